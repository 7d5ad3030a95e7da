"""The masked vector's wire type under SecAgg+: the smallest unsigned integer its modulus needs.

Flower 1.41's ``secaggplus_mod`` masks in int64 and uploads every masked value as int64
(8 bytes), though each one is reduced modulo the round's modulus ``m`` (``2**32`` in
lorafleet), so it fits in ``ceil(log2 m)`` bits. The device narrows the masked arrays
to the smallest unsigned type holding ``[0, m)`` (uint32 for ``2**32``: half the bytes)
after the mod has masked them; the coordinator widens them back to int64 before
Flower sums them. Both sides refuse a value outside ``[0, m)``: a masked value there
means a broken mod or a tampered upload, and a silently wrapped one would corrupt the
whole round's sum.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.errors import IntegrityError

WIRE_TYPES = (np.uint8, np.uint16, np.uint32, np.uint64)
"""Candidate wire types, smallest first."""


def masked_dtype(modulus: int) -> np.dtype[np.unsignedinteger]:
    """The smallest unsigned type that holds every value in ``[0, modulus)``.

    Examples
    --------
    >>> masked_dtype(2**32), masked_dtype(2**16), masked_dtype(2**16 + 1)
    (dtype('uint32'), dtype('uint16'), dtype('uint32'))
    """
    if modulus < 2:
        raise IntegrityError(f"a SecAgg+ modulus must be at least 2, got {modulus}")
    for kind in WIRE_TYPES:
        if modulus - 1 <= np.iinfo(kind).max:
            return np.dtype(kind)
    raise IntegrityError(f"a SecAgg+ modulus must be at most 2**64, got {modulus}")


def _check_range(arr: npt.NDArray[np.integer], modulus: int, side: str) -> None:
    if arr.dtype.kind not in "iu":
        raise IntegrityError(f"{side}: a masked vector must be integers, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= modulus):
        raise IntegrityError(
            f"{side}: masked value outside [0, {modulus}) (min {int(arr.min())}, max "
            f"{int(arr.max())}); the device's SecAgg+ mod or its upload is broken"
        )


def narrow_masked(arr: npt.NDArray[np.integer], modulus: int) -> npt.NDArray[np.unsignedinteger]:
    """``arr`` (masked values modulo ``modulus``) in :func:`masked_dtype`, range-checked.

    Examples
    --------
    >>> narrow_masked(np.array([0, 2**32 - 1], np.int64), 2**32).dtype
    dtype('uint32')
    """
    _check_range(arr, modulus, "narrowing")
    return arr.astype(masked_dtype(modulus), copy=False)


def widen_masked(arr: npt.NDArray[np.integer], modulus: int) -> npt.NDArray[np.int64]:
    """A received masked array as int64 for Flower's sum, range-checked.

    Accepts any integer type (devices that predate narrowing send int64), so a fleet
    can update devices and coordinator in either order.
    """
    if modulus > 2**63:
        raise IntegrityError(f"widening: a modulus above 2**63 does not fit int64, got {modulus}")
    _check_range(arr, modulus, "widening")
    return arr.astype(np.int64, copy=False)
