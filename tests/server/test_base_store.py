"""The base store: content-addressed copies, manifests a device's load_base agrees with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafleet.protocols.chunks import MIN_CHUNK_SIZE, ChunkedManifest
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.manifest import build_manifest
from lorafleet.server.base_store import BaseNotFoundError, BaseStore

CHUNK = MIN_CHUNK_SIZE


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "model",
        {
            "config.json": b'{"model_type": "llama"}',
            "model.safetensors": os.urandom(3 * CHUNK + 100),
            "tokenizer.json": b'{"version": "1.0"}',
            ".cache/ignored": b"hidden files are not part of a base",
        },
    )


@pytest.fixture
def store(tmp_path: Path) -> BaseStore:
    return BaseStore(tmp_path / "store", chunk_size=CHUNK)


def test_published_folder_has_the_digest_load_base_computes(
    store: BaseStore, model_dir: Path
) -> None:
    # Execute
    manifest = store.publish(model_dir, "tiny")

    # Assert
    assert manifest.digest() == build_manifest(model_dir, "tiny").digest()
    assert [f.path for f in manifest.files] == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert store.digests() == [manifest.digest()]
    assert manifest.digest() in store


def test_published_single_file_is_a_one_file_base_under_its_own_name(
    store: BaseStore, tmp_path: Path
) -> None:
    # Prepare: how load_base hashes a .gguf file
    gguf = _write(tmp_path / "g", {"tiny.Q4_1.gguf": os.urandom(2 * CHUNK)}) / "tiny.Q4_1.gguf"

    # Execute
    manifest = store.publish(gguf)

    # Assert
    assert manifest.name == "tiny.Q4_1"
    assert manifest.digest() == build_manifest(gguf.parent, "x", [gguf.name]).digest()


def test_every_chunk_reads_back_as_the_source_bytes(store: BaseStore, model_dir: Path) -> None:
    # Prepare
    manifest = store.publish(model_dir)

    # Execute
    rebuilt = {
        f.path: b"".join(
            store.read_chunk(manifest.digest(), f.path, i).data for i in range(f.num_chunks)
        )
        for f in manifest.files
    }

    # Assert
    assert rebuilt == {f.path: (model_dir / f.path).read_bytes() for f in manifest.files}


def test_store_keeps_its_own_copy_when_the_source_changes_later(
    store: BaseStore, model_dir: Path
) -> None:
    # Prepare
    manifest = store.publish(model_dir)
    original = (model_dir / "config.json").read_bytes()

    # Execute
    (model_dir / "config.json").write_bytes(b'{"model_type": "evil"}')

    # Assert
    assert store.read_chunk(manifest.digest(), "config.json", 0).data == original


def test_identical_files_of_two_bases_are_stored_once(
    store: BaseStore, model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (other / name).write_bytes((model_dir / name).read_bytes())
    (other / "model.safetensors").write_bytes(os.urandom(100))

    # Execute
    a, b = store.publish(model_dir), store.publish(other)

    # Assert
    assert a.digest() != b.digest()
    assert len(list((store.root / "objects").iterdir())) == 4


def test_publishing_again_returns_the_stored_manifest(store: BaseStore, model_dir: Path) -> None:
    # Prepare
    first = store.publish(model_dir)

    # Execute: the same bytes, even with another chunk size, keep the first chunking
    again = BaseStore(store.root, chunk_size=2 * CHUNK).publish(model_dir)

    # Assert
    assert again == first


def test_a_reopened_store_serves_what_was_published(store: BaseStore, model_dir: Path) -> None:
    # Prepare
    manifest = store.publish(model_dir)

    # Execute
    reopened = BaseStore(store.root)

    # Assert
    assert reopened.get_manifest(manifest.digest()) == manifest
    assert reopened.read_chunk(manifest.digest(), "config.json", 0).data.startswith(b"{")


def test_unknown_or_malformed_digest_is_refused_clearly(store: BaseStore) -> None:
    # Execute / Assert
    with pytest.raises(BaseNotFoundError, match="publish it first"):
        store.get_manifest("a" * 64)
    with pytest.raises(SpecError, match="64 lowercase hex"):
        store.get_manifest("not-a-digest")
    assert "a" * 64 not in store


@pytest.mark.parametrize(
    ("path", "index", "match"),
    [("missing.bin", 0, "has no file"), ("config.json", 1, "out of range")],
)
def test_reading_outside_the_manifest_is_a_spec_error(
    store: BaseStore, model_dir: Path, path: str, index: int, match: str
) -> None:
    # Prepare
    digest = store.publish(model_dir).digest()

    # Execute / Assert
    with pytest.raises(SpecError, match=match):
        store.read_chunk(digest, path, index)


def test_a_damaged_object_is_refused_not_served(store: BaseStore, model_dir: Path) -> None:
    # Prepare
    manifest = store.publish(model_dir)
    obj = store.root / "objects" / manifest.file("model.safetensors").sha256
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[CHUNK + 5] ^= 0xFF
    obj.write_bytes(bytes(data))

    # Execute / Assert
    store.read_chunk(manifest.digest(), "model.safetensors", 0)  # untouched chunk still served
    with pytest.raises(IntegrityError, match=r"is damaged: chunk 1 of 'model\.safetensors'"):
        store.read_chunk(manifest.digest(), "model.safetensors", 1)


def test_a_stored_manifest_edited_on_disk_is_refused(store: BaseStore, model_dir: Path) -> None:
    # Prepare
    digest = store.publish(model_dir).digest()
    path = store.root / "manifests" / f"{digest}.json"
    manifest = ChunkedManifest.from_json(path.read_bytes())
    forged = ChunkedManifest(manifest.name, manifest.files[1:])
    path.write_text(forged.to_json(), encoding="utf-8")

    # Execute / Assert
    with pytest.raises(IntegrityError, match="not the one its name says"):
        BaseStore(store.root).get_manifest(digest)


def test_publishing_a_missing_source_says_what_to_pass(store: BaseStore, tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(LorafleetError, match="no such file or folder; pass a model folder"):
        store.publish(tmp_path / "nope")
