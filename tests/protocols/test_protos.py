"""The committed gRPC code matches its .proto source, and serde round-trips every message."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lorafleet.protocols.chunks import ChunkedFile, ChunkedManifest, ChunkRange, FileChunk
from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.serde import (
    chunk_from_proto,
    chunk_to_proto,
    fetch_request_from_proto,
    fetch_request_to_proto,
    manifest_from_proto,
    manifest_request_from_proto,
    manifest_request_to_proto,
    manifest_to_proto,
)
from lorafleet.protocols.v1 import base_pb2
from lorafleet.protocols.v1.generate import GENERATED_SUFFIXES, PROTO_DIR, generate


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest() -> ChunkedManifest:
    weights = bytes(range(256)) * 40  # 10240 bytes: 3 chunks of 4 KiB
    chunks = tuple(_sha(weights[i : i + 4096]) for i in range(0, len(weights), 4096))
    return ChunkedManifest(
        "tiny",
        (
            ChunkedFile("model.safetensors", len(weights), _sha(weights), 4096, chunks),
            ChunkedFile("config.json", 2, _sha(b"{}"), 4096, (_sha(b"{}"),)),
            ChunkedFile("empty.txt", 0, _sha(b""), 4096, ()),
        ),
    )


def test_committed_generated_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    # Execute
    written = generate(tmp_path)

    # Assert: same files, byte for byte; regenerate with `python -m lorafleet.protocols.v1.generate`
    fresh = {p.name: p.read_bytes() for p in written}
    committed = {
        p.name: p.read_bytes()
        for p in PROTO_DIR.iterdir()
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }
    assert sorted(fresh) == sorted(committed)
    assert {"base_pb2.py", "base_pb2.pyi", "base_pb2_grpc.py", "base_pb2_grpc.pyi"} <= set(fresh)
    for name, data in fresh.items():
        assert committed[name] == data, f"{name} is stale; regenerate the protos"


def test_generated_code_imports_siblings_under_the_installed_package_name() -> None:
    # Execute
    grpc_module = (PROTO_DIR / "base_pb2_grpc.py").read_text(encoding="utf-8")

    # Assert
    assert "from lorafleet.protocols.v1 import base_pb2" in grpc_module
    assert base_pb2.DESCRIPTOR.package == "lorafleet.v1"


def test_manifest_round_trips_through_protobuf_bytes() -> None:
    # Prepare
    manifest = _manifest()

    # Execute
    wire = manifest_to_proto(manifest).SerializeToString()
    back = manifest_from_proto(base_pb2.Manifest.FromString(wire))

    # Assert
    assert back == manifest
    assert back.digest() == manifest.digest() == manifest.base.digest()


def test_manifest_whose_stated_digest_is_not_its_own_is_refused() -> None:
    # Prepare
    msg = manifest_to_proto(_manifest())
    msg.digest = "0" * 64

    # Execute / Assert
    with pytest.raises(IntegrityError, match="states digest"):
        manifest_from_proto(msg)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("path", "../etc/passwd", "must not contain"),
        ("sha256", "XYZ", "64 lowercase hex"),
        ("chunk_size", 1, "chunk size"),
    ],
)
def test_malformed_manifest_file_is_refused(field: str, value: object, match: str) -> None:
    # Prepare
    msg = manifest_to_proto(_manifest())
    setattr(msg.files[0], field, value)

    # Execute / Assert
    with pytest.raises(IntegrityError, match=match):
        manifest_from_proto(msg)


def test_manifest_with_a_missing_chunk_hash_is_refused() -> None:
    # Prepare
    msg = manifest_to_proto(_manifest())
    big = next(f for f in msg.files if f.path == "model.safetensors")
    del big.chunk_sha256[-1]

    # Execute / Assert
    with pytest.raises(IntegrityError, match="needs 3 chunk hashes, got 2"):
        manifest_from_proto(msg)


def test_requests_round_trip() -> None:
    # Prepare
    digest = _manifest().digest()
    ranges = [ChunkRange("model.safetensors", 1, 2), ChunkRange("config.json", 0, 1)]

    # Execute
    got_digest = manifest_request_from_proto(manifest_request_to_proto(digest))
    fetch = fetch_request_from_proto(
        base_pb2.FetchChunksRequest.FromString(
            fetch_request_to_proto(digest, ranges).SerializeToString()
        )
    )

    # Assert
    assert got_digest == digest
    assert fetch == (digest, tuple(ranges))


@pytest.mark.parametrize("digest", ["", "abc", "G" * 64, "A" * 64])
def test_request_with_a_malformed_digest_is_refused(digest: str) -> None:
    # Execute / Assert
    with pytest.raises(SpecError, match="64 lowercase hex"):
        manifest_request_from_proto(base_pb2.GetManifestRequest(digest=digest))


def test_fetch_request_with_an_empty_range_is_refused() -> None:
    # Prepare
    msg = base_pb2.FetchChunksRequest(
        digest="0" * 64, ranges=[base_pb2.ChunkRange(path="w.bin", first=0, count=0)]
    )

    # Execute / Assert
    with pytest.raises(SpecError, match="count must be a positive integer"):
        fetch_request_from_proto(msg)


def test_chunk_round_trips() -> None:
    # Prepare
    chunk = FileChunk("model.safetensors", 2, 8192, b"\x00\x01" * 10, _sha(b"\x00\x01" * 10))

    # Execute
    back = chunk_from_proto(base_pb2.Chunk.FromString(chunk_to_proto(chunk).SerializeToString()))

    # Assert
    assert back == chunk


def test_chunk_with_a_malformed_hash_label_is_refused() -> None:
    # Prepare
    msg = base_pb2.Chunk(path="w.bin", index=0, offset=0, data=b"x", sha256="nope")

    # Execute / Assert
    with pytest.raises(IntegrityError, match="sha256 must be 64"):
        chunk_from_proto(msg)
