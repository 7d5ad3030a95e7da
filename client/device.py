"""The device profile: what this CPU computes fast, measured once and cached per machine.

Personal devices are mixed. A bf16 matmul is about 2x faster than fp32 on a CPU with
native bf16 (AVX-512-BF16, AMX, ARM bf16), and 40-70x *slower* on one without (every
AVX2-only x86 laptop, Apple M1): there torch emulates bf16 element by element. So
``precision="auto"`` must not assume; it asks this module, which

1. **detects** the CPU: its ISA class after the environment's restrictions
   (``ATEN_CPU_CAPABILITY`` as torch reports it, ``ONEDNN_MAX_CPU_ISA``), its model name,
   its physical cores (hyperthreads don't add matmul throughput), and torch's version;
2. **measures** one frozen-base-sized matmul (512 tokens x 576 -> 1536, SmolLM2-135M's
   MLP at batch 4 x 128) in fp32, bf16, and int8 (the kernel of
   :mod:`lorafleet.client.qtrain`, fed bf16 as ``int8`` trains and fp32 as
   ``int8-fp32`` does), a few repetitions on one thread within a small time budget;
3. **chooses** a lean training path (:func:`choose_precision`): the bf16 family
   (``bf16-lean``, or ``int8``) when the CPU has native bf16 *and* bf16 measured faster
   than fp32, else the fp32 family (``fp32-lean``, or ``int8-fp32``); within a family
   int8 only where its kernel measured clearly faster than the float one.

The profile is cached under ``<cache root>/device/`` in a file named by its key (CPU
model and class, ISA restriction, torch version, threads, probe shape), so a change of
any of them measures again, and kept in memory for the rest of the process.

Examples
--------
>>> profile = device_profile()  # doctest: +SKIP
>>> profile.choice, profile.reason  # doctest: +SKIP
('int8-fp32', 'AVX2 CPU without native bf16 (bf16 matmul 44x slower than fp32); int8 ...')
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lorafleet.client.layout import cache_root, keyed_cache_file
from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.errors import StorageError

__all__ = [
    "PROBE_SHAPE",
    "PROBE_THREADS",
    "CpuInfo",
    "DeviceProfile",
    "choose_precision",
    "default_threads",
    "detect_cpu",
    "device_profile",
    "forget_profiles",
    "limit_threads",
    "measure_matmuls",
    "this_cpu",
]

log = logging.getLogger(__name__)

IsaClass = Literal["AMX", "AVX-512-BF16", "AVX-512", "AVX2", "x86-64", "ARM-BF16", "ARM", "other"]
ChosenPrecision = Literal["fp32-lean", "int8-fp32", "bf16-lean", "int8"]
CHOICES: tuple[str, ...] = ("fp32-lean", "int8-fp32", "bf16-lean", "int8")

PROBE_SHAPE = (512, 576, 1536)
"""(tokens, in, out) of the probe matmul: SmolLM2-135M's gate/up projection at 4 x 128."""
PROBE_VERSION = 3
"""Bumped when the probe changes, so cached profiles from an older probe are re-measured."""
PROBE_THREADS = 1
"""The probe runs on one thread: the choice needs the ratio between dtypes, which one core
measures as well as all of them, and a one-thread matmul is not stalled at a barrier by
another process holding a core. On the shared 2-core development machine two-thread
probes of the int8 kernel varied 20x from run to run, one-thread probes by a few %."""
_BUDGET_S = 0.25  # per dtype, after a warm-up call; a slow dtype stops at its warm-up
_REPS = 5
_PROFILE_DIR = "device"

