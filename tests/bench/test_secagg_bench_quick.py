"""bench/secagg.py runs end to end in its --quick size and writes the BENCH.md layout.

Targets are never asserted here: a benchmark reports, the docs record the full tables.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "secagg.py"

# One Ray simulation with 3 devices, 2 x 3 rounds: about a minute on a shared 2-core machine.
pytestmark = pytest.mark.slow


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_run_times_plain_and_secure_rounds(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "secagg.json"

    # Execute
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    # Assert: both paths timed side by side, with bytes and accuracy
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["bench"] == "secagg"
    assert doc["machine"]["flwr"] and doc["machine"]["max_rss_mb"] > 0
    assert doc["size"]["quick"] is True and doc["size"]["values"] == 256
    rows = doc["rows"]
    assert [(r["path"], r["clients"]) for r in rows] == [("plain-fp16", 3), ("secagg+", 3)]
    plain, secure = rows
    assert plain["ratio_vs_baseline"] == 1.0
    for row in rows:
        assert row["seconds_min"] <= row["seconds"] <= row["seconds_max"], row
        assert row["repeats"] == 2 and positive(row["bytes_up_per_client"])
    # SecAgg+ is exact to its tolerance (plus the float32 prior's rounding, per round)
    bound = secure["tolerance"] + 4 * secure["prior_float32_ulp"]
    assert secure["max_abs_err_vs_exact_mean"] <= bound
    # uint32 masked values (4 bytes) plus keys and shares, against 2 bytes per fp16 value
    assert secure["bytes_up_per_client"] > plain["bytes_up_per_client"]
    assert (secure["num_shares"], secure["threshold"]) == (3, 3)  # 3 devices: all neighbours
    assert secure["growth_vs_nlogn"] == 1.0  # one size: its own reference
    assert set(doc["ratios"]["secagg_round_time_vs_plain"]) == {"3"}
    assert set(doc["ratios"]["secagg_time_growth_vs_nlogn"]) == {"3"}
    assert positive(doc["ratios"]["secagg_round_time_vs_plain"]["3"])
    assert "SecAgg+ vs plain" in proc.stdout
