"""Differential privacy of the shared prior: Gaussian noise and the privacy it spends.

Each device clips its prior delta to the clip norm ``C``, so adding or removing one
device changes the sum of a round's deltas by at most ``C`` (L2). Gaussian noise of
standard deviation ``sigma * C`` on that sum (``sigma`` is the noise multiplier) makes
the round's output ``(epsilon, delta)``-differentially private with respect to any one
device's participation; the cohort is sampled each round (a share ``q`` of the devices),
which amplifies privacy further.

Two placements, chosen by the run config's ``dp``:

- ``central``: the coordinator adds the noise to the (securely) aggregated sum. It
  protects the prior against everyone who receives it (the devices, whoever reads the
  registry) but not against the coordinator, which sees the sum before the noise.
- ``client``: every sampled device adds ``N(0, (sigma*C)^2 / n)`` to its own clipped
  delta before masking, so the ``n`` shares add up to the same noise. With secure
  aggregation the coordinator sees only the noisy sum, so this protects against the
  coordinator too; when devices drop out, less noise arrives and the accountant charges
  the smaller effective multiplier ``sigma * sqrt(survivors / n)``.

The accountant is Rényi-DP (Mironov, 2017) of the Poisson-sampled Gaussian mechanism
(Mironov, Talwar and Zhang, 2019: the integer-order formula), composed over rounds and
converted to ``(epsilon, delta)`` with the bound of Balle et al. (2020, Prop. 12). It
matches Google's ``dp-accounting`` on the same integer orders (the tests pin values).
Fixed-size sampling without replacement is accounted as Poisson sampling at
``q = sampled / available``, the usual approximation in federated DP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.federation import BTensors

DpMode = Literal["off", "central", "client"]
DP_MODES: tuple[str, ...] = get_args(DpMode)

DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 112, 128, 160, 192, 256)
"""Rényi orders the accountant tracks (integers: the exact formula applies)."""


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) without overflow."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def rdp_sampled_gaussian(
    q: float, noise_multiplier: float, orders: Sequence[int] = DEFAULT_ORDERS
) -> npt.NDArray[np.float64]:
    """Rényi DP of one Poisson-sampled Gaussian mechanism at each (integer) order.

    Parameters
    ----------
    q
        Sampling rate in [0, 1]: the chance that a given device takes part.
    noise_multiplier
        Noise standard deviation divided by the L2 sensitivity (the clip norm).
    orders
        Integer Rényi orders >= 2.

    Returns
    -------
    numpy.ndarray
        RDP epsilon at each order (``inf`` for zero noise).

    Examples
    --------
    >>> float(rdp_sampled_gaussian(1.0, 2.0, [2])[0])  # alpha / (2 sigma^2)
    0.25
    """
    if not 0 <= q <= 1:
        raise SpecError(f"sampling rate must be in [0, 1], got {q!r}")
    if not noise_multiplier >= 0:
        raise SpecError(f"noise multiplier must be >= 0, got {noise_multiplier!r}")
    out = np.empty(len(orders), dtype=np.float64)
    for i, alpha in enumerate(orders):
        if int(alpha) != alpha or alpha < 2:
            raise SpecError(f"Rényi orders must be integers >= 2, got {alpha!r}")
        a = int(alpha)
        if q == 0:
            out[i] = 0.0
        elif noise_multiplier == 0:
            out[i] = math.inf
        elif q == 1:
            out[i] = a / (2 * noise_multiplier**2)
        else:
            # log A_alpha = log sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))
            log_a = -math.inf
            log_q, log_1mq = math.log(q), math.log1p(-q)
            for k in range(a + 1):
                term = _log_comb(a, k) + k * log_q + (a - k) * log_1mq
                log_a = _log_add(log_a, term + (k * k - k) / (2 * noise_multiplier**2))
            out[i] = log_a / (a - 1)
    return out


def epsilon_from_rdp(
    rdp: npt.NDArray[np.float64], orders: Sequence[int], delta: float
) -> tuple[float, int]:
    """The smallest epsilon at ``delta`` over the orders, and the order that gives it."""
    if not 0 < delta < 1:
        raise SpecError(f"dp delta must be in (0, 1), got {delta!r}")
    best, best_order = math.inf, int(orders[0])
    for alpha, r in zip(orders, rdp, strict=True):
        if r < 0 or delta**2 + math.expm1(-r) > 0:
            eps = 0.0  # a KL bound already gives delta; nothing is spent at this order
        elif math.isinf(r):
            eps = math.inf
        else:
            eps = r + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)
        if eps < best:
            best, best_order = eps, int(alpha)
    return max(0.0, best), best_order


@dataclass(frozen=True)
class PrivacyStep:
    """One noisy release: a round's sampling rate and effective noise multiplier."""

    round: int
    q: float
    noise_multiplier: float


