"""The masked vector's wire type: smallest unsigned type for the modulus, range-checked."""

from __future__ import annotations

import numpy as np
import pytest

from lorafleet.protocols.errors import IntegrityError
from lorafleet.protocols.masked import masked_dtype, narrow_masked, widen_masked


@pytest.mark.parametrize(
    ("modulus", "dtype"),
    [(2**8, np.uint8), (2**8 + 1, np.uint16), (2**16, np.uint16), (2**32, np.uint32)],
)
def test_the_wire_type_is_the_smallest_that_holds_the_modulus(modulus: int, dtype: type) -> None:
    assert masked_dtype(modulus) == np.dtype(dtype)


def test_narrow_then_widen_gives_back_the_same_values() -> None:
    # Prepare: the extremes of [0, 2**32) as Flower's mod leaves them (int64)
    masked = np.array([0, 1, 2**31, 2**32 - 1], np.int64)
    # Execute
    wire = narrow_masked(masked, 2**32)
    back = widen_masked(wire, 2**32)
    # Assert: half the bytes, the same values
    assert wire.dtype == np.uint32 and wire.nbytes == masked.nbytes // 2
    assert back.dtype == np.int64 and np.array_equal(back, masked)


@pytest.mark.parametrize("bad", [-1, 2**32, 2**40])
@pytest.mark.parametrize("step", [narrow_masked, widen_masked])
def test_a_value_outside_the_modulus_is_refused_with_one_clear_error(bad: int, step) -> None:  # type: ignore[no-untyped-def]
    masked = np.array([5, bad, 7], np.int64)
    with pytest.raises(IntegrityError, match=r"masked value outside \[0, 4294967296\)"):
        step(masked, 2**32)


def test_a_float_masked_vector_is_refused() -> None:
    with pytest.raises(IntegrityError, match="must be integers"):
        widen_masked(np.array([1.5]), 2**32)
