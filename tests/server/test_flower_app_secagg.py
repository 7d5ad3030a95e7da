"""Secure aggregation, differential privacy, devices' weights and the console's controls.

These run the coordinator's real rounds and Flower's real SecAgg+ workflow and mod over
an in-process grid (:class:`lorafleet.sim.runner.LocalGrid`) whose devices send
synthetic clipped deltas, so every number can be checked exactly and nothing needs Ray.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common import FitIns, Parameters, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from lorafleet.client import federated
from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.federation import (
    MAX_NUM_EXAMPLES,
    RoundInstruction,
    RoundMetrics,
    clip_by_global_norm,
    flatten,
    layout_from_json,
    layout_to_json,
    unflatten,
)
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.coordinator import CoordinatorConfig, CoordinatorState
from lorafleet.server.dp import PrivacyLedger
from lorafleet.server.flower_app import PAUSE_CONTROL, RoundLoop, run_federation
from lorafleet.server.grid_proxy import GridProxy
from lorafleet.server.registry import Registry
from lorafleet.server.secagg import (
    SecAggRisks,
    auto_num_shares,
    secagg_params,
    secagg_risks,
    secure_mean,
)
from lorafleet.sim.runner import LocalGrid, make_synthetic_client_app, synthetic_delta

SHAPES = {"layer0.q.lora_B": (96, 8), "layer0.v.lora_B": (32, 8)}
BIG = {"layer0.q.lora_B": (256, 8), "layer0.v.lora_B": (128, 8)}
SPEC = AdapterSpec(base_model_id="synthetic", base_sha256="0" * 64, rank=8)


def config(tmp: Path, nodes: int, **overrides: Any) -> CoordinatorConfig:
    args: dict[str, Any] = {
        "num_rounds": 1,
        "fraction_train": 1.0,
        "min_train_nodes": 2,
        "min_available_nodes": nodes,
        "wait_for_nodes_s": 5,
        "packing": "fp32",
        "base_model_id": "synthetic",
        "base_sha256": "0" * 64,
        "final_evaluation": False,
        "data_dir": str(tmp / "coordinator"),
        "clip_norm": 1.0,  # the synthetic deltas and tolerances below are for C = 1
        "shared_a": "seeded",  # synthetic devices send deltas, never a gradient sketch
    }
    args.update(overrides)
    return CoordinatorConfig(**args)


def plain_mean(shapes: dict[str, tuple[int, ...]], nodes: list[int], rnd: int, norm: float):  # type: ignore[no-untyped-def]
    return np.mean(
        [flatten(synthetic_delta(shapes, norm, (i, rnd)))[0].astype(np.float64) for i in nodes],
        axis=0,
    )


def stage_of(msg: Message) -> str:
    return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def final_prior(cfg: CoordinatorConfig) -> dict[str, np.ndarray]:
    """The last round's aggregate: the newest prior version, promoted or not (these tests
    check aggregation; apps without an evaluate handler cannot score the last one)."""
    coord = CoordinatorState.open(cfg)
    try:
        newest = coord.registry.list_prior_versions(coord.spec, limit=1).items[0]
        prior = coord.load_prior(newest)
    finally:
        coord.close()
    return prior


# ------------------------------------------------------------------ SecAgg+ itself
@pytest.mark.parametrize(("n", "clip"), [(3, 1.0), (10, 1.0), (10, 0.05)])
def test_secure_mean_matches_the_plain_mean_within_the_stated_tolerance(
    n: int, clip: float
) -> None:
    # Prepare: n devices with deltas clipped to `clip` (norm 0.9 * clip)
    grid = LocalGrid(make_synthetic_client_app(SHAPES), n)
    instr = RoundInstruction(round=1, spec=SPEC, prior_version="zero", clip_norm=clip)
    fitins = {node: FitIns(Parameters([], ""), instr.to_config()) for node in grid.get_node_ids()}
    params = secagg_params(n, clip_norm=clip, dropout_share=0.2)
    # Execute
    result = secure_mean(grid, fitins, params, round_number=1)
    # Assert: every value within one quantization step of the plain mean
    assert result is not None and len(result.replies) == n
    expected = plain_mean(SHAPES, list(range(n)), 1, 0.9 * clip)
    assert np.abs(result.mean - expected).max() <= params.tolerance
    assert params.tolerance < 1e-6 * clip  # far below fp16 packing's rounding


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors", "unmask"])
def test_a_round_survives_a_dropout_at_any_secagg_stage(stage: str) -> None:
    # Prepare: device 2 of 5 fails at `stage`; a dropout share of 0.3 allows one
    grid = LocalGrid(
        make_synthetic_client_app(SHAPES),
        5,
        dropout=lambda pid, msg: pid == 2 and stage_of(msg) == stage,
    )
    instr = RoundInstruction(round=1, spec=SPEC, prior_version="zero", clip_norm=1.0)
    fitins = {node: FitIns(Parameters([], ""), instr.to_config()) for node in grid.get_node_ids()}
    params = secagg_params(5, clip_norm=1.0, dropout_share=0.3)
    # Execute
    result = secure_mean(grid, fitins, params, round_number=1)
    # Assert: the mean over the devices whose masked vectors arrived
    assert result is not None
    finished = sorted(grid.partition[node] for node in result.replies)
    assert finished == ([0, 1, 2, 3, 4] if stage == "unmask" else [0, 1, 3, 4])
    expected = plain_mean(SHAPES, finished, 1, 0.9)
    assert np.abs(result.mean - expected).max() <= params.tolerance


@pytest.mark.parametrize(
    ("n", "share", "num_shares", "expected"),
    [
        (2, 0.2, 0, (2, 2)),
        (3, 0.34, 0, (3, 2)),
        (10, 0.3, 0, (10, 7)),
        (10, 0.0, 0, (10, 10)),
        (50, 0.2, 8, (9, 8)),
        (50, 0.2, -1, (50, 40)),  # -1: every sampled device, d per neighbourhood as before
        (50, 0.2, 0, (17, 9)),  # 0 (default): 3 log2 n neighbours, t = floor(k/2) + 1
        (200, 0.2, 0, (23, 12)),
        (10_000, 0.2, 0, (41, 21)),
    ],
)
def test_dropout_share_maps_to_shares_and_threshold(
    n: int, share: float, num_shares: int, expected: tuple[int, int]
) -> None:
    params = secagg_params(n, clip_norm=1.0, dropout_share=share, num_shares=num_shares)
    assert (params.num_shares, params.threshold) == expected
    assert params.threshold > params.num_shares / 2  # no one can collect both secrets
    assert n * params.quantization_range < params.modulus_range  # the sum never wraps


@pytest.mark.parametrize(("n", "k"), [(2, 2), (13, 13), (14, 13), (100, 21), (1000, 31)])
def test_the_default_neighbour_count_is_3_log2_n_and_odd(n: int, k: int) -> None:
    params = secagg_params(n, clip_norm=1.0, dropout_share=0.2)
    assert params.num_shares == k == min(n, auto_num_shares(n))
    assert k == n or (k % 2 == 1 and k >= 3 * np.log2(n))


@pytest.mark.parametrize("num_shares", [-2, 1, 2])
def test_a_neighbour_count_that_is_not_auto_all_or_at_least_3_is_refused(num_shares: int) -> None:
    with pytest.raises(SpecError, match=r"secagg-num-shares must be 0 \(auto\), -1"):
        secagg_params(20, clip_norm=1.0, dropout_share=0.2, num_shares=num_shares)


@pytest.mark.parametrize("n", [50, 200, 1000, 10_000])
def test_the_default_graph_keeps_the_stated_guarantees(n: int) -> None:
    # The figures docs/privacy.md states: 10% random dropouts or corrupted devices
    # fail or expose a round with probability < 1e-5; 20% removed rarely splits the ring.
    params = secagg_params(n, clip_norm=1.0, dropout_share=0.2)
    assert secagg_risks(params, dropped=0.10, corrupted=0.0).fails < 1e-5
    assert secagg_risks(params, dropped=0.0, corrupted=0.10).exposed < 1e-5
    assert secagg_risks(params, dropped=0.1, corrupted=0.1).split < 1e-5
    assert secagg_risks(params, dropped=0.2, corrupted=0.0).fails < 0.1


def test_with_every_device_a_neighbour_only_the_dropout_count_matters() -> None:
    params = secagg_params(20, clip_norm=1.0, dropout_share=0.2, num_shares=-1)
    assert (params.num_shares, params.threshold) == (20, 16)
    assert secagg_risks(params, dropped=0.2, corrupted=0.0) == SecAggRisks(0.0, 0.0, 0.0)
    assert secagg_risks(params, dropped=0.25, corrupted=0.0).fails == 1.0


class _Recorder(GridProxy):
    """Records what SecAgg+'s masked-vector stage sends and receives."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.ciphertexts: dict[int, int] = {}  # node -> key shares forwarded to it
        self.wire_types: set[str] = set()

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        for msg in messages:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            if Key.CIPHERTEXT_LIST in configs:
                self.ciphertexts[msg.metadata.dst_node_id] = len(configs[Key.CIPHERTEXT_LIST])
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in (r for r in replies if r.has_content()):
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            for b in configs.get(Key.MASKED_PARAMETERS, []):
                self.wire_types.add(str(bytes_to_ndarray(b).dtype))
        return replies


