"""The federated round protocol: what a train message carries and what comes back.

One round, as both sides see it:

1. The coordinator sends each sampled device a :class:`RoundInstruction` (the adapter
   spec with its cohort seed, the prior version, local hyper-parameters, clip norm and
   upload packing) and, when the device lacks that prior version, the prior's B encoded
   with :func:`lorafleet.protocols.encoding.encode_tensors`.
2. The device trains its personal B (pulled toward the prior, Ditto-style) and, from the
   prior, a prior step; it returns only the clipped prior delta (B only, encoded in the
   round's packing) with a :class:`RoundMetrics` record. The personal adapter stays on
   the device.

With secure aggregation (SecAgg+) the same instruction travels inside the record layout
Flower's SecAgg+ workflow uses (``fitins.config``, with the prior's bytes as one more
field), and the device returns its clipped delta as one flat vector in
:func:`flatten` order, which Flower's ``secaggplus_mod`` quantizes and masks before it
leaves the device; the tensor names and shapes travel beside it in plaintext as a
layout (they follow from the public spec and base, never from the user's data).

Everything here is plain data: Flower records (or any other transport) carry the
``to_config`` dicts and the encoded bytes, so the wire contract does not depend on one
framework's types.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.encoding import Packing
from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.spec import _SHA256, AdapterSpec

# Keys of the records in a train message and its reply.
INSTRUCTION_KEY = "lorafleet.round"
PRIOR_KEY = "lorafleet.prior"
UPDATE_KEY = "lorafleet.update"
METRICS_KEY = "lorafleet.metrics"
# Fields inside those records: the prior's B (PRIOR_KEY) and the device's delta (UPDATE_KEY),
# each the bytes of `encode_tensors`.
PRIOR_FIELD = "b"
DELTA_FIELD = "delta"

BTensors = dict[str, npt.NDArray[np.float32]]
"""B matrices (or B deltas) keyed by module path in the base
(``model.layers.0.self_attn.q_proj``): what a prior is, what a device trains, and what a
round carries; the one definition both sides use."""

# Secure aggregation: Flower's legacy record names, which its SecAgg+ workflow and mod use.
SECURE_INSTRUCTION_KEY = "fitins.config"
SECURE_PRIOR_FIELD = "lorafleet-prior"
SECURE_LAYOUT_FIELD = "lorafleet-layout"
# The cohort's gradient-aligned shared A (protocols/shared_a.py), encoded like a prior and
# sent beside it to a device that lacks it: in the PRIOR_KEY record, or in SecAgg+'s config.
SHARED_A_FIELD = "a"
SECURE_SHARED_A_FIELD = "lorafleet-shared-a"

MAX_NUM_EXAMPLES = 10**9
"""The most training examples a device may report: a phone's notes are far fewer, and
anything larger (``1e12``, ``inf``) is a lie or a bug, refused at the protocol boundary."""

REFUSAL_PREFIX = "lorafleet: "
"""Starts the reason of a device's error reply when the device names its own mistake
(no data, a missing prior): the rest is one line for a person, which the coordinator
quotes when a round fails, instead of Flower's repr of a wrapped exception."""

ZERO_PRIOR = "zero"
"""The prior before round 1: B = 0. Devices know its shapes from their own base and
spec, so the coordinator never needs the base's architecture."""

Mode = Literal["train", "evaluate", "personalize", "sketch"]
"""``train``: prior step (delta out) and optional personal steps; ``personalize``: the
final prior in, personal fine-tuning only, nothing out; ``evaluate``: losses only;
``sketch``: round 0 of a gradient-aligned shared A, the device's normalized gradient
sketch out in place of a delta (protocols/shared_a.py)."""


