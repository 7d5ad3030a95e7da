"""bench/warm_device.py runs end to end in its --quick size and writes the BENCH.md layout.

Targets are never asserted here: a benchmark reports, the docs record the full tables.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "warm_device.py"

# Two real federations (SuperLink, SuperNodes, workers) take minutes on 2 cores.
pytestmark = pytest.mark.slow


def test_quick_run_reports_round_time_and_device_memory_per_mode(
    run_quick_on_tiny: Callable[..., Any],
) -> None:
    # Execute
    proc, doc = run_quick_on_tiny(SCRIPT, timeout=1200)

    # Assert: both modes, every round accepted, memory sampled, ratios against the baseline
    assert doc["bench"] == "warm_device" and doc["size"]["quick"] is True
    assert [r["name"] for r in doc["rows"]] == ["fresh-process", "device-worker"]
    for row in doc["rows"]:
        assert (row["nodes"], row["rounds"]) == (2, 2)
        assert len(row["round_seconds"]) == 2 and all(s > 0 for s in row["round_seconds"])
        assert row["device_rss_peak_mb"] > 0 and row["rss_series"]
    assert set(doc["ratios"]) == {
        "round_s_median",
        "later_rounds_s_median",
        "device_rss_peak",
        "device_rss_mean",
    }
    assert "ratios device-worker / fresh-process" in proc.stdout