# x86 classes from lowest to highest; a restriction caps the hardware's class.
_X86_RANK: dict[str, int] = {"x86-64": 0, "AVX2": 1, "AVX-512": 2, "AVX-512-BF16": 3, "AMX": 4}
_ONEDNN_CAP: dict[str, str] = {  # ONEDNN_MAX_CPU_ISA value -> highest class it allows
    "SSE41": "x86-64",
    "AVX": "x86-64",
    "AVX2": "AVX2",
    "AVX2_VNNI": "AVX2",
    "AVX2_VNNI_2": "AVX2",
    "AVX512_CORE": "AVX-512",
    "AVX512_CORE_VNNI": "AVX-512",
    "AVX512_CORE_BF16": "AVX-512-BF16",
    "AVX512_CORE_FP16": "AVX-512-BF16",
    "AVX10_1_512": "AVX-512-BF16",
}
_ATEN_CAP: dict[str, str] = {"DEFAULT": "x86-64", "NO AVX": "x86-64", "AVX2": "AVX2"}
_FLAGS_REPORTED = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
    # aarch64 /proc/cpuinfo "Features" and macOS FEAT_* names, lower-cased
    "asimd",
    "asimddp",
    "bf16",
    "i8mm",
    "sve",
)
_RESTRICTION_VARS = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    # fbgemm (int8-fp32's kernel) reads neither variable above and picks its VNNI kernels
    # on a CPU that has them; only this one holds it to AVX2 (FBGEMM's own name).
    "FBGEMM_ENABLE_INSTRUCTIONS",
)


@dataclass(frozen=True)
class CpuInfo:
    """What this process's CPU can do, after the environment's ISA restrictions."""

    arch: str
    model: str
    isa_class: IsaClass = field(metadata={"help": "effective class, restrictions applied"})
    hardware_class: IsaClass = field(metadata={"help": "what the silicon offers"})
    native_bf16: bool = field(metadata={"help": "bf16 arithmetic in hardware, usable here"})
    native_int8: bool = field(metadata={"help": "int8 dot products (VNNI, AMX, i8mm, dotprod)"})
    flags: tuple[str, ...]
    torch_capability: str
    physical_cores: int
    logical_cpus: int
    isa_restriction: str = field(metadata={"help": "e.g. 'ONEDNN_MAX_CPU_ISA=AVX2'; '' if none"})


