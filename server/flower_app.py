"""The Flower ServerApp: rounds of the shared prior over many devices' private adapters.

Each round samples nodes, sends them the cohort's adapter seed (spec + prior version, and
the prior's B only to nodes that do not have that version yet), collects clipped prior
deltas, refuses malformed ones (logged with the node id), aggregates the rest into a new
prior version and commits it to disk and the registry. Too few accepted updates fail the
round cleanly; it is retried. A coordinator killed at any point resumes at the last
completed round.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.federation import (
    INSTRUCTION_KEY,
    METRICS_KEY,
    PRIOR_KEY,
    UPDATE_KEY,
    ZERO_PRIOR,
    RoundInstruction,
    RoundMetrics,
)
from lorafleet.server.aggregation import BTensors, Update, refusal_reason
from lorafleet.server.coordinator import Coordinator, CoordinatorConfig
from lorafleet.server.registry import RoundId
from lorafleet.server.registry.records import RoundStatus

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class RoundOutcome:
    """What one round attempt did, for logs, the registry and results.json."""

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


class Federation:
    """The round loop over a Flower Grid, with the coordinator's durable state."""

    def __init__(self, grid: Grid, coordinator: Coordinator) -> None:
        self.grid = grid
        self.coord = coordinator
        self.cfg = coordinator.config
        self._sent_prior: dict[int, str] = {}  # node id -> prior version it has

    def wait_for_nodes(self) -> list[int]:
        """Block until enough nodes are connected (or fail with a clear error)."""
        deadline = time.monotonic() + self.cfg.wait_for_nodes_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_available_nodes:
                return nodes
            if time.monotonic() > deadline:
                raise LorafleetError(
                    f"only {len(nodes)} node(s) connected after {self.cfg.wait_for_nodes_s:.0f}s; "
                    f"min-available-nodes is {self.cfg.min_available_nodes}: start more SuperNodes or lower it"
                )
            time.sleep(0.5)

    def _instruction(self, number: int, prior_ref: str, mode: str) -> RoundInstruction:
        c = self.cfg
        return RoundInstruction(
            round=number,
            spec=self.coord.spec,
            prior_version=prior_ref,
            mode=mode,  # type: ignore[arg-type]
            personal_steps=c.personal_steps,
            prior_steps=c.prior_steps,
            lr=c.lr,
            prox_mu=c.prox_mu,
            clip_norm=c.clip_norm,
            batch_size=c.batch_size,
            seq_len=c.seq_len,
            heldout_fraction=c.heldout_fraction,
            packing=c.packing,  # type: ignore[arg-type]
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
            if prior is not None and self._sent_prior.get(node) != instr.prior_version:
                content[PRIOR_KEY] = ConfigRecord({"b": prior_payload})
                bytes_down += len(prior_payload)
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout_s))
        return replies, bytes_down

    def run_round(
        self, number: int, attempt: int, prior_ref: str, prior: BTensors | None
    ) -> RoundOutcome:
        """One attempt at round ``number``: sample, send, validate, aggregate, commit."""
        started = time.perf_counter()
        nodes = sorted(self.grid.get_node_ids())
        rng = random.Random(f"{self.cfg.seed}/{number}/{attempt}")
        k = max(self.cfg.min_train_nodes, round(self.cfg.fraction_train * len(nodes)))
        sampled = sorted(rng.sample(nodes, min(k, len(nodes))))
        record = self.coord.start_round(number, attempt)
        outcome = RoundOutcome(round=number, attempt=attempt, sampled=len(sampled))
        log.info(
            "round %d/%d%s: training on %d of %d devices",
            number,
            self.cfg.num_rounds,
            f" (retry {attempt})" if attempt else "",
            len(sampled),
            len(nodes),
        )
        instr = self._instruction(number, prior_ref, "train")
        replies, outcome.bytes_down = self._send(sampled, instr, prior, MessageType.TRAIN)
        decoded: dict[int, tuple[BTensors, RoundMetrics, int]] = {}
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if not reply.has_content():
                self._sent_prior.pop(node, None)  # it may have lost its copy
                reason = reply.error.reason if reply.has_error() else "no content"
                outcome.refused[node] = f"error: {str(reason)[:200]}"
                continue
            self._sent_prior[node] = prior_ref
            try:
                delta_bytes = reply.content[UPDATE_KEY]["delta"]
                if not isinstance(delta_bytes, bytes):
                    raise LorafleetError("delta is not bytes")
                delta, _ = decode_tensors(delta_bytes)
                metrics = RoundMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
            except (KeyError, LorafleetError) as exc:
                outcome.refused[node] = f"malformed reply ({exc})"
                continue
            decoded[node] = (delta, metrics, len(delta_bytes))
        if prior is None:  # round 1: the zero prior in the shapes most devices agree on
            prior = _consensus_zero_prior([d for d, _, _ in decoded.values()])
        shapes = {k: tuple(v.shape) for k, v in prior.items()}
        updates: list[Update] = []
        for node, (delta, metrics, size) in decoded.items():
            reason = refusal_reason(delta, shapes, self.cfg.clip_norm)
            if reason is None and metrics.num_examples < 1:
                reason = "no training examples"
            if reason is not None:
                outcome.refused[node] = reason
                continue
            outcome.bytes_up += size
            outcome.metrics[node] = {k: float(v) for k, v in asdict(metrics).items()}
            updates.append(Update(node, delta, float(metrics.num_examples)))
        outcome.dropouts = len(set(sampled) - answered)
        outcome.accepted = len(updates)
        for node, why in outcome.refused.items():
            log.warning("round %d: update from node %d refused: %s", number, node, why)
        if len(updates) < self.cfg.min_train_nodes:
            outcome.seconds = time.perf_counter() - started
            self._close(record.id, outcome, status="failed")
            log.warning(
                "round %d attempt %d failed: %d accepted updates, %d needed",
                number,
                attempt,
                len(updates),
                self.cfg.min_train_nodes,
            )
            return outcome
        new_prior = self.coord.aggregator.step(prior, updates)
        means = _mean_metrics(outcome.metrics.values())
        saved = self.coord.save_prior(
            self.coord.next_prior_version(), new_prior, round=number, metrics=means
        )
        outcome.prior_version = saved.ref
        outcome.seconds = time.perf_counter() - started
        self._close(record.id, outcome, status="finished")
        log.info(
            "round %d/%d: %d/%d updates accepted, prior %s; held-out loss base %.3f, prior %.3f, personal %.3f (%.0f s)",
            number,
            self.cfg.num_rounds,
            len(updates),
            len(sampled),
            saved.ref,
            means.get("base_loss", float("nan")),
            means.get("prior_loss", float("nan")),
            means.get("personal_loss", float("nan")),
            outcome.seconds,
        )
        return outcome

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
        )

    def evaluate_all(self, prior_ref: str, prior: BTensors | None) -> dict[int, dict[str, float]]:
        """Held-out losses of base, prior and personal adapter on every node."""
        instr = self._instruction(self.coord.completed_round(), prior_ref, "evaluate")
        replies, _ = self._send(
            sorted(self.grid.get_node_ids()), instr, prior, MessageType.EVALUATE
        )
        out: dict[int, dict[str, float]] = {}
        for reply in replies:
            if reply.has_content():
                m = RoundMetrics.from_metrics(dict(reply.content[METRICS_KEY]))
                out[reply.metadata.src_node_id] = {k: float(v) for k, v in asdict(m).items()}
        return out


