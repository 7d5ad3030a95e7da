"""The Flower ServerApp: rounds of the shared prior over many devices' private adapters.

Each round samples nodes, sends them the cohort's adapter seed (spec + prior version, and
the prior's B only to nodes that do not have that version yet), collects clipped prior
deltas, refuses malformed ones (logged with the node id), aggregates the rest into a new
prior version and commits it to disk and the registry. Too few accepted updates fail the
round cleanly; it is retried. A coordinator killed at any point resumes at the last
completed round.

With ``secure-aggregation = true`` the deltas are summed with Flower's SecAgg+
(:mod:`lorafleet.server.secagg`): the coordinator learns only their mean. With ``dp``
the mean gets Gaussian noise (here, or on the devices) and the privacy spent is
accounted per round (:mod:`lorafleet.server.dp`). Operators steer it through the
registry: a round does not start while the console has paused training, and revoked
SuperNodes are neither sampled nor heard.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, Parameters
from flwr.serverapp import Grid, ServerApp

from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.federation import (
    DELTA_FIELD,
    INSTRUCTION_KEY,
    METRICS_KEY,
    PRIOR_FIELD,
    PRIOR_KEY,
    REFUSAL_PREFIX,
    SECURE_LAYOUT_FIELD,
    SECURE_PRIOR_FIELD,
    SECURE_SHARED_A_FIELD,
    SHARED_A_FIELD,
    UPDATE_KEY,
    ZERO_PRIOR,
    BTensors,
    RoundInstruction,
    RoundMetrics,
    clip_by_global_norm,
    global_norm,
    layout_from_json,
    unflatten,
)
from lorafleet.protocols.shared_a import a_from_sketch
from lorafleet.server.aggregation import (
    NORM_TOLERANCE,
    Aggregator,
    Update,
    refusal_reason,
)
from lorafleet.server.coordinator import CoordinatorConfig, CoordinatorState
from lorafleet.server.dp import gaussian_noise_like
from lorafleet.server.grid_proxy import GridProxy
from lorafleet.server.registry import RoundId
from lorafleet.server.registry.records import RoundStatus
from lorafleet.server.reports import RoundReports
from lorafleet.server.secagg import SecAggParams, secagg_params, secure_mean

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PAUSE_CONTROL = "training.paused"
"""Registry control the web console sets; while true no round starts."""


@dataclass
class RoundOutcome:
    """What one round attempt did, for logs, the registry and results.json.

    ``bytes_up``/``bytes_down`` are payload bytes: in the clear, the accepted deltas'
    encoded size and the priors sent; under SecAgg+, everything the protocol's four
    stages carried each way (keys, shares, masked vectors, instructions and priors).
    """

    round: int
    attempt: int
    sampled: int
    accepted: int = 0
    refused: dict[int, str] = field(default_factory=dict)
    dropouts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    prior_version: str | None = None
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    secure: bool = False
    failure: str | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    versions_recorded: int = 0
    """Personal adapter versions the devices reported and the registry recorded."""
    decision: str | None = None
    """The promotion rule's verdict on the candidate this round trained from (and scored)."""
    decision_reason: str | None = None


def _reason_text(reason: object) -> str:
    """An error reply's reason, kept whole (to 1,000 characters) when a device wrote it."""
    text = str(reason)
    return text[:1000] if text.startswith(REFUSAL_PREFIX) else text[:200]


def payload_bytes(content: RecordDict) -> int:
    """Bytes a message's records carry (bytes and strings by length, numbers as 8)."""

    def size(value: Any) -> int:
        if isinstance(value, bytes):
            return len(value)
        if isinstance(value, str):
            return len(value.encode())
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return 8

    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        else:
            total += sum(size(v) for v in record.values())
    return total