@dataclass(frozen=True)
class DeviceProfile:
    """A CPU's measured matmul speeds per dtype and the precision ``auto`` picks from them."""

    cpu: CpuInfo
    torch_version: str
    threads: int = field(metadata={"help": "torch threads for training (the probe uses one)"})
    shape: tuple[int, int, int]
    matmul_ms: Mapping[str, float]
    choice: ChosenPrecision
    reason: str
    measured_at: str
    from_cache: bool = False

    @property
    def key(self) -> dict[str, Any]:
        """What the measurement depends on; a change of any of it measures again."""
        return profile_key(self.cpu, self.torch_version, self.threads, self.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``lorafleet device --json`` and the cache file)."""
        doc = asdict(self)
        doc["matmul_ms"] = dict(self.matmul_ms)
        doc["key"] = self.key
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DeviceProfile:
        """Inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError on a bad doc."""
        cpu = dict(doc["cpu"])
        cpu["flags"] = tuple(cpu["flags"])
        choice = doc["choice"]
        if choice not in CHOICES:
            raise ValueError(f"unknown choice {choice!r}")
        return cls(
            cpu=CpuInfo(**cpu),
            torch_version=str(doc["torch_version"]),
            threads=int(doc["threads"]),
            shape=(int(doc["shape"][0]), int(doc["shape"][1]), int(doc["shape"][2])),
            matmul_ms={str(k): float(v) for k, v in doc["matmul_ms"].items()},
            choice=choice,
            reason=str(doc["reason"]),
            measured_at=str(doc["measured_at"]),
        )

    def _dtypes(self) -> list[str]:
        order = ("fp32", "bf16", "int8", "int8-fp32")
        return [k for k in order if k in self.matmul_ms] + sorted(
            k for k in self.matmul_ms if k not in order
        )

    def summary(self) -> str:
        """A few readable lines: class, model, cores, ms per dtype, the choice and why."""
        c = self.cpu
        restricted = f" (restricted by {c.isa_restriction})" if c.isa_restriction else ""
        lines = [
            f"cpu:        {c.model} [{c.arch}]",
            f"isa class:  {c.isa_class}{restricted}; hardware {c.hardware_class}",
            f"native:     bf16 {'yes' if c.native_bf16 else 'no'}, "
            f"int8 dot products {'yes' if c.native_int8 else 'no'}",
            f"cores:      {c.physical_cores} physical, {c.logical_cpus} logical usable; "
            f"torch threads {self.threads}",
            f"torch:      {self.torch_version} (kernels: {c.torch_capability})",
            "matmul:     {}x{}x{}, one thread: ".format(*self.shape)
            + ", ".join(f"{k} {self.matmul_ms[k]:.2f} ms" for k in self._dtypes())
            + (" (cached)" if self.from_cache else " (measured now)"),
            f"auto:       {self.choice}: {self.reason}",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- detection


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _sysctl(name: str) -> str:
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    for chunk in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def physical_cores(cpuinfo: str, usable: set[int]) -> int:
    """Distinct (package, core) pairs among the usable logical CPUs.

    Hyperthreads share one core's vector units, so a matmul gains nothing from them;
    where /proc/cpuinfo names no core ids (most ARM kernels), every usable CPU counts.
    """
    cores: set[tuple[str, str]] = set()
    for block in _cpuinfo_blocks(cpuinfo):
        if "processor" not in block or "core id" not in block:
            continue
        try:
            cpu = int(block["processor"])
        except ValueError:
            continue
        if cpu in usable:
            cores.add((block.get("physical id", "0"), block["core id"]))
    return len(cores) if cores else len(usable)


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity
        return set(range(os.cpu_count() or 1))


def _isa_restriction(env: Mapping[str, str]) -> str:
    return " ".join(f"{name}={env[name]}" for name in _RESTRICTION_VARS if env.get(name))


def _x86_class(flags: set[str]) -> IsaClass:
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512-BF16"
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "x86-64"


def _onednn_isa(env: Mapping[str, str]) -> str:
    """The ISA oneDNN is capped at by the environment, upper case; '' when uncapped."""
    return (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").upper()


def _cap_x86(hardware: IsaClass, torch_capability: str, env: Mapping[str, str]) -> IsaClass:
    """The hardware class capped by what torch's ATen kernels and oneDNN are allowed."""
    caps: list[str] = [hardware]
    aten = _ATEN_CAP.get(torch_capability.upper())
    if aten is not None:
        caps.append(aten)
    onednn = _onednn_isa(env)
    if onednn in _ONEDNN_CAP:
        caps.append(_ONEDNN_CAP[onednn])
    elif onednn not in ("", "ALL", "DEFAULT") and not onednn.startswith(
        ("AVX512_CORE_AMX", "AVX10_1_512_AMX")
    ):
        log.debug("ONEDNN_MAX_CPU_ISA=%s not recognised; treated as no restriction", onednn)
    lowest = min(caps, key=lambda c: _X86_RANK[c])
    return lowest  # type: ignore[return-value]


