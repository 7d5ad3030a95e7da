"""Whole federations through Flower's simulation engine, on the tiny test model."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from lorafleet.client import federated
from lorafleet.client.profile import Profile
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.federation import DELTA_FIELD, UPDATE_KEY
from lorafleet.server.coordinator import CoordinatorConfig
from lorafleet.server.registry import Registry

from .conftest import simulate_tiny, tiny_settings

pytestmark = pytest.mark.filterwarnings("ignore")


def run(
    tmp: Path, tiny: Path, users: Path, config: CoordinatorConfig, app: ClientApp | None = None
) -> dict[str, Any]:
    return simulate_tiny(tmp, tiny, users, config, client_app=app)


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
        # Through Ray too, each user folder is a registry user with its reported versions
        for profile_dir in (tmp_path / "profiles").iterdir():
            history = registry.user_history(profile_dir.name).items
            assert sorted(v.provenance.round for v in history) == [1, 2]
    finally:
        registry.close()
    for profile_dir in (tmp_path / "profiles").iterdir():
        versions = Profile.open(profile_dir).versions()
        assert [v.round for v in versions] == [1, 2]
        assert versions[1].prior_version == results["rounds"][0]["prior_version"]


def _windows(values: np.ndarray, count: int = 6) -> list[np.ndarray]:
    """Runs of 4 consecutive values, all clearly non-zero (distinctive in fp32 and fp16)."""
    flat = np.asarray(values, np.float64).reshape(-1)
    if flat.size < 4:
        return []
    smallest = np.minimum.reduce([np.abs(flat[i : flat.size - 3 + i]) for i in range(4)])
    starts = [int(i) for i in np.argsort(-smallest)[: count * 8 : 8] if smallest[i] > 1e-3]
    return [flat[i : i + 4] for i in starts]


def _needles(values: np.ndarray) -> list[bytes]:
    out = []
    for w in _windows(values):
        out += [w.astype("<f4").tobytes(), w.astype("<f2").tobytes()]
    return out


def _coordinator_haystack(config: CoordinatorConfig) -> bytes:
    """Every file in the data dir, and a SQL dump of the registry database."""
    files = b"".join(p.read_bytes() for p in Path(config.data_dir).rglob("*") if p.is_file())
    db = sqlite3.connect(config.registry.removeprefix("sqlite:///"))
    try:
        dump = "\n".join(db.iterdump()).encode()
    finally:
        db.close()
    return files + dump


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_nothing_of_a_users_text_adapter_or_delta_is_stored_by_the_coordinator(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any, secure: bool
) -> None:
    # Prepare: real devices; a mod inside SecAgg+'s records each clipped delta as it
    # leaves the training code (before masking), in the device's own process
    users, config = setup_run(tmp_path, tiny_model_dir, secure_aggregation=secure)
    deltas = tmp_path / "deltas"
    deltas.mkdir()

    def record(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        name = (
            f"{context.node_config['partition-id']}-{msg.metadata.group_id or 'r'}-{time.time_ns()}"
        )
        if "fitres.parameters" in reply.content.array_records:
            for array in reply.content.array_records["fitres.parameters"].values():
                np.save(deltas / f"{name}.npy", array.numpy())
        elif UPDATE_KEY in reply.content:
            delta, _ = decode_tensors(reply.content[UPDATE_KEY][DELTA_FIELD])  # type: ignore[arg-type]
            np.save(deltas / f"{name}.npy", np.concatenate([v.ravel() for v in delta.values()]))
        return reply

    settings = tiny_settings(users, tmp_path / "profiles", tiny_model_dir)
    app = federated.make_client_app(settings, mods=[record])
    # Execute
    results = run(tmp_path, tiny_model_dir, users, config, app=app)
    # Assert: the run worked, and the coordinator's disk holds none of the users' data
    assert [r["accepted"] for r in results["rounds"]] == [3, 3]
    assert all(r["secure"] is secure for r in results["rounds"])
    stored = _coordinator_haystack(config)
    needles: list[bytes] = []
    recorded = sorted(deltas.glob("*.npy"))
    assert len(recorded) == 6  # 3 devices x 2 rounds
    for path in recorded:
        needles += _needles(np.load(path))
    for profile_dir in (tmp_path / "profiles").iterdir():
        profile = Profile.open(profile_dir)
        for version in profile.versions():
            for tensor in profile.read(version.version)[1].values():
                needles += _needles(tensor)
    assert len(needles) > 50
    assert not [n for n in needles if n in stored]
    # the scan can find what is stored: the prior's own values are there
    registry = Registry.open(config.registry)
    try:
        record = registry.active_prior(config.spec)
    finally:
        registry.close()
    assert record is not None
    prior_file = next(Path(config.data_dir).rglob(f"v{record.version:04d}.safetensors"))
    prior, _ = decode_tensors(prior_file.read_bytes())
    controls = [n for t in prior.values() for n in _needles(t)[::2]]  # fp32 ones
    assert controls and all(n in stored for n in controls)
    texts = 0
    for user in users.iterdir():
        for part in ("train.txt", "heldout.txt"):
            for line in (user / part).read_text().splitlines():
                if len(line) > 20 and not line.startswith("#"):
                    texts += 1
                    assert line.encode() not in stored
                    assert line[:24].encode() not in stored
    assert texts > 10


def test_a_bad_update_is_refused_by_node_and_the_round_goes_on(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: a ClientApp that behaves, except device 0 sends a delta full of NaN
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1)
    settings = tiny_settings(users, tmp_path / "profiles", tiny_model_dir)
    honest = federated.make_client_app(settings)
    rogue = ClientApp()

    @rogue.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if int(context.node_config["partition-id"]) == 0:
            delta, _ = decode_tensors(reply.content[UPDATE_KEY][DELTA_FIELD])  # type: ignore[arg-type]
            poisoned = {k: np.full_like(v, np.inf) for k, v in delta.items()}
            raw = encode_tensors({k: np.zeros_like(v) for k, v in poisoned.items()}, packing="fp32")
            raw = raw.replace(
                np.zeros(1, "<f4").tobytes() * 4, np.full(4, np.nan, "<f4").tobytes(), 1
            )
            reply.content[UPDATE_KEY] = ConfigRecord({DELTA_FIELD: raw})
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
    settings = tiny_settings(users, tmp_path / "profiles", tiny_model_dir)
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