class _Tally(GridProxy):
    """The coordinator's Grid, counting payload bytes and noting who failed to answer."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.bytes_up = 0
        self.bytes_down = 0
        self.errors: dict[int, str] = {}
        self.missing: set[int] = set()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_down += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_content():
                self.bytes_up += payload_bytes(reply.content)
            else:
                reason = reply.error.reason if reply.has_error() else "no content"
                self.errors.setdefault(node, f"error: {_reason_text(reason)}")
        self.missing |= {m.metadata.dst_node_id for m in messages} - answered
        return replies


class RoundLoop:
    """The round loop over a Flower Grid, with the coordinator's durable state."""

    pause_poll_s: float = 2.0
    """How often a paused coordinator checks whether training may go on."""

    def __init__(
        self,
        grid: Grid,
        coordinator: CoordinatorState,
        *,
        noise_rng: np.random.Generator | None = None,
    ) -> None:
        self.grid = grid
        self.coord = coordinator
        self.cfg = coordinator.config
        self._sent_prior: dict[int, str] = {}  # node id -> prior version it has
        self._shared_a: tuple[str, bytes] | None = None  # (digest, bytes) of a gradient A
        self._sent_a: dict[int, str] = {}  # node id -> shared A digest it has
        self._unregistrable: set[int] = set()
        self._ledger = coordinator.privacy_ledger() if self.cfg.dp != "off" else None
        self._noise_rng = noise_rng  # None: OS-seeded (tests pass a seeded one)

    # ------------------------------------------------------------ operator controls
    def wait_while_paused(self) -> None:
        """Block while the console has paused training (checked every ``pause_poll_s``)."""
        registry = self.coord.registry
        waited = False
        while registry.get_control(PAUSE_CONTROL, False):
            if not waited:
                log.warning(
                    "training is paused from the console; waiting (checking every %.0f s)",
                    self.pause_poll_s,
                )
                waited = True
            time.sleep(self.pause_poll_s)
        if waited:
            log.info("training resumed")

    def eligible_nodes(self, *, register: bool = True) -> list[int]:
        """Connected nodes that are not revoked; each is recorded in the registry."""
        nodes = sorted(self.grid.get_node_ids())
        if register:
            for node in nodes:
                self._register(node)
        revoked = self.coord.registry.revoked_node_ids()
        return [n for n in nodes if n not in revoked]

    def _register(self, node: int) -> None:
        """Record a node as seen; a registry that cannot store its id must not stop training."""
        try:
            self.coord.registry.register_node(node)
        except Exception as exc:  # e.g. a 64-bit unsigned Flower id a signed column cannot hold
            if node not in self._unregistrable:
                self._unregistrable.add(node)
                log.warning("node %d could not be recorded in the registry (%s)", node, exc)

    def wait_for_nodes(self) -> list[int]:
        """Block until enough nodes are connected (or fail with a clear error)."""
        deadline = time.monotonic() + self.cfg.wait_for_nodes_s
        while True:
            nodes = self.eligible_nodes(register=False)
            if len(nodes) >= self.cfg.min_available_nodes:
                return nodes
            if time.monotonic() > deadline:
                raise LorafleetError(
                    f"only {len(nodes)} node(s) connected after {self.cfg.wait_for_nodes_s:.0f}s; "
                    f"min-available-nodes is {self.cfg.min_available_nodes}: start more SuperNodes or lower it"
                )
            time.sleep(0.5)

    def use_shared_a(self, shared: tuple[str, bytes]) -> None:
        """Train on the cohort's shared A from now on.

        Every instruction names its digest; a device that lacks it gets its bytes with
        the round's message.
        """
        self._shared_a = shared

    def _a_bytes_for(self, node: int) -> bytes | None:
        """The shared A's bytes if ``node`` may not have them yet, else None."""
        if self._shared_a is None or self._sent_a.get(node) == self._shared_a[0]:
            return None
        return self._shared_a[1]

    def _a_delivered(self, node: int, ok: bool) -> None:
        """Remember whether ``node`` holds the shared A after it answered (or failed)."""
        if self._shared_a is None:
            return
        if ok:
            self._sent_a[node] = self._shared_a[0]
        else:
            self._sent_a.pop(node, None)

    def _instruction(
        self, number: int, prior_ref: str, mode: str, *, noise_std: float = 0.0
    ) -> RoundInstruction:
        c = self.cfg
        return RoundInstruction(
            shared_a=self._shared_a[0] if self._shared_a is not None else "",
            sketch_passes=c.sketch_passes,
            sketch_batches=c.sketch_batches,
            round=number,
            spec=self.coord.spec,
            prior_version=prior_ref,
            mode=mode,  # type: ignore[arg-type]
            personal_steps=c.personalize_steps if mode == "personalize" else c.personal_steps,
            prior_steps=0 if mode == "personalize" else c.prior_steps,
            lr=c.lr,
            personal_lr=c.personal_learning_rate,
            personal_a_lr=c.personal_a_lr if mode == "personalize" else 0.0,
            prox_mu=c.prox_mu,
            clip_norm=c.clip_norm,
            batch_size=c.batch_size,
            seq_len=c.seq_len,
            heldout_fraction=c.heldout_fraction,
            packing=c.packing,  # type: ignore[arg-type]
            noise_std=noise_std,
            blend=c.personalize_blend,
        )

    def _send(
        self,
        nodes: Iterable[int],
        instr: RoundInstruction,
        prior: BTensors | None,
        message_type: str,
    ) -> tuple[list[Message], int]:
        messages, bytes_down = [], 0
        prior_payload = encode_tensors(prior, packing="fp32") if prior is not None else b""
        for node in nodes:
            content = RecordDict({INSTRUCTION_KEY: ConfigRecord(instr.to_config())})  # type: ignore[arg-type]
            fields: dict[str, bytes] = {}
            if prior is not None and self._sent_prior.get(node) != instr.prior_version:
                fields[PRIOR_FIELD] = prior_payload
            a_bytes = self._a_bytes_for(node)
            if a_bytes is not None:
                fields[SHARED_A_FIELD] = a_bytes
            if fields:
                content[PRIOR_KEY] = ConfigRecord(fields)  # type: ignore[arg-type]
                bytes_down += sum(len(v) for v in fields.values())
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout_s))
        for reply in replies:
            self._a_delivered(reply.metadata.src_node_id, reply.has_content())
        return replies, bytes_down

    # ------------------------------------------------------------------ one round
    def run_round(
        self, number: int, attempt: int, prior_ref: str, prior: BTensors | None
    ) -> RoundOutcome:
        """One attempt at round ``number``: sample, send, validate, aggregate, commit."""
        self.wait_while_paused()
        started = time.perf_counter()
        nodes = self.eligible_nodes()
        rng = random.Random(f"{self.cfg.seed}/{number}/{attempt}")
        k = max(self.cfg.min_train_nodes, round(self.cfg.fraction_train * len(nodes)))
        sampled = sorted(rng.sample(nodes, min(k, len(nodes))))
        record = self.coord.start_round(number, attempt)
        outcome = RoundOutcome(
            round=number,
            attempt=attempt,
            sampled=len(sampled),
            secure=self.cfg.secure_aggregation,
        )
        log.info(
            "round %d/%d%s: training on %d of %d devices%s",
            number,
            self.cfg.num_rounds,
            f" (retry {attempt})" if attempt else "",
            len(sampled),
            len(nodes),
            " with SecAgg+" if self.cfg.secure_aggregation else "",
        )
        reports = RoundReports(self.coord, number, prior_ref)
        if self.cfg.secure_aggregation:
            result = self._secure_round(number, sampled, prior_ref, prior, outcome, reports)
        else:
            result = self._plain_round(number, sampled, prior_ref, prior, outcome, reports)
        # Versions the devices saved exist whether or not the prior's update succeeds.
        outcome.versions_recorded = reports.record().versions
        for node, why in outcome.refused.items():
            log.warning("round %d: update from node %d refused: %s", number, node, why)
        undecided = self._score(number, prior_ref, outcome)
        if result is not None and undecided:
            outcome.failure = (
                f"too few devices scored candidate {prior_ref} ({len(outcome.metrics)}, "
                f"{self.cfg.min_train_nodes} needed)"
            )
            result = None
        if result is not None and outcome.decision == "held":
            # The update was built on the held candidate: it goes with it.
            outcome.seconds = time.perf_counter() - started
            self._close(record.id, outcome, status="finished")
            log.warning(
                "round %d: prior %s %s; this round's update is discarded",
                number,
                prior_ref,
                outcome.decision_reason,
            )
            return outcome
        if result is None:
            outcome.seconds = time.perf_counter() - started
            self._close(record.id, outcome, status="failed")
            log.warning("round %d attempt %d failed: %s", number, attempt, outcome.failure)
            return outcome
        prior, mean = result
        if self._ledger is not None:
            mean = self._privatize(number, mean, outcome, available=len(nodes))
        new_prior = self.coord.aggregator.apply(prior, mean)
        means = _mean_metrics(outcome.metrics.values())
        saved = self.coord.save_prior(
            self.coord.next_prior_version(), new_prior, round=number, metrics=means
        )
        outcome.prior_version = saved.ref
        outcome.seconds = time.perf_counter() - started
        self._close(record.id, outcome, status="finished")
        log.info(
            "round %d/%d: %d/%d updates accepted, prior %s; held-out loss base %.3f, prior %.3f, personal %.3f (%.0f s)%s",
            number,
            self.cfg.num_rounds,
            outcome.accepted,
            len(sampled),
            saved.ref,
            means.get("base_loss", float("nan")),
            means.get("prior_loss", float("nan")),
            means.get("personal_loss", float("nan")),
            outcome.seconds,
            ""
            if outcome.dp_epsilon is None
            else f"; privacy spent so far: epsilon {outcome.dp_epsilon:.3g} at delta {outcome.dp_delta:g}",
        )
        return outcome

    def run_sketch_round(self, attempt: int) -> tuple[RoundOutcome, tuple[str, bytes] | None]:
        """Round 0 of a gradient-aligned shared A: sum every device's sketch, keep its A.

        Every eligible device is asked (the more gradients, the better the directions);
        their sketches are summed like deltas (under SecAgg+ when configured), the A's
        rows are the sum's top directions (protocols/shared_a.py), and the A is stored
        with its digest. Returns the outcome and, if it worked, the A as (digest, bytes).
        """
        self.wait_while_paused()
        started = time.perf_counter()
        sampled = self.eligible_nodes()
        record = self.coord.start_round(0, attempt)
        outcome = RoundOutcome(
            round=0, attempt=attempt, sampled=len(sampled), secure=self.cfg.secure_aggregation
        )
        log.info(
            "round 0: gradient sketch for the shared A from %d devices%s",
            len(sampled),
            " with SecAgg+" if self.cfg.secure_aggregation else "",
        )
        reports = RoundReports(self.coord, 0, ZERO_PRIOR)
        round_fn = self._secure_round if self.cfg.secure_aggregation else self._plain_round
        result = round_fn(0, sampled, ZERO_PRIOR, None, outcome, reports, mode="sketch")
        for node, why in outcome.refused.items():
            log.warning("round 0: sketch from node %d refused: %s", node, why)
        shared: tuple[str, bytes] | None = None
        if result is not None:
            try:
                a = a_from_sketch(result[1], self.coord.spec.rank)
            except LorafleetError as exc:
                outcome.failure = str(exc)
            else:
                digest = self.coord.save_shared_a(a)
                shared = (digest, encode_tensors(a, packing="fp32"))
        outcome.seconds = time.perf_counter() - started
        self._close(record.id, outcome, status="finished" if shared else "failed")
        if shared is None:
            log.warning("round 0 attempt %d failed: %s", attempt, outcome.failure)
        else:
            log.info(
                "round 0: shared A %s… from %d sketches (%.0f s)",
                shared[0][:12],
                outcome.accepted,
                outcome.seconds,
            )
        return outcome, shared

    def _score(self, number: int, prior_ref: str, outcome: RoundOutcome) -> bool:
        """Record how this round's devices scored the prior they trained from; judge a candidate.

        Costs the devices nothing: each measured that prior on its validation split before
        training (``prior_loss``, next to ``base_loss``). Returns True when the prior is a
        candidate that too few devices scored to decide on.
        """
        if prior_ref == ZERO_PRIOR:
            return False
        score = self.coord.score_prior(prior_ref, outcome.metrics.values(), round=number)
        pending = self.coord.registry.pending_prior(self.coord.spec)
        if pending is None or pending.ref != prior_ref:
            return False
        verdict = None if score is None else self.coord.judge(pending, score, round=number)
        if verdict is None:
            return True
        outcome.decision = "promoted" if verdict.promote else "held"
        outcome.decision_reason = verdict.reason
        return False

    def score_candidate(self) -> RoundOutcome | None:
        """Score the candidate that no round will train from (a run's last) and judge it.

        The one extra message of the promotion rule: sampled like a training round, in
        ``evaluate`` mode (losses only, nothing trained or sent back but metrics).
        """
        pending = self.coord.registry.pending_prior(self.coord.spec)
        if pending is None:
            return None
        prior = self.coord.load_prior(pending)
        nodes = self.eligible_nodes()
        rng = random.Random(f"{self.cfg.seed}/score/{pending.ref}")
        k = max(self.cfg.min_train_nodes, round(self.cfg.fraction_train * len(nodes)))
        sampled = sorted(rng.sample(nodes, min(k, len(nodes))))
        instr = self._instruction(self.coord.completed_round(), pending.ref, "evaluate")
        log.info("scoring candidate prior %s on %d devices", pending.ref, len(sampled))
        replies, bytes_down = self._send(sampled, instr, prior, MessageType.EVALUATE)
        outcome = RoundOutcome(round=instr.round, attempt=0, sampled=len(sampled))
        outcome.bytes_down = bytes_down
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_content():
                self._sent_prior.pop(node, None)
                continue
            self._sent_prior[node] = pending.ref
            try:
                m = RoundMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
            except (KeyError, LorafleetError):
                continue
            outcome.metrics[node] = {k: float(v) for k, v in asdict(m).items()}
        if self._score(instr.round, pending.ref, outcome):
            log.warning(
                "candidate prior %s: %d of %d devices scored it, %d needed; it stays undecided "
                "(the next run scores it again)",
                pending.ref,
                len(outcome.metrics),
                len(sampled),
                self.cfg.min_train_nodes,
            )
        return outcome

    def _plain_round(
        self,
        number: int,
        sampled: list[int],
        prior_ref: str,
        prior: BTensors | None,
        outcome: RoundOutcome,
        reports: RoundReports,
        *,
        mode: str = "train",
    ) -> tuple[BTensors, BTensors] | None:
        """Deltas in the clear: each is validated, then averaged (weighted by examples)."""
        instr = self._instruction(number, prior_ref, mode)
        replies, outcome.bytes_down = self._send(sampled, instr, prior, MessageType.TRAIN)
        revoked = self.coord.registry.revoked_node_ids()  # revocations during the round count
        decoded: dict[int, tuple[BTensors, RoundMetrics, int]] = {}
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if node in revoked or node not in sampled:
                outcome.refused[node] = "node revoked" if node in revoked else "not sampled"
                continue
            if not reply.has_content():
                self._sent_prior.pop(node, None)  # it may have lost its copy
                reason = reply.error.reason if reply.has_error() else "no content"
                outcome.refused[node] = f"error: {_reason_text(reason)}"
                continue
            self._sent_prior[node] = prior_ref
            try:
                delta_bytes = reply.content[UPDATE_KEY][DELTA_FIELD]
                if not isinstance(delta_bytes, bytes):
                    raise LorafleetError("delta is not bytes")
                delta, _ = decode_tensors(delta_bytes)
                metrics = RoundMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
            except (KeyError, LorafleetError) as exc:
                outcome.refused[node] = f"malformed reply ({exc})"
                continue
            decoded[node] = (delta, metrics, len(delta_bytes))
            reports.add_reply(node, reply.content, metrics)
        if prior is None:  # round 1: the zero prior in the shapes most devices agree on
            prior = _consensus_zero_prior([d for d, _, _ in decoded.values()])
        shapes = {k: tuple(v.shape) for k, v in prior.items()}
        updates: list[Update] = []
        private = self.cfg.dp != "off"
        for node, (delta, metrics, size) in decoded.items():
            reason = refusal_reason(delta, shapes, self.cfg.clip_norm)
            if reason is None and metrics.num_examples < 1:
                reason = "no training examples"
            if reason is not None:
                outcome.refused[node] = reason
                continue
            outcome.bytes_up += size
            outcome.metrics[node] = {k: float(v) for k, v in asdict(metrics).items()}
            if private:  # DP needs each device's influence bounded exactly: clip, weigh equally
                delta = clip_by_global_norm(delta, self.cfg.clip_norm)[0]
            # Weighted by examples, each weight capped so that no device (honest with a
            # huge data set, or lying) outweighs a fair share of the round.
            weight = min(metrics.num_examples, self.cfg.example_weight_cap)
            updates.append(Update(node, delta, 1.0 if private else float(weight)))
        outcome.dropouts = len(set(sampled) - answered)
        outcome.accepted = len(updates)
        if len(updates) < self.cfg.min_train_nodes:
            outcome.failure = f"{len(updates)} accepted updates, {self.cfg.min_train_nodes} needed"
            return None
        return prior, Aggregator.weighted_mean(updates)

    def _secure_round(
        self,
        number: int,
        sampled: list[int],
        prior_ref: str,
        prior: BTensors | None,
        outcome: RoundOutcome,
        reports: RoundReports,
        *,
        mode: str = "train",
    ) -> tuple[BTensors, BTensors] | None:
        """Deltas through SecAgg+: only their mean is revealed, then checked as a whole."""
        c = self.cfg
        if len(sampled) < max(2, c.min_train_nodes):
            outcome.failure = (
                f"{len(sampled)} devices available, {max(2, c.min_train_nodes)} needed"
            )
            return None
        noise_std = (
            c.dp_noise_multiplier * c.clip_norm / math.sqrt(len(sampled))
            if c.dp == "client"
            else 0.0
        )
        # Example-weighted like a plain round, with the same cap; DP keeps equal weights,
        # since its noise is calibrated to each device's equal share of the mean.
        weight_cap = c.example_weight_cap if c.dp == "off" else 0
        params = secagg_params(
            len(sampled),
            clip_norm=c.clip_norm,
            dropout_share=c.secagg_dropout_share,
            noise_std=noise_std,
            num_shares=c.secagg_num_shares,
            max_weight=max(1, weight_cap),
        )
        instr = replace(
            self._instruction(number, prior_ref, mode, noise_std=noise_std),
            secure_weight_cap=weight_cap,
        )
        prior_payload = encode_tensors(prior, packing="fp32") if prior is not None else None
        fitins: dict[int, FitIns] = {}
        for node in sampled:
            config: dict[str, Any] = dict(instr.to_config())
            if prior_payload is not None and self._sent_prior.get(node) != prior_ref:
                config[SECURE_PRIOR_FIELD] = prior_payload
            a_bytes = self._a_bytes_for(node)
            if a_bytes is not None:
                config[SECURE_SHARED_A_FIELD] = a_bytes
            fitins[node] = FitIns(Parameters(tensors=[], tensor_type=""), config)
        tally = _Tally(self.grid)
        try:
            result = secure_mean(
                tally, fitins, params, round_number=number, timeout=c.round_timeout_s
            )
        except Exception as exc:  # a device's bad vector breaks Flower's sum
            log.exception("round %d: secure aggregation failed", number)
            outcome.failure = f"secure aggregation failed ({type(exc).__name__}: {exc})"
            result = None
        outcome.bytes_up, outcome.bytes_down = tally.bytes_up, tally.bytes_down
        outcome.dropouts = len(tally.missing)
        for node, why in tally.errors.items():
            outcome.refused[node] = why
            self._sent_prior.pop(node, None)
            self._a_delivered(node, False)
        for node in tally.missing:
            self._sent_prior.pop(node, None)
            self._a_delivered(node, False)
        if result is None:
            outcome.failure = outcome.failure or (
                f"SecAgg+ stopped: fewer than {params.threshold} of a device's "
                f"{params.num_shares} neighbours answered (it survives "
                f"{params.dropouts_survived} dropouts per neighbourhood)"
            )
            return None
        contributors = sorted(result.replies)
        for node in contributors:
            self._sent_prior[node] = prior_ref
            self._a_delivered(node, True)
        layouts: set[str] = set()
        for node, fields in result.replies.items():
            layouts.add(str(fields.get(SECURE_LAYOUT_FIELD, "")))
            metrics: RoundMetrics | None = None
            try:
                metrics = RoundMetrics.from_metrics(
                    {k: v for k, v in fields.items() if k != SECURE_LAYOUT_FIELD}
                )
                outcome.metrics[node] = {k: float(v) for k, v in asdict(metrics).items()}
            except LorafleetError as exc:
                log.warning("round %d: node %d sent unreadable metrics (%s)", number, node, exc)
            reports.add_fields(node, fields, metrics)
        outcome.accepted = len(contributors)
        checked = self._check_secure_mean(
            result.mean, layouts, prior, params, noise_std, contributors
        )
        if isinstance(checked, str):
            outcome.failure = checked
            return None
        return checked

    def _check_secure_mean(
        self,
        flat: Any,
        layouts: set[str],
        prior: BTensors | None,
        params: SecAggParams,
        noise_std: float,
        contributors: list[int],
    ) -> str | tuple[BTensors, BTensors]:
        """The mean as tensors, or why the round must be discarded."""
        if len(contributors) < self.cfg.min_train_nodes:
            return (
                f"{len(contributors)} devices finished SecAgg+, {self.cfg.min_train_nodes} needed"
            )
        revoked = self.coord.registry.revoked_node_ids() & set(contributors)
        if revoked:
            return f"node(s) {sorted(revoked)} were revoked during the round; their deltas are inside the sum"
        if len(layouts) != 1:
            return f"devices disagree on the delta's tensors ({len(layouts)} layouts)"
        try:
            layout = layout_from_json(next(iter(layouts)))
            mean = unflatten(np.asarray(flat, np.float64), layout)
        except LorafleetError as exc:
            return f"the securely aggregated mean does not match the devices' layout ({exc})"
        if prior is None:
            prior = {name: np.zeros(shape, np.float32) for name, shape in layout}
        if {k: v.shape for k, v in mean.items()} != {k: v.shape for k, v in prior.items()}:
            return "the devices' tensors differ from the prior's"
        if not all(np.isfinite(v).all() for v in mean.values()):
            return "the securely aggregated mean contains NaN or Inf"
        # Honest devices clip to C, so the mean's norm is at most C, up to quantization
        # (< one step per value) and the client-side noise's (Gaussian) norm bound.
        values = sum(v.size for v in mean.values())
        m = len(contributors)
        allowed = (
            self.cfg.clip_norm * (1 + NORM_TOLERANCE)
            + params.tolerance * math.sqrt(values)
            + noise_std / math.sqrt(m) * (math.sqrt(values) + 10)
        )
        norm = global_norm(mean)
        if norm > allowed:
            return (
                f"the mean delta's norm {norm:.4g} exceeds what {m} clipped deltas can reach "
                f"({allowed:.4g}): a device did not clip; the round is discarded"
            )
        return prior, mean

    def _privatize(
        self, number: int, mean: BTensors, outcome: RoundOutcome, *, available: int
    ) -> BTensors:
        """Central noise on the mean (dp = central), and the round's privacy accounting."""
        assert self._ledger is not None
        c = self.cfg
        m = max(outcome.accepted, 1)
        if c.dp == "central":
            # N(0, (sigma C)^2) on the sum of m deltas is N(0, (sigma C / m)^2) on their mean.
            noise = gaussian_noise_like(
                mean, c.dp_noise_multiplier * c.clip_norm / m, self._noise_rng
            )
            mean = {k: (v + noise[k]).astype(np.float32) for k, v in mean.items()}
            sigma = c.dp_noise_multiplier
        else:  # client: each sampled device added 1/sqrt(sampled) of it; dropouts took theirs
            sigma = c.dp_noise_multiplier * math.sqrt(m / max(outcome.sampled, 1))
        q = min(1.0, outcome.sampled / max(available, 1))
        outcome.dp_epsilon = self.coord.record_release(self._ledger, number, q, sigma)
        outcome.dp_delta = c.dp_delta
        return mean

    def _close(self, round_id: RoundId, outcome: RoundOutcome, *, status: RoundStatus) -> None:
        """Record a round attempt's totals in the registry, finished or failed."""
        self.coord.registry.finish_round(
            round_id,
            participants=outcome.accepted,
            dropouts=outcome.dropouts,
            refused=len(outcome.refused),
            bytes_up=outcome.bytes_up,
            bytes_down=outcome.bytes_down,
            prior_ref=outcome.prior_version,
            status=status,
            dp_epsilon=outcome.dp_epsilon if status == "finished" else None,
            dp_delta=outcome.dp_delta if status == "finished" else None,
        )

    def personalize_all(
        self, prior_ref: str, prior: BTensors | None
    ) -> dict[int, dict[str, float]]:
        """Every (unrevoked) node fine-tunes its personal adapter from the final prior.

        Nothing comes back but metrics: the personal adapter stays on the device. Each
        device early-stops on its validation notes and keeps the best of {prior, its
        previous personal adapter, the fine-tuned one}, so this never leaves a user
        worse on validation than the prior (client/federated.py ``run_round``).
        """
        instr = self._instruction(self.coord.completed_round(), prior_ref, "personalize")
        nodes = self.eligible_nodes()
        log.info(
            "personalizing on %d devices from prior %s (at most %d steps each)",
            len(nodes),
            prior_ref,
            instr.personal_steps,
        )
        replies, _ = self._send(nodes, instr, prior, MessageType.TRAIN)
        reports = RoundReports(self.coord, instr.round, prior_ref)
        out: dict[int, dict[str, float]] = {}
        failed = 0
        for reply in replies:
            if not reply.has_content():
                failed += 1
                self._sent_prior.pop(reply.metadata.src_node_id, None)
                continue
            self._sent_prior[reply.metadata.src_node_id] = prior_ref
            try:
                m = RoundMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
            except (KeyError, LorafleetError):
                failed += 1
                continue
            out[reply.metadata.src_node_id] = {k: float(v) for k, v in asdict(m).items()}
            reports.add_reply(reply.metadata.src_node_id, reply.content, m)
        recorded = reports.record()
        means = _mean_metrics(out.values())
        log.info(
            "personalized %d/%d devices (%d new versions recorded); held-out loss prior %.3f, personal %.3f%s",
            len(out),
            len(nodes),
            recorded.versions,
            means.get("prior_loss", float("nan")),
            means.get("personal_loss", float("nan")),
            f"; {failed} failed (they keep their previous adapter)" if failed else "",
        )
        return out

    def evaluate_all(self, prior_ref: str, prior: BTensors | None) -> dict[int, dict[str, float]]:
        """Held-out losses of base, prior and personal adapter on every (unrevoked) node."""
        instr = self._instruction(self.coord.completed_round(), prior_ref, "evaluate")
        replies, _ = self._send(self.eligible_nodes(), instr, prior, MessageType.EVALUATE)
        reports = RoundReports(self.coord, instr.round, prior_ref, evaluate=True)
        out: dict[int, dict[str, float]] = {}
        for reply in replies:
            if reply.has_content():
                m = RoundMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
                out[reply.metadata.src_node_id] = {k: float(v) for k, v in asdict(m).items()}
                reports.add_reply(reply.metadata.src_node_id, reply.content, m)
        reports.record()
        if prior_ref != ZERO_PRIOR and out:  # every device's score of the final prior
            self.coord.score_prior(
                prior_ref, out.values(), round=instr.round, source="final-evaluation"
            )
        return out


