"""Secure aggregation of a round's prior deltas with Flower's SecAgg+.

With ``secure-aggregation = true`` the coordinator never sees a device's delta: each
device quantizes its clipped delta, adds pairwise masks agreed with its neighbours and a
private mask, and uploads only that; the masks cancel in the sum, and the coordinator
rebuilds the masks of devices that dropped out from secret shares their neighbours hold
(Bell et al., 2020). The protocol is Flower's own (``SecAggPlusWorkflow`` on the
coordinator, ``secaggplus_mod`` on the device); this module chooses its parameters from
the round's clip norm and dropout budget and drives it for one round.

Parameters, and why:

- **Example weights, capped.** Each device uploads its training examples, at most the
  round's cap (the plain rounds' ``example_weight_cap``), as its weight, and Flower's
  ``max_weight`` is that cap: the mod scales the delta by ``weight / cap`` before
  masking and sends the scaled weight in the masked vector too, so the unmasked result
  is the example-weighted mean over the devices that finished, as in a plain round, and
  the coordinator learns only the weights' sum. (With equal weights, the design before,
  the fortunes prior scored 0.03 worse on validation than plain rounds':
  docs/personalization.md.) Rounds with DP keep equal weights (``max_weight = 1``),
  since the noise is calibrated to each device's equal share. The weight costs
  precision: one quantization step of a device's scaled value is ``cap`` times larger
  relative to its weight than at weight 1, so :attr:`SecAggParams.tolerance` is ``cap``
  steps, about ``2.4e-7 * C`` at the default cap of 32 and 10 devices, still far below
  fp16 packing's rounding.
- **Clipping range = clip norm** (plus 8 standard deviations of the device's DP noise,
  when it adds any). Every coordinate of a vector whose L2 norm is at most ``C`` lies in
  ``[-C, C]``, so the range clips nothing an honest device sends.
- **Quantization range** ``q``: the largest power of two with ``n * q < 2**32`` (the
  modulus; ``n`` sampled devices), at most ``2**30``. The sum of ``n`` values in
  ``[0, q]`` then never wraps. Flower rounds stochastically, so each device's value moves
  by less than one step ``2C / q`` and so does the mean: about ``1e-8 * C`` for 10
  devices at weight 1, times the cap with example weights (above).
- **Neighbours** ``k`` (``secagg-num-shares``). By default (0) every device shares its
  secrets with ``k = min(n, odd(ceil(3 * log2 n)))`` devices (itself included) of the
  ``n`` sampled, SecAgg+'s logarithmic graph (Bell et al., 2020): Flower places the
  devices on a ring in a fresh random order each round and links each to its ``k - 1``
  nearest, so each device's key agreement and masking cost ``O(log n)`` and the round
  ``O(n log n)``, not ``O(n^2)``. ``-1`` makes every sampled device a neighbour (the
  default before, when 0 meant that); a count ``>= 3`` sets ``k`` (rounded up to odd).
- **Threshold** ``t``: how many of a device's ``k`` neighbours must answer for its
  secrets to be rebuilt. On the default bounded graph ``t = floor(k/2) + 1``, the lowest
  that keeps a device's two secrets apart (a coordinator collecting ``t`` shares of one
  never gets ``t`` of the other from honest devices), which makes dropout tolerance
  per neighbourhood as large as it can be: ``k - t``. When every device is a neighbour,
  or ``k`` is set by hand, ``t = k - floor(d * k)`` (``d`` = ``secagg-dropout-share``,
  below 1/2 so that ``t > k/2``) as before: the round survives any ``floor(d * k)``
  dropouts per neighbourhood. With more, the attempt fails cleanly and is retried.
  :func:`secagg_risks` bounds what the bounded graph risks when a random share of the
  round drops out or is corrupted; docs/privacy.md tabulates it.
- **Wire type.** Devices send the masked vector in the smallest unsigned type the modulus
  needs (uint32 for ``2**32``), not Flower's int64 (:mod:`lorafleet.protocols.masked`);
  :class:`_Workflow` widens it back, range-checked, before Flower sums.

What secure aggregation gives up: the coordinator cannot check a single delta. Devices
clip their own; the coordinator checks the finite mean's norm is at most ``C`` (plus
the quantization error and the DP noise's bound), which any device that skips clipping
by much breaks, and then discards the whole round. Flower 1.41's mask generator seeds
numpy's ``RandomState`` with 32 bits folded from the 256-bit shared secret; see
docs/privacy.md for what that means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
    WorkflowState,
)
from flwr.serverapp import Grid

from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.masked import widen_masked
from lorafleet.server.grid_proxy import GridProxy

log = logging.getLogger(__name__)

MODULUS_RANGE = 2**32
"""SecAgg+'s modulus: Flower requires a power of two below 2**32 + 1."""

