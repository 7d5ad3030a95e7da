"""The cold-start replay: the experiment's newcomer curve from a saved prior (#12)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lorafleet.client.adapter import get_b, materialize
from lorafleet.client.base import load_base
from lorafleet.protocols.encoding import decode_tensors
from lorafleet.protocols.errors import DataError, IntegrityError, SpecError
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.coordinator import CoordinatorConfig, CoordinatorState
from lorafleet.sim.baselines import open_lab, read_prior, read_shared_a
from lorafleet.sim.coldstart import main, replay, run_prior, run_recipe
from lorafleet.sim.experiment import (
    ExperimentConfig,
    cold_start_curve,
    cold_start_wins,
    run_experiment,
)
from lorafleet.sim.personas import (
    PersonaConfig,
    generate_personas,
    load_user_folders,
    write_user_folders,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def _prior(tiny: Path, path: Path, *, rank: int) -> Path:
    base = load_base(tiny)
    spec = AdapterSpec(base_model_id=base.model_id, base_sha256=base.sha256, rank=rank)
    b = get_b(materialize(base.model, spec, base_sha256=base.sha256))
    save_file({k: np.full_like(v, 0.01) for k, v in b.items()}, str(path))
    return path


def test_the_replay_trains_each_newcomer_from_the_prior_and_from_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: two newcomers with 30 notes each (about 19 of them for training)
    newcomers = write_user_folders(
        generate_personas(PersonaConfig(num_users=2, notes_per_user=30)), tmp_path / "new"
    )
    prior = _prior(tiny_model_dir, tmp_path / "prior.safetensors", rank=4)

    # Execute: k = 4 and 8 fit, k = 500 does not
    rows = replay(
        newcomers,
        prior,
        [4, 8, 500],
        steps=3,
        base=str(tiny_model_dir),
        precision="fp32",
        rank=4,
        seq_len=32,
    )

    # Assert: one row per k that fits, both newcomers in each; the prior alone does not
    # depend on k, the trained arms do their own thing
    assert [r["k"] for r in rows] == [4.0, 8.0]
    assert all(r["newcomers"] == 2.0 for r in rows)
    assert rows[0]["prior_alone"] == pytest.approx(rows[1]["prior_alone"])
    for r in rows:
        assert all(np.isfinite(r[key]) for key in ("from_prior", "from_zero", "prior_alone"))
        # each newcomer's own figures, whose mean is the row's
        per = r["per_newcomer"]
        assert len(per) == 2
        assert np.mean([v["from_prior"] for v in per.values()]) == pytest.approx(r["from_prior"])
    small, large, wins, counted = cold_start_wins(rows) or (0, 0, -1, 0)
    expected = sum(
        rows[0]["per_newcomer"][n]["from_prior"] < rows[1]["per_newcomer"][n]["from_zero"]
        for n in rows[0]["per_newcomer"]
    )
    assert (small, large, wins, counted) == (4, 8, expected, 2)


def test_the_cold_start_is_counted_per_newcomer_on_those_with_both_k() -> None:
    # Prepare: "b" has too few notes for k = 64; "c" wins, "a" does not
    def row(k: int, per: dict[str, tuple[float, float]]) -> dict[str, object]:
        figures = {
            n: {"from_prior": p, "from_zero": z, "prior_alone": 4.0} for n, (p, z) in per.items()
        }
        return {"k": float(k), "per_newcomer": figures}

    rows = [
        row(16, {"a": (3.9, 4.2), "b": (3.0, 4.0), "c": (3.5, 4.1)}),
        row(64, {"a": (3.7, 3.8), "c": (3.4, 3.6)}),
    ]

    # Execute / Assert
    assert cold_start_wins(rows) == (16, 64, 1, 2)
    assert cold_start_wins(rows[:1]) is None  # one k: nothing to compare
    assert cold_start_wins([{"k": 16.0}, {"k": 64.0}]) is None  # an older file's means


def test_a_prior_of_another_rank_is_refused_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    newcomers = write_user_folders(
        generate_personas(PersonaConfig(num_users=1, notes_per_user=20)), tmp_path / "new"
    )
    prior = _prior(tiny_model_dir, tmp_path / "prior.safetensors", rank=2)

    # Execute / Assert: the library raises a SpecError naming the file
    with pytest.raises(SpecError, match="is not a prior of this base at rank 4"):
        replay(newcomers, prior, [4], base=str(tiny_model_dir), precision="fp32", rank=4)
    # and the command names a missing prior without a traceback
    with pytest.raises(SystemExit) as exit_info:
        main([str(newcomers), str(tmp_path / "missing.safetensors")])
    assert exit_info.value.code == 2
    assert "is not a file" in capsys.readouterr().err
    # as it names a precision no device has (the run's own repeats its figures)
    with pytest.raises(SystemExit) as exit_info:
        main([str(newcomers), str(prior), "--precision", "bf17"])
    assert exit_info.value.code == 2
    assert "--precision: invalid choice: 'bf17'" in capsys.readouterr().err


def test_a_prior_on_a_shared_a_is_replayed_on_that_a_and_a_bad_a_is_refused(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    shared_a_file: Callable[..., Path],
) -> None:
    # Prepare: a newcomer, a prior B, and a gradient-style shared A (and a scaled copy)
    newcomers = write_user_folders(
        generate_personas(PersonaConfig(num_users=1, notes_per_user=30)), tmp_path / "new"
    )
    prior = _prior(tiny_model_dir, tmp_path / "prior.safetensors", rank=4)
    good = shared_a_file(tiny_model_dir, tmp_path / "shared-a.safetensors", rank=4)
    scaled = shared_a_file(tiny_model_dir, tmp_path / "scaled.safetensors", rank=4, scale=3.0)
    kwargs = dict(steps=2, base=str(tiny_model_dir), precision="fp32", rank=4, seq_len=32)

    # Execute
    on_seeded = replay(newcomers, prior, [4], **kwargs)  # type: ignore[arg-type]
    on_shared = replay(newcomers, prior, [4], shared_a_path=good, **kwargs)  # type: ignore[arg-type]

    # Assert: the same B scores differently on the shared A (the prior is read on it),
    # the "from zero" arm stays on the seeded A and does not move
    assert on_shared[0]["prior_alone"] != pytest.approx(on_seeded[0]["prior_alone"], abs=1e-6)
    assert on_shared[0]["from_zero"] == pytest.approx(on_seeded[0]["from_zero"], abs=1e-5)
    # an A whose rows are not at the device's norm is refused as the device refuses it
    with pytest.raises(SpecError, match="is not a shared A of this base at rank 4"):
        replay(newcomers, prior, [4], shared_a_path=scaled, **kwargs)  # type: ignore[arg-type]
    # and the command names a missing A file in one line
    with pytest.raises(SystemExit) as exit_info:
        main([str(newcomers), str(prior), "--shared-a", str(tmp_path / "missing.safetensors")])
    assert exit_info.value.code == 2
    assert "is not a file" in capsys.readouterr().err


def test_each_arm_trains_at_the_personal_rate_of_its_own_a(
    tiny_model_dir: Path, tmp_path: Path, shared_a_file: Callable[..., Path]
) -> None:
    # Prepare: a prior on a shared A; the prior's arm lives on it, zero's on the seeded A
    newcomers = write_user_folders(
        generate_personas(PersonaConfig(num_users=1, notes_per_user=30)), tmp_path / "new"
    )
    prior_path = _prior(tiny_model_dir, tmp_path / "prior.safetensors", rank=4)
    lab, loaded = open_lab(str(tiny_model_dir), "fp32", rank=4)
    prior = read_prior(lab, prior_path)
    prior_a = read_shared_a(lab, shared_a_file(tiny_model_dir, tmp_path / "a.st", rank=4))
    users = load_user_folders(newcomers)

    def curve(**rates: float) -> dict[str, float]:
        cfg = ExperimentConfig(
            output=tmp_path,
            cold_start_ks=(8,),
            cold_start_steps=4,
            base=str(tiny_model_dir),
            precision="fp32",
            rank=4,
            seq_len=32,
            **rates,  # type: ignore[arg-type]
        )
        (row,) = cold_start_curve(cfg, lab, loaded, prior, users, progress=False, prior_a=prior_a)
        return row

    # Execute
    base = curve(personal_lr=1e-2, personal_lr_shared_a=1e-2)
    shared_moved = curve(personal_lr=1e-2, personal_lr_shared_a=1e-1)
    seeded_moved = curve(personal_lr=1e-1, personal_lr_shared_a=1e-2)

    # Assert: the shared A's rate moves only the prior's arm, the seeded one only zero's
    assert shared_moved["from_prior"] != pytest.approx(base["from_prior"], abs=1e-6)
    assert shared_moved["from_zero"] == pytest.approx(base["from_zero"], abs=1e-6)
    assert seeded_moved["from_zero"] != pytest.approx(base["from_zero"], abs=1e-6)
    assert seeded_moved["from_prior"] == pytest.approx(base["from_prior"], abs=1e-6)


def test_a_run_gives_its_active_prior_not_its_newest_file_and_a_swapped_one_is_refused(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    shared_a_file: Callable[..., Path],
) -> None:
    # Prepare: an experiment-style seed folder whose coordinator holds a shared A, an
    # active v1 and a newer v2 that is only a candidate (held back until devices score it)
    base = load_base(tiny_model_dir)
    run = tmp_path / "seed-3"
    config = CoordinatorConfig(
        rank=4,
        cohort_seed=3,
        base_model_id="tiny",
        base_sha256=base.sha256,
        shared_a="gradient",
        data_dir=str(run / "coordinator"),
    )
    a, _ = decode_tensors(shared_a_file(tiny_model_dir, tmp_path / "a.st", rank=4).read_bytes())
    b1 = load_file(str(_prior(tiny_model_dir, tmp_path / "b1.safetensors", rank=4)))
    b2 = {k: v * 5 for k, v in b1.items()}
    coord = CoordinatorState.open(config)
    try:
        coord.save_shared_a(a)
        for number in (1, 2):
            started = coord.registry.start_round(config.spec, number)
            coord.registry.finish_round(started.id, participants=3)
        coord.save_prior(1, b1, round=1, metrics={}, activate=True)
        coord.save_prior(2, b2, round=2, metrics={})
        coord.registry.start_round(config.spec, 3)  # a round that never finished
    finally:
        coord.close()
    newcomers = write_user_folders(
        generate_personas(PersonaConfig(num_users=1, notes_per_user=30)), tmp_path / "new"
    )

    # Execute
    found = run_prior(run)

    # Assert: the active version, with the cohort's seed, rank and shared A, from either
    # the seed folder or the data dir itself; it replays on that A
    assert (found.version, found.cohort_seed, found.rank, found.rounds) == (1, 3, 4, 2)
    assert found.prior.name == "v0001.safetensors" and found.shared_a is not None
    for key, value in load_file(str(found.prior)).items():
        np.testing.assert_array_equal(value, b1[key])
    assert run_prior(run / "coordinator") == found
    rows = replay(
        newcomers,
        found.prior,
        [4],
        steps=2,
        base=str(tiny_model_dir),
        precision="fp32",
        rank=found.rank,
        seq_len=32,
        cohort_seed=found.cohort_seed,
        shared_a_path=found.shared_a,
    )
    assert rows and np.isfinite(rows[0]["prior_alone"])
    # A prior file swapped behind the registry's back is refused, as the coordinator would
    save_file(b2, str(found.prior))
    with pytest.raises(IntegrityError, match="does not match the registry's content hash"):
        run_prior(run)
    # and the command says in one line what to name instead
    assert main([str(newcomers), "--run", str(tmp_path / "nothing")]) == 2
    assert "holds no registry.db" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(newcomers), str(found.prior), "--run", str(run)])
    assert exit_info.value.code == 2
    assert "not both" in capsys.readouterr().err


def test_a_run_on_more_targets_replays_on_them_and_its_prior_fits_no_other(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a coordinator data dir whose cohort adapts o_proj besides q_proj and v_proj
    base = load_base(tiny_model_dir)
    config = CoordinatorConfig(
        rank=2,
        target_modules="v_proj,o_proj,q_proj",
        base_model_id="tiny",
        base_sha256=base.sha256,
        data_dir=str(tmp_path / "data"),
    )
    spec = config.spec
    b = get_b(materialize(base.model, spec, base_sha256=base.sha256))
    coord = CoordinatorState.open(config)
    try:
        started = coord.registry.start_round(spec, 1)
        coord.registry.finish_round(started.id, participants=2)
        prior = {k: np.full_like(v, 0.01) for k, v in b.items()}
        coord.save_prior(1, prior, round=1, metrics={}, activate=True)
    finally:
        coord.close()
    newcomers = write_user_folders(
        generate_personas(PersonaConfig(num_users=1, notes_per_user=30)), tmp_path / "new"
    )

    # Execute
    found = run_prior(tmp_path / "data")

    # Assert: the run's targets come with its prior, and the replay runs on them
    assert found.targets == ("o_proj", "q_proj", "v_proj") and found.rank == 2
    common = dict(steps=2, base=str(tiny_model_dir), precision="fp32", rank=2, seq_len=32)
    rows = replay(newcomers, found.prior, [4], targets=found.targets, **common)  # type: ignore[arg-type]
    assert rows and np.isfinite(rows[0]["from_prior"])
    # on the default targets the same file is refused in one line naming them
    with pytest.raises(SpecError, match="at rank 2 on q_proj, v_proj"):
        replay(newcomers, found.prior, [4], **common)  # type: ignore[arg-type]


def test_a_replay_of_an_experiments_run_repeats_its_own_cold_start(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a finished experiment whose cold start ran on a recipe of its own (a local
    # budget of 5 steps where the default is 3 x 6, other personal rates, the seeded A)
    users = write_user_folders(
        generate_personas(PersonaConfig(num_users=2, notes_per_user=20)), tmp_path / "users"
    )
    newcomers = write_user_folders(
        generate_personas(PersonaConfig(num_users=1, notes_per_user=30, seed=5)),
        tmp_path / "new",
    )
    cfg = ExperimentConfig(
        output=tmp_path / "run",
        users_dir=users,
        newcomers_dir=newcomers,
        base=str(tiny_model_dir),
        precision="fp32",
        engine="local",
        num_rounds=1,
        prior_steps=2,
        local_steps=5,
        rank=2,
        seq_len=32,
        lr=0.05,
        personal_lr=0.03,
        cold_start_ks=(4, 8),
        baselines=False,
        shared_a="seeded",
    )
    run_experiment(cfg, progress=False)
    ran = json.loads((tmp_path / "run" / "results.json").read_text())["runs"][0]["cold_start"]
    out = tmp_path / "rows.json"

    # Execute: the replay, told only the run (its precision too is the run's, fp32)
    args = [str(newcomers), "--run", str(tmp_path / "run" / "seed-0"), "--ks", "4,8"]
    code = main([*args, "--out", str(out)])

    # Assert: the run's recipe is read and shown, and every newcomer's figure repeats
    assert code == 0
    shown = capsys.readouterr().out
    assert "local_steps 5" in shown and "precision fp32" in shown
    assert run_recipe(tmp_path / "run" / "seed-0" / "coordinator")["personal_lr"] == 0.03
    rows = json.loads(out.read_text())
    assert [r["k"] for r in rows] == [r["k"] for r in ran]
    for mine, theirs in zip(rows, ran, strict=True):
        for name, figures in theirs["per_newcomer"].items():
            for arm, value in figures.items():
                assert mine["per_newcomer"][name][arm] == pytest.approx(value, abs=1e-6)
    # and with the defaults' budget (what a replay did before it read the run) it does not
    assert main([*args, "--precision", "fp32", "--steps", "18", "--out", str(out)]) == 0
    other = json.loads(out.read_text())
    assert other[1]["from_zero"] != pytest.approx(ran[1]["from_zero"], abs=1e-6)


def test_a_runs_recipe_from_before_the_shared_as_own_rate_takes_the_rate_it_ran_at(
    tmp_path: Path,
) -> None:
    # Prepare: an experiment's results.json from before personal_lr_shared_a existed,
    # and a coordinator data dir outside any experiment
    (tmp_path / "old" / "seed-0" / "coordinator").mkdir(parents=True)
    config = {"personal_lr": 0.01, "local_steps": 30, "precision": "bf16-lean", "rank": 8}
    (tmp_path / "old" / "results.json").write_text(json.dumps({"config": config}))
    (tmp_path / "old" / "seed-0" / "coordinator" / "registry.db").write_bytes(b"")
    (tmp_path / "alone").mkdir()
    (tmp_path / "broken" / "seed-1").mkdir(parents=True)
    (tmp_path / "broken" / "results.json").write_text("{not json")

    # Execute
    old = run_recipe(tmp_path / "old" / "seed-0")

    # Assert: only cold-start options, the shared A's rate as that run personalized,
    # the same from its data dir; nothing outside an experiment; a broken file named
    assert old == {
        "personal_lr": 0.01,
        "personal_lr_shared_a": 0.01,
        "local_steps": 30,
        "precision": "bf16-lean",
    }
    assert run_recipe(tmp_path / "old" / "seed-0" / "coordinator") == old
    assert run_recipe(tmp_path / "alone") == {}
    with pytest.raises(DataError, match="is not a readable results file"):
        run_recipe(tmp_path / "broken" / "seed-1")
