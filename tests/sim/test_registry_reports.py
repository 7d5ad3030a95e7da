"""Devices report their personal adapter versions; the registry knows every one of them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from lorafleet.client.federated import make_client_app
from lorafleet.client.profile import Profile
from lorafleet.protocols.reports import REPORT_KEY
from lorafleet.server.coordinator import CoordinatorConfig, CoordinatorState
from lorafleet.server.flower_app import run_federation
from lorafleet.server.registry import Registry
from lorafleet.sim.runner import LocalGrid

from .conftest import simulate_tiny, tiny_settings

pytestmark = pytest.mark.filterwarnings("ignore")


def run_local(
    tmp: Path, tiny: Path, users: Path, config: CoordinatorConfig, **settings: str
) -> dict[str, Any]:
    return simulate_tiny(tmp, tiny, users, config, engine="local", extra_settings=settings)


def test_every_users_versions_provenance_and_evaluations_reach_the_registry(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: two rounds that each save a personal version, then the final personalization
    users, config = setup_run(tmp_path, tiny_model_dir, personalize_steps=4)
    # Execute
    results = run_local(tmp_path, tiny_model_dir, users, config)
    # Assert: each user folder is a registry user whose history is its device's versions
    priors = [r["prior_version"] for r in results["rounds"]]
    assert [r["versions_recorded"] for r in results["rounds"]] == [3, 3]
    names = sorted(p.name for p in users.iterdir())
    with Registry.open(config.registry) as reg:
        assert [u.pseudonym for u in reg.search_users().items] == names
        assert reg.counts().users == 3
        for name in names:
            device = Profile.open(tmp_path / "profiles" / name).versions()
            (adapter,) = reg.list_adapters(name)
            assert adapter.spec == config.spec and adapter.pinned_version is None
            history = sorted(reg.user_history(name).items, key=lambda v: v.version)
            assert [v.version for v in history] == [p.version for p in device] == [1, 2, 3]
            for stored, local in zip(history, device, strict=True):
                prov = stored.provenance
                assert prov.spec.fingerprint() == config.spec.fingerprint()
                assert prov.spec.base_sha256 == config.base_sha256
                assert (prov.parent, prov.round, prov.prior_version) == (
                    local.parent,
                    local.round,
                    local.prior_version,
                )
                assert prov.content_hash == local.content_hash
                assert prov.created_at == local.created_at
                folder = tmp_path / "profiles" / name / "adapters" / f"v{local.version:04d}"
                assert stored.size_bytes == sum(f.stat().st_size for f in folder.iterdir())
                (evaluation, *final) = reg.list_evaluations(stored.id)
                assert evaluation.source == "device" and evaluation.round == prov.round
                assert evaluation.metrics["val_loss"] == pytest.approx(
                    local.metrics["personal_loss"]
                )
                assert evaluation.metrics["num_examples"] > 0
            # Lineage: round 1 from the zero prior, round 2 and the personalization from
            # the priors those rounds received, each version the child of the one before.
            assert [v.provenance.prior_version for v in history] == ["zero", priors[0], priors[1]]
            assert [v.provenance.parent for v in history] == [None, 1, 2]
            assert [v.provenance.round for v in history] == [1, 2, 2]
            # The final evaluation scored the version in use (v3) once more.
            assert [e.metrics.keys() >= {"val_loss", "prior_val_loss"} for e in final] == [True]

    # Execute: the first user rolls back on the device (what PersonalModel.rollback does),
    # then the coordinator runs again: no rounds left, the final evaluation only
    Profile.open(tmp_path / "profiles" / names[0]).set_current(2)
    again = dataclasses.replace(config, personalize_steps=0)
    run_local(tmp_path, tiny_model_dir, users, again)
    # Assert: the registry moved that adapter's pointer, rewrote nothing, scored v2
    with Registry.open(config.registry) as reg:
        pins = {name: reg.list_adapters(name)[0].pinned_version for name in names}
        assert pins == {names[0]: 2, names[1]: None, names[2]: None}
        rolled = reg.list_adapters(names[0])[0]
        assert reg.current_version(rolled.id).version == 2  # type: ignore[union-attr]
        assert reg.counts().versions == 9
        v2 = reg.get_adapter_version(rolled.id, 2)
        assert len(reg.list_evaluations(v2.id)) == 2


def test_a_device_that_opts_out_reports_no_version(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1)
    # Execute: the run setting every simulated device reads
    results = run_local(tmp_path, tiny_model_dir, users, config, **{"report-versions": "false"})
    # Assert: the round trained as usual, the registry holds no user, version or evaluation
    assert results["rounds"][0]["accepted"] == 3
    assert all(len(Profile.open(p).versions()) == 1 for p in (tmp_path / "profiles").iterdir())
    with Registry.open(config.registry) as reg:
        counts = reg.counts()
        assert (counts.users, counts.adapters, counts.versions) == (0, 0, 0)
        assert counts.prior_versions == 1


def test_a_malformed_report_is_refused_with_one_line_and_the_round_goes_on(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: device 0 claims a negative version; the others are honest (node pseudonyms)
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1)

    def rewrite(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) == 0 and REPORT_KEY in reply.content:
            reply.content[REPORT_KEY] = ConfigRecord(
                {**dict(reply.content[REPORT_KEY]), "version": -4}
            )
        return reply

    settings = tiny_settings(users, tmp_path / "profiles", tiny_model_dir)
    grid = LocalGrid(make_client_app(settings, mods=[rewrite]), 3)
    # Execute
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        results = run_federation(grid, config)
    # Assert: the delta still counted, one log line names node 1001, two versions stored
    assert results["rounds"][0]["accepted"] == 3
    assert results["rounds"][0]["versions_recorded"] == 2
    refusals = [r for r in caplog.records if "adapter report of node 1001 refused" in r.message]
    assert len(refusals) == 1 and "version" in refusals[0].message
    coord = CoordinatorState.open(config)
    try:
        pseudonyms = {u.pseudonym for u in coord.registry.search_users().items}
        assert pseudonyms == {coord.pseudonym(1002), coord.pseudonym(1003)}
        assert coord.registry.counts().versions == 2
    finally:
        coord.close()
