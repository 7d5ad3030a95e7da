"""Frozen A matrices from a cohort seed, bit-identical on every platform.

Every device in a cohort must build exactly the same A for each adapted module, or the
B matrices trained against it could not be averaged. Device RNGs (torch, CUDA, MPS) and
NumPy's distribution samplers make no such promise across versions and platforms, so A
is computed here from the raw 64-bit output of a PCG64 bit generator (whose stream NumPy
keeps stable, NEP 19) with exact IEEE arithmetic only: no log, no cos, no library-
dependent rounding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.spec import AdapterSpec

_DOMAIN = b"lorafleet/A/v1\x00"


def module_seed(cohort_seed: int, a_init: str, module_path: str) -> int:
    """128-bit seed of one module's A, bound to cohort, scheme and module path.

    Hashing the module path means each layer's A is independent of the others and of
    the order in which a device happens to visit them.
    """
    h = hashlib.sha256()
    h.update(_DOMAIN)
    h.update(cohort_seed.to_bytes(8, "little"))
    h.update(a_init.encode() + b"\x00")
    h.update(module_path.encode())
    return int.from_bytes(h.digest()[:16], "little")


def derive_a(spec: AdapterSpec, module_path: str, in_features: int) -> npt.NDArray[np.float32]:
    """The frozen A of one module, shape ``(rank, in_features)``, float32.

    Parameters
    ----------
    spec
        The cohort's adapter spec (rank, seed and init scheme are used).
    module_path
        Dotted path of the adapted Linear inside the base model, for example
        ``model.layers.0.self_attn.q_proj``.
    in_features
        The Linear's input width (fan-in).

    Examples
    --------
    >>> spec = AdapterSpec(base_model_id="m", base_sha256="0" * 64, rank=2)
    >>> derive_a(spec, "layers.0.q_proj", 4).shape
    (2, 4)
    """
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise SpecError(f"in_features must be a positive integer, got {in_features!r}")
    bitgen = np.random.PCG64(module_seed(spec.cohort_seed, spec.a_init, module_path))
    raw = bitgen.random_raw(spec.rank * in_features)  # (r * fan_in,) uint64
    bound = 1.0 / math.sqrt(in_features)  # sqrt is correctly rounded in IEEE 754
    if spec.a_init == "kaiming_uniform":
        # 53 high bits -> exact float64 in [0, 1); 2u - 1 is exact; one rounding per multiply.
        u = (raw >> np.uint64(11)).astype(np.float64) * (2.0**-53)
        a64 = (2.0 * u - 1.0) * bound
    else:  # "sign": the top bit chooses the sign
        a64 = np.where((raw >> np.uint64(63)) == 1, bound, -bound)
    return a64.astype(np.float32).reshape(spec.rank, in_features)


def a_digest(spec: AdapterSpec, modules: Iterable[tuple[str, int]]) -> str:
    """sha256 over the A matrices of ``(module_path, in_features)`` pairs, in sorted order.

    Devices compare this to prove they share the same frozen half of the adapter.
    """
    h = hashlib.sha256()
    for path, fan_in in sorted(modules):
        a = derive_a(spec, path, fan_in)
        h.update(path.encode() + b"\x00")
        h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return h.hexdigest()
