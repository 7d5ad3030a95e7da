"""The cold-start replay: the experiment's newcomer curve from a saved prior (#12)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafleet.client.adapter import get_b, materialize
from lorafleet.client.base import load_base
from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.sim.baselines import open_lab, read_prior, read_shared_a
from lorafleet.sim.coldstart import main, replay
from lorafleet.sim.experiment import ExperimentConfig, cold_start_curve
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
