"""bench/generate.py runs end to end in its --quick size, so it never rots (BENCH.md).

Targets are never asserted here: a benchmark reports, the docs record the full tables.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import load_bench_script

REPO = Path(__file__).resolve().parents[2]
GENERATE = REPO / "bench" / "generate.py"
PATHS = ["peft-fp32", "peft-bf16", "onnx-fp32", "onnx-int8", "onnx-int4"]
QUICK_BATCHES = [1, 2]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def load_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_bench_script(monkeypatch, GENERATE, "bench_generate")


def assert_complete_result(doc: dict[str, Any]) -> None:
    assert doc["bench"] == "generate"
    assert doc["machine"]["threads"] == 2
    assert doc["machine"]["onnxruntime"]
    # bf16 is emulated without native bf16: that row is left out there
    paths = [p for p in PATHS if doc["machine"]["native_bf16"] or p != "peft-bf16"]
    names = [f"{p}/b{b}" for b in QUICK_BATCHES for p in paths]
    assert [row["name"] for row in doc["rows"]] == names
    for row in doc["rows"]:
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"], row
        assert 0.0 <= row["same_tokens_as_reference"] <= 1.0
        if row["path"].startswith("onnx-"):
            assert math.isfinite(row["gate_ce"]) and isinstance(row["gate_passed"], bool)
    speed = doc["ratios"]["tokens_per_s_vs_reference"]
    assert set(speed) == set(names)
    assert speed["peft-fp32/b1"] == 1.0 and speed["peft-fp32/b2"] == 1.0
    # The float32 ONNX graph greedily picks exactly what peft picks.
    assert (
        next(r for r in doc["rows"] if r["name"] == "onnx-fp32/b1")["same_tokens_as_reference"]
        == 1.0
    )
    assert doc["target"]["path"] == "onnx-int8"


def test_quick_run_reports_every_path_on_a_tiny_base(run_quick_on_tiny: Callable[..., Any]) -> None:
    # Execute
    proc, doc = run_quick_on_tiny(GENERATE)

    # Assert
    assert_complete_result(doc)
    assert "target >= 3x tokens/s" in proc.stdout
    assert "skipped (--quick)" in proc.stdout
    assert proc.stdout.startswith(f"CPU class: {doc['machine']['cpu_class']} (")
    for row in doc["rows"]:
        assert row["path"] in proc.stdout


@pytest.mark.skipif(not X86, reason="the AVX2 restriction is an x86 kernel setting")
def test_isa_avx2_names_the_class_and_what_onnx_runtime_ignores(
    run_quick_on_tiny: Callable[..., Any],
) -> None:
    # Execute
    proc, doc = run_quick_on_tiny(GENERATE, "--isa", "avx2")

    # Assert
    assert (doc["machine"]["cpu_class"], doc["machine"]["native_bf16"]) == ("AVX2", False)
    assert doc["settings"]["isa"] == "avx2"
    assert_complete_result(doc)
    assert proc.stdout.startswith("CPU class: AVX2 (")
    assert "ONNX Runtime does not read ONEDNN_MAX_CPU_ISA=AVX2" in proc.stdout


def test_onnx_child_reports_its_peak_rss_without_torch(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the inputs the full run hands its children.
    bench = load_bench(monkeypatch)
    args = argparse.Namespace(base=str(tiny_model_dir), cache_dir=tmp_path / "cache", threads=2)
    inputs, _ = bench.prepare(args, bench.QUICK)
    inputs.save(tmp_path)
    common = importlib.import_module("_common")

    # Execute
    result = common.run_child(
        [
            str(GENERATE),
            "--child",
            "onnx-int8",
            "--inputs",
            str(tmp_path),
            "--new-tokens",
            "4",
            "--base",
            str(tiny_model_dir),
        ],
        timeout_s=300,
    )

    # Assert: the ONNX path's memory is measured without PyTorch in the process.
    assert result["path"] == "onnx-int8"
    assert result["torch_imported"] is False
    assert 10 < result["peak_rss_mb"] < 100_000  # MiB, not KiB or bytes


def test_bad_base_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_bench("--quick", "--base", str(tmp_path / "missing"), timeout=120)

    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
