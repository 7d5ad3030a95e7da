"""Helpers every benchmark under ``bench/`` shares, so all of them follow shared/BENCH.md.

A benchmark measures a baseline and lorafleet's paths side by side, reports medians with
min/max, and with ``--json PATH`` writes ``{"bench", "machine", "rows", "ratios"}``.
This module holds the pieces that must not drift between benchmarks: the machine
description, the statistics, the JSON layout, and peak-memory measurement (this
process's max RSS, or a child process's when one path's memory must be told apart).

Benchmarks import it as ``_common``: ``python bench/NAME.py`` puts ``bench/`` first on
``sys.path``. Running this file itself does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD_RESULT_PREFIX = "BENCH-CHILD-RESULT "
"""Marks the one stdout line a child process reports its result on (JSON after it)."""


@dataclass(frozen=True)
class Stats:
    """Median, min and max of repeated measurements; the median is what gets compared."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """Summarize ``values``; refuses an empty sequence (nothing was measured)."""
        if not values:
            raise ValueError("no measurements to summarize")
        return cls(
            median=float(statistics.median(values)),
            min=float(min(values)),
            max=float(max(values)),
            n=len(values),
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain-data form for JSON."""
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def ratio(value: float, reference: float) -> float:
    """``value / reference``; NaN when the reference is zero or not finite."""
    if reference == 0 or not math.isfinite(reference) or not math.isfinite(value):
        return float("nan")
    return value / reference


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                check=True,
                timeout=5,
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def machine_info(*, threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, library versions, threads used."""
    import torch

    from lorafleet.client.device import detect_cpu

    cpu = detect_cpu()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the class a figure holds for (BENCH.md), after the ISA restriction variables:
        # a child run under ONEDNN_MAX_CPU_ISA=AVX2 reports AVX2, not the chip's class
        "cpu_class": cpu.isa_class,
        "isa_restriction": cpu.isa_restriction,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``'s ``ru_maxrss``).

    On Linux a freshly started child inherits its parent's high-water mark in this
    figure (the kernel carries it across fork and exec), so a child measuring itself
    should use :func:`own_peak_rss_mb`.
    """
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return raw / (1024 * 1024) if sys.platform == "darwin" else raw / 1024


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process image alone, in MiB.

    Linux: ``VmHWM`` from ``/proc/self/status``, the high-water mark of this process's
    own address space, which starts afresh at exec. Elsewhere: :func:`max_rss_mb`.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return max_rss_mb()


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def report_child_result(result: Mapping[str, Any]) -> None:
    """Print a child's result on one marked stdout line for :func:`run_child` to parse."""
    print(CHILD_RESULT_PREFIX + json.dumps(dict(result), sort_keys=True), flush=True)


def run_child(argv: Sequence[str], *, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process and return the result it reported.

    The child must call :func:`report_child_result`; its other output is ignored, and a
    failure raises ``RuntimeError`` with the tail of its stderr.
    """
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_RESULT_PREFIX):
            parsed: dict[str, Any] = json.loads(line[len(CHILD_RESULT_PREFIX) :])
            return parsed
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"child {list(argv)} exited {proc.returncode} without a result:\n{tail}")


def write_json(
    path: str | os.PathLike[str],
    *,
    bench: str,
    machine: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    ratios: Mapping[str, Any],
    **extra: Any,
) -> None:
    """Write the result file BENCH.md specifies; NaN and infinities become ``null``."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    doc = {"bench": bench, "machine": machine, "rows": list(rows), "ratios": ratios, **extra}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(clean(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)


def run_main(run: Callable[[Any], int], args: Any, logger: logging.Logger) -> int:
    """Run a benchmark's ``run(args)`` the way every one should exit.

    Progress goes to stderr through ``logger``; a lorafleet error (a missing base, a bad
    flag value) is one ``error:`` line and exit status 2, never a traceback.
    """
    from lorafleet.protocols.errors import LorafleetError

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    try:
        return run(args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def flower_wire_bytes(record: Any) -> int:
    """Bytes Flower's transport pushes for ``record``: every nested object, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# --------------------------------------------------------------------------- CPU classes

ISAS = ("native", "avx2")
"""What ``--isa`` accepts: this CPU as it is, or restricted to AVX2 kernels."""
AVX2_ENV = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}
"""The restriction that makes any x86 CPU compute as an AVX2-only one (no AVX-512, no
native bf16, no VNNI) in torch's ATen kernels, oneDNN and fbgemm (the int8 kernel of
``int8-fp32``, which reads only its own variable: without it, a VNNI CPU runs its
VNNI kernels, about 2x faster than AVX2's). torch reads them when it starts, so they
only hold for a process started with them: hence a child process."""


def add_base_arguments(parser: Any) -> None:
    """``--base`` and ``--cache-dir``, as every benchmark on a base model takes them."""
    parser.add_argument(
        "--base", default="default", help="base model: 'default', a .gguf file or a model folder"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="lorafleet cache (default: lorafleet's own)"
    )


def require_positive(parser: Any, args: Any, *names: str) -> None:
    """One usage error for the first of ``names`` set below 1 (unset, None, is fine)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def add_isa_argument(parser: Any) -> None:
    """``--isa {native,avx2}`` on a benchmark's argument parser."""
    parser.add_argument(
        "--isa",
        choices=ISAS,
        default="native",
        help="CPU class to measure: this CPU as it is, or AVX2 kernels only (a child "
        "process under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 "
        "FBGEMM_ENABLE_INSTRUCTIONS=AVX2)",
    )


def rerun_under_isa(isa: str, script: str, argv: Sequence[str] | None) -> int | None:
    """Run ``script`` again in a child process restricted to ``isa``; None if already so.

    With ``--isa avx2`` in a process that does not carry the restriction yet, the whole
    benchmark runs again as a child with :data:`AVX2_ENV` set (same arguments, output
    passed through) and its exit status is returned. In that child, or with ``native``,
    this returns None and the caller measures in-process.
    """
    if isa != "avx2" or all(os.environ.get(k) == v for k, v in AVX2_ENV.items()):
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print("error: --isa avx2 restricts x86 kernels; this CPU is not x86", file=sys.stderr)
        return 2
    args = list(sys.argv[1:] if argv is None else argv)
    proc = subprocess.run(
        [sys.executable, script, *args], env={**os.environ, **AVX2_ENV}, check=False
    )
    return proc.returncode


def class_line(machine: Mapping[str, Any]) -> str:
    """One line naming the CPU class and model a table holds for (BENCH.md)."""
    restricted = machine.get("isa_restriction") or ""
    how = f", restricted by {restricted}" if restricted else ""
    return (
        f"CPU class: {machine.get('cpu_class')} ({machine.get('cpu_model')}{how}); "
        f"torch kernels {machine.get('cpu_capability')}, {machine.get('threads')} threads"
    )
