"""The personal-lr tuning replays the device's personalization and picks on validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafleet.client.adapter import get_b, materialize
from lorafleet.client.base import load_base
from lorafleet.client.train import steps_for_data
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.sim.personas import PersonaConfig, generate_personas, write_user_folders
from lorafleet.sim.tune_personal import main, summary, tune


def _prior(tiny: Path, path: Path) -> Path:
    base = load_base(tiny)
    spec = AdapterSpec(base_model_id=base.model_id, base_sha256=base.sha256, rank=4)
    b = get_b(materialize(base.model, spec, base_sha256=base.sha256))
    save_file({k: np.full_like(v, 0.01) for k, v in b.items()}, str(path))
    return path


def _tune(
    tiny: Path, tmp_path: Path, users: int, lrs: list[float], **kw: Any
) -> dict[str, dict[str, dict[str, float]]]:
    folders = write_user_folders(
        generate_personas(PersonaConfig(num_users=users, notes_per_user=30)), tmp_path / "users"
    )
    prior = _prior(tiny, tmp_path / "prior.safetensors")
    return tune(
        folders, prior, lrs, steps=4, base=str(tiny), precision="fp32", rank=4, seq_len=32, **kw
    )


def test_every_lr_and_user_is_scored_and_the_pick_is_the_lowest_mean_validation(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Execute
    results = _tune(tiny_model_dir, tmp_path, 2, [1e-3, 5e-2])
    best, lines = summary(results)

    # Assert: both lrs, both users, losses finite; the pick is the lowest mean val
    assert set(results) == {"0.001", "0.05"}
    for per_user in results.values():
        assert len(per_user) == 2
        for row in per_user.values():
            assert all(np.isfinite(row[k]) for k in ("val", "test", "test_notes"))
            assert 0 <= row["mix"] <= 1 and 0 <= row["steps"] <= 4
    means = {lr: np.mean([u["val"] for u in r.values()]) for lr, r in results.items()}
    assert best == min(means, key=lambda k: means[k])
    assert lines[-1] == f"picked on validation: personal lr {best}"


def test_a_lrs_replay_a_personal_a_and_keep_it_in_the_choice(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Execute: the seeded A and a personal A at a rate that moves it
    results = _tune(tiny_model_dir, tmp_path, 1, [5e-2], a_lrs=[0.0, 5e-2])

    # Assert: both arms scored; they differ, so A was trained and scored with B
    assert set(results) == {"0.05 a 0", "0.05 a 0.05"}
    (seeded,), (personal,) = (list(r.values()) for r in results.values())
    assert all(np.isfinite(personal[k]) for k in ("val", "test", "test_notes"))
    assert personal["val"] != seeded["val"]


def test_a_prior_on_a_shared_a_is_personalized_on_that_a(
    tiny_model_dir: Path, tmp_path: Path, shared_a_file: Callable[..., Path]
) -> None:
    # Prepare: a gradient-style shared A for the prior's cohort
    shared = shared_a_file(tiny_model_dir, tmp_path / "shared-a.safetensors", rank=4)

    # Execute: the same prior B, read on the seeded A and on the shared A
    on_seeded = _tune(tiny_model_dir, tmp_path / "s", 1, [1e-3])
    on_shared = _tune(tiny_model_dir, tmp_path / "g", 1, [1e-3], shared_a_path=shared)

    # Assert: the shared A changes what the prior (and so its personalization) scores
    (seeded,), (gradient,) = (list(r["0.001"].values()) for r in (on_seeded, on_shared))
    assert np.isfinite(gradient["val"]) and gradient["val"] != seeded["val"]


@pytest.mark.parametrize(
    ("argv_tail", "fragment"),
    [
        (["--lrs", "fast"], "--lrs must be comma-separated numbers"),
        (["--lrs", "2"], "in (0, 1)"),
        (["--plateau-decays", "half"], "--plateau-decays must be comma-separated numbers"),
        (["--plateau-decays", "1"], "--plateau-decays must be in [0, 1)"),
        (["--a-lrs", "x"], "--a-lrs must be comma-separated numbers"),
        (["--a-lrs", "-1"], "--a-lrs must be in [0, 1)"),
        (["--max-train-notes", "1"], "--max-train-notes must be >= 2"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], fragment: str
) -> None:
    (tmp_path / "p.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), str(tmp_path / "p.safetensors"), *argv_tail])
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


def test_max_train_notes_cuts_only_the_training_notes_as_a_cold_start(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Execute: all of a user's training notes, then only its first 4
    whole = _tune(tiny_model_dir, tmp_path / "all", 1, [5e-2])
    cut = _tune(tiny_model_dir, tmp_path / "cut", 1, [5e-2], max_train_notes=4)

    # Assert: 4 training notes instead of all (about 19 of 30), and another personal
    # adapter from them
    (full,), (few,) = (list(r["0.05"].values()) for r in (whole, cut))
    assert few["train_notes"] == 4 and full["train_notes"] > 10
    assert few["val"] != full["val"]


def test_plateau_decays_are_a_second_axis_of_the_grid(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Execute
    results = _tune(tiny_model_dir, tmp_path, 1, [5e-2], decays=[0.0, 0.5])

    # Assert
    assert set(results) == {"0.05 decay 0", "0.05 decay 0.5"}
    assert all(np.isfinite(u["val"]) for r in results.values() for u in r.values())


def test_steps_per_block_size_each_users_budget_and_zero_trains_from_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    folders = write_user_folders(
        generate_personas(PersonaConfig(num_users=2, notes_per_user=30)), tmp_path / "users"
    )

    # Execute: from zero B (no prior), the fixed budget and one sized by the data
    results = tune(
        folders,
        None,
        [5e-2],
        steps=40,
        base=str(tiny_model_dir),
        precision="fp32",
        rank=4,
        seq_len=32,
        per_blocks=[0.0, 0.25],
    )

    # Assert: each user spent at most their sized budget, and some budgets did shrink
    assert set(results) == {"0.05 per-block 0", "0.05 per-block 0.25"}
    for label, per_user in results.items():
        per_block = float(label.rsplit(" ", 1)[1])
        for row in per_user.values():
            budget = steps_for_data(int(row["train_blocks"]), 40, per_block)
            assert 1 <= row["steps"] <= budget
    sized = results["0.05 per-block 0.25"].values()
    assert any(steps_for_data(int(r["train_blocks"]), 40, 0.25) < 40 for r in sized)