@pytest.mark.parametrize("lost", [None, 7])
def test_bounded_neighbours_still_give_the_exact_mean_in_uint32(lost: int | None) -> None:
    # Prepare: 20 devices, so the default graph is bounded (13 neighbours, threshold 7);
    # optionally device 7 is lost after uploading nothing (at the masked-vector stage)
    n = 20
    grid = _Recorder(
        LocalGrid(
            make_synthetic_client_app(SHAPES),
            n,
            dropout=lambda pid, msg: pid == lost and stage_of(msg) == "collect_masked_vectors",
        )
    )
    instr = RoundInstruction(round=1, spec=SPEC, prior_version="zero", clip_norm=1.0)
    fitins = {node: FitIns(Parameters([], ""), instr.to_config()) for node in grid.get_node_ids()}
    params = secagg_params(n, clip_norm=1.0, dropout_share=0.2)
    assert (params.num_shares, params.threshold) == (13, 7)
    # Execute
    result = secure_mean(grid, fitins, params, round_number=1)
    # Assert: each device got the shares of its 12 neighbours only, uploaded uint32, and
    # the mean over those who finished is within one quantization step
    assert result is not None
    assert set(grid.ciphertexts.values()) == {params.num_shares - 1}
    assert grid.wire_types == {"uint32"}
    finished = [i for i in range(n) if i != lost]
    assert sorted(grid.inner.partition[node] for node in result.replies) == finished
    expected = plain_mean(SHAPES, finished, 1, 0.9)
    assert np.abs(result.mean - expected).max() <= params.tolerance


