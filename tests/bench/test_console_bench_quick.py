"""bench/console.py runs end to end in its --quick size and writes the BENCH.md layout.

Targets are never asserted here: a benchmark reports, the docs record the full tables.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "console.py"
PAGES = ["users_page", "users_search", "user_detail"]


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_run_times_every_page_on_both_consoles(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "console.json"

    # Execute
    proc = run_bench(
        "--quick", "--no-progress", "--dir", str(tmp_path / "dirs"), "--json", str(out)
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["bench"] == "console"
    assert [row["name"] for row in doc["rows"]] == PAGES
    for row in doc["rows"]:
        assert row["n"] == 40 and row["adapters"] == 5000 and row["adapters_baseline"] == 500
        assert row["min_ms"] <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert all(positive(row[k]) for k in ("p50_ms", "p95_ms", "p50_ms_baseline")), row
    for key in ("p50_vs_baseline", "p95_vs_baseline"):
        assert set(doc["ratios"][key]) == set(PAGES)
    assert set(doc["target"]) == {"users_page_p95_ms", "target_ms", "met"}
    assert "target < 300 ms" in proc.stdout


def test_a_registry_too_small_to_page_is_one_clear_line() -> None:
    # Execute
    proc = run_bench("--quick", "--adapters", "10", timeout=120)

    # Assert
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --adapters must be at least 100, got 10"
    assert "Traceback" not in proc.stderr