def _mean_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    rows = list(rows)
    keys = ("base_loss", "prior_loss", "personal_loss")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}


def check_resumed_a(coord: CoordinatorState, mode: str) -> None:
    """Refuse to resume a cohort on another kind of A than its priors were trained on.

    A prior's B means something only on the A it was trained with: a data dir whose
    rounds ran on the seeded A, resumed with a gradient A (or the other way round, e.g.
    after the default changed), would hand devices a prior they cannot use.
    """
    if coord.has_shared_a():  # round 0 ran: every prior of this cohort is on that A
        if mode == "gradient":
            return
        ran, asked = "gradient", "seeded"
    elif mode == "seeded" or coord.completed_round() == 0:
        return
    else:
        ran, asked = "seeded", "gradient"
    raise LorafleetError(
        f"the data dir {coord.config.data_dir} holds rounds run on the {ran} A, but this run "
        f"asks for the {asked} A; set shared-a = {ran} to resume it, or use a new data-dir"
    )


def run_federation(grid: Grid, config: CoordinatorConfig) -> dict[str, Any]:
    """Run (or resume) the configured rounds, then evaluate; returns the results record."""
    coord = CoordinatorState.open(config)
    try:
        fed = RoundLoop(grid, coord)
        log.info("waiting for %d devices", config.min_available_nodes)
        fed.wait_for_nodes()
        outcomes: list[RoundOutcome] = []
        mode = config.shared_a_mode
        if config.shared_a == "auto":
            log.info(
                "shared-a auto -> %s%s",
                mode,
                " (dp is on and the gradient sketch has no privacy accounting)"
                if mode == "seeded"
                else " (round 0 sums the devices' gradient sketches)",
            )
        check_resumed_a(coord, mode)
        if mode == "gradient":
            shared = coord.shared_a()
            for attempt in range(config.max_round_retries + 1):
                if shared is not None:
                    break
                outcome, shared = fed.run_sketch_round(attempt)
                outcomes.append(outcome)
            if shared is None:
                raise LorafleetError(
                    f"round 0 (the shared A's sketch) failed {config.max_round_retries + 1} "
                    f"times ({outcomes[-1].failure}){failure_causes(outcomes[-1])}; fix that "
                    "(the nodes' logs have more), or run with shared-a = seeded"
                )
            fed.use_shared_a(shared)
        record, prior = coord.training_prior()
        prior_ref = record.ref if record is not None else ZERO_PRIOR
        done = coord.completed_round()
        if done:
            log.info("resuming after round %d (prior %s)", done, prior_ref)
        for number in range(done + 1, config.num_rounds + 1):
            for attempt in range(config.max_round_retries + 1):
                # Train from the candidate awaiting its score, else the active prior:
                # after a held candidate, or an operator's rollback in the console
                # (waited out while paused), that is the active one again (a few registry
                # queries; the prior's file is read only if it changed).
                fed.wait_while_paused()
                if (coord.training_prior_ref() or ZERO_PRIOR) != prior_ref:
                    record, prior = coord.training_prior()
                    prior_ref = record.ref if record is not None else ZERO_PRIOR
                outcome = fed.run_round(number, attempt, prior_ref, prior)
                outcomes.append(outcome)
                if outcome.failure is None:
                    break
            else:
                raise LorafleetError(
                    f"round {number} failed {config.max_round_retries + 1} times "
                    f"({outcomes[-1].failure}){failure_causes(outcomes[-1])}; "
                    "fix that (the nodes' logs have more), then run again to resume"
                )
        scored = fed.score_candidate()
        # Devices personalize from, and are evaluated on, the prior that is active now.
        record, prior = coord.active_prior()
        prior_ref = record.ref if record is not None else ZERO_PRIOR
        personalized = fed.personalize_all(prior_ref, prior) if config.personalize_steps > 0 else {}
        evaluation = fed.evaluate_all(prior_ref, prior) if config.final_evaluation else {}
        results = {
            "prior_version": prior_ref,
            "rounds": [asdict(o) for o in outcomes],
            "final_candidate": asdict(scored) if scored is not None else None,
            "personalization": {str(k): v for k, v in sorted(personalized.items())},
            "evaluation": {str(k): v for k, v in sorted(evaluation.items())},
            "bytes_up_per_client": _bytes_up_per_client(outcomes),
            "secure_aggregation": config.secure_aggregation,
            "privacy": _privacy_summary(fed, config),
        }
        atomic_write_text(
            Path(config.data_dir) / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True)
        )
        return results
    finally:
        coord.close()