@dataclass(frozen=True)
class RoundInstruction:
    """What a device needs to take part in one round."""

    round: int
    spec: AdapterSpec
    prior_version: str
    mode: Mode = "train"
    personal_steps: int = 8
    prior_steps: int = 8
    lr: float = 2e-3
    personal_lr: float = 0.0
    """Learning rate of the personal steps; 0: ``lr`` (what older coordinators mean)."""
    personal_a_lr: float = 0.0
    """Learning rate of A in a personalize round (a personal A, trained with B and kept on
    the device); 0: A stays the seeded one (what older coordinators mean)."""
    prox_mu: float = 0.0
    clip_norm: float = 10.0
    batch_size: int = 4
    seq_len: int = 128
    heldout_fraction: float = 0.2
    packing: Packing = "fp16"
    noise_std: float = 0.0
    """Std of the Gaussian noise the device adds to its clipped delta (client-side DP)."""
    blend: bool = True
    """In a personalize round, also try points between the prior and the fine-tuned B."""
    shared_a: str = ""
    """sha256 digest of the cohort's shared A (``shared_a_digest``); empty: the spec's
    seeded A (what older coordinators mean). The device trains on no other A."""
    sketch_passes: int = 4
    """In a sketch round: sign matrices per module; the sketch has passes x rank columns."""
    sketch_batches: int = 2
    """In a sketch round: training batches the device's gradient is summed over."""
    secure_weight_cap: int = 0
    """In a SecAgg+ round: the device weighs its masked delta by
    ``min(num_examples, cap) / cap`` (Flower's ``max_weight`` is the cap), so that the
    secure mean is example-weighted like a plain round's; 0: weight 1, an equal-weight
    mean (what older coordinators mean, and what DP rounds use)."""

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SpecError(f"round instruction: {what}")

        need(
            isinstance(self.round, int) and self.round >= 0,
            f"round must be >= 0, got {self.round!r}",
        )
        need(bool(self.prior_version), "prior_version is empty")
        need(
            self.mode in get_args(Mode),
            f"mode must be train, evaluate, personalize or sketch, got {self.mode!r}",
        )
        need(self.personal_steps >= 0 and self.prior_steps >= 0, "steps must be >= 0")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr!r}")
        need(
            self.personal_lr >= 0 and math.isfinite(self.personal_lr),
            f"personal_lr must be >= 0 (0: lr), got {self.personal_lr!r}",
        )
        need(
            isinstance(self.personal_a_lr, int | float)
            and not isinstance(self.personal_a_lr, bool)
            and 0 <= self.personal_a_lr < 1,
            f"personal_a_lr must be in [0, 1) (0: A stays seeded), got {self.personal_a_lr!r}",
        )
        need(self.prox_mu >= 0, f"prox_mu must be >= 0, got {self.prox_mu!r}")
        need(
            self.clip_norm > 0 and math.isfinite(self.clip_norm),
            f"clip_norm must be positive, got {self.clip_norm!r}",
        )
        need(self.batch_size >= 1 and self.seq_len >= 8, "batch_size must be >= 1 and seq_len >= 8")
        need(
            0 < self.heldout_fraction < 1,
            f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}",
        )
        need(
            self.packing in get_args(Packing),
            f"packing must be fp32, fp16 or int8, got {self.packing!r}",
        )
        need(
            isinstance(self.noise_std, int | float)
            and math.isfinite(self.noise_std)
            and self.noise_std >= 0,
            f"noise_std must be a finite number >= 0, got {self.noise_std!r}",
        )
        need(isinstance(self.blend, bool), f"blend must be true or false, got {self.blend!r}")
        need(
            isinstance(self.shared_a, str)
            and (self.shared_a == "" or bool(_SHA256.match(self.shared_a))),
            f"shared_a must be empty or a sha256 hex digest, got {self.shared_a!r}",
        )
        need(
            isinstance(self.secure_weight_cap, int)
            and not isinstance(self.secure_weight_cap, bool)
            and 0 <= self.secure_weight_cap <= MAX_NUM_EXAMPLES,
            f"secure-weight-cap must be an integer in 0..{MAX_NUM_EXAMPLES}, "
            f"got {self.secure_weight_cap!r}",
        )
        for name in ("sketch_passes", "sketch_batches"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64,
                f"{name.replace('_', '-')} must be an integer in 1..64, got {value!r}",
            )

    @property
    def personal_learning_rate(self) -> float:
        """The learning rate the personal steps use (``personal_lr``, else ``lr``)."""
        return self.personal_lr or self.lr

    def to_config(self) -> dict[str, int | float | str | bool]:
        """Flat scalars for a Flower ConfigRecord (the spec as its canonical JSON)."""
        out: dict[str, int | float | str | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = value.to_json() if f.name == "spec" else value
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundInstruction:
        """Parse :meth:`to_config` output, naming any missing or bad field."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                if f.default is not MISSING:  # has a default: optional on the wire
                    continue
                raise SpecError(f"round instruction: missing {key!r}")
            value = config[key]
            kwargs[f.name] = AdapterSpec.from_json(str(value)) if f.name == "spec" else value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"round instruction: {exc}") from None


@dataclass(frozen=True)
class RoundMetrics:
    """What a device reports: held-out losses and sizes, never data or the adapter."""

    num_examples: int
    base_loss: float
    prior_loss: float
    personal_loss: float
    delta_norm: float = 0.0
    clipped: bool = False
    train_seconds: float = 0.0
    bytes_up: int = 0

    def __post_init__(self) -> None:
        # Replies come from devices, so every number is checked before the coordinator
        # uses it: num_examples is an aggregation weight, and inf/nan/huge would let one
        # device crash the round or become the whole prior.
        n: object = self.num_examples
        if isinstance(n, float) and math.isfinite(n) and n.is_integer():
            object.__setattr__(self, "num_examples", int(n))
        elif isinstance(n, bool) or not isinstance(n, int):
            raise SpecError(
                f"round metrics: num-examples must be an integer, got {n!r}; "
                "report how many training examples the device used"
            )
        if not 0 <= self.num_examples <= MAX_NUM_EXAMPLES:
            raise SpecError(
                f"round metrics: num-examples must be in [0, {MAX_NUM_EXAMPLES}], "
                f"got {self.num_examples!r}"
            )
        b = self.bytes_up
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b < 2**63:
            raise SpecError(f"round metrics: bytes-up must be a size in bytes, got {b!r}")

    def to_metrics(self) -> dict[str, int | float]:
        """Flat numbers for a Flower MetricRecord."""
        return {
            k.replace("_", "-"): (int(v) if isinstance(v, bool) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> RoundMetrics:
        """Parse :meth:`to_metrics` output, refusing numbers no honest device sends.

        Examples
        --------
        >>> RoundMetrics.from_metrics({"num-examples": 12.0, "base-loss": 2.0,
        ...     "prior-loss": 1.9, "personal-loss": 1.8}).num_examples
        12
        >>> RoundMetrics.from_metrics({"num-examples": float("inf"), "base-loss": 2.0,
        ...     "prior-loss": 1.9, "personal-loss": 1.8})
        Traceback (most recent call last):
        ...
        lorafleet.protocols.errors.SpecError: round metrics: num-examples must be an integer, got inf; report how many training examples the device used
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in metrics:
                kwargs[f.name] = bool(metrics[key]) if f.name == "clipped" else metrics[key]
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"round metrics: {exc}") from None


