"""Manifests: a base's identity follows its bytes, and damage is named precisely."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from lorafleet.protocols import manifest as manifest_mod
from lorafleet.protocols.errors import IntegrityError, LorafleetError
from lorafleet.protocols.manifest import (
    STAT_CACHE_NAME,
    BaseManifest,
    ManifestFile,
    build_manifest,
    verify_manifest,
)

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 5000,  # > 1 MiB: crosses a chunk boundary
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


def write_model(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model")


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file the manifest module actually hashes."""
    calls: list[Path] = []
    real = manifest_mod._hash_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(manifest_mod, "_hash_file", counting)
    return calls


def test_manifest_records_relative_paths_sizes_and_sha256(model_dir: Path) -> None:
    # Execute
    m = build_manifest(model_dir, "tiny")

    # Assert
    assert [f.path for f in m.files] == sorted(FILES)
    for f in m.files:
        assert f.size == len(FILES[f.path])
        assert f.sha256 == hashlib.sha256(FILES[f.path]).hexdigest()


def test_digest_independent_of_location_listing_order_and_name(tmp_path: Path) -> None:
    # Prepare: the same bytes in two places, one listed forwards, one backwards
    a = write_model(tmp_path / "a" / "model")
    b = write_model(tmp_path / "elsewhere" / "deeper" / "renamed")

    # Execute
    m_a = build_manifest(a, "smollm2", files=sorted(FILES))
    m_b = build_manifest(b, "another label", files=sorted(FILES, reverse=True))
    m_all = build_manifest(b, "walked")

    # Assert
    assert m_a.files == m_b.files
    assert m_a.digest() == m_b.digest() == m_all.digest()


def test_digest_changes_when_one_byte_changes(tmp_path: Path) -> None:
    # Prepare
    a = write_model(tmp_path / "a")
    changed = dict(FILES, **{"config.json": b'{"model_type": "llamb"}'})
    b = write_model(tmp_path / "b", changed)

    # Execute / Assert
    assert build_manifest(a, "m").digest() != build_manifest(b, "m").digest()


def test_digest_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    # Prepare
    a = write_model(tmp_path / "a")
    b = write_model(tmp_path / "b")
    (b / "config.json").rename(b / "config2.json")

    # Execute / Assert
    assert build_manifest(a, "m").digest() != build_manifest(b, "m").digest()


def test_hidden_files_and_folders_are_not_part_of_the_base(model_dir: Path) -> None:
    # Prepare
    before = build_manifest(model_dir, "m").digest()
    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "lock").write_text("x")
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "HEAD").write_text("ref")
    (model_dir / ".DS_Store").write_bytes(b"\0")
    (model_dir / STAT_CACHE_NAME).write_text("{}")

    # Execute
    after = build_manifest(model_dir, "m")

    # Assert
    assert after.digest() == before
    assert all(not part.startswith(".") for f in after.files for part in f.path.split("/"))


