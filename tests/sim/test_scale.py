"""Scale-down curves: each point is a real experiment; the notes cut spares val and test."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lorafleet.protocols.errors import SpecError
from lorafleet.sim.cli import main
from lorafleet.sim.experiment import ExperimentConfig
from lorafleet.sim.scale import ScaleConfig, parse_notes, parse_ranks, recommend_rank, run_scale

pytestmark = pytest.mark.filterwarnings("ignore")

SIZES = {"a": 12, "b": 30, "c": 40}
"""Notes per real-text user: a has fewer training notes than the notes sweep's 10."""


def _users(root: Path) -> Path:
    for name, n in SIZES.items():
        folder = root / name
        folder.mkdir(parents=True)
        lines = [
            json.dumps({"text": f"note {i} of {name}: the tide, the bakery, the cat Pixel."})
            for i in range(n)
        ]
        (folder / "notes.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _fast(output: Path, users: Path, tiny: Path, **overrides: Any) -> ExperimentConfig:
    """One round of one step, no baselines, no cold start: the sweep's plumbing only."""
    args: dict[str, Any] = {
        "output": output,
        "users_dir": users,
        "num_rounds": 1,
        "fraction_train": 1.0,
        "prior_steps": 1,
        "personalize_steps": 1,
        "lr": 0.05,
        "seq_len": 32,
        "base": str(tiny),
        "precision": "fp32",
        "cold_start_ks": (),
        "baselines": False,
        "engine": "local",
        "secure_aggregation": False,
    }
    args.update(overrides)
    return ExperimentConfig(**args)


@pytest.fixture(scope="module")
def swept(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Ranks 2 and 4 with all notes, and 10 or all notes at rank 4: three experiments."""
    root = tmp_path_factory.mktemp("scale")
    cfg = ScaleConfig(
        _fast(root / "out", _users(root / "users"), tiny_model_dir, rank=4),
        ranks=(2, 4),
        notes=(10, 0),
    )
    said: list[str] = []
    record = run_scale(cfg, progress=False, say=said.append)
    return {"cfg": cfg, "record": record, "said": said, "out": root / "out"}


def test_a_rank_and_a_notes_sweep_write_every_point_with_its_curves(swept: dict[str, Any]) -> None:
    # Assert: the shared point (rank 4, all notes) ran once; each point has its folder
    out: Path = swept["out"]
    assert [line.split(":")[0] for line in swept["said"]] == [
        "point 1/3 rank-2_notes-all",
        "point 2/3 rank-4_notes-all",
        "point 3/3 rank-4_notes-10",
    ]
    scale = json.loads((out / "scale.json").read_text())
    assert scale == json.loads(json.dumps(swept["record"]))
    assert scale["rank_sweep"] == ["rank-2_notes-all", "rank-4_notes-all"]
    assert scale["notes_sweep"] == ["rank-4_notes-10", "rank-4_notes-all"]
    for name, point in scale["points"].items():
        assert (out / name / "results.json").is_file()
        results = json.loads((out / name / "results.json").read_text())
        assert results["config"]["rank"] == point["rank"]
        for metric in ("test", "test_notes", "val"):
            assert set(point[metric]) == {"base", "prior", "personal"}
        assert point["steps_per_user"]["personal"] >= 1
        assert point["wins"]["test"]["users"] == 3 and not point["resumed"]
    # A rank-4 adapter's weights are larger than a rank-2 one's
    sizes = [scale["points"][n]["personal_adapter_bytes"] for n in scale["rank_sweep"]]
    assert 0 < sizes[0] < sizes[1]
    # The pick is one of the swept ranks, made on validation
    assert scale["recommended_rank"] in (2, 4) and "validation" in scale["selection"]
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "scale.txt").read_text()
    assert "recommended rank" in table
    # No baselines ran, so the table claims no wins: a dash, never "0/3"
    rows = [line.split() for line in table.splitlines() if line.startswith("rank-2_notes-all")]
    assert rows[-1][2:4] == ["-", "-"] and "0/3" not in table


def test_the_notes_sweep_cuts_training_notes_and_leaves_validation_and_test_alone(
    swept: dict[str, Any],
) -> None:
    # Prepare
    out: Path = swept["out"]
    full = json.loads((out / "rank-4_notes-all" / "results.json").read_text())["split"]
    cut = json.loads((out / "rank-4_notes-10" / "results.json").read_text())["split"]
    point = swept["record"]["points"]["rank-4_notes-10"]
    # Assert: the first 10 training notes (all of a user's when fewer); same val and test
    assert set(cut) == set(full) == set(SIZES)
    for uid in SIZES:
        assert cut[uid]["val"] == full[uid]["val"] and cut[uid]["test"] == full[uid]["test"]
        assert cut[uid]["train"] == full[uid]["train"][:10]
        assert cut[uid]["train_available"] == len(full[uid]["train"])
        assert point["train_notes"]["kept"][uid] == min(10, len(full[uid]["train"]))
    assert len(full["a"]["train"]) < 10 < len(full["c"]["train"])
    assert point["train_notes"]["short_users"] == ["a"]
    assert len(cut["c"]["train"]) == 10
    # The devices trained on the cut side only
    device = out / "rank-4_notes-10" / "seed-0" / "devices" / "c" / "train.jsonl"
    assert len(device.read_text().splitlines()) == 10


def test_a_rerun_reads_finished_points_instead_of_running_them(swept: dict[str, Any]) -> None:
    # Prepare
    out: Path = swept["out"]
    stamps = {p: os.stat(out / p / "results.json").st_mtime_ns for p in swept["record"]["points"]}
    said: list[str] = []
    # Execute
    again = run_scale(swept["cfg"], progress=False, say=said.append)
    # Assert: one line per point says it was read; nothing was rewritten
    assert len(said) == 3 and all("read, not rerun" in line for line in said)
    assert all(p["resumed"] for p in again["points"].values())
    assert {p: os.stat(out / p / "results.json").st_mtime_ns for p in stamps} == stamps
    for name, point in again["points"].items():
        assert point["test"] == swept["record"]["points"][name]["test"]


def test_a_finished_point_run_with_other_options_is_refused(
    swept: dict[str, Any], tiny_model_dir: Path
) -> None:
    # Prepare: the same folder, two steps per round instead of one
    users = Path(swept["cfg"].experiment.users_dir)
    cfg = ScaleConfig(
        _fast(swept["out"], users, tiny_model_dir, rank=4, prior_steps=2), ranks=(2,), notes=()
    )
    # Execute / Assert
    with pytest.raises(SpecError, match=r"other options.*prior_steps 1 -> 2"):
        run_scale(cfg, progress=False, say=lambda _: None)


def test_the_command_runs_a_sweep_and_resumes_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    argv = [
        "scale",
        "--users-dir",
        str(_users(tmp_path / "users")),
        "--output",
        str(tmp_path / "out"),
        "--ranks",
        "2",
        "--notes",
        "",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--personalize-steps",
        "1",
        "--fraction",
        "1",
        "--no-baselines",
        "--no-secure-aggregation",
        "--engine",
        "local",
        "--base",
        str(tiny_model_dir),
        "--precision",
        "fp32",
    ]
    # Execute
    first = main(argv)
    ran = capsys.readouterr().out
    second = main(argv)
    read = capsys.readouterr().out
    # Assert
    assert first == second == 0
    assert "point 1/1 rank-2_notes-all: running" in ran and "recommended rank: 2" in ran
    assert "point 1/1 rank-2_notes-all: finished" in read and "read, not rerun" in read
    assert (tmp_path / "out" / "scale.png").is_file()


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--ranks", "1,x"], "'x'"),
        (["--ranks", "0,2"], "'0'"),
        (["--notes", "1,8"], "'1'"),
        (["--notes", "8,some"], "'some'"),
        (["--ranks", "", "--notes", ""], "nothing to sweep"),
        (["--rank", "0", "--ranks", ""], "rank must be >= 1"),
        (["--bogus"], "--bogus"),
        (["--notes"], "--notes"),
    ],
)
def test_a_mistake_is_one_line_and_exit_2(
    flags: list[str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    try:
        code = main(["scale", "--output", str(tmp_path / "out"), *flags])
    except SystemExit as exc:  # argparse's own mistakes leave through exit(2)
        code = int(exc.code or 0)
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and names in err[0]
    assert not (tmp_path / "out").exists()


def test_the_sweep_lists_parse_with_all_last_and_no_duplicates() -> None:
    assert parse_ranks("16, 1,2,2") == (1, 2, 16)
    assert parse_notes("all,64,8") == (8, 64, 0)
    assert parse_ranks("") == () == parse_notes(" ")


@pytest.mark.parametrize(
    ("losses", "pick"),
    [
        ({1: 3.00, 2: 2.90, 4: 2.89, 8: 2.88}, 4),  # 2.89 is within 0.5% of 2.88
        ({1: 3.00, 2: 2.95, 4: 2.80, 8: 2.90}, 4),  # the best is the pick
        ({1: 2.50, 2: 2.60}, 1),
    ],
)
def test_the_recommended_rank_is_the_smallest_within_half_a_percent_on_validation(
    losses: dict[int, float], pick: int
) -> None:
    # Prepare: test losses that would pick otherwise must not matter
    points = [
        {"rank": r, "val": {"personal": v}, "test": {"personal": -r}} for r, v in losses.items()
    ]
    # Execute / Assert
    chosen = recommend_rank(points)
    assert chosen is not None and chosen[0] == pick


def test_a_rank_that_keeps_the_personal_adapters_but_loses_the_prior_is_not_picked() -> None:
    # Prepare: fortunes' gradient-A rank 4 and 8 (personal level, the prior 1% behind)
    points = [
        {"rank": 4, "val": {"personal": 3.7649, "prior": 3.9072}},
        {"rank": 8, "val": {"personal": 3.7627, "prior": 3.8661}},
    ]
    # Execute
    chosen = recommend_rank(points)
    personal_only = recommend_rank(
        [{**p, "val": {"personal": p["val"]["personal"]}} for p in points]
    )
    # Assert: on the personal adapters alone rank 4 would do; the prior keeps rank 8
    assert personal_only is not None and personal_only[0] == 4
    assert chosen == (8, {"personal": (3.7627, 3.7627), "prior": (3.8661, 3.8661)})