def test_a_masked_value_beyond_the_modulus_is_refused_before_the_sum() -> None:
    # Prepare: device 0 runs a modified mod that uploads one value past 2**32
    def tampering(msg: Message, context: Context, call_next: Any) -> Message:
        reply = federated.secure_aggregation_mod(msg, context, call_next)
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs and context.node_config["partition-id"] == 0:
            arrays = [bytes_to_ndarray(b).astype(np.int64) for b in configs[Key.MASKED_PARAMETERS]]
            arrays[1][0] = 2**32 + 5
            configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
        return reply

    app = ClientApp()

    @app.train(mods=[tampering])
    def train(msg: Message, context: Context) -> Message:
        instr, _ = federated.read_instruction(msg)
        pid = int(context.node_config["partition-id"])
        delta = synthetic_delta(SHAPES, 0.9, (pid, instr.round))
        m = RoundMetrics(num_examples=20, base_loss=2.0, prior_loss=1.8, personal_loss=1.5)
        return federated.update_reply(msg, instr, delta, m)

    grid = LocalGrid(app, 4)
    instr = RoundInstruction(round=1, spec=SPEC, prior_version="zero", clip_norm=1.0)
    fitins = {node: FitIns(Parameters([], ""), instr.to_config()) for node in grid.get_node_ids()}
    params = secagg_params(4, clip_norm=1.0, dropout_share=0.2)
    # Execute / Assert: one clear error, not a silently wrapped sum
    with pytest.raises(IntegrityError, match=r"widening: masked value outside \[0, 4294967296\)"):
        secure_mean(grid, fitins, params, round_number=1)


# ------------------------------------------------------------------ whole rounds
def test_secure_and_plain_federations_reach_the_same_prior(tmp_path: Path) -> None:
    # Prepare: the same synthetic devices, once in the clear (fp32) and once with SecAgg+
    plain_cfg = config(tmp_path / "plain", 4, num_rounds=2)
    secure_cfg = config(tmp_path / "secure", 4, num_rounds=2, secure_aggregation=True)
    # Execute
    plain = run_federation(LocalGrid(make_synthetic_client_app(SHAPES), 4), plain_cfg)
    secure = run_federation(LocalGrid(make_synthetic_client_app(SHAPES), 4), secure_cfg)
    # Assert: the same priors, up to SecAgg+'s tolerance per round and float32
    tolerance = secagg_params(4, clip_norm=1.0, dropout_share=0.2).tolerance
    a, b = final_prior(plain_cfg), final_prior(secure_cfg)
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= 2 * tolerance + 1e-7
    assert [r["accepted"] for r in secure["rounds"]] == [4, 4]
    assert all(r["secure"] and r["bytes_up"] > 0 for r in secure["rounds"])
    assert secure["secure_aggregation"] is True and plain["secure_aggregation"] is False
    # the per-device metrics still arrive in the clear
    assert all(m["num_examples"] == 20 for m in secure["rounds"][0]["metrics"].values())


