"""The gRPC BaseService over a real loopback server: answers, order, and status codes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lorafleet.protocols.chunks import MIN_CHUNK_SIZE, ChunkedManifest, ChunkRange
from lorafleet.protocols.errors import LorafleetError, SpecError
from lorafleet.protocols.serde import (
    chunk_from_proto,
    fetch_request_to_proto,
    manifest_from_proto,
    manifest_request_to_proto,
)
from lorafleet.protocols.v1 import base_pb2, base_pb2_grpc
from lorafleet.server.base_service import BaseServicer, ServerTLS, serve_bases
from lorafleet.server.base_store import BaseStore

CHUNK = MIN_CHUNK_SIZE
WEIGHTS = os.urandom(5 * CHUNK + 7)


@pytest.fixture
def published(tmp_path: Path) -> tuple[BaseStore, ChunkedManifest]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(b'{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(WEIGHTS)
    store = BaseStore(tmp_path / "store", chunk_size=CHUNK)
    return store, store.publish(model, "tiny")


@pytest.fixture
def stub(
    published: tuple[BaseStore, ChunkedManifest],
) -> Iterator[base_pb2_grpc.BaseServiceStub]:
    server, port = serve_bases(published[0])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield base_pb2_grpc.BaseServiceStub(channel)
    finally:
        channel.close()
        server.stop(None)


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    assert isinstance(exc.value, grpc.Call)
    return exc.value.code()


def _details(exc: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    assert isinstance(exc.value, grpc.Call)
    return exc.value.details() or ""


def test_get_manifest_returns_the_published_manifest(
    published: tuple[BaseStore, ChunkedManifest], stub: base_pb2_grpc.BaseServiceStub
) -> None:
    # Prepare
    manifest = published[1]

    # Execute
    got = manifest_from_proto(stub.GetManifest(manifest_request_to_proto(manifest.digest())))

    # Assert
    assert got == manifest


def test_fetch_chunks_streams_the_ranges_in_request_order(
    published: tuple[BaseStore, ChunkedManifest], stub: base_pb2_grpc.BaseServiceStub
) -> None:
    # Prepare
    digest = published[1].digest()
    ranges = [ChunkRange("model.safetensors", 3, 3), ChunkRange("config.json", 0, 1)]

    # Execute
    chunks = [chunk_from_proto(m) for m in stub.FetchChunks(fetch_request_to_proto(digest, ranges))]

    # Assert
    assert [(c.path, c.index) for c in chunks] == [
        ("model.safetensors", 3),
        ("model.safetensors", 4),
        ("model.safetensors", 5),
        ("config.json", 0),
    ]
    assert b"".join(c.data for c in chunks[:3]) == WEIGHTS[3 * CHUNK :]
    assert [c.offset for c in chunks[:3]] == [3 * CHUNK, 4 * CHUNK, 5 * CHUNK]


def test_unknown_base_is_not_found(stub: base_pb2_grpc.BaseServiceStub) -> None:
    # Execute
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetManifest(manifest_request_to_proto("b" * 64))

    # Assert
    assert _code(exc) == grpc.StatusCode.NOT_FOUND
    assert "b" * 64 in _details(exc)


@pytest.mark.parametrize(
    ("ranges", "detail"),
    [
        ([base_pb2.ChunkRange(path="model.safetensors", first=5, count=2)], "out of range"),
        ([base_pb2.ChunkRange(path="missing.bin", first=0, count=1)], "has no file"),
        ([base_pb2.ChunkRange(path="config.json", first=0, count=0)], "count must be"),
        ([], "at least one chunk range"),
    ],
)
def test_bad_ranges_are_invalid_arguments(
    published: tuple[BaseStore, ChunkedManifest],
    stub: base_pb2_grpc.BaseServiceStub,
    ranges: list[base_pb2.ChunkRange],
    detail: str,
) -> None:
    # Prepare
    request = base_pb2.FetchChunksRequest(digest=published[1].digest(), ranges=ranges)

    # Execute
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.FetchChunks(request))

    # Assert
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in _details(exc)


def test_malformed_digest_is_an_invalid_argument(stub: base_pb2_grpc.BaseServiceStub) -> None:
    # Execute
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetManifest(base_pb2.GetManifestRequest(digest="../../etc/passwd"))

    # Assert
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_huge_request_is_refused_before_anything_is_read(
    published: tuple[BaseStore, ChunkedManifest], stub: base_pb2_grpc.BaseServiceStub
) -> None:
    # Prepare: the whole weights file asked for 20000 times (over 400 MiB, default limit 256)
    whole = base_pb2.ChunkRange(path="model.safetensors", first=0, count=6)
    request = base_pb2.FetchChunksRequest(digest=published[1].digest(), ranges=[whole] * 20_000)

    # Execute
    with pytest.raises(grpc.RpcError) as exc:
        next(iter(stub.FetchChunks(request)))

    # Assert
    assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_damaged_object_is_data_loss_not_sent(
    published: tuple[BaseStore, ChunkedManifest], stub: base_pb2_grpc.BaseServiceStub
) -> None:
    # Prepare
    store, manifest = published
    obj = store.root / "objects" / manifest.file("model.safetensors").sha256
    os.chmod(obj, 0o644)
    obj.write_bytes(b"\x00" * len(WEIGHTS))
    request = fetch_request_to_proto(manifest.digest(), [ChunkRange("model.safetensors", 0, 1)])

    # Execute
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.FetchChunks(request))

    # Assert
    assert _code(exc) == grpc.StatusCode.DATA_LOSS


def test_servicer_limit_below_a_client_batch_is_refused(
    published: tuple[BaseStore, ChunkedManifest],
) -> None:
    # Execute / Assert
    with pytest.raises(SpecError, match="max_request_bytes must be"):
        BaseServicer(published[0], max_request_bytes=1 << 20)


def test_an_address_in_use_is_one_clear_error(
    published: tuple[BaseStore, ChunkedManifest],
) -> None:
    # Prepare
    server, port = serve_bases(published[0])

    # Execute / Assert
    try:
        with pytest.raises(LorafleetError, match="cannot listen on"):
            serve_bases(published[0], f"127.0.0.1:{port}")
    finally:
        server.stop(None)


def test_tls_key_never_appears_in_repr() -> None:
    # Prepare
    tls = ServerTLS(b"-----BEGIN CERTIFICATE-----\nAAA", b"-----BEGIN PRIVATE KEY-----\nSECRET")

    # Execute / Assert
    assert "SECRET" not in repr(tls)
    with pytest.raises(SpecError, match="PEM"):
        ServerTLS(b"not pem", b"-----BEGIN PRIVATE KEY-----")
