"""The device's personal step: never worse on validation than the prior or than itself."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorafleet.client.adapter import get_b, materialize
from lorafleet.client.base import load_base
from lorafleet.client.profile import Profile
from lorafleet.sim.runner import simulate

pytestmark = pytest.mark.filterwarnings("ignore")


def _versions(profiles: Path) -> list[Any]:
    return [v for d in sorted(profiles.iterdir()) for v in Profile.open(d).versions()]


def test_every_saved_personal_version_is_at_least_as_good_as_the_prior_on_validation(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=3)
    # Execute: the real ServerApp and ClientApp, in this process
    simulate(users, tmp_path, config, base=str(tiny_model_dir), precision="fp32", engine="local")
    # Assert: each round's version scored no worse than the prior it received
    versions = _versions(tmp_path / "profiles")
    assert len(versions) == 9
    for v in versions:
        m = v.metrics
        assert m["personal_loss"] <= m["prior_loss"] + 1e-9
        assert m["personal_loss"] <= m["start_loss"] + 1e-9
        assert m["steps"] == config.personal_steps
        assert m["prior_steps"] == config.prior_steps


def test_after_the_last_round_every_device_personalizes_once_from_the_final_prior(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: no personal steps inside the rounds, one personalization at the end
    users, config = setup_run(
        tmp_path, tiny_model_dir, num_rounds=2, personal_steps=0, personalize_steps=6
    )
    # Execute
    results = simulate(
        users, tmp_path, config, base=str(tiny_model_dir), precision="fp32", engine="local"
    )
    # Assert: one version per device, made from the final prior, early-stopped within the
    # budget, and no worse on validation than that prior
    assert len(results["personalization"]) == 3
    final_prior = results["prior_version"]
    versions = _versions(tmp_path / "profiles")
    assert len(versions) == 3
    for v in versions:
        m = v.metrics
        assert v.prior_version == final_prior
        assert m["prior_steps"] == 0 and 1 <= m["steps"] <= 6
        assert m["started_from_prior"] == 1.0
        assert m["mix"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # the blend with the prior it kept
        assert m["personal_loss"] <= m["prior_loss"] + 1e-9
        assert m["prior_loss"] < m["base_loss"]  # the prior had two rounds to learn
    # The final evaluation scores the adapter the personalization saved
    for node_metrics in results["evaluation"].values():
        assert node_metrics["personal_loss"] <= node_metrics["prior_loss"] + 1e-6


def test_a_personal_adapter_worse_than_the_prior_restarts_from_the_prior(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: one round teaches a prior; then every device's personal adapter is reset to
    # zero (the bare base), which the trained prior beats
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1)
    simulate(users, tmp_path, config, base=str(tiny_model_dir), precision="fp32", engine="local")
    base = load_base(tiny_model_dir)
    model = materialize(base.model, config.spec, base_sha256=base.sha256)
    zero = {k: np.zeros_like(v) for k, v in get_b(model).items()}
    for folder in sorted((tmp_path / "profiles").iterdir()):
        Profile.open(folder).save(model, zero)  # version 2, current
    # Execute: the second round resumes the same federation
    resumed = replace(config, num_rounds=2)
    simulate(users, tmp_path, resumed, base=str(tiny_model_dir), precision="fp32", engine="local")
    # Assert: the new versions started from the prior and ended no worse than it
    new = [v for v in _versions(tmp_path / "profiles") if v.version == 3]
    assert len(new) == 3
    for v in new:
        assert v.metrics["prior_loss"] < v.metrics["base_loss"]  # the premise
        assert v.metrics["started_from_prior"] == 1.0
        assert v.metrics["start_loss"] == v.metrics["prior_loss"]
        assert v.metrics["personal_loss"] <= v.metrics["prior_loss"] + 1e-9
