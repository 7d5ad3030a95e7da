"""bench/registry_scale.py runs end to end in its --quick size and writes the BENCH.md layout.

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
SCRIPT = REPO / "bench" / "registry_scale.py"
QUERIES = ["latest_user_version", "get_version", "user_history", "users_page"]
RAW = "latest_user_version_raw_sqlite3"


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


def test_quick_run_reports_insert_rate_and_every_lookup(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "registry.json"

    # Execute
    proc = run_bench("--quick", "--no-progress", "--dir", str(tmp_path / "db"), "--json", str(out))

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["bench"] == "registry_scale"
    assert doc["machine"]["backend"] == "sqlite"
    assert doc["machine"]["server_version"].startswith("sqlite ")
    assert [row["name"] for row in doc["rows"]] == ["insert", *QUERIES, RAW, "report_round"]
    reports = doc["rows"].pop()
    assert reports["reports"] == 200 and reports["rounds"] == 3
    assert reports["round_ms_min"] <= reports["round_ms"] <= reports["round_ms_max"]
    assert positive(reports["round_ms_baseline"])
    assert positive(doc["ratios"]["report_round_ms_vs_baseline"])
    assert "record_reports" in proc.stdout
    insert = doc["rows"][0]
    assert insert["versions"] == 20_000 and insert["versions_baseline"] == 2_000
    assert insert["rows_per_s_min"] <= insert["rows_per_s"] <= insert["rows_per_s_max"]
    assert all(positive(insert[k]) for k in ("rows_per_s", "rows_per_s_baseline", "db_size_mb"))
    for row in doc["rows"][1:]:
        assert row["n"] == 200, row
        assert row["min_ms"] <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert all(positive(row[k]) for k in ("p50_ms", "p99_ms", "p50_ms_baseline")), row
    assert positive(doc["ratios"]["insert_rows_per_s_vs_baseline"])
    for key in ("p50_vs_baseline", "p99_vs_baseline"):
        assert set(doc["ratios"][key]) == {*QUERIES, RAW}
        assert all(positive(v) for v in doc["ratios"][key].values())
    assert set(doc["target"]) == {"users_page_p95_ms", "target_ms", "met"}
    for name in [*QUERIES, RAW]:
        assert name in proc.stdout
    assert positive(doc["ratios"]["latest_user_version_p99_vs_raw_sqlite3"])
    assert "target < 300 ms" in proc.stdout


def test_a_url_that_is_not_postgresql_is_one_clear_line() -> None:
    # Execute
    proc = run_bench("--quick", "--url", "mysql://root:hunter2@db/x", timeout=120)

    # Assert
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "PostgreSQL" in last
    assert "hunter2" not in proc.stderr
    assert "Traceback" not in proc.stderr
