"""The device profile: detection, the measured choice behind ``auto``, its cache, the CLI."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorafleet.client.cli import main
from lorafleet.client.device import (
    choose_precision,
    default_threads,
    detect_cpu,
    device_profile,
    forget_profiles,
    limit_threads,
    physical_cores,
    profile_key,
)
from lorafleet.client.runtime import PLANS, base_dtype, resolve_precision

CPU = torch.device("cpu")
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

_BASE_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2"
_AVX512 = f"{_BASE_FLAGS} avx512f avx512dq avx512bw avx512vl avx512_vnni"


def _cpuinfo(flags: str, *, cores: int = 2, threads_per_core: int = 1) -> str:
    blocks = []
    for cpu in range(cores * threads_per_core):
        blocks.append(
            f"processor\t: {cpu}\nmodel name\t: Test CPU\nphysical id\t: 0\n"
            f"core id\t\t: {cpu // threads_per_core}\nflags\t\t: {flags}\n"
        )
    return "\n".join(blocks)


@pytest.fixture
def fresh_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private cache root and no profile in memory, before and after."""
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    forget_profiles()
    threads = torch.get_num_threads()
    yield tmp_path / "cache"
    forget_profiles()
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("flags", "env", "isa_class", "native_bf16"),
    [
        (_BASE_FLAGS, {}, "AVX2", False),
        (_AVX512, {}, "AVX-512", False),
        (f"{_AVX512} avx512_bf16", {}, "AVX-512-BF16", True),
        (f"{_AVX512} avx512_bf16 amx_tile amx_bf16 amx_int8", {}, "AMX", True),
        (f"{_AVX512} avx512_bf16 amx_tile amx_bf16", AVX2_ONLY, "AVX2", False),
        # fbgemm's own variable (the benchmarks' --isa avx2 sets it) is recorded as well
        (
            f"{_AVX512} avx512_bf16 avx512_vnni",
            {**AVX2_ONLY, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
            "AVX2",
            False,
        ),
        (f"{_AVX512} avx512_bf16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "AVX-512", False),
        ("fpu sse sse2", {}, "x86-64", False),
    ],
)
def test_x86_class_follows_the_flags_capped_by_the_isa_restriction(
    flags: str, env: dict[str, str], isa_class: str, native_bf16: bool
) -> None:
    # Execute: torch's capability as an AVX-512 host reports it, whatever runs the test
    cpu = detect_cpu(cpuinfo=_cpuinfo(flags), env=env, arch="x86_64", torch_capability="AVX512")

    # Assert
    assert cpu.isa_class == isa_class
    assert cpu.native_bf16 is native_bf16
    assert cpu.model == "Test CPU"
    assert cpu.isa_restriction == " ".join(f"{k}={v}" for k, v in env.items())


def test_fbgemms_restriction_alone_gets_a_profile_of_its_own() -> None:
    # Arrange: fbgemm's int8 kernels change speed under FBGEMM_ENABLE_INSTRUCTIONS even
    # where torch and oneDNN are not restricted, so a cached probe must not be reused
    flags = f"{_AVX512} avx512_bf16 avx512_vnni"
    plain = detect_cpu(cpuinfo=_cpuinfo(flags), env={}, arch="x86_64", torch_capability="AVX512")
    held = detect_cpu(
        cpuinfo=_cpuinfo(flags),
        env={"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
        arch="x86_64",
        torch_capability="AVX512",
    )

    # Execute
    keys = [profile_key(cpu, "2.13.0", 2, (512, 576, 1536)) for cpu in (plain, held)]

    # Assert: the class is the chip's (torch and oneDNN are free), the key is not shared
    assert held.isa_class == plain.isa_class == "AVX-512-BF16"
    assert held.isa_restriction == "FBGEMM_ENABLE_INSTRUCTIONS=AVX2"
    assert keys[0] != keys[1]


@pytest.mark.parametrize(
    ("env", "native_int8"),
    [({}, True), ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}, True), (AVX2_ONLY, False)],
)
def test_avx_vnni_counts_unless_onednn_is_capped_at_plain_avx2(
    env: dict[str, str], native_int8: bool
) -> None:
    # Arrange: an AVX2-class client CPU with AVX-VNNI (Alder Lake and later), and an AMX
    # server part that has it too; under the AVX2 restriction neither may use it.
    for flags in (f"{_BASE_FLAGS} avx_vnni", f"{_AVX512} avx512_bf16 amx_tile amx_bf16 avx_vnni"):
        # Execute
        cpu = detect_cpu(cpuinfo=_cpuinfo(flags), env=env, arch="x86_64", torch_capability="AVX512")

        # Assert
        assert cpu.native_int8 is native_int8, (flags, env)


