"""PersonalModel.train(report_to=...) and rollback(report_to=...): an enrolled device's new
version and its scores reach the coordinator's registry as metadata, and nothing else."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet.client.backup import BackupClient
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.v1 import backup_pb2
from lorafleet.server.backup_service import BackupServicer, serve_backup
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.registry import Registry

PLACES = ["the gym", "the harbour", "the bakery", "the tide pools", "the ferry", "the park"]
NOTES = [f"On day {d} Maya went to {p} and took Pixel along." for d in range(2) for p in PLACES]
FAST = TrainConfig(steps=4, lr=0.05, eval_every=2, precision="fp32")
OPEN = {"precision": "fp32", "device": "cpu", "seq_len": 32}


class CountingServicer(BackupServicer):
    """The real servicer, counting the ReportVersions calls that reach it."""

    report_calls = 0
    down = False
    """While set, ReportVersions answers UNAVAILABLE (a coordinator being restarted)."""

    def ReportVersions(
        self, request: backup_pb2.ReportVersionsRequest, context: grpc.ServicerContext
    ) -> backup_pb2.ReportVersionsResponse:
        type(self).report_calls += 1
        if type(self).down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is restarting")
        return super().ReportVersions(request, context)


@dataclass
class Coordinator:
    registry: Registry
    address: str
    tmp: Path

    def enroll(self, user: str, **kw: Any) -> BackupClient:
        self.registry.ensure_user(user)
        token = self.registry.issue_enrolment_token(user)
        path = self.tmp / f"{user}-{time.monotonic_ns()}.json"
        return BackupClient.enroll(self.address, token, path, name="phone", timeout=10, **kw)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    CountingServicer.report_calls = 0
    CountingServicer.down = False
    server, port = serve_backup(CountingServicer(registry, BlobStore(tmp_path / "blobs")))
    try:
        yield Coordinator(registry, f"127.0.0.1:{port}", tmp_path)
    finally:
        server.stop(None)
        registry.close()


def test_an_sdk_train_on_an_enrolled_device_is_recorded_in_the_registry(
    tiny_model_dir: Path, tmp_path: Path, coordinator: Coordinator
) -> None:
    # Prepare
    client = coordinator.enroll("u-maya")
    pm = PersonalModel.open(tmp_path / "profile", base=tiny_model_dir, rank=4, **OPEN)  # type: ignore[arg-type]

    # Execute: two trainings reported, then a rollback to the first version
    first = pm.train(NOTES, FAST, test_fraction=0.2, progress=False, report_to=client)
    second = pm.train(NOTES, FAST, test_fraction=0.2, progress=False, report_to=client)
    moved = pm.rollback(1, report_to=client)

    # Assert: the versions with their lineage and scores, under the device's user
    assert first.reported is not None and first.reported.versions == 1
    assert second.reported is not None and second.reported.evaluations == 1
    assert moved is not None and moved.pointers == 1
    registry = coordinator.registry
    adapter = registry.find_adapter("u-maya", "default")
    assert adapter is not None and adapter.spec == pm.spec and adapter.pinned_version == 1
    for report, version in ((first, 1), (second, 2)):
        assert report.provenance is not None
        stored = registry.get_adapter_version(adapter.id, version)
        assert stored.provenance.content_hash == report.provenance.content_hash
        assert stored.provenance.parent == (None if version == 1 else 1)
        assert stored.provenance.spec.base_sha256 == pm.spec.base_sha256
        assert stored.size_bytes > 0
        (evaluation,) = registry.list_evaluations(stored.id)
        assert evaluation.source == "device"
        assert evaluation.metrics["val_loss"] == pytest.approx(report.result.heldout_loss_after)
        assert evaluation.metrics["test_loss"] == pytest.approx(report.test_loss_after)
        assert evaluation.metrics["num_examples"] == report.train_examples
    assert [u.pseudonym for u in registry.search_users().items] == ["u-maya"]
    assert registry.current_version(adapter.id) is not None
    assert registry.current_version(adapter.id).version == 1  # type: ignore[union-attr]


def test_an_opted_out_device_reports_nothing(
    tiny_model_dir: Path, tmp_path: Path, coordinator: Coordinator
) -> None:
    # Prepare
    client = coordinator.enroll("u-maya", send_reports=False)
    pm = PersonalModel.open(tmp_path / "profile", base=tiny_model_dir, rank=4, **OPEN)  # type: ignore[arg-type]

    # Execute
    report = pm.train(NOTES, FAST, progress=False, report_to=client)
    pm.rollback(1, report_to=client)

    # Assert: saved on the device; not a call, not a row on the coordinator
    assert report.provenance is not None and pm.version == 1
    assert report.reported is None
    assert CountingServicer.report_calls == 0
    assert coordinator.registry.find_adapter("u-maya", "default") is None
    assert coordinator.registry.counts().versions == 0


def test_reports_that_failed_are_queued_on_the_device_and_sent_with_the_next(
    tiny_model_dir: Path, tmp_path: Path, coordinator: Coordinator
) -> None:
    # Prepare: a device whose coordinator is down for its first training
    client = coordinator.enroll("u-maya")
    client.retries = 0  # fail at once instead of backing off
    pm = PersonalModel.open(tmp_path / "profile", base=tiny_model_dir, rank=4, **OPEN)  # type: ignore[arg-type]
    CountingServicer.down = True

    # Execute: v1 trained while down, then v2 once it is back
    first = pm.train(NOTES, FAST, test_fraction=0.2, progress=False, report_to=client)
    queued = [r.current for r in pm._profile.pending_reports()]
    CountingServicer.down = False
    second = pm.train(NOTES, FAST, test_fraction=0.2, progress=False, report_to=client)

    # Assert: nothing lost: both versions recorded, in order, and the queue emptied
    assert first.reported is None and queued == [1]
    assert second.reported is not None and second.reported.versions == 2
    adapter = coordinator.registry.find_adapter("u-maya", "default")
    assert adapter is not None
    versions = [coordinator.registry.get_adapter_version(adapter.id, v) for v in (1, 2)]
    assert [v.provenance.parent for v in versions] == [None, 1]
    assert coordinator.registry.current_version(adapter.id).version == 2  # type: ignore[union-attr]
    assert pm._profile.pending_reports() == []
    assert pm.send_pending_reports(client) is None  # nothing left to send


def test_send_pending_reports_flushes_the_queue_without_training(
    tiny_model_dir: Path, tmp_path: Path, coordinator: Coordinator
) -> None:
    # Prepare: a version whose report failed, and a torn line in the queue
    client = coordinator.enroll("u-maya")
    client.retries = 0
    pm = PersonalModel.open(tmp_path / "profile", base=tiny_model_dir, rank=4, **OPEN)  # type: ignore[arg-type]
    CountingServicer.down = True
    pm.train(NOTES, FAST, progress=False, report_to=client)
    queue = tmp_path / "profile" / "pending-reports.jsonl"
    queue.write_text(queue.read_text() + '{"adapter": "default", "curr\n')
    CountingServicer.down = False

    # Execute
    receipt = pm.send_pending_reports(client)

    # Assert: the good report arrived, the torn line was dropped, the file is gone
    assert receipt is not None and receipt.versions == 1
    assert not queue.exists()
    assert coordinator.registry.counts().versions == 1