def failure_causes(outcome: RoundOutcome) -> str:
    """What the devices said when a round failed, for the run's one-line failure.

    A device that names its own mistake (an error reply starting with
    :data:`REFUSAL_PREFIX`) is quoted as it wrote it; other refusals (a malformed delta,
    a crash's repr) are cut short. The commonest cause comes first with its count, so a
    misconfigured fleet reads as one sentence rather than one line per device.
    """
    if not outcome.refused:
        return f"; {outcome.dropouts} device(s) did not answer" if outcome.dropouts else ""
    counts: dict[str, int] = {}
    for reason in outcome.refused.values():
        text = reason.removeprefix("error: ")
        text = text.removeprefix(REFUSAL_PREFIX) if text.startswith(REFUSAL_PREFIX) else text[:160]
        counts[text] = counts.get(text, 0) + 1
    (first, n), *rest = sorted(counts.items(), key=lambda kv: -kv[1])
    others = sum(k for _, k in rest)
    more = f" (and {others} other refusal(s))" if others else ""
    return f"; {n} of {outcome.sampled} device(s) refused: {first}{more}"


def _privacy_summary(fed: RoundLoop, config: CoordinatorConfig) -> dict[str, Any]:
    """The DP mode and the cumulative epsilon (None without DP)."""
    ledger = fed._ledger
    return {
        "dp": config.dp,
        "noise_multiplier": config.dp_noise_multiplier if config.dp != "off" else None,
        "delta": config.dp_delta if config.dp != "off" else None,
        "epsilon": ledger.epsilon(config.dp_delta) if ledger is not None else None,
        "releases": len(ledger.steps) if ledger is not None else 0,
    }


