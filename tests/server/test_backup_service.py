"""The backup service over a real loopback gRPC server: enrolment, signed calls, per-user
isolation, resumable uploads, limits and erasure."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from lorafleet.client.backup import BackupAuthError, BackupClient, BackupError
from lorafleet.client.keys import KeyStore
from lorafleet.protocols import crypto
from lorafleet.protocols.envelope import BlobContext, new_blob_id, seal_blob
from lorafleet.protocols.request_auth import sign_request
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.protocols.v1 import backup_pb2, backup_pb2_grpc
from lorafleet.server.backup_service import METHODS, BackupServicer, serve_backup
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.cli import main as server_cli
from lorafleet.server.registry import Registry, RegistryValueError

SPEC = AdapterSpec(base_model_id="tiny", base_sha256="ab" * 32, rank=4)
KEY = crypto.random_key()
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    registry: Registry
    store: BlobStore
    servicer: BackupServicer
    address: str
    tmp: Path

    def client(self, user: str, name: str = "phone") -> BackupClient:
        self.registry.ensure_user(user)
        token = self.registry.issue_enrolment_token(user)
        path = self.tmp / f"{user}-{name}-{time.monotonic_ns()}.json"
        return BackupClient.enroll(self.address, token, path, name=name, timeout=10)

    def stub(self) -> backup_pb2_grpc.BackupServiceStub:
        channel = grpc.insecure_channel(self.address)
        return backup_pb2_grpc.BackupServiceStub(channel)


@contextlib.contextmanager
def _start(
    url: str, tmp: Path, servicer_class: type[BackupServicer] = BackupServicer, **kw: Any
) -> Iterator[Service]:
    registry = Registry.open(url)
    store = BlobStore(tmp / "blobs", max_blob_bytes=kw.pop("max_blob_bytes", 4 << 20))
    servicer = servicer_class(registry, store, **kw)
    server, port = serve_backup(servicer)
    try:
        yield Service(registry, store, servicer, f"127.0.0.1:{port}", tmp)
    finally:
        server.stop(None)
        registry.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with _start(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path) as started:
        yield started


def envelope(
    user: str, version: int = 1, size: int = 1000, adapter: str = "default"
) -> tuple[str, bytes]:
    blob_id = new_blob_id()
    context = BlobContext(user, adapter, version, SPEC.base_sha256, blob_id)
    return blob_id, seal_blob(KEY, context, bytes(size), key_id=1)


def put_adapter(client: BackupClient, version: int = 1, size: int = 1000) -> tuple[str, bytes]:
    blob_id, data = envelope(client.user, version, size)
    client.put_blob(blob_id, data, kind="adapter", adapter="default", version=version, spec=SPEC)
    return blob_id, data


def key_file_bytes(tmp: Path) -> bytes:
    """A real key file (tiny KDF cost), as a device uploads it for a passphrase restore."""
    path = tmp / f"keys-{time.monotonic_ns()}.json"
    KeyStore.create(path, "a passphrase", kdf=crypto.ScryptParams(log2_n=4))
    return path.read_bytes()


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


# --- enrolment -------------------------------------------------------------------------


def test_a_token_enrols_one_device_once(service: Service, tmp_path: Path) -> None:
    # Prepare
    service.registry.ensure_user("u-maya")
    token = service.registry.issue_enrolment_token("u-maya")

    # Execute
    client = BackupClient.enroll(service.address, token, tmp_path / "d1.json", name="phone")
    with pytest.raises(BackupAuthError, match="unknown, used or expired"):
        BackupClient.enroll(service.address, token, tmp_path / "d2.json", name="laptop")

    # Assert
    assert client.user == "u-maya"
    device = service.registry.get_device(client.identity.device_id)  # type: ignore[arg-type]
    assert device.public_key == client.identity.public_key and device.name == "phone"
    assert (tmp_path / "d1.json").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "d2.json").exists()
    assert client.list_blobs() == []


def test_enrol_with_a_malformed_key_is_invalid_argument(service: Service) -> None:
    # Prepare
    service.registry.ensure_user("u-1")
    token = service.registry.issue_enrolment_token("u-1")
    request = backup_pb2.EnrollRequest(token=token, public_key=b"short", name="x")

    # Execute / Assert
    assert code_of(lambda: service.stub().Enroll(request)) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_cli_prints_a_token_that_enrols_a_device(
    service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = server_cli(
        ["users", "enroll-token", "--registry", service.registry.url, "--create", "u-cli"]
    )
    token = capsys.readouterr().out.strip()
    client = BackupClient.enroll(service.address, token, tmp_path / "cli.json", name="phone")

    # Assert
    assert code == 0 and client.user == "u-cli"


def test_the_cli_names_an_unknown_user_and_the_fix(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = server_cli(["users", "enroll-token", "--registry", service.registry.url, "u-none"])

    # Assert
    err = capsys.readouterr().err
    assert code == 2 and "no user 'u-none'" in err and "--create" in err


# --- signed requests -------------------------------------------------------------------


def _list_call(
    service: Service, client: BackupClient, **sign: Any
) -> tuple[backup_pb2.ListBlobsRequest, tuple[tuple[str, str], ...]]:
    request = backup_pb2.ListBlobsRequest(adapter="default")
    metadata = sign_request(client.identity.private_key, METHODS["ListBlobs"], request, **sign)
    return request, metadata


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no signature", grpc.StatusCode.UNAUTHENTICATED),
        ("unenrolled key", grpc.StatusCode.UNAUTHENTICATED),
        ("stale timestamp", grpc.StatusCode.UNAUTHENTICATED),
        ("future timestamp", grpc.StatusCode.UNAUTHENTICATED),
        ("another message", grpc.StatusCode.UNAUTHENTICATED),
        ("another method", grpc.StatusCode.UNAUTHENTICATED),
        ("another device's key", grpc.StatusCode.UNAUTHENTICATED),
        ("revoked device", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_unauthorized_requests_are_refused(
    service: Service, case: str, expected: grpc.StatusCode
) -> None:
    # Prepare
    client = service.client("u-1")
    other = service.client("u-2")
    request, metadata = _list_call(service, client)
    now_ms = time.time_ns() // 1_000_000
    if case == "no signature":
        metadata = ()
    elif case == "unenrolled key":
        stranger = crypto.signing_keypair()
        metadata = sign_request(stranger.private_key, METHODS["ListBlobs"], request)
    elif case == "stale timestamp":
        _, metadata = _list_call(service, client, timestamp_ms=now_ms - 6 * 60 * 1000)
    elif case == "future timestamp":
        _, metadata = _list_call(service, client, timestamp_ms=now_ms + 6 * 60 * 1000)
    elif case == "another message":
        request = backup_pb2.ListBlobsRequest(adapter="other")
    elif case == "another method":
        metadata = sign_request(client.identity.private_key, METHODS["GetBlob"], request)
    elif case == "another device's key":  # signed by u-2, claiming u-1's key
        _, signed = _list_call(service, other)
        metadata = tuple(
            (k, client.identity.public_key.hex()) if k == "lf-device-key" else (k, v)
            for k, v in signed
        )
    elif case == "revoked device":
        service.registry.revoke_device(client.identity.device_id)  # type: ignore[arg-type]

    # Execute
    code = code_of(lambda: service.stub().ListBlobs(request, metadata=metadata))

    # Assert
    assert code == expected


def test_a_replayed_signed_request_is_refused(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    request, metadata = _list_call(service, client)
    stub = service.stub()

    # Execute
    stub.ListBlobs(request, metadata=metadata)
    code = code_of(lambda: stub.ListBlobs(request, metadata=metadata))

    # Assert
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_a_request_replayed_after_a_restart_is_refused(registry_url: str, tmp_path: Path) -> None:
    # Prepare: a real signed request, accepted by a service that is then stopped
    with _start(registry_url, tmp_path) as first:
        client = first.client("u-1")
        request, metadata = _list_call(first, client)
        first.stub().ListBlobs(request, metadata=metadata)
    # Execute: a new service (new registry connection, servicer and gRPC server) on the
    # same registry, within the request's window
    with _start(registry_url, tmp_path) as second, pytest.raises(grpc.RpcError) as info:
        second.stub().ListBlobs(request, metadata=metadata)
    # Assert: refused as a replay, while a fresh request of the same device passes
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in str(info.value.details())
    with _start(registry_url, tmp_path) as third:
        fresh, fresh_metadata = _list_call(third, client)
        assert list(third.stub().ListBlobs(fresh, metadata=fresh_metadata).blobs) == []


def test_the_replay_cache_forgets_a_nonce_after_two_windows_and_is_bounded(
    tmp_path: Path,
) -> None:
    # Prepare: a service whose clock the test moves, with room for two nonces
    now = [time.time()]
    with _start(
        f"sqlite:///{tmp_path / 'r.db'}", tmp_path, max_nonces=2, clock=lambda: now[0]
    ) as service:
        client = service.client("u-1")
        calls = [_list_call(service, client, timestamp_ms=int(now[0] * 1000)) for _ in range(3)]
        stub = service.stub()
        stub.ListBlobs(calls[0][0], metadata=calls[0][1])
        stub.ListBlobs(calls[1][0], metadata=calls[1][1])
        # Execute / Assert: full of nonces still needed: refused, not forgotten
        full = code_of(lambda: stub.ListBlobs(calls[2][0], metadata=calls[2][1]))
        assert full == grpc.StatusCode.RESOURCE_EXHAUSTED
        # two windows later the old nonces are gone and a new request fits
        now[0] += 2 * service.servicer.window_s + 1
        later = _list_call(service, client, timestamp_ms=int(now[0] * 1000))
        stub.ListBlobs(later[0], metadata=later[1])
        with service.registry.engine.connect() as conn:
            held = conn.execute(text("SELECT count(*) FROM request_nonces")).scalar_one()
        assert held == 1


@pytest.mark.parametrize("state", ["enrolled", "revoked"])
def test_a_bad_signature_gets_one_answer_whether_or_not_the_device_is_revoked(
    service: Service, state: str
) -> None:
    # Prepare: a request naming the device's public key, signed by someone else
    client = service.client("u-1")
    if state == "revoked":
        service.registry.revoke_device(client.identity.device_id)  # type: ignore[arg-type]
    request = backup_pb2.ListBlobsRequest(adapter="default")
    forged = sign_request(crypto.signing_keypair().private_key, METHODS["ListBlobs"], request)
    metadata = tuple(
        (k, client.identity.public_key.hex()) if k == "lf-device-key" else (k, v) for k, v in forged
    )

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        service.stub().ListBlobs(request, metadata=metadata)

    # Assert: nothing in the answer tells a revoked device from an enrolled one
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "request signature does not verify"


def test_a_revoked_device_gets_one_clear_error_from_the_client(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    service.registry.revoke_device(client.identity.device_id)  # type: ignore[arg-type]

    # Execute / Assert
    with pytest.raises(BackupAuthError, match="was revoked"):
        client.list_blobs()


# --- per-user isolation ----------------------------------------------------------------


def test_one_user_can_never_read_list_or_delete_anothers_blobs(service: Service) -> None:
    # Prepare
    maya, jonas = service.client("u-maya"), service.client("u-jonas")
    blob_id, _ = put_adapter(maya)

    # Execute / Assert
    with pytest.raises(BackupError, match="no blob") as info:
        jonas.get_blob(blob_id)
    assert info.value.code == "NOT_FOUND"
    assert jonas.list_blobs() == []
    assert jonas.upload_status(blob_id) == (False, 0)
    request = backup_pb2.DeleteUserDataRequest(user="u-maya")
    metadata = sign_request(jonas.identity.private_key, METHODS["DeleteUserData"], request)
    code = code_of(lambda: service.stub().DeleteUserData(request, metadata=metadata))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    _, data = envelope("u-jonas")
    with pytest.raises(BackupError) as taken:
        jonas.put_blob(blob_id, data, kind="keyfile")
    assert taken.value.code == "ALREADY_EXISTS"
    assert [b.blob_id for b in maya.list_blobs()] == [blob_id]


# --- uploads ---------------------------------------------------------------------------


def test_put_list_get_round_trip_records_the_metadata(service: Service) -> None:
    # Prepare
    client = service.client("u-1")

    # Execute
    blob_id, data = put_adapter(client, version=3, size=3 << 20)  # several messages
    listed = client.list_blobs(adapter="default")
    got = client.get_blob(blob_id)

    # Assert
    assert got == data
    (info,) = listed
    assert (info.blob_id, info.kind, info.adapter, info.version) == (
        blob_id,
        "adapter",
        "default",
        3,
    )
    assert info.spec == SPEC and info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    record = service.registry.get_blob_meta(blob_id)
    assert record.sha256 == info.sha256 and record.version == 3
    assert service.store.read(info.sha256) == data


def test_an_interrupted_upload_resumes_where_it_stopped(service: Service) -> None:
    # Prepare: a first call sends the header and 1 MiB, then the stream ends
    client = service.client("u-1")
    blob_id, data = envelope("u-1", size=3 << 20)
    header = backup_pb2.PutBlobRequest(
        header=backup_pb2.BlobHeader(
            blob_id=blob_id,
            kind="adapter",
            adapter="default",
            version=1,
            spec_json=json.dumps(SPEC.to_dict()),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
    )
    metadata = sign_request(client.identity.private_key, METHODS["PutBlob"], header)
    first = service.stub().PutBlob(
        iter([header, backup_pb2.PutBlobRequest(data=data[: 1 << 20])]), metadata=metadata
    )
    assert (first.complete, first.received) == (False, 1 << 20)
    assert client.upload_status(blob_id) == (False, 1 << 20)
    written: list[int] = []
    original = service.store.upload

    def spy(*args: Any, **kwargs: Any) -> Any:
        written.append(kwargs["offset"])
        return original(*args, **kwargs)

    service.store.upload = spy  # type: ignore[method-assign]

    # Execute
    info = client.put_blob(blob_id, data, kind="adapter", adapter="default", version=1, spec=SPEC)

    # Assert
    assert written == [1 << 20]
    assert info.size == len(data) and client.get_blob(blob_id) == data


class DropsFirstUpload(BackupServicer):
    """A server whose connection drops after the first MiB of the first upload."""

    dropped = False

    def PutBlob(self, request_iterator: Any, context: Any) -> backup_pb2.PutBlobResponse:
        if self.dropped:
            return super().PutBlob(request_iterator, context)
        type(self).dropped = True

        def cut() -> Iterator[backup_pb2.PutBlobRequest]:
            for n, message in enumerate(request_iterator):
                if n == 2:  # header, one MiB, then the line goes dead
                    context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
                yield message

        return super().PutBlob(cut(), context)


def test_an_upload_cut_off_midway_is_resumed_by_the_client(tmp_path: Path) -> None:
    with _start(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, DropsFirstUpload) as service:
        # Prepare
        client = service.client("u-1")
        pauses: list[float] = []
        client._sleep = pauses.append
        blob_id, data = envelope("u-1", size=3 << 20)
        offsets: list[int] = []
        original = service.store.upload

        def spy(*args: Any, **kwargs: Any) -> Any:
            offsets.append(kwargs["offset"])
            return original(*args, **kwargs)

        service.store.upload = spy  # type: ignore[method-assign]

        # Execute
        info = client.put_blob(
            blob_id, data, kind="adapter", adapter="default", version=1, spec=SPEC, resume=False
        )

        # Assert: the second attempt sent only what the server lacked
        assert offsets == [0, 1 << 20] and len(pauses) == 1
        assert info.size == len(data) and client.get_blob(blob_id) == data


def test_a_blob_over_the_limit_is_resource_exhausted(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    blob_id, data = envelope("u-1", size=5 << 20)

    # Execute / Assert
    with pytest.raises(BackupError, match="over this store's limit") as info:
        client.put_blob(blob_id, data, kind="adapter", adapter="default", version=1, spec=SPEC)
    assert info.value.code == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("3 MiB of junk", "RESOURCE_EXHAUSTED", "a key file is at most 1048576 bytes"),
        ("1 KiB of junk", "INVALID_ARGUMENT", "not UTF-8 JSON"),
        ("JSON that is no key file", "INVALID_ARGUMENT", "format member"),
        ("a key file without its store id", "INVALID_ARGUMENT", "store_id"),
    ],
)
def test_a_keyfile_blob_must_be_a_key_file_of_at_most_1_mib(
    service: Service, tmp_path: Path, case: str, code: str, message: str
) -> None:
    # Prepare
    client = service.client("u-1")
    data = {
        "3 MiB of junk": bytes(range(256)) * (3 << 12),
        "1 KiB of junk": bytes(range(256)) * 4,
        "JSON that is no key file": b'{"hello": "world"}',
        "a key file without its store id": key_file_bytes(tmp_path).replace(
            b'"store_id"', b'"store"'
        ),
    }[case]
    blob_id = new_blob_id()

    # Execute
    with pytest.raises(BackupError, match=message) as info:
        client.put_blob(blob_id, data, kind="keyfile")

    # Assert
    assert info.value.code == code
    assert client.list_blobs() == [] and client.upload_status(blob_id) == (False, 0)


def test_a_real_key_file_is_stored(service: Service, tmp_path: Path) -> None:
    # Prepare
    client = service.client("u-1")
    data = key_file_bytes(tmp_path)

    # Execute
    info = client.put_blob(new_blob_id(), data, kind="keyfile")

    # Assert
    assert client.get_blob(info.blob_id) == data


def test_a_name_with_a_trailing_newline_is_refused(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    blob_id, data = envelope("u-1")

    # Execute / Assert: over the wire, and at the registry the CLI uses
    with pytest.raises(BackupError) as info:
        client.put_blob(blob_id, data, kind="adapter", adapter="default\n", version=1, spec=SPEC)
    assert info.value.code == "INVALID_ARGUMENT"
    assert client.list_blobs() == []
    with pytest.raises(RegistryValueError, match="is not valid"):
        service.registry.ensure_user("u-2\n")


def test_no_pattern_that_validates_input_lets_a_trailing_newline_through() -> None:
    # Python's `$` also matches before a final newline; `\Z` (or fullmatch) does not.
    anchored = re.compile(r"re\.compile\(r?[\"'][^\"']*\$[\"']\)")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for package in ("protocols", "client", "server", "sim")
        for path in sorted((REPO / package).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if anchored.search(line)
    ]

    assert offenders == []


@pytest.mark.parametrize("case", ["not an envelope", "another blob's envelope"])
def test_an_adapter_blob_must_be_the_envelope_of_its_blob_id(service: Service, case: str) -> None:
    # Prepare
    client = service.client("u-1")
    blob_id, data = envelope("u-1")
    if case == "not an envelope":
        data = b"\x00" * len(data)
    else:
        _, data = envelope("u-1")

    # Execute / Assert
    with pytest.raises(BackupError) as info:
        client.put_blob(blob_id, data, kind="adapter", adapter="default", version=1, spec=SPEC)
    assert info.value.code == "INVALID_ARGUMENT"
    assert client.list_blobs() == [] and client.upload_status(blob_id) == (False, 0)


def test_a_version_is_never_backed_up_twice_with_other_bytes(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    put_adapter(client, version=2)
    other_spec = AdapterSpec(base_model_id="tiny", base_sha256="ab" * 32, rank=8)
    blob_id, data = envelope("u-1", version=3)

    # Execute / Assert
    with pytest.raises(BackupError, match="already backed up") as dup:
        put_adapter(client, version=2)
    with pytest.raises(BackupError, match="another spec") as spec:
        client.put_blob(
            blob_id, data, kind="adapter", adapter="default", version=3, spec=other_spec
        )
    assert dup.value.code == spec.value.code == "ALREADY_EXISTS"


def test_a_retried_upload_of_a_stored_blob_is_idempotent(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    blob_id, data = put_adapter(client)

    # Execute
    again = client.put_blob(blob_id, data, kind="adapter", adapter="default", version=1, spec=SPEC)

    # Assert
    assert again.blob_id == blob_id and len(client.list_blobs()) == 1


def test_a_stored_blob_whose_bytes_are_lost_is_data_loss(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    blob_id, data = put_adapter(client)
    path = service.store.object_path(hashlib.sha256(data).hexdigest())
    path.chmod(0o644)
    path.write_bytes(data[:-10])

    # Execute / Assert
    with pytest.raises(BackupError, match="lost or damaged") as info:
        client.get_blob(blob_id)
    assert info.value.code == "DATA_LOSS"


def test_a_lost_blob_can_be_uploaded_again_under_its_id(service: Service) -> None:
    # Prepare
    client = service.client("u-1")
    blob_id, data = put_adapter(client)
    service.store.delete(hashlib.sha256(data).hexdigest())
    with pytest.raises(BackupError) as lost:
        client.get_blob(blob_id)

    # Execute
    client.put_blob(blob_id, data, kind="adapter", adapter="default", version=1, spec=SPEC)

    # Assert
    assert lost.value.code == "DATA_LOSS"
    assert client.get_blob(blob_id) == data and len(client.list_blobs()) == 1


# --- erasure ---------------------------------------------------------------------------


def test_delete_user_data_erases_blobs_uploads_records_and_devices(
    registry_url: str, tmp_path: Path
) -> None:
    with _start(registry_url, tmp_path) as service:
        # Prepare
        maya, jonas = service.client("u-maya"), service.client("u-jonas")
        _, maya_data = put_adapter(maya, version=1)
        maya.put_blob(new_blob_id(), key_file_bytes(tmp_path), kind="keyfile")
        _, jonas_data = put_adapter(jonas, version=1)
        with service.store.upload("1", "cd" * 16, size=100, sha256="0" * 64) as up:
            up.write(b"x" * 10)  # an unfinished upload of maya's (user id 1)

        # Execute
        report = maya.delete_user_data()

        # Assert
        assert report.blobs == 3 and report.registry_rows >= 5
        assert not service.store.exists(hashlib.sha256(maya_data).hexdigest())
        assert service.store.uploads_of("1") == []
        with pytest.raises(BackupAuthError, match="not enrolled"):
            maya.list_blobs()
        assert service.registry.find_adapter("u-jonas", "default") is not None
        assert jonas.get_blob(jonas.list_blobs()[0].blob_id) == jonas_data
