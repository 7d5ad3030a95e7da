"""The personalize step's last choice: a point between the prior and the trained B."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorafleet.client.adapter import get_b, materialize, set_b
from lorafleet.client.base import load_base
from lorafleet.client.federated import BLEND_WEIGHTS, blend_with_prior
from tests.client.test_adapter import random_b, spec_for


@pytest.mark.parametrize("target_weight", [1.0, 0.5, 0.25, 0.0])
def test_the_blend_keeps_the_weight_whose_adapter_validates_best(
    tiny_model_dir: Path, target_weight: float
) -> None:
    # Prepare: a prior, a trained B, and a validation loss that is lowest at a known
    # point on the line between them (squared distance to that point)
    base = load_base(tiny_model_dir)
    model = materialize(base.model, spec_for(base.sha256), base_sha256=base.sha256)
    prior, trained = random_b(model, seed=1), random_b(model, seed=2)
    best = {k: prior[k] + target_weight * (trained[k] - prior[k]) for k in prior}

    def loss() -> float:
        now = get_b(model)
        return float(sum(np.sum((now[k] - best[k]) ** 2) for k in best))

    set_b(model, prior)
    prior_loss = loss()
    set_b(model, trained)
    trained_loss = loss()
    # Execute
    got_loss, weight = blend_with_prior(model, prior, prior_loss, trained_loss, loss)
    # Assert: that point is chosen, the model holds it, and its loss is the one returned
    assert weight == target_weight
    held = get_b(model)
    for k in best:
        np.testing.assert_allclose(held[k], best[k], atol=1e-6)
    assert got_loss == pytest.approx(loss(), abs=1e-9)
    assert got_loss <= min(prior_loss, trained_loss)


def test_on_a_tie_the_trained_adapter_is_kept(tiny_model_dir: Path) -> None:
    # Prepare: a flat validation loss
    base = load_base(tiny_model_dir)
    model = materialize(base.model, spec_for(base.sha256), base_sha256=base.sha256)
    prior, trained = random_b(model, seed=1), random_b(model, seed=2)
    set_b(model, trained)
    # Execute
    _, weight = blend_with_prior(model, prior, 1.0, 1.0, lambda: 1.0)
    # Assert
    assert weight == 1.0 and 1.0 not in BLEND_WEIGHTS
    np.testing.assert_array_equal(get_b(model)[next(iter(trained))], trained[next(iter(trained))])
