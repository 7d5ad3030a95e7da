"""Turning devices' prior deltas into the next prior: validation and aggregators.

Only B travels, and A is shared by the cohort, so averaging B deltas is exact: the
averaged adapter is the adapter of the averaged update. Every update is checked before it
counts (shape, finiteness, clip norm); a bad one is refused and logged with its node, and
the round goes on without it.

Under secure aggregation the coordinator only learns the mean of a round's deltas, so
aggregators work from the mean (:meth:`Aggregator.apply`); :meth:`Aggregator.step` is
the plain path, which first takes the example-weighted mean of the individual updates.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.federation import BTensors as BTensors
from lorafleet.protocols.federation import global_norm

log = logging.getLogger(__name__)


# int8 and fp16 packing round each value; their norm may exceed the device's clipped
# norm by a little. 2% covers int8's worst case (half a step per value) with room.
NORM_TOLERANCE = 0.02


@dataclass(frozen=True)
class Update:
    """One device's contribution to a round, after decoding."""

    node_id: int
    delta: BTensors
    weight: float


def refusal_reason(
    delta: Mapping[str, npt.NDArray[Any]], shapes: Mapping[str, tuple[int, ...]], clip_norm: float
) -> str | None:
    """Why ``delta`` must not count, or None if it is acceptable."""
    if set(delta) != set(shapes):
        missing, extra = sorted(set(shapes) - set(delta)), sorted(set(delta) - set(shapes))
        return f"wrong tensors (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, expected in shapes.items():
        if tuple(delta[name].shape) != tuple(expected):
            return f"{name} has shape {tuple(delta[name].shape)}, expected {tuple(expected)}"
        if not np.isfinite(delta[name]).all():
            return f"{name} contains NaN or Inf"
    norm = global_norm(delta)
    if norm > clip_norm * (1 + NORM_TOLERANCE):
        return f"norm {norm:.4g} exceeds the clip norm {clip_norm:.4g}"
    return None


class Aggregator(ABC):
    """Maps the current prior and a round's accepted updates to the next prior.

    Aggregators with state (FedAdam's moments) expose it through :meth:`state` and
    :meth:`load_state` so a restarted coordinator resumes exactly.
    """

    name: str = ""

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0 or not math.isfinite(server_lr):
            raise SpecError(f"server learning rate must be positive, got {server_lr!r}")
        self.server_lr = server_lr

    @staticmethod
    def weighted_mean(updates: Sequence[Update]) -> BTensors:
        """Example-weighted mean of the deltas (float64 accumulation)."""
        if not updates:
            raise SpecError("no updates to aggregate")
        total = sum(u.weight for u in updates)
        if not total > 0:
            raise SpecError("updates carry no weight (num_examples are all zero)")
        out: BTensors = {}
        for name in updates[0].delta:
            acc = np.zeros(updates[0].delta[name].shape, dtype=np.float64)
            for u in updates:
                acc += u.weight * u.delta[name].astype(np.float64)
            out[name] = (acc / total).astype(np.float32)
        return out

    def step(
        self, prior: Mapping[str, npt.NDArray[np.float32]], updates: Sequence[Update]
    ) -> BTensors:
        """The next prior from individual updates (their weighted mean, then :meth:`apply`)."""
        return self.apply(prior, self.weighted_mean(updates))

    @abstractmethod
    def apply(
        self,
        prior: Mapping[str, npt.NDArray[np.float32]],
        mean: Mapping[str, npt.NDArray[np.float32]],
    ) -> BTensors:
        """The next prior from the round's mean delta."""

    def state(self) -> dict[str, npt.NDArray[np.float32]]:
        """Tensors to persist with the prior (none for stateless aggregators)."""
        return {}

    def load_state(self, state: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Restore :meth:`state` after a restart."""
        if state:
            raise SpecError(f"{self.name} keeps no state, but {len(state)} tensors were given")


class FedAvg(Aggregator):
    """prior + server_lr * weighted mean of deltas (McMahan et al., 2017)."""

    name = "fedavg"

    def apply(
        self,
        prior: Mapping[str, npt.NDArray[np.float32]],
        mean: Mapping[str, npt.NDArray[np.float32]],
    ) -> BTensors:
        """Prior + server_lr * mean."""
        return {k: (prior[k] + self.server_lr * mean[k]).astype(np.float32) for k in prior}


class FedAdam(Aggregator):
    """Adam on the server over the mean delta as a pseudo-gradient (Reddi et al., 2021)."""

    name = "fedadam"

    def __init__(
        self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(server_lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self._m: BTensors = {}
        self._v: BTensors = {}

    def apply(
        self,
        prior: Mapping[str, npt.NDArray[np.float32]],
        mean: Mapping[str, npt.NDArray[np.float32]],
    ) -> BTensors:
        """One Adam step with the mean delta as the (ascent) direction."""
        out: BTensors = {}
        for k, p in prior.items():
            m_old = self._m.get(k, np.zeros_like(p)).astype(np.float64)
            v_old = self._v.get(k, np.zeros_like(p)).astype(np.float64)
            m = self.beta1 * m_old + (1 - self.beta1) * mean[k]
            v = self.beta2 * v_old + (1 - self.beta2) * np.square(mean[k].astype(np.float64))
            self._m[k], self._v[k] = m.astype(np.float32), v.astype(np.float32)
            out[k] = (p + self.server_lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
        return out

    def state(self) -> dict[str, npt.NDArray[np.float32]]:
        """First and second moments, keyed ``m/<name>`` and ``v/<name>``."""
        return {
            **{f"m/{k}": v for k, v in self._m.items()},
            **{f"v/{k}": v for k, v in self._v.items()},
        }

    def load_state(self, state: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Restore the moments."""
        self._m = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("m/")}
        self._v = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("v/")}


AGGREGATORS: dict[str, Callable[[float], Aggregator]] = {"fedavg": FedAvg, "fedadam": FedAdam}


def make_aggregator(name: str, server_lr: float) -> Aggregator:
    """The aggregator registered under ``name``."""
    try:
        return AGGREGATORS[name](server_lr)
    except KeyError:
        raise SpecError(f"unknown aggregator {name!r}; choose from {sorted(AGGREGATORS)}") from None