def test_too_many_dropouts_fail_the_attempt_cleanly_and_it_is_retried(tmp_path: Path) -> None:
    # Prepare: 4 devices, no dropout allowed; two fail the first attempt's training
    failed: set[int] = set()

    def drop(pid: int, msg: Message) -> bool:
        if pid in (1, 2) and stage_of(msg) == "collect_masked_vectors" and pid not in failed:
            failed.add(pid)
            return True
        return False

    cfg = config(tmp_path, 4, secure_aggregation=True, secagg_dropout_share=0.0)
    # Execute
    results = run_federation(LocalGrid(make_synthetic_client_app(SHAPES), 4, dropout=drop), cfg)
    # Assert
    first, second = results["rounds"]
    assert first["prior_version"] is None and "SecAgg+ stopped" in first["failure"]
    assert len(first["refused"]) == 2
    assert second["prior_version"].endswith("/v1") and second["accepted"] == 4


def test_a_device_that_does_not_clip_gets_the_secure_round_discarded(tmp_path: Path) -> None:
    # Prepare: device 0 runs modified code that skips the reply path's clip and sends a
    # delta 30x the clip norm (each value still within SecAgg+'s range)
    rogue = ClientApp()

    @rogue.train(mods=[federated.secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        instr, _ = federated.read_instruction(msg)
        pid = int(context.node_config["partition-id"])
        norm = 30.0 if pid == 0 else 0.9
        delta = synthetic_delta(SHAPES, norm * instr.clip_norm, (pid, instr.round))
        metrics = RoundMetrics(num_examples=20, base_loss=2.0, prior_loss=1.8, personal_loss=1.5)
        unclipped = dataclasses.replace(instr, clip_norm=1000.0) if pid == 0 else instr
        return federated.update_reply(msg, unclipped, delta, metrics)

    cfg = config(tmp_path, 3, secure_aggregation=True, max_round_retries=0)
    # Execute / Assert: the round is refused as a whole; no prior is published
    with pytest.raises(Exception, match="round 1 failed"):
        run_federation(LocalGrid(rogue, 3), cfg)
    registry = Registry.open(cfg.registry)
    try:
        assert registry.list_prior_versions(cfg.spec).items == ()
    finally:
        registry.close()


# ------------------------------------------------------------------ differential privacy
@pytest.mark.parametrize(
    ("mode", "secure"), [("central", False), ("central", True), ("client", True)]
)
def test_dp_noise_has_the_stated_scale_and_epsilon_is_reported(
    tmp_path: Path, mode: str, secure: bool
) -> None:
    # Prepare: 5 devices, 2 rounds, sigma 2, 5 of 10 sampled (q = 0.5)
    cfg = config(
        tmp_path,
        10,
        num_rounds=2,
        fraction_train=0.5,
        secure_aggregation=secure,
        dp=mode,
        dp_noise_multiplier=2.0,
        clip_norm=0.5,
    )
    # Execute
    results = run_federation(LocalGrid(make_synthetic_client_app(BIG), 10), cfg)
    # Assert: epsilon grows per round and matches an independent ledger
    expected = PrivacyLedger()
    epsilons = []
    for r in results["rounds"]:
        expected.add(r["round"], 0.5, 2.0)
        epsilons.append(r["dp_epsilon"])
        assert r["dp_epsilon"] == pytest.approx(expected.epsilon(1e-5))
        assert r["dp_delta"] == 1e-5
    assert 0 < epsilons[0] < epsilons[1]
    assert results["privacy"]["epsilon"] == pytest.approx(epsilons[-1])
    registry = Registry.open(cfg.registry)
    try:
        rounds = sorted(registry.list_rounds(cfg.spec).items, key=lambda r: r.number)
        assert [r.dp_epsilon for r in rounds] == pytest.approx(epsilons)
        assert all(r.dp_delta == 1e-5 for r in rounds)
    finally:
        registry.close()
    # the round-1 prior is the mean plus N(0, (sigma C / m)^2) per value
    sampled = sorted(int(n) for n in results["rounds"][0]["metrics"])
    grid_nodes = sorted(LocalGrid(make_synthetic_client_app(BIG), 10).partition.items())
    pids = [pid for node, pid in grid_nodes if node in sampled]
    coord = CoordinatorState.open(cfg)
    try:
        record = coord.registry.list_prior_versions(cfg.spec).items[-1]  # v1
        prior1 = coord.load_prior(record)
    finally:
        coord.close()
    got, _ = flatten(prior1)
    noise = got.astype(np.float64) - plain_mean(BIG, pids, 1, 0.9 * 0.5)
    assert np.std(noise) == pytest.approx(2.0 * 0.5 / len(pids), rel=0.15)


def test_a_lost_privacy_ledger_stops_the_coordinator(tmp_path: Path) -> None:
    cfg = config(tmp_path, 3, dp="central")
    run_federation(LocalGrid(make_synthetic_client_app(SHAPES), 3), cfg)
    ledger = next((tmp_path / "coordinator" / "privacy").glob("*.json"))
    ledger.unlink()
    again = config(tmp_path, 3, dp="central", num_rounds=2)
    with pytest.raises(IntegrityError, match="privacy ledger"):
        run_federation(LocalGrid(make_synthetic_client_app(SHAPES), 3), again)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dp": "client"}, "needs secure-aggregation"),
        ({"dp": "loud"}, "dp must be one of"),
        ({"dp": "central", "dp_noise_multiplier": 0.0}, "dp-noise-multiplier"),
        ({"dp_delta": 1.0}, "dp-delta"),
        ({"secagg_dropout_share": 0.5}, "secagg-dropout-share"),
        ({"secure_aggregation": True, "min_train_nodes": 1}, "min-train-nodes >= 2"),
        ({"secagg_num_shares": 2}, "secagg-num-shares"),
        ({"secagg_num_shares": -2}, "secagg-num-shares"),
    ],
)
def test_privacy_settings_are_checked(
    tmp_path: Path, overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(SpecError, match=match):
        config(tmp_path, 3, **overrides)


def test_run_config_keys_reach_the_privacy_settings() -> None:
    cfg = CoordinatorConfig.from_run_config(
        {
            "secure-aggregation": "true",
            "secagg-dropout-share": 0.3,
            "dp": "client",
            "dp-noise-multiplier": 0.8,
            "dp-delta": 1e-6,
        }
    )
    assert (cfg.secure_aggregation, cfg.secagg_dropout_share, cfg.dp) == (True, 0.3, "client")
    assert (cfg.dp_noise_multiplier, cfg.dp_delta) == (0.8, 1e-6)


# ------------------------------------------------------------------ console controls
def test_a_paused_coordinator_starts_no_round_until_resumed(tmp_path: Path) -> None:
    # Prepare: training paused in the registry before the run
    cfg = config(tmp_path, 3)
    coord = CoordinatorState.open(cfg)
    coord.registry.set_control(PAUSE_CONTROL, True)
    grid = LocalGrid(make_synthetic_client_app(SHAPES), 3)
    fed = RoundLoop(grid, coord)
    fed.pause_poll_s = 0.05
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(fed.run_round(1, 0, "zero", None)))
    # Execute
    worker.start()
    time.sleep(0.5)
    delivered_while_paused = grid.delivered
    coord.registry.set_control(PAUSE_CONTROL, False)
    worker.join(timeout=30)
    coord.close()
    # Assert
    assert delivered_while_paused == 0
    assert done and done[0].prior_version is not None and grid.delivered == 3