def _bytes_up_per_client(outcomes: list[RoundOutcome]) -> float:
    accepted = sum(o.accepted for o in outcomes)
    return sum(o.bytes_up for o in outcomes) / accepted if accepted else 0.0


def _consensus_zero_prior(deltas: list[BTensors]) -> BTensors:
    """Zeros in the tensor names and shapes that most devices reported (round 1 only)."""
    if not deltas:
        return {}
    signatures = [tuple(sorted((k, tuple(v.shape)) for k, v in d.items())) for d in deltas]
    winner = max(set(signatures), key=signatures.count)
    return {k: np.zeros(shape, np.float32) for k, shape in winner}


# ------------------------------------------------------------------ the Flower ServerApp
def _log_to_stderr() -> None:
    """Round progress reaches ``flwr log`` on a SuperLink, where our logger has no handler."""
    root = logging.getLogger("lorafleet")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def make_server_app(
    config: CoordinatorConfig | None = None,
    *,
    on_results: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`run_federation`; with ``config`` it ignores the run config.

    ``flwr run`` uses :data:`app`, which reads ``[tool.flwr.app.config]``; in-process
    simulations pass their typed config here, and ``on_results`` to receive the results.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """Entry point Flower calls with the run's Grid and config."""
        _log_to_stderr()
        cfg = config or CoordinatorConfig.from_run_config(dict(context.run_config))
        results = run_federation(grid, cfg)
        if on_results is not None:
            on_results(results)

    return server_app


app = make_server_app()
"""The ServerApp ``flwr run`` loads (``[tool.flwr.app.components]``)."""


if not TYPE_CHECKING:
    # ``Federation`` was renamed ``RoundLoop`` (#15): it is the ServerApp's round loop, not
    # the federation. The old name still imports, with a DeprecationWarning, for one
    # release so that code outside this repository has time to follow; it is hidden from
    # type checkers so that mypy flags any use left here.
    def __getattr__(name: str) -> Any:
        """Deprecated aliases: ``Federation`` -> :class:`RoundLoop`."""
        if name == "Federation":
            warnings.warn(
                "lorafleet.server.flower_app.Federation is deprecated; use RoundLoop",
                DeprecationWarning,
                stacklevel=2,
            )
            return RoundLoop
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