def test_symlinked_files_count_as_their_contents(tmp_path: Path) -> None:
    # Prepare: a hub snapshot folder is made of symlinks into a blob store
    real = write_model(tmp_path / "real")
    blobs = write_model(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    for rel in FILES:
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(blobs / rel)

    # Execute / Assert
    assert build_manifest(snapshot, "m").digest() == build_manifest(real, "m").digest()


def test_json_round_trip_is_canonical(model_dir: Path) -> None:
    # Prepare
    m = build_manifest(model_dir, "tiny")

    # Execute
    text = m.to_json()
    again = BaseManifest.from_json(text)

    # Assert
    assert again == m
    assert again.to_json() == text
    assert " " not in text and "\n" not in text
    assert json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")) == text


def test_files_are_sorted_whatever_order_they_are_given_in() -> None:
    # Prepare
    x = ManifestFile("b/x.bin", 1, "1" * 64)
    y = ManifestFile("a.json", 2, "2" * 64)

    # Execute / Assert
    assert BaseManifest("m", (x, y)) == BaseManifest("m", (y, x))
    assert BaseManifest("m", (x, y)).digest() == BaseManifest("m", (y, x)).digest()


@pytest.mark.parametrize(
    "path",
    ["../escape.bin", "/abs/config.json", "a//b.json", "./config.json", "a\\b.json", "a/../b", ""],
)
def test_paths_outside_or_ambiguous_are_refused(path: str) -> None:
    # Execute / Assert
    with pytest.raises(IntegrityError, match="path"):
        ManifestFile(path, 1, "0" * 64)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"name": "m"}', "missing field"),
        ('{"name": "m", "files": [], "extra": 1}', "unknown field"),
        ('{"name": "m", "files": [], "format": 1}', "lists no files"),
        ('{"name": "m", "files": [{"path": "a", "size": 1}], "format": 1}', "exactly path"),
        ('{"name":"m","files":[{"path":"a","size":-1,"sha256":"' + "0" * 64 + '"}]}', "size"),
        ('{"name":"m","files":[{"path":"a","size":1,"sha256":"XYZ"}]}', "sha256"),
        ('{"name":"m","files":[{"path":"../a","size":1,"sha256":"' + "0" * 64 + '"}]}', "path"),
        (
            '{"name":"m","format":2,"files":[{"path":"a","size":1,"sha256":"' + "0" * 64 + '"}]}',
            "format",
        ),
        (
            '{"name":"m","files":[{"path":"a","size":1,"sha256":"'
            + "0" * 64
            + '"},{"path":"a","size":1,"sha256":"'
            + "0" * 64
            + '"}]}',
            "listed twice",
        ),
    ],
)
def test_malformed_manifest_json_is_refused_clearly(text: str, match: str) -> None:
    # Execute / Assert
    with pytest.raises(IntegrityError, match=match):
        BaseManifest.from_json(text)


def test_build_refuses_missing_folder_empty_folder_and_missing_listed_file(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()
    write_model(tmp_path / "m")

    # Execute / Assert
    with pytest.raises(LorafleetError, match="does not exist"):
        build_manifest(tmp_path / "nope", "m")
    with pytest.raises(LorafleetError, match="holds no files"):
        build_manifest(tmp_path / "empty", "m")
    with pytest.raises(IntegrityError, match=r"ghost\.bin"):
        build_manifest(tmp_path / "m", "m", files=["config.json", "ghost.bin"])


def test_intact_folder_verifies(model_dir: Path) -> None:
    # Prepare
    m = build_manifest(model_dir, "tiny")
    (model_dir / "unlisted.txt").write_text("extra files are ignored")

    # Execute / Assert (no exception)
    verify_manifest(model_dir, m)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "match"),
    [(_flip_byte, "contents differ"), (_truncate, "size"), (_delete, "missing")],
    ids=["flipped-byte", "truncated", "deleted"],
)
@pytest.mark.parametrize("trust", [False, True], ids=["full-hash", "stat-cache"])
def test_tampered_file_is_named_with_the_fix(
    model_dir: Path, damage: object, match: str, trust: bool
) -> None:
    # Prepare: a verified folder (with trust, its stat cache is now warm)
    m = build_manifest(model_dir, "tiny", write_stat_cache=trust)
    verify_manifest(model_dir, m, trust_stat_cache=trust)
    assert callable(damage)
    damage(model_dir / "model.safetensors")

    # Execute
    with pytest.raises(IntegrityError) as info:
        verify_manifest(model_dir, m, trust_stat_cache=trust)

    # Assert
    message = str(info.value)
    assert "model.safetensors" in message
    assert match in message
    assert "restore the file" in message
    assert "\n" not in message


def test_verify_refuses_a_missing_folder(tmp_path: Path, model_dir: Path) -> None:
    # Prepare
    m = build_manifest(model_dir, "tiny")
    shutil.rmtree(model_dir)

    # Execute / Assert
    with pytest.raises(LorafleetError, match="does not exist"):
        verify_manifest(model_dir, m)