def detect_cpu(
    *,
    cpuinfo: str | None = None,
    env: Mapping[str, str] | None = None,
    arch: str | None = None,
    torch_capability: str | None = None,
) -> CpuInfo:
    """Detect this CPU: ISA class (restrictions applied), model, cores, native dtypes.

    ``cpuinfo``, ``env``, ``arch`` and ``torch_capability`` default to ``/proc/cpuinfo``,
    ``os.environ``, ``platform.machine()`` and this process's torch kernel capability;
    passing them describes another machine (an AVX2 host's torch reports ``AVX2`` and
    would cap any described class to it).
    """
    env = os.environ if env is None else env
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    blocks = _cpuinfo_blocks(text)
    first = blocks[0] if blocks else {}
    flags = set((first.get("flags") or first.get("features") or "").lower().split())
    arch = (arch or platform.machine()).lower() or "unknown"
    model = first.get("model name") or first.get("hardware") or ""
    if torch_capability is None:
        torch_capability = str(torch.backends.cpu.get_cpu_capability())
    usable = _usable_cpus()
    if platform.system() == "Darwin" and cpuinfo is None:
        model = _sysctl("machdep.cpu.brand_string")
        for feat in ("FEAT_BF16", "FEAT_I8MM", "FEAT_DotProd"):
            if _sysctl(f"hw.optional.arm.{feat}") == "1":
                flags.add({"FEAT_DotProd": "asimddp"}.get(feat, feat[5:].lower()))
    hardware: IsaClass
    if arch in ("x86_64", "amd64", "i686", "i386"):
        hardware = _x86_class(flags)
        effective = _cap_x86(hardware, torch_capability, env)
        native_bf16 = _X86_RANK[effective] >= _X86_RANK["AVX-512-BF16"]
        # AVX-VNNI is AVX2-width, so an AVX2-class CPU may have it; but oneDNN capped at
        # plain AVX2 (or lower) is not allowed to use it, which is how the AVX2 restriction
        # makes any x86 CPU compute as one without int8 dot products.
        vnni_allowed = _onednn_isa(env) not in ("SSE41", "AVX", "AVX2")
        native_int8 = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) and (
            _X86_RANK[effective] >= _X86_RANK["AVX-512"] or ("avx_vnni" in flags and vnni_allowed)
        )
    elif arch in ("aarch64", "arm64"):
        hardware = "ARM-BF16" if "bf16" in flags else "ARM"
        effective, native_bf16 = hardware, "bf16" in flags
        native_int8 = bool({"i8mm", "asimddp"} & flags)
    else:
        hardware = effective = "other"
        native_bf16 = native_int8 = False
    return CpuInfo(
        arch=arch,
        model=model or platform.processor() or arch,
        isa_class=effective,
        hardware_class=hardware,
        native_bf16=native_bf16,
        native_int8=native_int8,
        flags=tuple(f for f in _FLAGS_REPORTED if f in flags),
        torch_capability=torch_capability,
        physical_cores=physical_cores(text, usable),
        logical_cpus=len(usable),
        isa_restriction=_isa_restriction(env),
    )


# --------------------------------------------------------------------------- threads


def default_threads(cpu: CpuInfo | None = None) -> int:
    """Torch threads for one training process: the physical cores it may use.

    ``OMP_NUM_THREADS`` wins when set: Ray sets it to each simulated client's CPU share,
    so concurrent clients split the cores instead of each taking all of them.
    """
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    info = cpu or detect_cpu()
    return max(1, min(info.physical_cores, info.logical_cpus))


def limit_threads(cpu: CpuInfo | None = None) -> int:
    """Lower torch's threads to :func:`default_threads` if it counts more; returns the count.

    Only ever lowers: a caller who set fewer threads (a benchmark, a simulation's share)
    keeps them, while a torch build that counts hyperthreads as cores (OpenMP without
    MKL, most ARM builds) stops oversubscribing the vector units.
    """
    current = torch.get_num_threads()
    wanted = default_threads(cpu)
    if current > wanted:
        log.info("torch threads %d -> %d (physical cores usable here)", current, wanted)
        torch.set_num_threads(wanted)
        return wanted
    return current


# --------------------------------------------------------------------------- measurement


def _time_ms(fn: Callable[[], object], budget_s: float = _BUDGET_S, reps: int = _REPS) -> float:
    """Fastest of a few calls after a warm-up, in ms.

    A dtype slower than the budget is timed by its warm-up alone (it has lost by then,
    and a second call would cost more). The minimum, not the median: other processes
    only ever add time.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first >= budget_s / 2:
        return first * 1000.0
    times: list[float] = []
    while len(times) < reps and first + sum(times) < budget_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000.0


def measure_matmuls(
    shape: tuple[int, int, int] = PROBE_SHAPE, *, threads: int = PROBE_THREADS
) -> dict[str, float]:
    """Milliseconds of one ``x @ W.T`` of ``shape`` (tokens, in, out) per training dtype.

    fp32 and bf16 through ``F.linear`` (what the base's Linear layers run); ``int8`` and
    ``int8-fp32`` through the int8 training path's own kernel for this CPU (per-token
    activation scales; ``torch._int_mm`` with VNNI/AMX, fbgemm without,
    :func:`lorafleet.client.int8mm.int8_linear`) with bf16 and fp32 activations, as the
    ``int8`` and ``int8-fp32`` precisions feed it. Runs on ``threads`` torch threads and
    restores the caller's count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(shape)
    finally:
        torch.set_num_threads(before)


