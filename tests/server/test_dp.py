"""The privacy accountant and the noise the coordinator adds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.server.dp import (
    DEFAULT_ORDERS,
    PrivacyLedger,
    epsilon_from_rdp,
    gaussian_noise_like,
    rdp_sampled_gaussian,
)

# Reference values from Google's dp-accounting 0.6.0 (RdpAccountant with the same integer
# orders, SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)).
REFERENCE = [
    (1.0, 1.0, 1, 1e-5, 4.752728336819822),
    (1.0, 2.0, 20, 1e-5, 12.301691480042894),
    (0.5, 1.0, 10, 1e-5, 11.770582666023335),
    (0.01, 1.1, 1000, 1e-5, 1.7252908180449444),
    (0.1, 0.8, 50, 1e-6, 10.70591098034756),
    (0.3, 5.0, 3, 1e-5, 0.46652008140867013),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "expected"), REFERENCE)
def test_epsilon_matches_dp_accounting(
    q: float, sigma: float, steps: int, delta: float, expected: float
) -> None:
    # Prepare
    ledger = PrivacyLedger()
    # Execute
    for r in range(steps):
        ledger.add(r + 1, q, sigma)
    # Assert
    assert ledger.epsilon(delta) == pytest.approx(expected, rel=1e-9)


def test_unsampled_gaussian_rdp_is_alpha_over_two_sigma_squared() -> None:
    rdp = rdp_sampled_gaussian(1.0, 1.5, DEFAULT_ORDERS)
    assert np.allclose(rdp, np.array(DEFAULT_ORDERS) / (2 * 1.5**2))


def test_more_rounds_less_noise_and_more_sampling_spend_more() -> None:
    def eps(q: float, sigma: float, steps: int) -> float:
        ledger = PrivacyLedger()
        for r in range(steps):
            ledger.add(r, q, sigma)
        return ledger.epsilon(1e-5)

    assert eps(0.5, 1.0, 1) < eps(0.5, 1.0, 5) < eps(0.5, 1.0, 20)
    assert eps(0.5, 2.0, 5) < eps(0.5, 1.0, 5)
    assert eps(0.1, 1.0, 5) < eps(0.5, 1.0, 5) < eps(1.0, 1.0, 5)
    assert PrivacyLedger().epsilon(1e-5) == 0.0
    assert math.isinf(epsilon_from_rdp(rdp_sampled_gaussian(0.5, 0.0), DEFAULT_ORDERS, 1e-5)[0])


def test_ledger_survives_a_restart_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger()
    ledger.add(1, 0.5, 1.0)
    ledger.add(2, 0.5, 0.8)
    path = tmp_path / "privacy.json"
    # Execute
    ledger.save(path)
    again = PrivacyLedger.load(path)
    # Assert
    assert again.steps == ledger.steps
    assert again.epsilon(1e-5) == ledger.epsilon(1e-5)
    assert PrivacyLedger.load(tmp_path / "missing.json").steps == []
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match="privacy ledger"):
        PrivacyLedger.load(path)


@pytest.mark.parametrize(
    ("q", "sigma", "match"),
    [(1.5, 1.0, "sampling rate"), (0.5, -1.0, "noise multiplier")],
)
def test_bad_parameters_are_named(q: float, sigma: float, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        PrivacyLedger().add(1, q, sigma)


def test_noise_has_the_asked_std_and_shapes() -> None:
    like = {"a": np.zeros((200, 50), np.float32), "b": np.zeros(3000, np.float32)}
    noise = gaussian_noise_like(like, 0.3, np.random.default_rng(0))
    assert {k: v.shape for k, v in noise.items()} == {"a": (200, 50), "b": (3000,)}
    assert noise["a"].dtype == np.float32
    assert np.std(noise["a"]) == pytest.approx(0.3, rel=0.03)
    assert gaussian_noise_like(like, 0.3)["b"].std() > 0  # OS-seeded by default
