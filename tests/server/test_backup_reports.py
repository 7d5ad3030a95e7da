"""ReportVersions over a real loopback gRPC server: a device's adapter reports land in the
registry under its own user, and nothing unsigned, forged or for another user does."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet.client.backup import BackupAuthError, BackupClient, BackupError
from lorafleet.protocols import crypto
from lorafleet.protocols.reports import AdapterReport, VersionReport
from lorafleet.protocols.request_auth import sign_request
from lorafleet.protocols.serde import report_request_from_proto, report_request_to_proto
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.protocols.v1 import backup_pb2_grpc
from lorafleet.server.backup_service import METHODS, BackupServicer, serve_backup
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.registry import Registry

SPEC = AdapterSpec(base_model_id="tiny", base_sha256="ab" * 32, rank=4)


class Service:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.registry = Registry.open(f"sqlite:///{tmp / 'registry.db'}")
        self.server, port = serve_backup(BackupServicer(self.registry, BlobStore(tmp / "blobs")))
        self.address = f"127.0.0.1:{port}"

    def client(self, user: str, **kw: Any) -> BackupClient:
        self.registry.ensure_user(user)
        token = self.registry.issue_enrolment_token(user)
        path = self.tmp / f"{user}-{time.monotonic_ns()}.json"
        return BackupClient.enroll(self.address, token, path, name="phone", timeout=10, **kw)

    def stub(self) -> backup_pb2_grpc.BackupServiceStub:
        return backup_pb2_grpc.BackupServiceStub(grpc.insecure_channel(self.address))

    def versions(self, user: str) -> list[int]:
        adapter = self.registry.find_adapter(user, "default")
        if adapter is None:
            return []
        return [v.version for v in self.registry.history(adapter.id).items]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    started = Service(tmp_path)
    yield started
    started.server.stop(None)
    started.registry.close()


def report(version: int = 1, *, val_loss: float = 2.5, **over: Any) -> AdapterReport:
    saved = VersionReport(
        version=version,
        parent=version - 1 or None,
        spec_fingerprint=SPEC.fingerprint(),
        base_sha256=SPEC.base_sha256,
        content_hash=hashlib.sha256(f"v{version}".encode()).hexdigest(),
        num_examples=24,
        val_loss=val_loss,
        test_loss=2.75,
        size_bytes=4096,
        created_at="2026-01-02T03:04:05+00:00",
    )
    return AdapterReport(adapter="default", current=version, saved=saved, **over)


def test_a_report_is_recorded_as_a_version_with_provenance_and_an_evaluation(
    service: Service,
) -> None:
    # Prepare
    client = service.client("u-maya")

    # Execute
    first = client.report_versions(SPEC, [report(1)])
    second = client.report_versions(SPEC, [report(2, val_loss=2.0)])
    again = client.report_versions(SPEC, [report(2, val_loss=2.0)])  # a retry: idempotent
    rollback = client.report_versions(SPEC, [AdapterReport(adapter="default", current=1)])

    # Assert
    assert first is not None and (first.versions, first.evaluations) == (1, 1)
    assert second is not None and second.versions == 1
    assert again is not None and again.versions == 0
    assert rollback is not None and rollback.pointers == 1
    adapter = service.registry.find_adapter("u-maya", "default")
    assert adapter is not None and adapter.spec == SPEC and adapter.pinned_version == 1
    v2 = service.registry.get_adapter_version(adapter.id, 2)
    assert v2.provenance.parent == 1 and v2.provenance.round is None
    assert v2.provenance.content_hash == hashlib.sha256(b"v2").hexdigest()
    assert v2.size_bytes == 4096
    (evaluation,) = service.registry.list_evaluations(v2.id)
    assert evaluation.source == "device"
    assert evaluation.metrics == {"val_loss": 2.0, "test_loss": 2.75, "num_examples": 24.0}


def test_opted_out_client_sends_nothing(service: Service) -> None:
    # Prepare
    client = service.client("u-maya", send_reports=False)

    # Execute
    receipt = client.report_versions(SPEC, [report(1)])

    # Assert
    assert receipt is None
    assert service.versions("u-maya") == []
    assert service.registry.counts().versions == 0


FORGERIES = [
    "no signature",
    "unenrolled key",
    "report changed after signing",
    "signed for another method",
    "another device's key",
]


@pytest.mark.parametrize("case", FORGERIES)
def test_an_unsigned_or_forged_report_is_refused(service: Service, case: str) -> None:
    # Prepare
    client = service.client("u-maya")
    other = service.client("u-jonas")
    request = report_request_to_proto(SPEC, [report(1)])
    method = METHODS["ReportVersions"]
    metadata = sign_request(client.identity.private_key, method, request)
    if case == "no signature":
        metadata = ()
    elif case == "unenrolled key":
        metadata = sign_request(crypto.signing_keypair().private_key, method, request)
    elif case == "report changed after signing":  # a better loss than the device measured
        request = report_request_to_proto(SPEC, [report(1, val_loss=0.1)])
    elif case == "signed for another method":
        metadata = sign_request(client.identity.private_key, METHODS["ListBlobs"], request)
    elif case == "another device's key":  # signed by u-jonas, claiming u-maya's key
        signed = sign_request(other.identity.private_key, method, request)
        metadata = tuple(
            (k, client.identity.public_key.hex()) if k == "lf-device-key" else (k, v)
            for k, v in signed
        )

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        service.stub().ReportVersions(request, metadata=metadata)

    # Assert
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert service.registry.counts().versions == 0


def test_a_report_for_another_user_is_refused(service: Service) -> None:
    # Prepare
    maya = service.client("u-maya")
    service.client("u-jonas")

    # Execute
    with pytest.raises(BackupAuthError, match="enrolled for") as info:
        maya.report_versions(SPEC, [report(1, user="u-jonas")])
    own = maya.report_versions(SPEC, [report(1, user="u-maya")])

    # Assert
    assert info.value.code == "PERMISSION_DENIED"
    assert service.versions("u-jonas") == []
    assert own is not None and own.versions == 1 and service.versions("u-maya") == [1]


def test_a_report_that_contradicts_its_spec_is_invalid(service: Service) -> None:
    # Prepare
    client = service.client("u-maya")
    other_spec = AdapterSpec(base_model_id="tiny", base_sha256="cd" * 32, rank=4)

    # Execute
    with pytest.raises(BackupError) as info:
        client.report_versions(other_spec, [report(1)])

    # Assert
    assert info.value.code == "INVALID_ARGUMENT"
    assert service.registry.counts().versions == 0


def test_the_wire_form_is_the_round_replys_fields() -> None:
    # Prepare
    sent = [report(2, user="u-maya"), AdapterReport(adapter="default", current=1)]

    # Execute
    spec, received = report_request_from_proto(report_request_to_proto(SPEC, sent))

    # Assert
    assert spec == SPEC and received == sent