def test_stat_cache_skips_rehashing_unchanged_files(
    model_dir: Path, hash_calls: list[Path]
) -> None:
    # Prepare: one full check fills the stat cache
    m = build_manifest(model_dir, "tiny")
    verify_manifest(model_dir, m, trust_stat_cache=True)
    assert len(hash_calls) == 2 * len(FILES)  # build + first verify
    assert (model_dir / STAT_CACHE_NAME).is_file()
    hash_calls.clear()

    # Execute
    verify_manifest(model_dir, m, trust_stat_cache=True)

    # Assert
    assert hash_calls == []


def test_without_trust_every_file_is_hashed_and_folder_untouched(
    model_dir: Path, hash_calls: list[Path]
) -> None:
    # Prepare
    m = build_manifest(model_dir, "tiny", write_stat_cache=True)
    hash_calls.clear()

    # Execute
    verify_manifest(model_dir, m)

    # Assert
    assert sorted(p.name for p in hash_calls) == sorted(Path(p).name for p in FILES)


def test_build_can_warm_the_stat_cache(model_dir: Path, hash_calls: list[Path]) -> None:
    # Prepare
    m = build_manifest(model_dir, "tiny", write_stat_cache=True)
    hash_calls.clear()

    # Execute
    verify_manifest(model_dir, m, trust_stat_cache=True)

    # Assert
    assert hash_calls == []


def test_in_place_edit_with_restored_size_and_mtime_is_still_caught(
    model_dir: Path, hash_calls: list[Path]
) -> None:
    # Prepare: same size, same inode, mtime put back with os.utime; only ctime moves
    target = model_dir / "model.safetensors"
    m = build_manifest(model_dir, "tiny", write_stat_cache=True)
    before = os.stat(target)
    with open(target, "r+b") as fh:  # in place: the inode stays the same
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    hash_calls.clear()

    # Execute
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        verify_manifest(model_dir, m, trust_stat_cache=True)

    # Assert: the changed file was hashed again, not trusted
    assert target in hash_calls


def test_stat_cache_cannot_vouch_for_a_different_manifest(model_dir: Path) -> None:
    # Prepare: the cache says config.json hashes to X; a manifest claims Y
    m = build_manifest(model_dir, "tiny", write_stat_cache=True)
    other = BaseManifest(
        "tiny",
        tuple(
            ManifestFile(f.path, f.size, "0" * 64) if f.path == "config.json" else f
            for f in m.files
        ),
    )

    # Execute / Assert
    with pytest.raises(IntegrityError, match=r"config\.json"):
        verify_manifest(model_dir, other, trust_stat_cache=True)


@pytest.mark.parametrize("garbage", ["not json", "[]", '{"format": 99, "files": {}}'])
def test_unreadable_stat_cache_falls_back_to_hashing(
    model_dir: Path, hash_calls: list[Path], garbage: str
) -> None:
    # Prepare
    m = build_manifest(model_dir, "tiny")
    (model_dir / STAT_CACHE_NAME).write_text(garbage)
    hash_calls.clear()

    # Execute
    verify_manifest(model_dir, m, trust_stat_cache=True)

    # Assert: every file hashed, and the cache repaired for next time
    assert len(hash_calls) == len(FILES)
    hash_calls.clear()
    verify_manifest(model_dir, m, trust_stat_cache=True)
    assert hash_calls == []


def test_stat_cache_can_live_outside_the_model_folder(
    tmp_path: Path, hash_calls: list[Path]
) -> None:
    # Prepare: a read-only model folder keeps its stat cache elsewhere
    model = write_model(tmp_path / "model")
    cache = tmp_path / "state" / "model.verified.json"
    cache.parent.mkdir()
    m = build_manifest(model, "tiny")
    verify_manifest(model, m, trust_stat_cache=True, stat_cache_path=cache)
    hash_calls.clear()

    # Execute
    verify_manifest(model, m, trust_stat_cache=True, stat_cache_path=cache)

    # Assert
    assert hash_calls == []
    assert not (model / STAT_CACHE_NAME).exists()