@pytest.mark.parametrize(
    ("features", "isa_class", "native_bf16"),
    [("fp asimd asimddp", "ARM", False), ("fp asimd asimddp i8mm bf16", "ARM-BF16", True)],
)
def test_arm_class_comes_from_the_bf16_feature(
    features: str, isa_class: str, native_bf16: bool
) -> None:
    # Prepare: aarch64 kernels name no core ids
    text = f"processor\t: 0\nFeatures\t: {features}\nCPU part\t: 0xd0c\n"

    # Execute
    cpu = detect_cpu(cpuinfo=text, env={}, arch="aarch64")

    # Assert
    assert (cpu.isa_class, cpu.native_bf16, cpu.native_int8) == (isa_class, native_bf16, True)


def test_hyperthreads_do_not_count_as_cores() -> None:
    # Prepare: 2 cores x 2 threads
    text = _cpuinfo(_BASE_FLAGS, cores=2, threads_per_core=2)

    # Execute / Assert
    assert physical_cores(text, {0, 1, 2, 3}) == 2
    assert physical_cores(text, {0, 1}) == 1  # affinity to one core's two threads


_BF16 = f"{_AVX512} avx512_bf16"


@pytest.mark.parametrize(
    ("flags", "ms", "choice", "why"),
    [
        # AVX2: bf16 emulated; int8 only where it clearly beats fp32
        (
            _BASE_FLAGS,
            (17, 745, 30, 12),
            "int8-fp32",
            "AVX2 CPU without native bf16 (bf16 matmul 44x",
        ),
        (_BASE_FLAGS, (17, 745, 30, 16), "fp32-lean", "int8 matmul only 1.1x faster than fp32"),
        (_BASE_FLAGS, (17, 745, 30, 40), "fp32-lean", "int8 matmul 2.4x slower than fp32"),
        (_BASE_FLAGS, (17, 8, 4, 40), "fp32-lean", "bf16 matmul 2.1x faster, but emulated"),
        # native bf16: the bf16 family, int8 against bf16 (its own activations)
        (_BF16, (20, 8, 4, 30), "int8", "native bf16 (bf16 matmul 2.5x faster than fp32); int8"),
        (_BF16, (20, 8, 9, 3), "bf16-lean", "int8 matmul 1.1x slower than bf16"),
        (_BF16, (8, 20, 4, 30), "fp32-lean", "native bf16, but bf16 matmul 2.5x the fp32 time"),
    ],
)
def test_auto_picks_the_fastest_lean_path_and_bf16_only_where_native_and_faster(
    flags: str, ms: tuple[float, float, float, float], choice: str, why: str
) -> None:
    # Prepare
    cpu = detect_cpu(cpuinfo=_cpuinfo(flags), env={}, arch="x86_64", torch_capability="AVX512")
    timings = dict(zip(("fp32", "bf16", "int8", "int8-fp32"), ms, strict=True))

    # Execute
    chosen, reason = choose_precision(cpu, timings)

    # Assert
    assert chosen == choice
    assert why in reason
    if not cpu.native_bf16:  # nothing bf16 anywhere: neither the base nor autocast
        assert PLANS[chosen].base_dtype == torch.float32 and not PLANS[chosen].autocast