def global_norm(tensors: Mapping[str, npt.NDArray[np.floating[Any]]]) -> float:
    """L2 norm over every element of every tensor (float64 accumulation)."""
    return math.sqrt(
        sum(float(np.square(np.asarray(t, dtype=np.float64)).sum()) for t in tensors.values())
    )


def clip_by_global_norm(
    tensors: Mapping[str, npt.NDArray[np.floating[Any]]], max_norm: float
) -> tuple[dict[str, npt.NDArray[np.float32]], float, bool]:
    """Scale ``tensors`` so their global norm is at most ``max_norm``.

    Returns the (possibly scaled) float32 tensors, the norm before clipping and whether
    clipping happened. Clipping bounds each device's influence on the prior, which is
    what secure aggregation's value ranges and differential privacy both rely on.
    """
    norm = global_norm(tensors)
    scale = 1.0 if norm <= max_norm or norm == 0 else max_norm / norm
    out = {
        k: (np.asarray(v, dtype=np.float64) * scale).astype(np.float32) for k, v in tensors.items()
    }
    return out, norm, scale < 1.0


Layout = tuple[tuple[str, tuple[int, ...]], ...]
"""Tensor names and shapes of a flattened delta, in :func:`flatten` order."""


def flatten(
    tensors: Mapping[str, npt.NDArray[np.floating[Any]]],
) -> tuple[npt.NDArray[np.float32], Layout]:
    """One float32 vector of every tensor, in sorted-name order, and its layout.

    Secure aggregation sums vectors; one vector per device in a fixed order means a
    device whose tensors differ fails the sum loudly instead of adding misaligned values.
    """
    names = sorted(tensors)
    layout: Layout = tuple((n, tuple(int(d) for d in np.shape(tensors[n]))) for n in names)
    if not names:
        return np.zeros(0, np.float32), layout
    flat = np.concatenate([np.asarray(tensors[n], np.float32).reshape(-1) for n in names])
    return flat, layout


def unflatten(flat: npt.NDArray[Any], layout: Layout) -> dict[str, npt.NDArray[np.float32]]:
    """The tensors of :func:`flatten`, from the vector and its layout."""
    sizes = [math.prod(shape) for _, shape in layout]
    if int(np.size(flat)) != sum(sizes):
        raise SpecError(f"flat delta has {np.size(flat)} values, its layout describes {sum(sizes)}")
    out: dict[str, npt.NDArray[np.float32]] = {}
    offset = 0
    vector = np.asarray(flat).reshape(-1)
    for (name, shape), size in zip(layout, sizes, strict=True):
        out[name] = vector[offset : offset + size].astype(np.float32).reshape(shape)
        offset += size
    return out


def layout_to_json(layout: Layout) -> str:
    """The layout as compact JSON (a plaintext field of a secure reply)."""
    return json.dumps([[n, list(s)] for n, s in layout], separators=(",", ":"))


def layout_from_json(text: str) -> Layout:
    """Parse :func:`layout_to_json`, naming what is wrong."""
    try:
        raw = json.loads(text)
        return tuple((str(n), tuple(int(d) for d in s)) for n, s in raw)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"delta layout is not valid JSON of [name, shape] pairs ({exc})") from None