@dataclass
class PrivacyLedger:
    """Every noisy release so far; the cumulative epsilon follows from it.

    The coordinator writes it to its data dir before it publishes the round's prior, so
    a restarted coordinator resumes with every release counted (a round interrupted
    after its release is counted again when rerun: the error is on the safe side).
    """

    steps: list[PrivacyStep] = field(default_factory=list)
    orders: tuple[int, ...] = DEFAULT_ORDERS

    def add(self, round: int, q: float, noise_multiplier: float) -> None:
        """Record one release."""
        rdp_sampled_gaussian(q, noise_multiplier, self.orders[:1])  # validates
        self.steps.append(PrivacyStep(round, float(q), float(noise_multiplier)))

    def rdp(self) -> npt.NDArray[np.float64]:
        """Composed RDP at each order (sums over releases)."""
        total = np.zeros(len(self.orders), dtype=np.float64)
        cache: dict[tuple[float, float], npt.NDArray[np.float64]] = {}
        for s in self.steps:
            key = (s.q, s.noise_multiplier)
            if key not in cache:
                cache[key] = rdp_sampled_gaussian(s.q, s.noise_multiplier, self.orders)
            total += cache[key]
        return total

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon spent at ``delta`` (0 before any release)."""
        if not self.steps:
            return 0.0
        return epsilon_from_rdp(self.rdp(), self.orders, delta)[0]

    def to_json(self) -> str:
        """The ledger file's content."""
        return json.dumps(
            {
                "orders": list(self.orders),
                "steps": [
                    {"round": s.round, "q": s.q, "noise_multiplier": s.noise_multiplier}
                    for s in self.steps
                ],
            },
            indent=2,
            sort_keys=True,
        )

    def save(self, path: Path) -> None:
        """Write the ledger atomically."""
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Read a ledger; a missing file is an empty ledger."""
        path = Path(path)
        if not path.is_file():
            return cls()
        try:
            doc: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            steps = [
                PrivacyStep(int(s["round"]), float(s["q"]), float(s["noise_multiplier"]))
                for s in doc["steps"]
            ]
            orders = tuple(int(o) for o in doc["orders"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(
                f"privacy ledger {path} is unreadable ({exc}); restore it from the coordinator's backup"
            ) from None
        return cls(steps, orders)


def gaussian_noise_like(
    tensors: Mapping[str, npt.NDArray[Any]], std: float, rng: np.random.Generator | None = None
) -> BTensors:
    """Independent ``N(0, std^2)`` noise in the shapes of ``tensors`` (float32).

    The default generator draws its seed from the operating system: noise anyone could
    predict would protect nothing.
    """
    if not std >= 0 or not math.isfinite(std):
        raise SpecError(f"noise std must be a finite number >= 0, got {std!r}")
    gen = rng if rng is not None else np.random.default_rng()
    return {
        k: gen.normal(0.0, std, size=np.shape(v)).astype(np.float32) for k, v in tensors.items()
    }
