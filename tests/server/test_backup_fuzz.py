"""Fuzzing the backup service's request handling: arbitrary messages and metadata give a
documented status code, never a crash.

Most examples call the servicer's methods directly with a stand-in context (fast, and a
crash shows as a Python exception); a few go through a real loopback gRPC server.
Requests are sent unsigned, with junk metadata, or correctly signed by an enrolled
device, so the fuzzer reaches past authentication into every handler.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.protocols import crypto
from lorafleet.protocols.request_auth import (
    KEY_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign_request,
)
from lorafleet.protocols.v1 import backup_pb2, backup_pb2_grpc
from lorafleet.server.backup_service import METHODS, BackupServicer, serve_backup
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.registry import Registry

DOCUMENTED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DATA_LOSS,
}
USER = "fuzz-user-7f3a9c0e51d2"
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class FakeContext:
    """What the servicer uses of grpc.ServicerContext."""

    def __init__(self, metadata: Sequence[tuple[Any, Any]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[Any, Any], ...]:
        return self._metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def is_active(self) -> bool:
        return True


@dataclass
class World:
    servicer: BackupServicer
    device: crypto.SigningKeyPair
    address: str
    blob_ids: list[str]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="lorafleet-fuzz-") as tmp:
        registry = Registry.open(f"sqlite:///{Path(tmp) / 'registry.db'}")
        registry.ensure_user(USER)
        device = crypto.signing_keypair()
        registry.redeem_enrolment_token(
            registry.issue_enrolment_token(USER), device.public_key, name="fuzzer"
        )
        store = BlobStore(Path(tmp) / "blobs", max_blob_bytes=1 << 16)
        servicer = BackupServicer(registry, store)
        data = b"stored keyfile"
        blob_id = "0f" * 16
        sha = store.put(data)
        registry.put_blob_meta(USER, blob_id, size_bytes=len(data), sha256=sha, kind="keyfile")
        server, port = serve_backup(servicer)
        try:
            yield World(servicer, device, f"127.0.0.1:{port}", [blob_id])
        finally:
            server.stop(None)
            registry.close()


# --- strategies -------------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
hexish = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=0, max_size=70),
    st.text(max_size=40),
    st.sampled_from(["0f" * 16, "ab" * 16, "00" * 32]),
)
spec_json = st.one_of(
    st.text(max_size=60),
    st.just('{"base_model_id": "m", "base_sha256": "' + "0" * 64 + '", "rank": 4}'),
    st.just("[]"),
    st.just('{"base_sha256": 5}'),
)
header = st.builds(
    backup_pb2.BlobHeader,
    blob_id=hexish,
    kind=st.sampled_from(["adapter", "keyfile", "", "other"]),
    adapter=st.one_of(st.just("default"), st.text(max_size=20)),
    version=u64,
    spec_json=spec_json,
    size=st.one_of(st.integers(0, 1 << 17), u64),
    sha256=hexish,
    offset=st.one_of(st.integers(0, 64), u64),
)
put_messages = st.lists(
    st.one_of(
        header.map(lambda h: backup_pb2.PutBlobRequest(header=h)),
        st.binary(max_size=512).map(lambda d: backup_pb2.PutBlobRequest(data=d)),
        st.just(backup_pb2.PutBlobRequest()),
    ),
    max_size=5,
)
unary_requests = st.one_of(
    st.builds(
        lambda t, k, n: ("Enroll", backup_pb2.EnrollRequest(token=t, public_key=k, name=n)),
        st.text(max_size=60),
        st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32)),
        st.one_of(st.text(max_size=30), st.just("phone")),
    ),
    st.builds(lambda b: ("UploadStatus", backup_pb2.UploadStatusRequest(blob_id=b)), hexish),
    st.builds(
        lambda b, o: ("GetBlob", backup_pb2.GetBlobRequest(blob_id=b, offset=o)),
        hexish,
        st.one_of(st.integers(0, 40), u64),
    ),
    st.builds(
        lambda a, s, t: (
            "ListBlobs",
            backup_pb2.ListBlobsRequest(adapter=a, page_size=s, page_token=t),
        ),
        st.text(max_size=20),
        st.one_of(st.integers(0, 1200), u32),
        st.one_of(st.text(max_size=25), st.integers(0, 2**70).map(str)),
    ),
    st.builds(
        lambda u: ("DeleteUserData", backup_pb2.DeleteUserDataRequest(user=u)),
        st.text(max_size=20),
    ),
)
junk_metadata = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from([KEY_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER]),
            st.text(max_size=12),
        ),
        st.one_of(st.text(max_size=140), st.binary(max_size=20), st.integers()),
    ),
    max_size=6,
)
auth_mode = st.sampled_from(["signed", "signed", "junk", "none"])


def _metadata(world: World, mode: str, method: str, first: Message, junk: list[Any]) -> list[Any]:
    if mode == "signed":
        return list(sign_request(world.device.private_key, METHODS[method], first))
    return junk if mode == "junk" else []


def _call_direct(world: World, method: str, request: Any, metadata: list[Any]) -> None:
    handler = getattr(world.servicer, method)
    try:
        result = handler(request, FakeContext(metadata))
        if method == "GetBlob":
            for chunk in result:
                assert isinstance(chunk, backup_pb2.BlobChunk)
    except Aborted as exc:
        assert exc.code in DOCUMENTED, (exc.code, exc.details)
        assert exc.details and "\n" not in exc.details


# --- direct calls -------------------------------------------------------------------------


@SETTINGS
@given(call=unary_requests, mode=auth_mode, junk=junk_metadata)
def test_unary_calls_give_a_response_or_a_documented_status(
    world: World, call: tuple[str, Message], mode: str, junk: list[Any]
) -> None:
    method, request = call
    _call_direct(world, method, request, _metadata(world, mode, method, request, junk))


@SETTINGS
@given(messages=put_messages, mode=auth_mode, junk=junk_metadata)
def test_put_blob_streams_give_a_response_or_a_documented_status(
    world: World, messages: list[backup_pb2.PutBlobRequest], mode: str, junk: list[Any]
) -> None:
    first = messages[0] if messages else backup_pb2.PutBlobRequest()
    metadata = _metadata(world, mode, "PutBlob", first, junk)
    _call_direct(world, "PutBlob", iter(messages), metadata)


@SETTINGS
@given(
    data=st.binary(min_size=1, max_size=300),
    cut=st.integers(0, 300),
    kind=st.sampled_from(["adapter", "keyfile"]),
)
def test_well_formed_uploads_of_arbitrary_bytes_are_stored_or_refused_cleanly(
    world: World, data: bytes, cut: int, kind: str
) -> None:
    # A header that passes validation, so the fuzzer exercises the store and the checks.
    h = backup_pb2.BlobHeader(
        blob_id=hashlib.sha256(data + kind.encode()).hexdigest()[:32],
        kind=kind,
        adapter="default" if kind == "adapter" else "",
        version=1 + cut if kind == "adapter" else 0,
        spec_json=(
            '{"base_model_id": "m", "base_sha256": "' + "0" * 64 + '", "rank": 4}'
            if kind == "adapter"
            else ""
        ),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    first = backup_pb2.PutBlobRequest(header=h)
    messages = [
        first,
        backup_pb2.PutBlobRequest(data=data[:cut]),
        backup_pb2.PutBlobRequest(data=data[cut:]),
    ]
    _call_direct(world, "PutBlob", iter(messages), _metadata(world, "signed", "PutBlob", first, []))


# --- through a real channel ---------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=unary_requests, mode=auth_mode, junk=junk_metadata)
def test_calls_over_a_loopback_channel_give_only_documented_codes(
    world: World, call: tuple[str, Message], mode: str, junk: list[Any]
) -> None:
    method, request = call
    # gRPC metadata on the wire: ASCII keys and printable values only.
    wire_junk = [
        (k.lower(), v)
        for k, v in junk
        if isinstance(k, str)
        and k
        and k.isascii()
        and all(c.isalnum() or c in "-_." for c in k)
        and not k.lower().startswith("grpc")
        and not k.lower().endswith("-bin")
        and isinstance(v, str)
        and v.isascii()
        and v.isprintable()
    ]
    metadata = _metadata(world, mode, method, request, wire_junk)
    with grpc.insecure_channel(world.address) as channel:
        stub = backup_pb2_grpc.BackupServiceStub(channel)
        try:
            result = getattr(stub, method)(request, metadata=metadata, timeout=10)
            if method == "GetBlob":
                list(result)
        except grpc.RpcError as exc:
            assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
