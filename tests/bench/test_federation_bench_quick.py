"""bench/federation.py runs end to end in its --quick size and writes the BENCH.md layout.

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
SCRIPT = REPO / "bench" / "federation.py"
PACKINGS = ["fp32", "fp16", "int8"]
CLIENTS = [10, 100, 1000]
AGG_PATHS = [
    "flower-aggregate_arrayrecords",
    "lorafleet-fedavg",
    "lorafleet-fedadam",
    "lorafleet-fedavg+decode-fp16",
]
DECODE_PATHS = ["flower-Array.numpy-fp32", *(f"decode_tensors-{p}" for p in PACKINGS)]

# Three Ray simulations (one per packing) take over a minute on a shared 2-core machine.
pytestmark = pytest.mark.slow


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_quick_run_reports_bytes_gain_and_aggregation_time(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "federation.json"

    # Execute
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    # Assert: the file has every section, each with the metrics the docs table needs
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["bench"] == "federation"
    assert doc["machine"]["flwr"] and doc["machine"]["max_rss_mb"] > 0
    assert doc["size"]["quick"] is True
    sections: dict[str, list[dict[str, Any]]] = {}
    for row in doc["rows"]:
        sections.setdefault(row["section"], []).append(row)
    assert list(sections) == ["bytes", "personalization", "aggregation", "decode"]

    names = [r["name"] for r in sections["bytes"]]
    assert names == ["bytes/flowertune-AB-fp32", *(f"bytes/lorafleet-B-{p}" for p in PACKINGS)]
    baseline, *ours = sections["bytes"]
    assert baseline["ratio_vs_baseline"] == 1.0
    for row in ours:
        assert row["payload_bytes"] < baseline["record_bytes"], row
        assert 0 < row["ratio_vs_baseline"] < 1 and positive(row["record_bytes"]), row
        assert row["tensors"] * 2 == baseline["tensors"]  # B only against A and B

    assert [r["packing"] for r in sections["personalization"]] == PACKINGS
    for row in sections["personalization"]:
        assert row["users"] == 3 and row["accepted"] == [3]
        assert all(finite(row[k]) for k in ("gain", "prior_gain", "base_loss", "personal_loss"))
        assert positive(row["bytes_up_per_client"]) and positive(row["seconds"])

    agg = sections["aggregation"]
    assert [(r["path"], r["clients"]) for r in agg] == [(p, n) for n in CLIENTS for p in AGG_PATHS]
    for row in agg:
        assert row["ms_min"] <= row["ms"] <= row["ms_max"] and positive(row["ms"]), row
        assert positive(row["ratio_vs_baseline"])
    assert all(r["max_abs_diff_vs_baseline"] < 1e-3 for r in agg if "max_abs_diff_vs_baseline" in r)
    assert [r["path"] for r in sections["decode"]] == DECODE_PATHS
    assert all(positive(r["ms_per_client"]) for r in sections["decode"])

    ratios = doc["ratios"]
    assert set(ratios["bytes_vs_flowertune"]) == set(PACKINGS)
    assert set(ratios["gain_vs_fp32"]) == set(ratios["prior_gain_vs_fp32"]) == {"fp16", "int8"}
    assert set(ratios["aggregation_time_vs_flower"]) == set(AGG_PATHS[1:])
    for by_clients in ratios["aggregation_time_vs_flower"].values():
        assert set(by_clients) == {str(n) for n in CLIENTS}
    assert set(ratios["decode_time_vs_flower"]) == set(DECODE_PATHS[1:])
    assert set(doc["target"]) == {"fp16", "int8"}
    for t in doc["target"].values():
        assert {"bytes_ratio", "bytes_met", "gain_rel_vs_fp32", "gain_met"} <= set(t)
    for heading in ("bytes uploaded", "personalization gain", "aggregation time"):
        assert heading in proc.stdout
