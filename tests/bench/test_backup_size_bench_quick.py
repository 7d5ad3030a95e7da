"""bench/backup_size.py runs end to end in its --quick size and writes the BENCH.md layout.

Targets are never asserted here: a benchmark reports, docs/benchmarks.md records the
full-size table (on a tiny base the folder's small files dominate, so its ratios say
nothing about the real one).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "backup_size.py"


# The personal-A run is slow-marked: the default run keeps under CI's 15 minutes, and
# format 3 itself is tested in tests/client/test_personal_a.py.
@pytest.mark.parametrize(
    ("a_lr", "fmt"), [("0", 2), pytest.param("0.05", 3, marks=pytest.mark.slow)]
)
def test_quick_run_reports_bytes_and_loss_of_each_path_against_format_1(
    tiny_model_dir: Path, tmp_path: Path, a_lr: str, fmt: int
) -> None:
    # Prepare: a seeded A (format 2) or a personal A (format 3)
    out = tmp_path / "backup_size.json"
    paths = ["format-1", *(f"format-{fmt}-{p}" for p in ("fp32", "fp16", "int8"))]

    # Execute
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--base",
            str(tiny_model_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--seq-len",
            "32",
            "--json",
            str(out),
            "--a-lr",
            a_lr,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["bench"] == "backup_size"
    assert {"cpu_model", "cpu_class", "threads", "torch"} <= set(doc["machine"])
    rows = {row["name"]: row for row in doc["rows"]}
    assert list(rows) == paths
    assert rows["format-1"]["sealed_x_format_1"] == 1.0
    exact = rows[f"format-{fmt}-fp32"]
    assert exact["same_files_as_saved"]  # exact B (and A): the very same folder
    assert exact["heldout_loss_delta"] == 0.0 and exact["max_abs_error"] == 0.0
    for name, row in rows.items():
        assert row["sealed_bytes"] > row["archive_bytes"] > 0, name
        assert math.isfinite(row["heldout_loss"]), name
        timing = row["pack_seal_ms"]
        assert timing["min"] <= timing["median"] <= timing["max"], name
    assert set(doc["ratios"]["sealed_bytes_x_format_1"]) == set(paths)
    assert isinstance(doc["target"]["met"], bool)
    assert math.isfinite(doc["stock_peft_loss"])
    assert "x today" in proc.stdout and "users x 10 versions" in proc.stdout