@pytest.mark.skipif(not X86, reason="the AVX2 restriction is an x86 kernel setting")
def test_auto_never_resolves_to_bf16_under_the_avx2_restriction(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a child process, because torch reads the restriction when it starts
    script = (
        "import logging, sys, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from lorafleet.client import PersonalModel\n"
        "from lorafleet.client.runtime import PLANS, base_dtype, resolve_precision\n"
        "cpu = torch.device('cpu')\n"
        "from lorafleet.client.train import LocalTrainer, TrainConfig\n"
        "print(resolve_precision('auto', cpu), base_dtype('auto', cpu))\n"
        "print(resolve_precision('bf16', cpu))\n"
        "pm = PersonalModel.open(sys.argv[2], base=sys.argv[1], device='cpu')\n"
        "print(pm.precision, next(pm.model.parameters()).dtype)\n"
        "fast = LocalTrainer(pm.model, TrainConfig(precision='auto'))._fast\n"
        "print(fast.config.compute_dtype)\n"
    )
    env = {**os.environ, **AVX2_ONLY, "LORAFLEET_CACHE": str(tmp_path / "cache")}

    # Execute
    run = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir), str(tmp_path / "p")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    # Assert: an fp32-family lean path (the SDK loads the base in fp32 too, and the lean
    # forward computes in fp32), an explicit bf16 still wins, and one log line says why
    assert run.returncode == 0, run.stderr
    auto, explicit, opened, compute = run.stdout.splitlines()
    chosen = auto.split()[0]
    assert chosen in ("fp32-lean", "int8-fp32")
    assert auto == f"{chosen} torch.float32"
    assert explicit == "bf16"
    assert opened == f"{chosen} torch.float32"
    assert compute == "torch.float32"
    said = [line for line in run.stderr.splitlines() if line.startswith("precision auto")]
    assert len(said) == 1
    assert said[0].startswith(
        f"precision auto -> {chosen}: AVX2 CPU without native bf16 (bf16 matmul"
    )


def test_auto_on_the_cpu_is_the_profiles_choice_and_is_cached(fresh_profiles: Path) -> None:
    # Execute
    chosen = resolve_precision("auto", CPU)
    measured = device_profile()
    forget_profiles()
    cached = device_profile()

    # Assert
    assert chosen == measured.choice
    assert base_dtype("auto", CPU) == PLANS[chosen].base_dtype
    assert chosen in ("fp32-lean", "int8-fp32", "bf16-lean", "int8")
    assert not measured.from_cache and cached.from_cache
    assert cached.matmul_ms == measured.matmul_ms
    assert set(measured.matmul_ms) >= {"fp32", "bf16", "int8", "int8-fp32"}
    assert len(list((fresh_profiles / "device").glob("profile-*.json"))) == 1


def test_a_changed_key_or_a_corrupt_file_measures_again(fresh_profiles: Path) -> None:
    # Prepare
    first = device_profile()
    forget_profiles()
    (cache_file,) = (fresh_profiles / "device").glob("profile-*.json")

    # Execute: another thread count is another profile
    torch.set_num_threads(1)
    one_thread = device_profile()
    torch.set_num_threads(first.threads)
    forget_profiles()
    doc = json.loads(cache_file.read_text())
    doc["key"]["torch"] = "0.0.0"  # a file written by another torch version
    cache_file.write_text(json.dumps(doc))
    after_upgrade = device_profile()
    forget_profiles()
    cache_file.write_text("{not json")
    after_corruption = device_profile()

    # Assert
    assert one_thread.threads == 1 and not one_thread.from_cache
    assert not after_upgrade.from_cache
    assert not after_corruption.from_cache
    assert json.loads(cache_file.read_text())["key"] == first.key


def test_an_explicit_precision_wins_without_measuring(fresh_profiles: Path) -> None:
    # Execute
    chosen = [resolve_precision(p, CPU) for p in ("fp32", "bf16", "bf16-mixed", "int8")]

    # Assert
    assert chosen == ["fp32", "bf16", "bf16-mixed", "int8"]
    assert not (fresh_profiles / "device").exists()


def test_threads_default_to_omp_num_threads_and_are_only_lowered(
    fresh_profiles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: what Ray sets for a simulated client's CPU share
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)

    # Execute
    lowered = limit_threads()
    kept = limit_threads()

    # Assert
    assert default_threads() == 1
    assert lowered == kept == torch.get_num_threads() == 1


def test_device_command_prints_the_profile_and_json(
    fresh_profiles: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    assert main(["device", "--cache-dir", str(fresh_profiles)]) == 0
    text = capsys.readouterr().out
    forget_profiles()
    assert main(["device", "--json", "--cache-dir", str(fresh_profiles)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert main(["device", "--refresh", "--cache-dir", str(fresh_profiles)]) == 0
    refreshed = capsys.readouterr().out

    # Assert
    assert "isa class:" in text and "(measured now)" in text
    assert f"auto:       {doc['choice']}: {doc['reason']}" in text
    assert doc["from_cache"] is True
    assert doc["cpu"]["physical_cores"] >= 1
    assert set(doc["matmul_ms"]) >= {"fp32", "bf16"}
    assert doc["key"]["torch"] == torch.__version__
    assert "(measured now)" in refreshed
