"""Chunked manifests: chunk hashes describe the same bytes, and the identity stays the base's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lorafleet.protocols.chunks import (
    MIN_CHUNK_SIZE,
    ChunkedFile,
    ChunkedManifest,
    ChunkHasher,
    chunk_file,
    chunk_manifest,
)
from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.manifest import build_manifest

CHUNK = MIN_CHUNK_SIZE  # 4 KiB
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 100,  # 25600 bytes: 6 full chunks and a tail
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    "exact.bin": b"\x07" * (2 * CHUNK),  # ends on a chunk boundary
    "empty.txt": b"",
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_chunked_manifest_has_the_digest_of_the_base_manifest(model_dir: Path) -> None:
    # Prepare
    base = build_manifest(model_dir, "tiny")

    # Execute
    chunked = chunk_manifest(model_dir, base, chunk_size=CHUNK)

    # Assert: chunk hashes are extra data; the identity is the one load_base computes
    assert chunked.digest() == base.digest()
    assert chunked.base == base
    assert ChunkedManifest("renamed", chunked.files).digest() == base.digest()


@pytest.mark.parametrize(
    ("rel", "n_chunks"),
    [("model.safetensors", 7), ("exact.bin", 2), ("empty.txt", 0), ("config.json", 1)],
)
def test_each_chunk_hash_is_the_sha256_of_its_slice(
    model_dir: Path, rel: str, n_chunks: int
) -> None:
    # Execute
    f = chunk_file(model_dir / rel, rel, CHUNK)

    # Assert
    data = FILES[rel]
    assert f.num_chunks == n_chunks
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    for i in range(n_chunks):
        offset, length = f.chunk_span(i)
        assert f.chunk_sha256[i] == hashlib.sha256(data[offset : offset + length]).hexdigest()


@pytest.mark.parametrize("piece", [1, 1000, CHUNK, CHUNK + 1, 100_000])
def test_hasher_gives_the_same_result_whatever_the_piece_size(piece: int) -> None:
    # Prepare
    data = FILES["model.safetensors"]
    reference = ChunkHasher(CHUNK)
    reference.update(data)

    # Execute
    hasher = ChunkHasher(CHUNK)
    for start in range(0, len(data), piece):
        hasher.update(data[start : start + piece])

    # Assert
    assert hasher.finish("w") == reference.finish("w")


def test_chunking_a_file_that_changed_since_its_manifest_is_refused(model_dir: Path) -> None:
    # Prepare
    base = build_manifest(model_dir, "tiny")
    (model_dir / "model.safetensors").write_bytes(b"\xff" + FILES["model.safetensors"][1:])

    # Execute / Assert
    with pytest.raises(IntegrityError, match=r"model\.safetensors: changed since"):
        chunk_manifest(model_dir, base, chunk_size=CHUNK)


def test_verify_chunk_names_file_and_chunk_of_a_tampered_chunk(model_dir: Path) -> None:
    # Prepare
    f = chunk_file(model_dir / "model.safetensors", "model.safetensors", CHUNK)
    offset, length = f.chunk_span(3)
    good = FILES["model.safetensors"][offset : offset + length]
    bad = bytes([good[0] ^ 1]) + good[1:]

    # Execute / Assert
    f.verify_chunk(3, good)
    with pytest.raises(IntegrityError, match=r"chunk 3 of 'model\.safetensors' has sha256"):
        f.verify_chunk(3, bad)
    with pytest.raises(IntegrityError, match="has 4095 bytes"):
        f.verify_chunk(3, good[:-1])


@pytest.mark.parametrize(
    ("size", "chunk_size", "hashes", "match"),
    [
        (10, CHUNK, 2, "needs 1 chunk hashes, got 2"),
        (10, CHUNK, 0, "needs 1 chunk hashes, got 0"),
        (10, 1024, 1, "chunk size"),
        (10, 64 << 20, 1, "chunk size"),
    ],
)
def test_inconsistent_chunked_file_is_refused(
    size: int, chunk_size: int, hashes: int, match: str
) -> None:
    # Execute / Assert
    with pytest.raises(IntegrityError, match=match):
        ChunkedFile("w.bin", size, "0" * 64, chunk_size, ("1" * 64,) * hashes)


def test_a_path_listed_as_file_and_folder_is_refused() -> None:
    # Prepare
    h = "0" * 64
    files = (
        ChunkedFile("a", 1, h, CHUNK, (h,)),
        ChunkedFile("a.txt", 1, h, CHUNK, (h,)),
        ChunkedFile("a/b", 1, h, CHUNK, (h,)),
    )

    # Execute / Assert
    with pytest.raises(IntegrityError, match="listed both as a file and as the folder"):
        ChunkedManifest("x", files)


def test_json_round_trip_and_unknown_format(model_dir: Path) -> None:
    # Prepare
    chunked = chunk_manifest(model_dir, build_manifest(model_dir, "tiny"), chunk_size=CHUNK)

    # Execute
    back = ChunkedManifest.from_json(chunked.to_json())

    # Assert
    assert back == chunked
    with pytest.raises(IntegrityError, match="upgrade lorafleet"):
        ChunkedManifest.from_json(
            chunked.to_json().replace('"chunked_format":1', '"chunked_format":9')
        )


def test_chunk_span_out_of_range_is_a_spec_error(model_dir: Path) -> None:
    # Prepare
    f = chunk_file(model_dir / "config.json", "config.json", CHUNK)

    # Execute / Assert
    with pytest.raises(SpecError, match="out of range"):
        f.chunk_span(1)
