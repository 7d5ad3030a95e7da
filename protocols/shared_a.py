"""A shared frozen A aligned with the cohort's gradient, built once from a summed sketch.

B-only training can only move a Linear's output along ``B A x``: A fixes which input
directions an adapter can use. A seeded random A picks them blindly; docs/personalization.md
measured that a shared A whose rows span the top right singular vectors of the cohort's
pooled gradient ``G = dL/dW`` (at the bare base) lets B-only training beat stock peft's
A-and-B training, where random, orthonormal or the weight's own directions do not (the
idea of LoRA-GA, Wang et al. 2024, here summed across devices).

The devices never send G. Round 0 asks each for a sketch ``G_u^T Omega`` per module:
``Omega`` is a public random sign matrix rebuilt from the cohort seed, like the seeded A,
so the sketch is linear in G, the sum over devices is the sketch of the summed gradient,
and SecAgg+ can add it up like any delta. The coordinator keeps the top ``rank`` left
singular vectors of the summed sketch per module (a randomized range finder, Halko et
al. 2011) as A's rows, at the seeded A's expected row norm, and every device checks the A
it is handed (:func:`check_shared_a`) before it trains on it. A then stays fixed: B is
still the only thing trained and sent.

What the coordinator can choose is which ``rank`` orthonormal directions B acts on, at a
norm the devices fix; it cannot scale A up, send NaN, or hand one device another A than
the digest every instruction names.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.spec import AdapterSpec

ATensors = dict[str, npt.NDArray[np.float32]]
"""A matrices keyed by module path, each ``(rank, in_features)``."""

ROW_NORM = 1.0 / math.sqrt(3.0)
"""Every row's L2 norm: the expected row norm of the seeded kaiming-uniform A
(entries uniform in +-1/sqrt(fan_in) have variance 1/(3 fan_in)), so a shared A keeps
the scale the learning rates were chosen for."""

ORTHO_TOLERANCE = 1e-3
"""Largest entry of ``|A A^T / ROW_NORM^2 - I|`` a device accepts (float32 round-off is
about 1e-6; anything larger is another matrix)."""

DEFAULT_PASSES = 4
"""Sketch columns are ``passes x rank``: 4 passes oversample a rank-8 A fourfold, enough
for the top directions of a gradient whose spectrum falls fast."""

_DOMAIN = b"lorafleet/sketch/v1\x00"


def sketch_signs(
    spec: AdapterSpec, module_path: str, out_features: int, index: int
) -> npt.NDArray[np.float32]:
    """Pass ``index``'s public sign matrix ``Omega`` for one module, ``(out_features, rank)``.

    Entries are +-1 from the top bit of a PCG64 stream seeded by the cohort seed, module
    path and pass, so every device builds the same matrix bit for bit (as the seeded A).
    """
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise SpecError(f"out_features must be a positive integer, got {out_features!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise SpecError(f"sketch pass must be an integer >= 0, got {index!r}")
    h = hashlib.sha256()
    h.update(_DOMAIN)
    h.update(spec.cohort_seed.to_bytes(8, "little"))
    h.update(index.to_bytes(4, "little"))
    h.update(module_path.encode())
    raw = np.random.PCG64(int.from_bytes(h.digest()[:16], "little")).random_raw(
        out_features * spec.rank
    )
    signs = np.where((raw >> np.uint64(63)) == 1, 1.0, -1.0).astype(np.float32)
    return signs.reshape(out_features, spec.rank)


def normalize_sketch(sketch: Mapping[str, npt.NDArray[Any]]) -> ATensors:
    """Scale each module's sketch to norm ``1/sqrt(modules)``: global norm 1 per device.

    Every device then weighs the same in every module's sum, whatever its amount of
    text or its loss scale, and the clipped range of SecAgg+'s quantization fits.
    """
    if not sketch:
        raise SpecError("gradient sketch is empty")
    share = 1.0 / math.sqrt(len(sketch))
    out: ATensors = {}
    for path, value in sketch.items():
        v = np.asarray(value, dtype=np.float64)
        norm = float(np.linalg.norm(v))
        if not math.isfinite(norm):
            raise SpecError(f"gradient sketch of {path} is not finite")
        out[path] = (v * (share / norm) if norm > 0 else v).astype(np.float32)
    return out


def a_from_sketch(sketch: Mapping[str, npt.NDArray[Any]], rank: int) -> ATensors:
    """The shared A from a summed sketch, rows of norm :data:`ROW_NORM`.

    Per module, A's rows are the top ``rank`` left singular vectors of its
    ``(in_features, columns)`` sketch. Each row's sign is fixed (its largest entry is positive), so the same sum gives the
    same A. A module whose sketch has fewer than ``rank`` independent directions (too
    few devices or too little text) is refused: a rank-deficient A would waste B's rows.
    """
    out: ATensors = {}
    for path in sorted(sketch):
        y = np.asarray(sketch[path], dtype=np.float64)
        if y.ndim != 2 or y.shape[1] < rank:
            raise SpecError(
                f"sketch of {path} has shape {y.shape}; it needs at least {rank} columns"
            )
        if not np.isfinite(y).all():
            raise SpecError(f"summed sketch of {path} contains NaN or Inf")
        u, s, _ = np.linalg.svd(y, full_matrices=False)
        if s[0] <= 0 or s[rank - 1] <= 1e-9 * s[0]:
            raise SpecError(
                f"summed sketch of {path} spans fewer than {rank} directions; "
                "more devices or more text are needed for a gradient-aligned A"
            )
        rows = u[:, :rank].T.copy()
        for i, row in enumerate(rows):
            if row[int(np.argmax(np.abs(row)))] < 0:
                rows[i] = -row
        out[path] = (rows * ROW_NORM).astype(np.float32)
    return out


def shared_a_digest(a: Mapping[str, npt.NDArray[Any]]) -> str:
    """sha256 over every module's path and float32 little-endian A, in sorted order.

    Every round instruction names it, so a coordinator cannot hand devices different A.
    """
    h = hashlib.sha256(b"lorafleet/shared-a/v1\x00")
    for path in sorted(a):
        value = np.ascontiguousarray(a[path], dtype="<f4")
        h.update(path.encode() + b"\x00")
        h.update(repr(tuple(value.shape)).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def check_shared_a(
    a: Mapping[str, npt.NDArray[Any]],
    fan_ins: Mapping[str, int],
    rank: int,
    digest: str,
) -> ATensors:
    """The coordinator's A, checked before a device trains on it; refuses anything else.

    It must hash to ``digest`` (the instruction's), cover exactly the device's adapted
    modules, have shape ``(rank, fan_in)``, be finite, and have orthogonal rows of norm
    :data:`ROW_NORM`: so a coordinator can pick directions, never a scale that would
    blow up training or hide a large update in a small B.
    """
    if shared_a_digest(a) != digest:
        raise IntegrityError("the shared A does not match the digest the round names")
    missing, extra = sorted(set(fan_ins) - set(a)), sorted(set(a) - set(fan_ins))
    if missing or extra:
        raise IntegrityError(
            f"the shared A does not fit this adapter: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    out: ATensors = {}
    for path, fan_in in fan_ins.items():
        value = np.asarray(a[path], dtype=np.float32)
        if value.shape != (rank, fan_in):
            raise IntegrityError(
                f"the shared A of {path} has shape {value.shape}, expected {(rank, fan_in)}"
            )
        if not np.isfinite(value).all():
            raise IntegrityError(f"the shared A of {path} contains NaN or Inf")
        gram = value.astype(np.float64) @ value.astype(np.float64).T / ROW_NORM**2
        if float(np.abs(gram - np.eye(rank)).max()) > ORTHO_TOLERANCE:
            raise IntegrityError(
                f"the shared A of {path} does not have orthogonal rows of norm {ROW_NORM:.4f}"
            )
        out[path] = value
    return out