def test_revoked_nodes_are_not_sampled_and_every_node_is_registered(tmp_path: Path) -> None:
    # Prepare: 4 nodes seen once, then one revoked from the console
    cfg = config(tmp_path, 3, num_rounds=2, min_available_nodes=3)
    grid = LocalGrid(make_synthetic_client_app(SHAPES), 4)
    received: dict[int, int] = {}
    grid.dropout = lambda pid, msg: received.__setitem__(pid, received.get(pid, 0) + 1) or False
    Path(cfg.data_dir).mkdir(parents=True)
    registry = Registry.open(cfg.registry)
    revoked_node = sorted(grid.partition)[1]
    device = registry.register_node(revoked_node)
    registry.revoke_device(device.id)
    registry.close()
    # Execute
    results = run_federation(grid, cfg)
    # Assert: three devices took part each round, never the revoked one
    assert [r["sampled"] for r in results["rounds"]] == [3, 3]
    assert 1 not in received and sorted(received) == [0, 2, 3]
    registry = Registry.open(cfg.registry)
    try:
        seen = {d.node_id for d in registry.list_devices(kind="supernode").items}
        assert seen == set(grid.partition)
        assert registry.revoked_node_ids() == {revoked_node}
    finally:
        registry.close()


@pytest.mark.parametrize("secure", [False, True])
def test_a_node_revoked_during_a_round_is_not_heard(tmp_path: Path, secure: bool) -> None:
    # Prepare: node of partition 0 is revoked while it trains
    cfg = config(tmp_path, 4, secure_aggregation=secure, max_round_retries=1)
    grid = LocalGrid(make_synthetic_client_app(SHAPES), 4)
    victim = sorted(grid.partition)[0]
    revoked: list[int] = []

    def revoke_while_training(pid: int, msg: Message) -> bool:
        training = "fitins.config" in msg.content.config_records or (
            RECORD_KEY_CONFIGS not in msg.content.config_records
        )
        if pid == 0 and training and not revoked:
            registry = Registry.open(cfg.registry)
            try:
                registry.revoke_device(registry.register_node(victim).id)
            finally:
                registry.close()
            revoked.append(victim)
        return False

    grid.dropout = revoke_while_training
    # Execute
    results = run_federation(grid, cfg)
    # Assert: in the clear its reply is refused; under SecAgg+ the sum that holds it is
    # discarded and the retry runs without it
    final = results["rounds"][-1]
    assert final["prior_version"] is not None and str(victim) not in map(str, final["metrics"])
    if secure:
        assert "revoked" in results["rounds"][0]["failure"] and len(results["rounds"]) == 2
    else:
        assert results["rounds"][0]["refused"][victim] == "node revoked"


