from __future__ import annotations

import numpy as np
import pytest

from lorafleet.protocols.errors import SpecError
from lorafleet.server.aggregation import FedAdam, FedAvg, Update, make_aggregator, refusal_reason

SHAPES = {"a": (4, 2), "b": (3, 2)}


def delta(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def test_fedavg_is_the_example_weighted_mean_times_server_lr() -> None:
    prior = delta(1.0)
    updates = [Update(1, delta(0.3), 1.0), Update(2, delta(-0.1), 3.0)]
    out = FedAvg(server_lr=0.5).step(prior, updates)
    expected = 1.0 + 0.5 * (0.3 * 1 + -0.1 * 3) / 4
    assert all(np.allclose(v, expected) for v in out.values())


def test_fedadam_moves_toward_the_mean_and_its_state_survives_a_restart() -> None:
    prior = delta(0.0)
    a = FedAdam(server_lr=0.1)
    first = a.step(prior, [Update(1, delta(0.2), 1.0)])
    assert all((v > 0).all() for v in first.values())
    b = FedAdam(server_lr=0.1)
    b.load_state(a.state())
    assert all(
        np.array_equal(x, y)
        for x, y in zip(
            a.step(first, [Update(1, delta(0.2), 1.0)]).values(),
            b.step(first, [Update(1, delta(0.2), 1.0)]).values(),
            strict=True,
        )
    )


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"a": np.zeros((4, 2), np.float32)}, "wrong tensors"),
        ({"a": np.zeros((4, 3), np.float32), "b": np.zeros((3, 2), np.float32)}, "shape"),
        ({"a": np.full((4, 2), np.nan, np.float32), "b": np.zeros((3, 2), np.float32)}, "NaN"),
        ({"a": np.full((4, 2), 10.0, np.float32), "b": np.zeros((3, 2), np.float32)}, "clip norm"),
    ],
)
def test_bad_updates_are_refused_with_a_reason(bad: dict[str, np.ndarray], fragment: str) -> None:
    reason = refusal_reason(bad, SHAPES, clip_norm=1.0)
    assert reason is not None and fragment in reason


def test_a_good_update_at_the_clip_norm_is_accepted() -> None:
    d = delta(1.0)
    norm = float(np.sqrt(sum(np.square(v).sum() for v in d.values())))
    scaled = {k: v / norm for k, v in d.items()}
    assert refusal_reason(scaled, SHAPES, clip_norm=1.0) is None


def test_unknown_aggregator_and_bad_lr_are_refused() -> None:
    with pytest.raises(SpecError, match="choose from"):
        make_aggregator("median", 1.0)
    with pytest.raises(SpecError, match="positive"):
        FedAvg(server_lr=0.0)
