"""Whole federations through Flower's simulation engine, on the tiny test model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from lorafleet.client import federated
from lorafleet.client.profile import Profile
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.federation import UPDATE_KEY
from lorafleet.server.coordinator import CoordinatorConfig
from lorafleet.server.registry import Registry
from lorafleet.sim.runner import SimResources, simulate

pytestmark = pytest.mark.filterwarnings("ignore")


def run(
    tmp: Path, tiny: Path, users: Path, config: CoordinatorConfig, app: ClientApp | None = None
) -> dict[str, Any]:
    return simulate(
        users,
        tmp,
        config,
        base=str(tiny),
        precision="fp32",
        device="cpu",
        resources=SimResources(cpus_per_client=1, total_cpus=2),
        client_app=app,
    )


def test_a_federation_learns_a_prior_and_keeps_personal_adapters_on_devices(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare
    users, config = setup_run(tmp_path, tiny_model_dir)
    # Execute
    results = run(tmp_path, tiny_model_dir, users, config)
    # Assert: every round took all three updates and made a prior version
    assert [r["accepted"] for r in results["rounds"]] == [3, 3]
    assert results["prior_version"].endswith("/v2")
    evaluation = results["evaluation"]
    assert len(evaluation) == 3
    for losses in evaluation.values():
        assert losses["personal_loss"] < losses["base_loss"]
    assert results["bytes_up_per_client"] > 0
    # The registry has the rounds and priors; the devices have versioned personal adapters
    registry = Registry.open(config.registry)
    try:
        rounds = registry.list_rounds(config.spec).items
        assert sorted(r.number for r in rounds if r.status == "finished") == [1, 2]
        assert [p.version for p in registry.list_prior_versions(config.spec).items] == [2, 1]
    finally:
        registry.close()
    for profile_dir in (tmp_path / "profiles").iterdir():
        versions = Profile.open(profile_dir).versions()
        assert [v.round for v in versions] == [1, 2]
        assert versions[1].prior_version == results["rounds"][0]["prior_version"]


def test_nothing_of_a_users_text_or_adapter_reaches_the_coordinator(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1)
    run(tmp_path, tiny_model_dir, users, config)
    stored = b"".join(p.read_bytes() for p in Path(config.data_dir).rglob("*") if p.is_file())
    for user in users.iterdir():
        for line in (user / "train.txt").read_text().splitlines():
            if len(line) > 20 and not line.startswith("#"):
                assert line.encode() not in stored
    for profile_dir in (tmp_path / "profiles").iterdir():
        b = Profile.open(profile_dir).read(1)[1]
        for tensor in b.values():
            row = np.ascontiguousarray(tensor[0], dtype="<f4").tobytes()
            assert row not in stored


def test_a_bad_update_is_refused_by_node_and_the_round_goes_on(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: a ClientApp that behaves, except device 0 sends a delta full of NaN
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1)
    settings = {
        "sim-users-dir": str(users),
        "sim-profiles-dir": str(tmp_path / "profiles"),
        "base": str(tiny_model_dir),
        "precision": "fp32",
        "device": "cpu",
    }
    honest = federated.make_client_app(settings)
    rogue = ClientApp()

    @rogue.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if int(context.node_config["partition-id"]) == 0:
            delta, _ = decode_tensors(reply.content[UPDATE_KEY]["delta"])  # type: ignore[arg-type]
            poisoned = {k: np.full_like(v, np.inf) for k, v in delta.items()}
            raw = encode_tensors({k: np.zeros_like(v) for k, v in poisoned.items()}, packing="fp32")
            raw = raw.replace(
                np.zeros(1, "<f4").tobytes() * 4, np.full(4, np.nan, "<f4").tobytes(), 1
            )
            reply.content[UPDATE_KEY] = ConfigRecord({"delta": raw})
        return reply

    @rogue.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    # Execute
    results = run(tmp_path, tiny_model_dir, users, config, app=rogue)
    # Assert: one refusal, named by node, and the round still produced a prior
    (round1,) = results["rounds"]
    assert round1["accepted"] == 2
    assert len(round1["refused"]) == 1
    (reason,) = round1["refused"].values()
    assert "NaN" in reason or "malformed" in reason
    assert round1["prior_version"] is not None
    assert all(math.isfinite(v["personal_loss"]) for v in results["evaluation"].values())


def test_a_round_with_too_many_dropouts_fails_cleanly_and_is_retried(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: every device fails its first message (a dropout), then behaves
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1, final_evaluation=False)
    settings = {
        "sim-users-dir": str(users),
        "sim-profiles-dir": str(tmp_path / "profiles"),
        "base": str(tiny_model_dir),
        "precision": "fp32",
        "device": "cpu",
    }
    honest = federated.make_client_app(settings)
    flaky = ClientApp()
    marks = tmp_path / "dropped"
    marks.mkdir()

    @flaky.train()
    def train(msg: Message, context: Context) -> Message:
        mark = marks / str(context.node_config["partition-id"])
        if not mark.exists():
            mark.touch()
            raise RuntimeError("simulated dropout")
        return honest(msg, context)

    # Execute
    results = run(tmp_path, tiny_model_dir, users, config, app=flaky)
    # Assert: attempt 0 failed with every node refused, attempt 1 made the prior
    first, second = results["rounds"]
    assert (first["round"], first["attempt"], first["accepted"], first["prior_version"]) == (
        1,
        0,
        0,
        None,
    )
    assert len(first["refused"]) == 3
    assert (second["round"], second["attempt"], second["accepted"]) == (1, 1, 3)
    assert second["prior_version"].endswith("/v1")
    registry = Registry.open(config.registry)
    try:
        (round1,) = registry.list_rounds(config.spec).items
        assert round1.status == "finished" and round1.config["attempts"] == 2
    finally:
        registry.close()