MAX_QUANTIZATION_RANGE = 2**30
"""Flower quantizes into int32 before masking."""

ALL_NEIGHBOURS = -1
"""``secagg-num-shares`` value: every sampled device is every other's neighbour."""

AUTO_NEIGHBOURS = 0
"""``secagg-num-shares`` value (the default): :func:`auto_num_shares` neighbours."""

NEIGHBOUR_FACTOR = 3.0
"""``c`` in ``k = c * log2 n``; docs/privacy.md states what 3 buys (secagg_risks)."""

NOISE_SIGMAS = 8.0
"""Client-side DP noise beyond this many standard deviations is clipped (p < 1e-15)."""


@dataclass(frozen=True)
class SecAggParams:
    """One SecAgg+ round's parameters (see the module docstring for the choices)."""

    sampled: int
    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int = MODULUS_RANGE
    max_weight: float = 1.0
    """The weight cap (Flower's ``max_weight``); 1: equal weights."""

    @property
    def step(self) -> float:
        """One quantization step."""
        return 2 * self.clipping_range / self.quantization_range

    @property
    def tolerance(self) -> float:
        """Bound on ``|secure mean - plain mean|`` per value.

        Stochastic rounding moves each device's scaled value by less than one step, and
        the mean divides the summed error by the summed weights, at least ``n / cap``.
        """
        return self.step * self.max_weight

    @property
    def dropouts_survived(self) -> int:
        """Dropouts per neighbourhood the round survives."""
        return self.num_shares - self.threshold


def auto_num_shares(sampled: int) -> int:
    """The default neighbour count: ``min(n, odd(ceil(3 * log2 n)))``, itself included.

    Examples
    --------
    >>> [auto_num_shares(n) for n in (2, 10, 14, 50, 200, 10_000)]
    [2, 10, 13, 17, 23, 41]
    """
    if sampled < 2:
        return sampled
    k = math.ceil(NEIGHBOUR_FACTOR * math.log2(sampled))
    k += 1 - k % 2  # SecAgg+ neighbourhoods are symmetric: an odd size
    return min(sampled, max(3, k))