def test_a_device_that_requires_secure_aggregation_refuses_a_plain_round(tmp_path: Path) -> None:
    # Prepare: real device apps set to insist on SecAgg+, a coordinator in the clear
    app = federated.make_client_app({"require-secure-aggregation": "true"})
    coord = CoordinatorState.open(config(tmp_path, 3))
    try:
        # Execute
        outcome = RoundLoop(LocalGrid(app, 3), coord).run_round(1, 0, "zero", None)
    finally:
        coord.close()
    # Assert: no device sent its delta, each said why
    assert outcome.accepted == 0 and outcome.prior_version is None
    assert len(outcome.refused) == 3
    assert all("requires secure aggregation" in why for why in outcome.refused.values())


def test_a_flat_delta_round_trips_through_its_layout() -> None:
    # Prepare
    delta = synthetic_delta(SHAPES, 0.5, 7)
    # Execute
    flat, layout = flatten(delta)
    back = unflatten(flat, layout_from_json(layout_to_json(layout)))
    # Assert
    assert flat.shape == (96 * 8 + 32 * 8,)
    assert all(np.array_equal(back[k], delta[k]) for k in delta)
    with pytest.raises(SpecError, match="layout describes"):
        unflatten(flat[:-1], layout)
    with pytest.raises(SpecError, match="noise_std"):
        RoundInstruction(round=1, spec=SPEC, prior_version="zero", noise_std=-1.0)


def test_a_prior_rolled_back_during_a_pause_is_where_the_next_round_starts(
    tmp_path: Path,
) -> None:
    # Prepare: the operator pauses during round 2, rolls back to prior v1 once round 2
    # has published v2, then resumes; all while the run goes on
    cfg = config(tmp_path, 3, num_rounds=3)
    Path(cfg.data_dir).mkdir(parents=True)
    operator = Registry.open(cfg.registry)
    seen: list[int] = []

    def pause_in_round_two(pid: int, msg: Message) -> bool:
        seen.append(pid)
        if len(seen) == 4:  # the first message of round 2
            operator.set_control(PAUSE_CONTROL, True)
        return False

    def roll_back_then_resume() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(p.version == 2 for p in operator.list_prior_versions(spec).items):
                operator.set_active_prior(spec, 1)
                operator.set_control(PAUSE_CONTROL, False)
                return
            time.sleep(0.05)

    grid = LocalGrid(make_synthetic_client_app(SHAPES), 3, dropout=pause_in_round_two)
    spec = CoordinatorState.open(cfg).spec
    console = threading.Thread(target=roll_back_then_resume)
    # Execute
    console.start()
    results = run_federation(grid, cfg)
    console.join(timeout=60)
    # Assert: prior v3 = v1 + the mean of round 3's deltas (FedAvg, server lr 1), not v2 + ...
    coord = CoordinatorState.open(cfg)
    try:
        priors = {
            p.version: coord.load_prior(p)
            for p in coord.registry.list_prior_versions(coord.spec).items
        }
    finally:
        coord.close()
        operator.close()
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3] and sorted(priors) == [1, 2, 3]
    step = flatten(priors[3])[0].astype(np.float64) - flatten(priors[1])[0]
    assert np.abs(step - plain_mean(SHAPES, [0, 1, 2], 3, 0.9)).max() < 1e-6


# ------------------------------------------------------------------ a device's reported size
# and its delta's norm, played as an attacker (#14 item 4): device 0 is the rogue.
def delta_of(pid: int, rnd: int, norm: float = 0.9) -> dict[str, np.ndarray]:
    return synthetic_delta(SHAPES, norm, (pid, rnd))


def metrics(num_examples: int = 20) -> RoundMetrics:
    return RoundMetrics(num_examples=num_examples, base_loss=2.0, prior_loss=1.8, personal_loss=1.5)


