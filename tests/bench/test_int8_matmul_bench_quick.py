"""bench/int8_matmul.py runs end to end in its --quick size, so it never rots (BENCH.md).

Targets are never asserted here: a benchmark reports, the docs record the full tables.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "int8_matmul.py"
MATMULS = ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj", "lm_head"]


def test_quick_run_times_every_frozen_matmul_both_ways(
    run_quick_on_tiny: Callable[..., Any],
) -> None:
    proc, doc = run_quick_on_tiny(SCRIPT)
    assert doc["bench"] == "int8_matmul"
    assert doc["kernel"] in ("int_mm", "fbgemm")
    names = [row["name"] for row in doc["rows"]]
    assert names == [f"{m}/{d}" for m in MATMULS for d in ("forward", "grad-input")]
    for row in doc["rows"]:
        for key in ("fp32_ms", "int8_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, row
            assert row[f"{key}_min"] <= row[key] <= row[f"{key}_max"], row
    step = doc["step_ms"]
    # int8 where faster can only take less matmul time than either fixed choice
    assert step["best"] <= min(step["fp32"], step["int8_fp32_today"]) + 1e-9
    assert doc["ratios"]["int8_best_vs_fp32"] >= doc["ratios"]["int8_fp32_today_vs_fp32"] - 1e-9
    assert "CPU class:" in proc.stdout and "ceiling for the matmul part" in proc.stdout


def test_bad_threads_is_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--threads", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "--threads must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
