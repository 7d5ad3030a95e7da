"""The gradient-aligned shared A: public sketch matrices, the A from a summed sketch, its checks."""

from __future__ import annotations

import numpy as np
import pytest

from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.shared_a import (
    ROW_NORM,
    a_from_sketch,
    check_shared_a,
    normalize_sketch,
    shared_a_digest,
    sketch_signs,
)
from lorafleet.protocols.spec import AdapterSpec

SPEC = AdapterSpec(base_model_id="m", base_sha256="0" * 64, rank=3, cohort_seed=7)


def test_sketch_signs_are_public_signs_rebuilt_alike_and_distinct_per_pass_path_and_cohort() -> (
    None
):
    a = sketch_signs(SPEC, "layers.0.q_proj", 10, 0)
    assert a.shape == (10, 3) and a.dtype == np.float32
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert np.array_equal(a, sketch_signs(SPEC, "layers.0.q_proj", 10, 0))
    others = [
        sketch_signs(SPEC, "layers.0.q_proj", 10, 1),
        sketch_signs(SPEC, "layers.0.v_proj", 10, 0),
        sketch_signs(
            AdapterSpec(base_model_id="m", base_sha256="0" * 64, rank=3), "layers.0.q_proj", 10, 0
        ),
    ]
    assert all(not np.array_equal(a, o) for o in others)
    with pytest.raises(SpecError, match="out_features"):
        sketch_signs(SPEC, "p", 0, 0)


def _planted(
    rng: np.random.Generator, out: int, fan_in: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """A gradient with a clear top-``rank`` right singular subspace, and that subspace."""
    u, _ = np.linalg.qr(rng.normal(size=(out, out)))
    v, _ = np.linalg.qr(rng.normal(size=(fan_in, fan_in)))
    s = np.concatenate([[10.0, 8.0, 6.0], 0.1 * np.ones(min(out, fan_in) - rank)])
    g = u[:, : len(s)] @ np.diag(s) @ v[:, : len(s)].T
    return g, v[:, :rank]


def test_the_a_from_summed_sketches_spans_the_summed_gradients_top_right_directions() -> None:
    rng = np.random.default_rng(0)
    g, top = _planted(rng, 12, 20, 3)
    # Two devices' gradients sum to g; each sends its own sketch with the public signs.
    g1 = rng.normal(scale=0.5, size=g.shape)
    omega = np.concatenate([sketch_signs(SPEC, "p", 12, j) for j in range(4)], axis=1)
    summed = (g1.T @ omega) + ((g - g1).T @ omega)
    a = a_from_sketch({"p": summed}, 3)["p"]
    assert a.shape == (3, 20)
    np.testing.assert_allclose(a @ a.T, ROW_NORM**2 * np.eye(3), atol=1e-6)
    # Principal angles between A's row space and the planted subspace are near zero.
    cosines = np.linalg.svd((a / ROW_NORM) @ top, compute_uv=False)
    assert cosines.min() > 0.99
    # The same sum gives the same A, signs included; a scaled sum too.
    assert np.array_equal(a, a_from_sketch({"p": summed * 3.0}, 3)["p"])


def test_a_rank_deficient_or_non_finite_sketch_is_refused() -> None:
    with pytest.raises(SpecError, match="fewer than 3 directions"):
        a_from_sketch({"p": np.outer(np.ones(20), np.ones(8))}, 3)
    with pytest.raises(SpecError, match="columns"):
        a_from_sketch({"p": np.ones((20, 2))}, 3)
    bad = np.ones((20, 8))
    bad[0, 0] = np.nan
    with pytest.raises(SpecError, match="NaN"):
        a_from_sketch({"p": bad}, 3)


def test_normalize_sketch_gives_every_device_global_norm_one() -> None:
    out = normalize_sketch(
        {"a": np.full((4, 2), 5.0), "b": np.full((3, 2), 1e-4), "c": np.zeros((2, 2))}
    )
    total = np.sqrt(sum(float(np.square(v.astype(np.float64)).sum()) for v in out.values()))
    assert abs(total - np.sqrt(2 / 3)) < 1e-6  # the zero module stays zero
    assert abs(float(np.linalg.norm(out["a"])) - 1 / np.sqrt(3)) < 1e-6
    with pytest.raises(SpecError, match="empty"):
        normalize_sketch({})


def _good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return a_from_sketch({"p": rng.normal(size=(6, 12)), "q": rng.normal(size=(5, 12))}, 3)


def test_a_device_accepts_the_named_a_and_refuses_any_other() -> None:
    good = _good()
    fan_ins = {"p": 6, "q": 5}
    checked = check_shared_a(good, fan_ins, 3, shared_a_digest(good))
    assert set(checked) == {"p", "q"}

    def refused(a: dict[str, np.ndarray], match: str, fans: dict[str, int] = fan_ins) -> None:
        with pytest.raises(IntegrityError, match=match):
            check_shared_a(a, fans, 3, shared_a_digest(a))

    with pytest.raises(IntegrityError, match="digest"):
        check_shared_a(good, fan_ins, 3, "f" * 64)
    refused({**good, "p": good["p"] * 4}, "orthogonal rows")  # a scaled-up A
    skewed = good["p"].copy()
    skewed[1] = skewed[0]
    refused({**good, "p": skewed}, "orthogonal rows")
    nan = good["p"].copy()
    nan[0, 0] = np.nan
    refused({**good, "p": nan}, "NaN")
    refused({**good, "p": good["p"][:, :5]}, "shape")
    refused({"p": good["p"]}, "missing")
    refused(good, "unexpected", {"p": 6})


def test_round_instructions_carry_the_shared_a_digest_and_the_sketch_round() -> None:
    digest = shared_a_digest(_good())
    instr = RoundInstruction(round=0, spec=SPEC, prior_version="zero", mode="sketch", shared_a="")
    assert RoundInstruction.from_config(instr.to_config()) == instr
    later = RoundInstruction(round=3, spec=SPEC, prior_version="x/v2", shared_a=digest)
    assert RoundInstruction.from_config(later.to_config()).shared_a == digest
    # An older coordinator's instruction means the seeded A.
    config = later.to_config()
    del config["shared-a"]
    assert RoundInstruction.from_config(config).shared_a == ""
    with pytest.raises(SpecError, match="shared_a"):
        RoundInstruction(round=1, spec=SPEC, prior_version="zero", shared_a="not-a-digest")
    with pytest.raises(SpecError, match="sketch-passes"):
        RoundInstruction(round=0, spec=SPEC, prior_version="zero", mode="sketch", sketch_passes=0)