def secagg_params(
    sampled: int,
    *,
    clip_norm: float,
    dropout_share: float,
    noise_std: float = 0.0,
    num_shares: int = AUTO_NEIGHBOURS,
    max_weight: int = 1,
) -> SecAggParams:
    """SecAgg+ parameters for ``sampled`` devices with deltas clipped to ``clip_norm``.

    ``max_weight``: the weight cap the devices' ``num_examples`` are capped at (1: equal
    weights).

    ``num_shares``: :data:`AUTO_NEIGHBOURS` (0, :func:`auto_num_shares`),
    :data:`ALL_NEIGHBOURS` (-1) or a neighbour count ``>= 3``.

    Examples
    --------
    >>> p = secagg_params(10, clip_norm=1.0, dropout_share=0.3)
    >>> (p.num_shares, p.threshold, p.clipping_range, p.quantization_range == 2**28)
    (10, 7, 1.0, True)
    >>> p = secagg_params(200, clip_norm=1.0, dropout_share=0.2)
    >>> (p.num_shares, p.threshold, p.dropouts_survived)
    (23, 12, 11)
    """
    if sampled < 2:
        raise SpecError(f"secure aggregation needs at least 2 devices in a round, got {sampled}")
    if not 0 <= dropout_share < 0.5:
        raise SpecError(f"secagg-dropout-share must be in [0, 0.5), got {dropout_share!r}")
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise SpecError(f"clip norm must be positive, got {clip_norm!r}")
    if isinstance(max_weight, bool) or not isinstance(max_weight, int) or max_weight < 1:
        raise SpecError(f"the SecAgg+ weight cap must be an integer >= 1, got {max_weight!r}")
    if num_shares not in (AUTO_NEIGHBOURS, ALL_NEIGHBOURS) and num_shares < 3:
        raise SpecError(
            f"secagg-num-shares must be 0 (auto), -1 (all devices) or >= 3, got {num_shares}"
        )
    if num_shares == AUTO_NEIGHBOURS:
        k = auto_num_shares(sampled)
    elif num_shares == ALL_NEIGHBOURS:
        k = sampled
    else:
        k = min(num_shares + 1 - num_shares % 2, sampled)
    if k < sampled and num_shares == AUTO_NEIGHBOURS:
        t = k // 2 + 1  # the most dropouts per neighbourhood that keeps secrets apart
    else:
        t = max(k - math.floor(dropout_share * k), k // 2 + 1, 2)
        if k < sampled:
            t = min(t, k - 1)  # Flower requires threshold < num_shares when given as counts
    q = min(MAX_QUANTIZATION_RANGE, 2 ** math.floor(math.log2((MODULUS_RANGE - 1) / sampled)))
    return SecAggParams(
        sampled=sampled,
        num_shares=k,
        threshold=t,
        clipping_range=float(clip_norm + NOISE_SIGMAS * noise_std),
        quantization_range=int(q),
        max_weight=float(max_weight),
    )


@dataclass(frozen=True)
class SecAggRisks:
    """Union bounds on one round's failures, for a random share of devices (see secagg_risks)."""

    fails: float  # some neighbourhood loses more than k - t: the attempt fails, is retried
    exposed: float  # some honest device has >= t corrupted neighbours: its vector can leak
    split: float  # k // 2 ring neighbours in a row gone: partial sums may be revealed


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hypergeom_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P(X >= at_least) for X the marked items among ``draws`` without replacement."""
    total = 0.0
    for i in range(max(at_least, 0), min(marked, draws) + 1):
        if draws - i <= population - marked:
            total += math.exp(
                _log_comb(marked, i)
                + _log_comb(population - marked, draws - i)
                - _log_comb(population, draws)
            )
    return min(total, 1.0)


def secagg_risks(params: SecAggParams, *, dropped: float, corrupted: float) -> SecAggRisks:
    """What one round risks when a random share of its devices drops or is corrupted.

    ``dropped`` and ``corrupted`` are shares of the ``n`` sampled devices (any devices,
    chosen before Flower's secret random ring order is drawn, so each neighbourhood
    holds a hypergeometric count of them); corrupted devices pool their secrets with an
    honest-but-curious coordinator. Each figure is a union bound over the ``n``
    neighbourhoods (or ring positions), so an upper bound on the probability:

    - ``fails``: some neighbourhood keeps fewer than ``t`` members. The attempt fails
      cleanly and the round is retried: a cost, not a leak.
    - ``exposed``: some device has ``t`` or more corrupted neighbours, who could rebuild
      the secret the coordinator does not ask for and unmask that device's vector.
    - ``split``: ``floor(k/2)`` consecutive ring positions are all dropped or corrupted;
      only then can the honest survivors' mask graph fall apart, and the coordinator
      learn sums over parts of the round rather than only the whole.

    With every device a neighbour ``split`` is 0 and ``fails`` is 0 or 1 (the round
    survives exactly ``n - t`` dropouts).
    """
    n, k, t = params.sampled, params.num_shares, params.threshold
    gone, bad = math.floor(dropped * n), math.floor(corrupted * n)
    fails = min(1.0, n * _hypergeom_tail(n, gone, k, k - t + 1)) if k < n else float(gone > n - t)
    exposed = min(1.0, n * _hypergeom_tail(n - 1, bad, k - 1, t))
    run, removed = k // 2, min(n, gone + bad)
    split = 0.0
    if k < n and removed >= run:
        split = min(1.0, n * math.exp(_log_comb(removed, run) - _log_comb(n, run)))
    return SecAggRisks(fails=fails, exposed=exposed, split=split)


class _Widening(GridProxy):
    """Widens the masked vectors in SecAgg+ replies to int64 before Flower sums them."""

    def __init__(self, inner: Grid, modulus: int) -> None:
        super().__init__(inner)
        self.modulus = modulus

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_content():
                continue
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is None or SecAggKey.MASKED_PARAMETERS not in configs:
                continue
            arrays = cast(list[bytes], configs[SecAggKey.MASKED_PARAMETERS])
            configs[SecAggKey.MASKED_PARAMETERS] = [
                ndarray_to_bytes(widen_masked(bytes_to_ndarray(b), self.modulus)) for b in arrays
            ]
        return replies


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, taking narrow masked vectors and surviving early losses.

    Devices upload the masked vector in the smallest type its modulus needs; the
    masked-vector stage widens each reply to int64 (range-checked) before Flower sums.

    Flower 1.41 keeps a device that never answered the setup or key-sharing stage among
    the round's devices, then fails the unmasking because nobody holds shares of its
    secrets. Such a device never masked anything, so it is dropped from the round (and
    from every neighbourhood) once the key-sharing stage is over.
    """

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        return super().collect_masked_vectors_stage(
            _Widening(grid, state.mod_range), context, state
        )

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        super().share_keys_stage(grid, context, state)
        kept = set(state.active_node_ids)
        state.sampled_node_ids = kept
        state.nid_to_neighbours = {
            nid: neighbours & kept
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in kept
        }
        return self._check_threshold(state)


class _RoundStrategy(Strategy):
    """The legacy strategy the workflow calls: our FitIns out, the secure mean back."""

    def __init__(self, grid: Grid, fitins: Mapping[int, FitIns]) -> None:
        self.grid = grid
        self.fitins = dict(fitins)
        self.mean: npt.NDArray[np.float64] | None = None
        self.replies: dict[int, dict[str, Scalar]] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [
            (GridClientProxy(nid, self.grid, 0), ins) for nid, ins in sorted(self.fitins.items())
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:
            # The workflow puts the unmasked mean into every result's parameters.
            (vector,) = parameters_to_ndarrays(results[0][1].parameters)
            self.mean = np.asarray(vector, dtype=np.float64).reshape(-1)
        self.replies = {int(proxy.node_id): dict(res.metrics) for proxy, res in results}
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


@dataclass(frozen=True)
class SecureMean:
    """What a SecAgg+ round reveals: the mean delta and each finisher's plaintext fields."""

    mean: npt.NDArray[np.float64]  # (values,) flat, in the devices' flatten order
    replies: dict[int, dict[str, Any]]  # node id -> the reply's plaintext metrics


def secure_mean(
    grid: Grid,
    fitins: Mapping[int, FitIns],
    params: SecAggParams,
    *,
    round_number: int,
    timeout: float | None = None,
) -> SecureMean | None:
    """Run SecAgg+ over the devices in ``fitins``; None when too many dropped out.

    Each device receives its FitIns (our instruction in ``fitins.config``) at the
    masked-vector stage; its ClientApp, behind ``secaggplus_mod``, replies with its
    weight (at most ``params.max_weight``) and its flat delta, which the mod scales and
    masks.
    """
    if len(fitins) != params.sampled:
        raise SpecError(f"SecAgg+ parameters are for {params.sampled} devices, got {len(fitins)}")
    strategy = _RoundStrategy(grid, fitins)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: round_number}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _Workflow(
        # all sampled devices as neighbours is the fraction 1.0 in Flower's terms
        num_shares=1.0 if params.num_shares == params.sampled else params.num_shares,
        reconstruction_threshold=params.threshold,
        max_weight=params.max_weight,
        clipping_range=params.clipping_range,
        quantization_range=params.quantization_range,
        modulus_range=params.modulus_range,
        timeout=timeout,
    )
    workflow(grid, context)
    if strategy.mean is None:
        return None
    return SecureMean(strategy.mean, strategy.replies)