def _measure(shape: tuple[int, int, int]) -> dict[str, float]:
    tokens, d_in, d_out = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen)  # (T, in)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5  # (out, in)
    ms: dict[str, float] = {}
    with torch.no_grad():
        ms["fp32"] = _time_ms(lambda: F.linear(x, w))
        xb, wb = x.bfloat16(), w.bfloat16()
        ms["bf16"] = _time_ms(lambda: F.linear(xb, wb))
        try:
            from lorafleet.client.int8mm import default_kernel, int8_linear, quantize_weight

            wq = quantize_weight(w, default_kernel(this_cpu().native_int8))
            ms["int8"] = _time_ms(lambda: int8_linear(xb, wq))
            ms["int8-fp32"] = _time_ms(lambda: int8_linear(x, wq))
        except (RuntimeError, ImportError) as exc:  # no int8 kernel in this torch build
            log.debug("int8 probe skipped: %s", exc)
    return ms


def _ratio(a: float, b: float) -> str:
    r = a / b
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


INT8_MARGIN = 0.85
"""int8 is chosen only where its probe takes at most this share of the float one: it
costs a little held-out loss (+0.2% on SmolLM2-135M), and the probe times the forward
matmul alone, while a step also quantizes the output gradient for the backward one."""


def _float_family(cpu: CpuInfo, fp32: float, bf16: float | None) -> tuple[bool, str]:
    """Whether the bf16 family is usable here, and the words that say why (or why not)."""
    if not cpu.native_bf16:
        if bf16 is None:
            return False, f"{cpu.isa_class} CPU without native bf16"
        if bf16 >= fp32:
            detail = f"bf16 matmul {_ratio(bf16, fp32)} slower than fp32"
        else:
            detail = f"bf16 matmul {_ratio(fp32, bf16)} faster, but emulated"
        return False, f"{cpu.isa_class} CPU without native bf16 ({detail})"
    if bf16 is not None and bf16 < fp32:
        return True, (
            f"{cpu.isa_class} CPU with native bf16 (bf16 matmul {_ratio(fp32, bf16)} faster "
            "than fp32)"
        )
    detail = "not measured" if bf16 is None else f"{_ratio(bf16, fp32)} the fp32 time"
    return False, f"{cpu.isa_class} CPU with native bf16, but bf16 matmul {detail}"


def choose_precision(cpu: CpuInfo, matmul_ms: Mapping[str, float]) -> tuple[ChosenPrecision, str]:
    """``auto``'s CPU precision and the reason, from the detected CPU and its timings.

    Always a lean training path (:mod:`lorafleet.client.qtrain`'s forward: fused
    projections, eager attention, chunked lm_head + cross-entropy), which measured
    faster than the model's own forward at every dtype (docs/benchmarks.md); a base it
    cannot run falls back to the same dtype's peft forward.

    The family comes first: bf16 only where the CPU has native bf16 *and* it measured
    faster than fp32 (a fast fp32 probe on a native CPU can happen under contention; a
    fast bf16 probe without native bf16 cannot be trusted to hold for a whole step, whose
    element-wise work is emulated too). Then int8 within that family only where its
    kernel, fed that family's activations, took at most :data:`INT8_MARGIN` of the float
    matmul's time: without VNNI the int8 kernel can lose to fp32, and then int8 would be
    slower *and* less exact.
    """
    fp32, bf16 = matmul_ms["fp32"], matmul_ms.get("bf16")
    use_bf16, reason = _float_family(cpu, fp32, bf16)
    float_path: ChosenPrecision = "bf16-lean" if use_bf16 else "fp32-lean"
    int8_path: ChosenPrecision = "int8" if use_bf16 else "int8-fp32"
    float_ms = bf16 if use_bf16 and bf16 is not None else fp32
    int8_ms = matmul_ms.get(int8_path)
    float_name = "bf16" if use_bf16 else "fp32"
    if int8_ms is None:
        return float_path, f"{reason}; int8 not measured"
    if int8_ms <= INT8_MARGIN * float_ms:
        return (
            int8_path,
            f"{reason}; int8 matmul {_ratio(float_ms, int8_ms)} faster than {float_name}",
        )
    verdict = (
        f"{_ratio(int8_ms, float_ms)} slower than {float_name}"
        if int8_ms >= float_ms
        else f"only {_ratio(float_ms, int8_ms)} faster than {float_name}"
    )
    return float_path, f"{reason}; int8 matmul {verdict}"


