from __future__ import annotations

import numpy as np
import pytest

from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.federation import (
    RoundInstruction,
    RoundMetrics,
    clip_by_global_norm,
    global_norm,
)
from lorafleet.protocols.spec import AdapterSpec

SPEC = AdapterSpec(base_model_id="m", base_sha256="ab" * 32, cohort_seed=3)


def test_instruction_round_trips_through_flat_config() -> None:
    instr = RoundInstruction(
        round=4,
        spec=SPEC,
        prior_version="abc/v3",
        packing="int8",
        lr=1e-3,
        blend=False,
        secure_weight_cap=40,
    )
    config = instr.to_config()
    assert all(isinstance(v, int | float | str) for v in config.values())
    assert RoundInstruction.from_config(config) == instr


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"round": -1}, "round"),
        ({"clip-norm": 0.0}, "clip_norm"),
        ({"packing": "fp8"}, "packing"),
        ({"blend": "yes"}, "blend"),
        ({"secure-weight-cap": -1}, "secure-weight-cap"),
        ({"secure-weight-cap": 2.5}, "secure-weight-cap"),
        ({"secure-weight-cap": True}, "secure-weight-cap"),
    ],
)
def test_bad_instructions_name_the_field(change: dict[str, object], fragment: str) -> None:
    config = {**RoundInstruction(round=1, spec=SPEC, prior_version="p").to_config(), **change}
    with pytest.raises(SpecError, match=fragment):
        RoundInstruction.from_config(config)


def test_missing_spec_is_refused() -> None:
    config = RoundInstruction(round=1, spec=SPEC, prior_version="p").to_config()
    del config["spec"]
    with pytest.raises(SpecError, match="missing 'spec'"):
        RoundInstruction.from_config(config)


def test_metrics_round_trip() -> None:
    m = RoundMetrics(
        num_examples=10, base_loss=2.0, prior_loss=1.9, personal_loss=1.5, clipped=True
    )
    assert RoundMetrics.from_metrics(m.to_metrics()) == m


def test_clipping_bounds_the_norm_and_keeps_direction() -> None:
    t = {"x": np.array([3.0, 4.0], np.float32)}
    clipped, norm, was = clip_by_global_norm(t, 1.0)
    assert norm == pytest.approx(5.0) and was
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(clipped["x"], [0.6, 0.8])
    same, _, was = clip_by_global_norm(t, 10.0)
    assert not was and np.array_equal(same["x"], t["x"])


def test_personal_lr_falls_back_to_lr_and_is_optional_on_the_wire() -> None:
    # Arrange: an instruction from a coordinator that predates personal-lr
    config = RoundInstruction(round=1, spec=SPEC, prior_version="p", lr=1e-3).to_config()
    del config["personal-lr"]

    # Execute
    old = RoundInstruction.from_config(config)
    new = RoundInstruction.from_config({**config, "personal-lr": 8e-3})

    # Assert: 0 means "the prior's lr"; a set value is what the personal steps use
    assert old.personal_lr == 0 and old.personal_learning_rate == 1e-3
    assert new.personal_learning_rate == 8e-3


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_a_bad_personal_lr_is_refused(bad: float) -> None:
    config = {**RoundInstruction(round=1, spec=SPEC, prior_version="p").to_config()}
    with pytest.raises(SpecError, match="personal_lr"):
        RoundInstruction.from_config({**config, "personal-lr": bad})
