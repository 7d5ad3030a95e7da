"""A gradient-aligned shared A through whole federations: round 0's sketch, then B on that A."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorafleet.client.layout import shared_a_path
from lorafleet.client.profile import Profile
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.shared_a import ROW_NORM, shared_a_digest
from lorafleet.server.coordinator import (
    DEFAULT_PERSONAL_LR,
    DEFAULT_PERSONAL_LR_SHARED_A,
    CoordinatorConfig,
    CoordinatorState,
)
from lorafleet.server.flower_app import RoundLoop, check_resumed_a

from .conftest import simulate_tiny

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_round_0_builds_a_shared_a_that_every_device_then_trains_and_saves_on(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any, secure: bool
) -> None:
    # Prepare
    users, config = setup_run(
        tmp_path, tiny_model_dir, shared_a="gradient", secure_aggregation=secure
    )

    # Execute
    results = simulate_tiny(tmp_path, tiny_model_dir, users, config, engine="local")

    # Assert: round 0 took every device's sketch, then two rounds of B on the shared A
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["accepted"] for r in rounds] == [3, 3, 3]
    assert rounds[0]["prior_version"] is None
    coord = CoordinatorState.open(config)
    try:
        shared = coord.shared_a()
        assert shared is not None
        digest, payload = shared
        finished = sorted(
            r.number
            for r in coord.registry.list_rounds(config.spec).items
            if r.status == "finished"
        )
        assert finished == [0, 1, 2]
        prior = coord.active_prior()[1]
    finally:
        coord.close()
    a, _ = decode_tensors(payload)
    assert shared_a_digest(a) == digest
    for value in a.values():
        np.testing.assert_allclose(value @ value.T, ROW_NORM**2 * np.eye(4), atol=1e-5)
    assert prior is not None and set(prior) == set(a)  # the prior stays B only
    # Every device holds the A (checked, cached once) and saved its versions on it
    profiles = sorted((tmp_path / "profiles").iterdir())
    assert len(profiles) == 3
    for profile_dir in profiles:
        assert shared_a_path(profile_dir, digest).is_file()
        profile = Profile.open(profile_dir)
        versions = profile.versions()
        assert [v.round for v in versions] == [1, 2]
        for v in versions:
            provenance, _, saved_a = profile.read(v.version)
            assert provenance.personal_a and saved_a is not None
            for module, value in a.items():
                np.testing.assert_array_equal(saved_a[module], value)
    # A is sent once per device: round 1 carried it, round 2 did not
    assert rounds[1]["bytes_down"] > rounds[2]["bytes_down"]


def test_gradient_a_with_dp_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="shared-a = gradient has no differential-privacy"):
        CoordinatorConfig(shared_a="gradient", dp="central", data_dir=str(tmp_path))
    with pytest.raises(SpecError, match="shared-a must be auto, seeded or gradient"):
        CoordinatorConfig(shared_a="learned", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("shared_a", "dp", "mode"),
    [
        ("auto", "off", "gradient"),
        ("auto", "central", "seeded"),
        ("auto", "client", "seeded"),
        ("seeded", "off", "seeded"),
        ("gradient", "off", "gradient"),
    ],
)
def test_auto_is_the_gradient_a_unless_dp_is_on(
    tmp_path: Path, shared_a: str, dp: str, mode: str
) -> None:
    # Prepare / Execute
    config = CoordinatorConfig(
        shared_a=shared_a, dp=dp, secure_aggregation=True, data_dir=str(tmp_path)
    )

    # Assert: the kind of A, and the personal rate of that kind
    assert config.shared_a_mode == mode
    rate = DEFAULT_PERSONAL_LR_SHARED_A if mode == "gradient" else DEFAULT_PERSONAL_LR
    assert config.personal_learning_rate == rate


def test_auto_is_the_default_everywhere_a_run_is_configured() -> None:
    import tomllib

    from lorafleet.sim.experiment import ExperimentConfig

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config["shared-a"] == "auto"
    assert CoordinatorConfig().shared_a == "auto"
    assert ExperimentConfig(output=Path("x")).shared_a_mode == "gradient"


def test_a_data_dir_is_not_resumed_on_another_kind_of_a(tmp_path: Path) -> None:
    # Prepare: a cohort whose round 1 finished on the seeded A
    seeded = CoordinatorConfig(shared_a="seeded", data_dir=str(tmp_path / "s"))
    coord = CoordinatorState.open(seeded)
    try:
        record = coord.start_round(1, 0)
        coord.registry.finish_round(record.id, participants=3, status="finished")
        # Execute / Assert: resuming it on the seeded A is fine, on a gradient A refused
        check_resumed_a(coord, "seeded")
        with pytest.raises(LorafleetError, match="set shared-a = seeded to resume it"):
            check_resumed_a(coord, "gradient")
    finally:
        coord.close()
    # A cohort that built its gradient A (round 0) is never resumed on the seeded A
    gradient = CoordinatorConfig(shared_a="gradient", data_dir=str(tmp_path / "g"))
    coord = CoordinatorState.open(gradient)
    try:
        check_resumed_a(coord, "seeded")  # nothing ran yet: either kind may start
        coord.save_shared_a({"p": np.eye(2, 5, dtype=np.float32) * np.float32(ROW_NORM)})
        check_resumed_a(coord, "gradient")
        with pytest.raises(LorafleetError, match="set shared-a = gradient to resume it"):
            check_resumed_a(coord, "seeded")
    finally:
        coord.close()


def test_a_resumed_coordinator_keeps_its_shared_a_and_trusts_no_swapped_file(
    tmp_path: Path,
) -> None:
    config = CoordinatorConfig(shared_a="gradient", data_dir=str(tmp_path))
    coord = CoordinatorState.open(config)
    try:
        assert coord.shared_a() is None
        a = {"p": np.eye(2, 5, dtype=np.float32) * np.float32(ROW_NORM)}
        digest = coord.save_shared_a(a)
    finally:
        coord.close()
    coord = CoordinatorState.open(config)
    try:
        shared = coord.shared_a()
        assert shared is not None and shared[0] == digest
        # Another A in the file: the registry's digest (not the file) is what counts
        other = {"p": np.eye(2, 5, k=1, dtype=np.float32) * np.float32(ROW_NORM)}
        (coord.priors_dir / "shared-a.safetensors").write_bytes(encode_tensors(other))
        with pytest.raises(IntegrityError, match="does not match the registry's digest"):
            coord.shared_a()
    finally:
        coord.close()


def test_the_personal_rate_follows_the_cohorts_kind_of_a(tmp_path: Path) -> None:
    # Prepare / Execute: the defaults, an explicit rate, and the run config's key
    seeded = CoordinatorConfig(shared_a="seeded", data_dir=str(tmp_path / "s"))
    gradient = CoordinatorConfig(shared_a="gradient", data_dir=str(tmp_path / "g"))
    explicit = CoordinatorConfig(
        shared_a="gradient", personal_lr_shared_a=4e-3, data_dir=str(tmp_path / "e")
    )
    from_toml = CoordinatorConfig.from_run_config(
        {"shared-a": "gradient", "personal-lr-shared-a": 2e-3, "data-dir": str(tmp_path)}
    )

    # Assert: the seeded A keeps its rate, a gradient A steps at half of it unless set
    assert seeded.personal_learning_rate == DEFAULT_PERSONAL_LR
    assert gradient.personal_learning_rate == DEFAULT_PERSONAL_LR_SHARED_A
    assert DEFAULT_PERSONAL_LR_SHARED_A == DEFAULT_PERSONAL_LR / 2
    assert explicit.personal_learning_rate == 4e-3
    assert from_toml.personal_learning_rate == 2e-3
    # and the coordinator's instructions carry it, in train and personalize rounds
    coord = CoordinatorState.open(gradient)
    try:
        loop = RoundLoop(None, coord)  # type: ignore[arg-type]  # no grid: nothing is sent
        for mode in ("train", "personalize"):
            assert loop._instruction(1, "v0001", mode).personal_lr == 8e-3
    finally:
        coord.close()
    with pytest.raises(SpecError, match="personal-lr-shared-a must be >= 0"):
        CoordinatorConfig(personal_lr_shared_a=-1.0, data_dir=str(tmp_path))
