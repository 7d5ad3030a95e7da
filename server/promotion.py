"""Federated evaluation of prior versions and the rule that promotes them.

A round's aggregate is a *candidate*: it is stored as a new prior version but not made
active. Its evaluation costs the devices nothing extra: the next round trains from the
candidate, and every device of a round already measures the prior it received on its
validation split before training (``prior_loss``), next to the bare base
(``base_loss``, the zero prior: B = 0 makes LoRA the identity). Those replies score the
candidate; the coordinator keeps only their mean and spread (a
:class:`PriorScore`), as an evaluation row of that version. An extra evaluate step is
sent only for the last candidate of a run, which no later round would score.

The score compares priors across rounds whose sampled devices differ, and users differ
far more from each other (a hard user's loss may be 30% above an easy one's) than one
prior version from the next. So the score is relative per device: the prior's loss over
the base's loss on that device's own validation text, averaged over the devices (1.0 is
the base; 0.9 is 10% better). Dividing by the base removes each user's difficulty from
the comparison before averaging, and costs nothing, since both losses come in every
reply.

:class:`PromotionPolicy` then decides: the candidate becomes active only if its score
is at most the active version's score times ``1 + tolerance`` (against the zero prior
the active score is exactly 1.0). Otherwise the active version stays, the round that
scored the candidate discards its update (it was built on the held candidate), and the
next round trains from the active version again: a revision that makes things worse is
reverted, and the decision with its reason and both scores is recorded in the registry
(``Registry.decide_prior``), where the console shows it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lorafleet.protocols.errors import SpecError

DEFAULT_TOLERANCE = 0.01
"""A candidate may be at most 1% worse (relative) than the active prior and still be
promoted: sampling noise between rounds is of that order with a handful of devices."""


@dataclass(frozen=True)
class PriorScore:
    """Devices' validation losses of one prior version, as mean and spread.

    ``rel_*`` is the per-device ratio prior loss / base loss (the promotion rule's
    score); ``val_loss_*`` the plain validation loss, for people reading the console.
    """

    devices: int
    rel_mean: float
    rel_std: float
    val_loss_mean: float
    val_loss_std: float
    val_loss_min: float
    val_loss_max: float

    @classmethod
    def from_losses(cls, prior_losses: Sequence[float], base_losses: Sequence[float]) -> PriorScore:
        """Score from each device's (prior loss, base loss) on its validation split.

        Examples
        --------
        >>> s = PriorScore.from_losses([1.8, 2.7], [2.0, 3.0])
        >>> (s.devices, round(s.rel_mean, 6), round(s.val_loss_mean, 6))
        (2, 0.9, 2.25)
        """
        prior = np.asarray(prior_losses, np.float64)
        base = np.asarray(base_losses, np.float64)
        if prior.shape != base.shape or prior.ndim != 1 or prior.size == 0:
            raise SpecError("a prior score needs one prior loss and one base loss per device")
        if not (np.isfinite(prior).all() and np.isfinite(base).all() and (base > 0).all()):
            raise SpecError("a prior score needs finite losses and positive base losses")
        rel = prior / base
        return cls(
            devices=int(prior.size),
            rel_mean=float(rel.mean()),
            rel_std=float(rel.std()),
            val_loss_mean=float(prior.mean()),
            val_loss_std=float(prior.std()),
            val_loss_min=float(prior.min()),
            val_loss_max=float(prior.max()),
        )

    @classmethod
    def from_metrics(cls, rows: Iterable[Mapping[str, float]]) -> PriorScore | None:
        """Score from reply metrics (``prior_loss``, ``base_loss``); None without usable rows."""
        pairs = [
            (float(r["prior_loss"]), float(r["base_loss"]))
            for r in rows
            if "prior_loss" in r
            and "base_loss" in r
            and math.isfinite(r["prior_loss"])
            and math.isfinite(r["base_loss"])
            and r["base_loss"] > 0
        ]
        if not pairs:
            return None
        return cls.from_losses([p for p, _ in pairs], [b for _, b in pairs])

    def to_metrics(self) -> dict[str, float]:
        """The evaluation row's metrics (aggregates only: no device's own number)."""
        return {
            "rel_loss_mean": self.rel_mean,
            "rel_loss_std": self.rel_std,
            "val_loss_mean": self.val_loss_mean,
            "val_loss_std": self.val_loss_std,
            "val_loss_min": self.val_loss_min,
            "val_loss_max": self.val_loss_max,
        }

    @staticmethod
    def pooled_rel_mean(rows: Iterable[tuple[int, Mapping[str, float]]]) -> float | None:
        """The relative score over several evaluations (``(devices, metrics)``), device-weighted.

        An active version is scored again by every round that trains from it; pooling
        those rounds compares a candidate with everything known about the active one.
        """
        total, weight = 0.0, 0
        for devices, metrics in rows:
            value = metrics.get("rel_loss_mean")
            if devices > 0 and value is not None and math.isfinite(value):
                total += devices * value
                weight += devices
        return total / weight if weight else None


@dataclass(frozen=True)
class Verdict:
    """What the promotion rule decided, with the numbers it compared."""

    promote: bool
    reason: str
    candidate_score: float
    active_score: float
    tolerance: float


@dataclass(frozen=True)
class PromotionPolicy:
    """Promote a candidate prior unless it scores worse than the active one beyond a tolerance.

    Examples
    --------
    >>> policy = PromotionPolicy(tolerance=0.01)
    >>> policy.decide(PriorScore.from_losses([2.5], [2.0]), 1.0, "zero prior").promote
    False
    """

    tolerance: float = DEFAULT_TOLERANCE
    min_devices: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.tolerance, int | float) and 0 <= self.tolerance < 1):
            raise SpecError(
                f"promotion tolerance must be in [0, 1) (0.01 = 1% worse allowed), "
                f"got {self.tolerance!r}"
            )
        if self.min_devices < 1:
            raise SpecError(f"promotion needs at least one scoring device, got {self.min_devices}")

    def decide(self, candidate: PriorScore, active_score: float, active_name: str) -> Verdict:
        """Compare the candidate's relative score with the active version's.

        ``active_name`` names the active version in the reason (its ref, or "the zero
        prior"); ``active_score`` is its relative score (1.0 for the zero prior).
        """
        limit = active_score * (1 + self.tolerance)
        change = candidate.rel_mean / active_score - 1
        direction = "better" if change <= 0 else "worse"
        measured = (
            f"validation loss {candidate.rel_mean:.4f} x base on {candidate.devices} devices "
            f"(spread {candidate.rel_std:.4f}), {abs(change):.2%} {direction} than "
            f"{active_name} ({active_score:.4f} x base)"
        )
        if candidate.rel_mean <= limit:
            reason = f"promoted: {measured}; tolerance {self.tolerance:.2%}"
        else:
            reason = (
                f"held: {measured}, beyond the {self.tolerance:.2%} tolerance; "
                f"{active_name} stays active and training goes on from it"
            )
        return Verdict(
            promote=candidate.rel_mean <= limit,
            reason=reason,
            candidate_score=candidate.rel_mean,
            active_score=active_score,
            tolerance=self.tolerance,
        )