def _mean_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    rows = list(rows)
    keys = ("base_loss", "prior_loss", "personal_loss")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {}


def run_federation(grid: Grid, config: CoordinatorConfig) -> dict[str, Any]:
    """Run (or resume) the configured rounds, then evaluate; returns the results record."""
    coord = Coordinator.open(config)
    try:
        fed = Federation(grid, coord)
        log.info("waiting for %d devices", config.min_available_nodes)
        fed.wait_for_nodes()
        record, prior = coord.active_prior()
        prior_ref = record.ref if record is not None else ZERO_PRIOR
        done = coord.completed_round()
        if done:
            log.info("resuming after round %d (prior %s)", done, prior_ref)
        outcomes: list[RoundOutcome] = []
        for number in range(done + 1, config.num_rounds + 1):
            for attempt in range(config.max_round_retries + 1):
                outcome = fed.run_round(number, attempt, prior_ref, prior)
                outcomes.append(outcome)
                if outcome.prior_version is not None:
                    record, prior = coord.active_prior()
                    prior_ref = outcome.prior_version
                    break
            else:
                raise LorafleetError(
                    f"round {number} failed {config.max_round_retries + 1} times (too few accepted "
                    "updates); check the nodes' logs, then run again to resume"
                )
        evaluation = fed.evaluate_all(prior_ref, prior) if config.final_evaluation else {}
        results = {
            "prior_version": prior_ref,
            "rounds": [asdict(o) for o in outcomes],
            "evaluation": {str(k): v for k, v in sorted(evaluation.items())},
            "bytes_up_per_client": _bytes_up_per_client(outcomes),
        }
        atomic_write_text(
            Path(config.data_dir) / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True)
        )
        return results
    finally:
        coord.close()


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
