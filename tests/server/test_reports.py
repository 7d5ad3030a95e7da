"""Device reports on the coordinator: untrusted input refused, the rest recorded in one go."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict

from lorafleet.protocols.reports import REPORT_KEY, AdapterReport, VersionReport
from lorafleet.server.coordinator import CoordinatorConfig, CoordinatorState
from lorafleet.server.reports import RoundReports

PRIOR = "0123456789abcdef/v1"


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[CoordinatorState]:
    config = CoordinatorConfig(
        data_dir=str(tmp_path), base_sha256=hashlib.sha256(b"tiny").hexdigest(), rank=4
    )
    coordinator = CoordinatorState.open(config)
    yield coordinator
    coordinator.close()


def report(
    coord: CoordinatorState, version: int = 1, *, round: int = 2, **over: Any
) -> AdapterReport:
    saved = VersionReport(
        version=version,
        parent=version - 1 or None,
        spec_fingerprint=coord.spec.fingerprint(),
        base_sha256=coord.spec.base_sha256,
        content_hash=hashlib.sha256(f"v{version}".encode()).hexdigest(),
        prior_version=PRIOR,
        round=round,
        num_examples=24,
        val_loss=2.5,
        size_bytes=4096,
        created_at="2026-01-02T03:04:05+00:00",
    )
    return AdapterReport(adapter="default", current=version, saved=saved, **over)


def reply(fields: dict[str, Any]) -> RecordDict:
    return RecordDict({REPORT_KEY: ConfigRecord(fields)})  # type: ignore[arg-type]


Tamper = Callable[[dict[str, Any]], None]

TAMPERED: dict[str, Tamper] = {
    "negative version": lambda r: r.update(version=-4),
    "version beyond 32 bits": lambda r: r.update(version=2**40, current=2**40),
    "nan loss": lambda r: r.update({"val-loss": float("nan")}),
    "negative loss": lambda r: r.update({"test-loss": -1.0}),
    "huge size": lambda r: r.update({"size-bytes": 2**62}),
    "long adapter name": lambda r: r.update(adapter="x" * 5000),
    "adapter name with a slash": lambda r: r.update(adapter="../etc"),
    "long user label": lambda r: r.update(user="u" * 300),
    "other base": lambda r: r.update({"base-sha256": "0" * 64}),
    "other spec": lambda r: r.update({"spec-fingerprint": "f" * 64}),
    "other round": lambda r: r.update(round=99),
    "other prior": lambda r: r.update({"prior-version": "zero"}),
    "parent after version": lambda r: r.update(parent=r["version"] + 1),
    "current not the saved version": lambda r: r.update(current=r["version"] + 5),
    "unknown field": lambda r: r.update(weights="AAAA"),
    "missing field": lambda r: r.pop("content-hash"),
    "string as number": lambda r: r.update({"num-examples": "12"}),
    "bool as number": lambda r: r.update(version=True),
    "hash not hex": lambda r: r.update({"content-hash": "Z" * 64}),
    "time not a time": lambda r: r.update({"created-at": "yesterday"}),
}


@pytest.mark.parametrize("tamper", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_malformed_report_is_refused_with_one_line_and_nothing_recorded(
    coord: CoordinatorState, tamper: Tamper, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: an honest device and a tampered one in the same round
    reports = RoundReports(coord, 2, PRIOR)
    bad = report(coord).to_config()
    tamper(bad)
    # Execute
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        reports.add_reply(7, reply(report(coord).to_config()), None)
        reports.add_reply(8, reply(bad), None)
        counts = reports.record()
    # Assert: node 8 refused with one line, node 7's version recorded, nothing else
    assert list(reports.refused) == [8]
    assert [r.message.count("node 8") for r in caplog.records] == [1]
    assert (counts.users, counts.versions, counts.evaluations) == (1, 1, 1)
    assert coord.registry.counts().versions == 1


def test_secure_fields_carry_the_same_report(coord: CoordinatorState) -> None:
    # Prepare
    sent = report(coord, user="u-7")
    fields = {"num-examples": 24, "lorafleet-layout": "[]", **sent.to_secure_fields()}
    # Execute
    reports = RoundReports(coord, 2, PRIOR)
    reports.add_fields(7, fields, None)
    # Assert: a node pseudonym (user-pseudonym = node ignores the label)
    assert [r.pseudonym for r in reports.items] == [coord.pseudonym(7)]
    assert AdapterReport.from_secure_fields(fields) == sent
    assert AdapterReport.from_secure_fields({"num-examples": 24}) is None


def test_retries_pointers_and_missing_parents_are_recorded_as_what_they_are(
    coord: CoordinatorState,
) -> None:
    reg = coord.registry
    user = coord.pseudonym(7)

    def send(*reports: AdapterReport, round: int = 2) -> Any:
        batch = RoundReports(coord, round, PRIOR)
        for r in reports:
            batch.add_reply(7, reply(r.to_config()), None)
        return batch.record()

    # A device whose v1 was never reported (it opted out then) reports v2 and v3
    counts = send(report(coord, 2))
    assert (counts.users, counts.adapters, counts.versions) == (1, 1, 1)
    v2 = reg.user_history(user).items[0]
    assert v2.provenance.parent is None
    assert v2.provenance.metrics["unrecorded_parent"] == 1.0
    assert send(report(coord, 3, round=3), round=3).versions == 1
    # A repeated reply (a retried round) records nothing twice
    assert send(report(coord, 3, round=3), round=3).versions == 0
    assert reg.counts().versions == 2
    # A rollback on the device to v2 moves the pointer; moving back to v3 clears it
    (adapter,) = reg.list_adapters(user)
    assert send(AdapterReport(adapter="default", current=2)).pointers == 1
    assert reg.current_version(adapter.id).version == 2  # type: ignore[union-attr]
    assert send(AdapterReport(adapter="default", current=3)).pointers == 1
    assert reg.list_adapters(user)[0].pinned_version is None
    # A pointer to a version the registry never heard of changes nothing
    assert send(AdapterReport(adapter="default", current=1)).pointers == 0
    assert reg.counts().versions == 2


def test_user_pseudonyms_follow_the_config(tmp_path: Path) -> None:
    # Prepare
    base = {"base_sha256": hashlib.sha256(b"tiny").hexdigest()}
    by_node = CoordinatorState.open(CoordinatorConfig(data_dir=str(tmp_path / "a"), **base))
    by_device = CoordinatorState.open(
        CoordinatorConfig(data_dir=str(tmp_path / "b"), user_pseudonym="device", **base)
    )
    try:
        # Execute
        first, again, other = (by_node.pseudonym(n, "nadia") for n in (1, 1, 2))
        # Assert: a keyed hash per node, stable, not the label; the label when trusted
        assert first == again != other and first.startswith("node-") and "nadia" not in first
        assert first != hashlib.sha256(b"1").hexdigest()[:24]
        assert by_device.pseudonym(1, "nadia") == "nadia"
        assert by_device.pseudonym(1).startswith("node-")  # no label: the node's
    finally:
        by_node.close()
        by_device.close()