# --------------------------------------------------------------------------- the profile


def profile_key(
    cpu: CpuInfo, torch_version: str, threads: int, shape: tuple[int, int, int]
) -> dict[str, Any]:
    """The fields a cached profile must match to be reused."""
    return {
        "probe": PROBE_VERSION,
        "cpu_model": cpu.model,
        "arch": cpu.arch,
        "isa_class": cpu.isa_class,
        "isa_restriction": cpu.isa_restriction,
        "torch": torch_version,
        "threads": threads,
        "shape": list(shape),
    }


def _load(path: Path, key: Mapping[str, Any]) -> DeviceProfile | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("key") != key:
            return None
        return DeviceProfile.from_dict(doc)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("device profile %s unreadable (%s); measuring again", path, exc)
        return None


_MEMO: dict[str, DeviceProfile] = {}
_DETECTED: dict[tuple[str, frozenset[int]], CpuInfo] = {}


def this_cpu() -> CpuInfo:
    """Return :func:`detect_cpu` once per process, per ISA restriction and affinity.

    ``auto`` is resolved on every training step, and /proc/cpuinfo is long on a
    many-core machine.
    """
    key = (_isa_restriction(os.environ), frozenset(_usable_cpus()))
    if key not in _DETECTED:
        _DETECTED[key] = detect_cpu()
    return _DETECTED[key]


def forget_profiles() -> None:
    """Drop the profiles kept in memory; the next :func:`device_profile` reads the cache.

    For tests, and for a long-lived process that wants to see a refreshed cache file.
    """
    _MEMO.clear()


def device_profile(
    *,
    cache_dir: Path | None = None,
    refresh: bool = False,
    shape: tuple[int, int, int] = PROBE_SHAPE,
) -> DeviceProfile:
    """Return this machine's profile: from memory, else the cache file, else measured (< ~1 s).

    ``refresh`` measures again and rewrites the cache. An unwritable cache only costs a
    measurement per process; it is never an error.
    """
    cpu = this_cpu()
    threads = limit_threads(cpu)
    version = str(torch.__version__)
    key = profile_key(cpu, version, threads, shape)
    folder = cache_root(cache_dir) / _PROFILE_DIR
    path = keyed_cache_file(folder, "profile-", key)
    memo_key = f"{folder}|{path.name}"
    if not refresh:
        if memo_key in _MEMO:
            return _MEMO[memo_key]
        cached = _load(path, key)
        if cached is not None:
            profile = replace(cached, cpu=cpu, from_cache=True)
            _MEMO[memo_key] = profile
            return profile
    ms = measure_matmuls(shape)
    choice, reason = choose_precision(cpu, ms)
    profile = DeviceProfile(
        cpu=cpu,
        torch_version=version,
        threads=threads,
        shape=shape,
        matmul_ms=ms,
        choice=choice,
        reason=reason,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    try:
        doc = profile.to_dict()
        doc.pop("from_cache")
        atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    except StorageError as exc:
        log.warning("device profile not cached in %s (%s); it is measured per process", folder, exc)
    _MEMO[memo_key] = profile
    return profile
