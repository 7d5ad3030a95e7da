"""bench/backup.py runs end to end in its --quick size and writes the BENCH.md layout.

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
SCRIPT = REPO / "bench" / "backup.py"
PATHS = ("disk_write", "seal_upload", "download_open", "seal", "open")


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_run_reports_each_path_against_an_fsyncd_disk_write(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "backup.json"

    # Execute
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path), "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["bench"] == "backup"
    assert {"cpu_model", "python", "threads"} <= set(doc["machine"])
    assert [row["name"] for row in doc["rows"]] == ["0.5 MB", "2 MB"]
    for row in doc["rows"]:
        assert row["repeats"] == 3
        for path in PATHS:
            assert row[f"{path}_ms_min"] <= row[f"{path}_ms"] <= row[f"{path}_ms_max"], path
            assert positive(row[f"{path}_mb_per_s"]), path
        assert positive(row["seal_upload_x_disk"]) and positive(row["download_open_x_disk"])
    for key in ("seal+upload_x_disk", "download+open_x_disk"):
        assert set(doc["ratios"][key]) == {"0.5 MB", "2 MB"}
    assert "x disk" in proc.stdout and "2 MB seal+upload" in proc.stdout
    assert not any(p.name.startswith("lorafleet-bench-backup-") for p in tmp_path.iterdir())


def test_a_failure_is_one_clear_line(tmp_path: Path) -> None:
    # Execute: a --dir that is a file
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(blocker)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
