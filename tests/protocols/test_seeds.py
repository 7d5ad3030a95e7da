from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.seeds import a_digest, derive_a
from lorafleet.protocols.spec import AdapterSpec

SPEC = AdapterSpec(base_model_id="smollm2-135m-instruct", base_sha256="ab" * 32, cohort_seed=1234)
MODULE = "model.layers.0.self_attn.q_proj"


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("a_init", "expected"),
    [
        # Committed test vectors: every platform must produce exactly these bytes. If one
        # changes, devices in the field would stop agreeing on A: never edit, add a scheme.
        ("kaiming_uniform", "6d21f14cad80510578d493a2412d56ca443ee88f69f5ece283a7daf2af09f718"),
        ("sign", "9eb9332e4ce657c6efa6ea6b74fc4ab4c7773ac19ba1c816d81c79bb60f9d82b"),
    ],
)
def test_a_matches_the_committed_test_vector(a_init: str, expected: str) -> None:
    spec = AdapterSpec(
        base_model_id=SPEC.base_model_id,
        base_sha256=SPEC.base_sha256,
        cohort_seed=1234,
        a_init=a_init,  # type: ignore[arg-type]
    )
    a = derive_a(spec, MODULE, 576)
    assert a.shape == (8, 576) and a.dtype == np.float32
    assert sha(a) == expected


def test_a_has_the_kaiming_uniform_range_and_spread() -> None:
    a = derive_a(SPEC, MODULE, 576).astype(np.float64)
    bound = 1 / np.sqrt(576)
    assert np.abs(a).max() <= bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform(-b, b) has std b/sqrt(3)
    assert abs(a.mean()) < 0.05 * bound


def test_a_differs_per_module_and_seed_but_not_per_call() -> None:
    other_seed = AdapterSpec(base_model_id="m", base_sha256="ab" * 32, cohort_seed=1235)
    a1 = derive_a(SPEC, MODULE, 64)
    assert np.array_equal(a1, derive_a(SPEC, MODULE, 64))
    assert not np.array_equal(a1, derive_a(SPEC, "model.layers.1.self_attn.q_proj", 64))
    assert not np.array_equal(a1, derive_a(other_seed, MODULE, 64))


def test_a_digest_ignores_module_order() -> None:
    mods = [("b.q_proj", 16), ("a.q_proj", 16)]
    assert a_digest(SPEC, mods) == a_digest(SPEC, list(reversed(mods)))


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_bad_fan_in_is_refused(bad: object) -> None:
    with pytest.raises(SpecError, match="in_features"):
        derive_a(SPEC, MODULE, bad)  # type: ignore[arg-type]