def rogue_app(*, reported: float | None = None, norm: float = 0.9) -> ClientApp:
    """Device 0 reports ``reported`` examples (bypassing RoundMetrics' own checks) and
    hands the reply path a delta of ``norm`` times the clip norm; the others are honest."""
    app = ClientApp()

    @app.train(mods=[federated.secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        instr, _ = federated.read_instruction(msg)
        pid = int(context.node_config["partition-id"])
        delta = delta_of(pid, instr.round, norm if pid == 0 else 0.9)
        reply = federated.update_reply(msg, instr, delta, metrics())
        if pid == 0 and reported is not None:  # the plain metrics and the secure fitres ones
            for name, record in list(reply.content.metric_records.items()):
                if "num-examples" in record:
                    raw = dict(record)
                    raw["num-examples"] = reported
                    reply.content[name] = MetricRecord(raw)  # type: ignore[arg-type]
        return reply

    return app


def weighted(weights: dict[int, float], rnd: int = 1) -> np.ndarray:
    total = sum(weights.values())
    parts = [w * flatten(delta_of(pid, rnd))[0].astype(np.float64) for pid, w in weights.items()]
    return np.sum(parts, axis=0) / total


# ------------------------------------------------------------------ the protocol boundary
@pytest.mark.parametrize(
    "bad", [float("inf"), float("nan"), 1e12, -5, 2.5, True, "20", MAX_NUM_EXAMPLES + 1]
)
def test_round_metrics_refuse_a_num_examples_no_device_has(bad: Any) -> None:
    # Execute / Assert: one SpecError naming the field
    with pytest.raises(SpecError, match="num-examples"):
        RoundMetrics.from_metrics(
            {"num-examples": bad, "base-loss": 2.0, "prior-loss": 1.9, "personal-loss": 1.8}
        )


def test_round_metrics_take_an_integral_float_as_an_int() -> None:
    # Flower's MetricRecord may carry a count as a float
    parsed = RoundMetrics.from_metrics(
        {"num-examples": 12.0, "base-loss": 2.0, "prior-loss": 1.9, "personal-loss": 1.8}
    )
    assert parsed.num_examples == 12 and isinstance(parsed.num_examples, int)


# ------------------------------------------------------------------ a real plain round
@pytest.mark.parametrize("reported", [float("inf"), float("nan"), 1e12, -3.0, 2.5])
def test_a_lying_num_examples_is_refused_and_the_run_goes_on(
    tmp_path: Path, reported: float
) -> None:
    # Prepare: 4 devices over 2 rounds; device 0 reports an impossible example count
    cfg = config(tmp_path, 4, num_rounds=2)
    grid = LocalGrid(rogue_app(reported=reported), 4)
    rogue = min(grid.partition)
    # Execute
    results = run_federation(grid, cfg)
    # Assert: both rounds finished without the rogue, whose reply was refused by name
    assert [r["accepted"] for r in results["rounds"]] == [3, 3]
    for rnd in results["rounds"]:
        assert rnd["prior_version"] is not None
        reason = rnd["refused"].get(str(rogue), rnd["refused"].get(rogue))
        assert "malformed reply" in reason and "num-examples" in reason
    # the prior is the others' mean: round 1 and round 2 each moved it by that mean
    expected = weighted({1: 1, 2: 1, 3: 1}, 1) + weighted({1: 1, 2: 1, 3: 1}, 2)
    prior = flatten(final_prior(cfg))[0]
    assert np.abs(prior - expected).max() < 1e-6
    # and a restart on the same state resumes cleanly (nothing poisoned was stored)
    again = run_federation(
        LocalGrid(rogue_app(reported=reported), 4), dataclasses.replace(cfg, num_rounds=3)
    )
    assert [r["round"] for r in again["rounds"]] == [3]


@pytest.mark.parametrize(("cap", "expected_weight"), [(0, 8 * 4), (20, 20), (5, 5)])
def test_a_huge_num_examples_weighs_no_more_than_the_cap(
    tmp_path: Path, cap: int, expected_weight: int
) -> None:
    # Prepare: device 0 claims 100 million examples (within range, so it is accepted)
    cfg = config(tmp_path, 4, max_example_weight=cap)
    assert cfg.example_weight_cap == expected_weight  # 0: prior-steps x batch-size
    # Execute
    results = run_federation(LocalGrid(rogue_app(reported=1e8), 4), cfg)
    # Assert: accepted, but weighted at the cap, not at 1e8
    (round1,) = results["rounds"]
    assert round1["accepted"] == 4
    honest = min(20, expected_weight)
    expected = weighted({0: expected_weight, 1: honest, 2: honest, 3: honest})
    assert np.abs(flatten(final_prior(cfg))[0] - expected).max() < 1e-6


def test_the_weight_cap_is_a_checked_run_config_key() -> None:
    cfg = CoordinatorConfig.from_run_config({"max-example-weight": 64})
    assert cfg.example_weight_cap == 64
    with pytest.raises(SpecError, match="max-example-weight must be in"):
        CoordinatorConfig.from_run_config({"max-example-weight": -1})


# ------------------------------------------------------------------ a real SecAgg+ round
def test_a_delta_beyond_the_clip_norm_never_enters_the_masked_sum(tmp_path: Path) -> None:
    # Prepare: device 0's trainer hands the reply path a delta at 3x the clip norm
    n = 10  # enough devices that the unclipped delta would pass the mean's norm check
    cfg = config(tmp_path, n, secure_aggregation=True)
    # Execute
    results = run_federation(LocalGrid(rogue_app(norm=3.0), n), cfg)
    # Assert: the masked sum held device 0's delta clipped to C, not at 3C
    (round1,) = results["rounds"]
    assert round1["accepted"] == n
    clipped = clip_by_global_norm(delta_of(0, 1, 3.0), 1.0)[0]
    deltas = [flatten(clipped)[0].astype(np.float64)]
    deltas += [flatten(delta_of(pid, 1))[0].astype(np.float64) for pid in range(1, n)]
    expected = np.mean(deltas, axis=0)
    tolerance = secagg_params(n, clip_norm=1.0, dropout_share=0.2).tolerance
    assert np.abs(flatten(final_prior(cfg))[0] - expected).max() <= 2 * tolerance + 1e-7
    unclipped = (flatten(delta_of(0, 1, 3.0))[0] - deltas[0]) / n
    assert np.abs(unclipped).max() > 100 * tolerance  # the test can tell the two apart


def test_under_secagg_a_reported_num_examples_is_never_a_weight(tmp_path: Path) -> None:
    # Prepare: device 0 reports 1e8 examples in its plaintext metrics under SecAgg+
    cfg = config(tmp_path, 4, secure_aggregation=True)
    # Execute
    results = run_federation(LocalGrid(rogue_app(reported=1e8), 4), cfg)
    # Assert: the mean weighs each device by what it masked (its 20 examples, like the
    # others), not by the plaintext claim
    (round1,) = results["rounds"]
    assert round1["accepted"] == 4
    expected = weighted({0: 1, 1: 1, 2: 1, 3: 1})
    cap = cfg.example_weight_cap
    tolerance = secagg_params(4, clip_norm=1.0, dropout_share=0.2, max_weight=cap).tolerance
    assert np.abs(flatten(final_prior(cfg))[0] - expected).max() <= 2 * tolerance + 1e-7


def sized_app(sizes: dict[int, int], seen_caps: list[int]) -> ClientApp:
    """Honest devices with ``sizes[pid]`` training examples; records each training
    request's cap (the coordinator's scoring requests carry none)."""
    app = ClientApp()

    @app.train(mods=[federated.secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        instr, _ = federated.read_instruction(msg)
        if instr.mode == "train":
            seen_caps.append(instr.secure_weight_cap)
        pid = int(context.node_config["partition-id"])
        return federated.update_reply(msg, instr, delta_of(pid, instr.round), metrics(sizes[pid]))

    return app


def test_a_secure_round_weighs_devices_by_their_examples_as_a_plain_round_does(
    tmp_path: Path,
) -> None:
    # Prepare: devices of 5, 10 and 20 examples, and one of 1000, above the cap (32)
    sizes = {0: 5, 1: 10, 2: 20, 3: 1000}
    plain_cfg = config(tmp_path / "plain", 4)
    secure_cfg = config(tmp_path / "secure", 4, secure_aggregation=True)
    cap = secure_cfg.example_weight_cap
    assert cap == 32
    caps: list[int] = []
    # Execute
    run_federation(LocalGrid(sized_app(sizes, []), 4), plain_cfg)
    run_federation(LocalGrid(sized_app(sizes, caps), 4), secure_cfg)
    # Assert: both priors are the example-weighted mean, the big device at the cap
    expected = weighted({0: 5, 1: 10, 2: 20, 3: cap})
    tolerance = secagg_params(4, clip_norm=1.0, dropout_share=0.2, max_weight=cap).tolerance
    assert np.abs(flatten(final_prior(plain_cfg))[0] - expected).max() < 1e-6
    assert np.abs(flatten(final_prior(secure_cfg))[0] - expected).max() <= 2 * tolerance + 1e-7
    assert caps == [cap] * 4
    # the equal-weight mean, the secure rounds' mean before, is far from it
    equal = weighted({0: 1, 1: 1, 2: 1, 3: 1})
    assert np.abs(equal - expected).max() > 100 * tolerance


def test_a_dp_secure_round_keeps_equal_weights(tmp_path: Path) -> None:
    # Prepare: client-side DP, whose noise is calibrated to each device's equal share
    cfg = config(tmp_path, 4, secure_aggregation=True, dp="client", dp_noise_multiplier=0.01)
    caps: list[int] = []
    # Execute
    results = run_federation(LocalGrid(sized_app({0: 5, 1: 10, 2: 20, 3: 40}, caps), 4), cfg)
    # Assert: every device was told to send weight 1 (cap 0), and the mean is the equal one
    assert caps == [0] * 4
    assert results["rounds"][0]["accepted"] == 4
    equal = weighted({0: 1, 1: 1, 2: 1, 3: 1})
    by_examples = weighted({0: 5, 1: 10, 2: 20, 3: 32})
    got = flatten(final_prior(cfg))[0]
    assert np.linalg.norm(got - equal) < 0.5 * np.linalg.norm(got - by_examples)
