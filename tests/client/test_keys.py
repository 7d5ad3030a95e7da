"""Device key store: unlock, rotate, change passphrase, recover; nothing lost on failure."""

from __future__ import annotations

import ast
import dataclasses
import doctest
import errno
import json
import logging
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from lorafleet.client.keys import KeyStore, SeenGenerations, UnlockedKeys
from lorafleet.protocols import atomic, crypto
from lorafleet.protocols.envelope import BlobContext, new_blob_id, open_blob, seal_blob
from lorafleet.protocols.errors import (
    DecryptionError,
    KeyFileRollbackError,
    KeyFileTamperedError,
    KeyStoreError,
    LorafleetError,
    MissingKeyFileError,
    WrongPassphraseError,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "envelope.md"
PASSPHRASE = "tide tables at the harbour"
# Tiny costs so each unlock takes microseconds; production defaults are tested in
# tests/protocols/test_crypto.py.
CHEAP: crypto.KdfParams = (
    crypto.Argon2idParams(iterations=1, memory_kib=64, lanes=1)
    if crypto.argon2id_available()
    else crypto.ScryptParams(log2_n=10)
)


def _context(version: int = 1, user_id: str = "user-7") -> BlobContext:
    return BlobContext(user_id, "notes", version, "ab" * 32, new_blob_id())


@pytest.fixture
def recovery() -> crypto.RecoveryKeyPair:
    return crypto.recovery_keypair()


@pytest.fixture
def key_file(tmp_path: Path, recovery: crypto.RecoveryKeyPair) -> Path:
    path = tmp_path / "device" / "keys.json"
    KeyStore.create(path, PASSPHRASE, recovery_public_keys=[recovery.public_key], kdf=CHEAP)
    return path


def _snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# --- create and unlock -------------------------------------------------------------


def test_create_writes_a_private_file_that_unlocks_to_the_same_key(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "keys.json"

    # Execute
    created = KeyStore.create(path, PASSPHRASE, kdf=CHEAP)
    unlocked = KeyStore.unlock(path, PASSPHRASE)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert unlocked == created and unlocked.current_key_id == 1
    assert len(unlocked.current_key) == 32
    doc = json.loads(path.read_text())
    assert doc["format"] == "lorafleet-keyfile" and doc["format_version"] == 1
    assert doc["passphrase"]["kdf"] == CHEAP.to_json()  # KDF and parameters in the header


def test_create_without_argon2id_records_scrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an OpenSSL build without Argon2id; default cost lowered for speed
    monkeypatch.setattr(crypto, "argon2id_available", lambda: False)
    monkeypatch.setattr(crypto, "ScryptParams", _CheapScrypt)
    path = tmp_path / "keys.json"

    # Execute
    KeyStore.create(path, PASSPHRASE)

    # Assert
    kdf = json.loads(path.read_text())["passphrase"]["kdf"]
    assert kdf["name"] == "scrypt" and {"log2_n", "r", "p", "salt"} <= set(kdf)
    assert KeyStore.unlock(path, PASSPHRASE).current_key_id == 1
    assert KeyStore.info(path).kdf == "scrypt"


@dataclasses.dataclass(frozen=True)
class _CheapScrypt(crypto.ScryptParams):
    log2_n: int = 10


def test_create_refuses_to_overwrite_an_existing_key_file(key_file: Path) -> None:
    before = _snapshot(key_file)

    with pytest.raises(KeyStoreError, match="already exists"):
        KeyStore.create(key_file, "another passphrase", kdf=CHEAP)

    assert _snapshot(key_file) == before


def test_a_wrong_passphrase_gives_one_clear_error_and_changes_nothing(key_file: Path) -> None:
    before = _snapshot(key_file)

    with pytest.raises(WrongPassphraseError, match="wrong passphrase for key file") as info:
        KeyStore.unlock(key_file, "tide tables at the harbor")

    assert "\n" not in str(info.value) and "harbo" not in str(info.value)
    assert _snapshot(key_file) == before


def test_a_missing_key_file_says_where_and_how_to_restore(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "keys.json"

    with pytest.raises(MissingKeyFileError) as info:
        KeyStore.unlock(path, PASSPHRASE)

    message = str(info.value)
    assert str(path) in message and "KeyStore.restore" in message and "recovery" in message
    assert not path.exists()


@pytest.mark.parametrize("passphrase", ["", None, b"bytes"])
def test_empty_or_non_text_passphrases_are_refused(tmp_path: Path, passphrase: Any) -> None:
    with pytest.raises(LorafleetError, match="passphrase must be a non-empty string"):
        KeyStore.create(tmp_path / "keys.json", passphrase, kdf=CHEAP)
    assert not (tmp_path / "keys.json").exists()


def test_a_loose_file_mode_is_warned_about(
    key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file.chmod(0o644)

    with caplog.at_level(logging.WARNING, logger="lorafleet.client.keys"):
        KeyStore.unlock(key_file, PASSPHRASE)

    assert "chmod 600" in caplog.text


# --- change passphrase and rotate --------------------------------------------------


def test_change_passphrase_keeps_the_keys_and_drops_the_old_passphrase(key_file: Path) -> None:
    # Prepare
    keys = KeyStore.unlock(key_file, PASSPHRASE)
    old_salt = json.loads(key_file.read_text())["passphrase"]["kdf"]["salt"]

    # Execute
    KeyStore.change_passphrase(key_file, PASSPHRASE, "a brand new passphrase")

    # Assert
    assert KeyStore.unlock(key_file, "a brand new passphrase") == keys
    with pytest.raises(WrongPassphraseError):
        KeyStore.unlock(key_file, PASSPHRASE)
    assert json.loads(key_file.read_text())["passphrase"]["kdf"]["salt"] != old_salt
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_change_passphrase_with_a_wrong_old_one_changes_nothing(key_file: Path) -> None:
    before = _snapshot(key_file)

    with pytest.raises(WrongPassphraseError):
        KeyStore.change_passphrase(key_file, "not it", "a brand new passphrase")

    assert _snapshot(key_file) == before


def test_a_failed_write_never_loses_the_old_file(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the disk fills up at the moment the new file would replace the old one
    before = key_file.read_bytes()

    def full_disk(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)

    # Execute
    with pytest.raises(LorafleetError, match="disk full"):
        KeyStore.change_passphrase(key_file, PASSPHRASE, "a brand new passphrase")
    with pytest.raises(LorafleetError, match="disk full"):
        KeyStore.rotate(key_file, PASSPHRASE)
    monkeypatch.undo()

    # Assert: the old file is intact and still opens with the old passphrase
    assert key_file.read_bytes() == before
    assert KeyStore.unlock(key_file, PASSPHRASE).current_key_id == 1
    assert not [p for p in key_file.parent.iterdir() if p.name.startswith(atomic.TMP_PREFIX)]


def test_rotation_adds_a_generation_and_old_blobs_still_open(key_file: Path) -> None:
    # Prepare: a blob sealed before the rotation
    before = KeyStore.unlock(key_file, PASSPHRASE)
    old_ctx = _context(version=1)
    old_blob = seal_blob(before.current_key, old_ctx, b"v1", key_id=before.current_key_id)

    # Execute
    new_id = KeyStore.rotate(key_file, PASSPHRASE)
    after = KeyStore.unlock(key_file, PASSPHRASE)
    new_ctx = _context(version=2)
    new_blob = seal_blob(after.current_key, new_ctx, b"v2", key_id=after.current_key_id)

    # Assert
    assert new_id == after.current_key_id == 2 and sorted(after) == [1, 2]
    assert after[1] == before[1] and after[2] != after[1]
    assert open_blob(after, old_ctx, old_blob) == b"v1"  # no re-upload needed
    assert open_blob(after, new_ctx, new_blob) == b"v2"
    with pytest.raises(DecryptionError, match="generation 2"):
        open_blob(before, new_ctx, new_blob)


def test_concurrent_rotations_never_drop_a_generation(key_file: Path) -> None:
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(KeyStore.rotate(key_file, PASSPHRASE)))
        for _ in range(4)
    ]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == [2, 3, 4, 5]
    assert sorted(KeyStore.unlock(key_file, PASSPHRASE)) == [1, 2, 3, 4, 5]


# --- recovery ----------------------------------------------------------------------


def test_a_recovery_key_unlocks_every_generation(
    key_file: Path, recovery: crypto.RecoveryKeyPair
) -> None:
    KeyStore.rotate(key_file, PASSPHRASE)

    keys = KeyStore.unlock_with_recovery(key_file, recovery.private_key)

    assert keys == KeyStore.unlock(key_file, PASSPHRASE) and sorted(keys) == [1, 2]


def test_an_unregistered_recovery_key_is_refused(key_file: Path) -> None:
    stranger = crypto.recovery_keypair()

    with pytest.raises(KeyStoreError, match="not registered"):
        KeyStore.unlock_with_recovery(key_file, stranger.private_key)


def test_added_and_removed_recovery_keys(key_file: Path) -> None:
    # Prepare
    second = crypto.recovery_keypair()
    KeyStore.rotate(key_file, PASSPHRASE)

    # Execute / Assert: the new key opens old and new generations, then no longer
    KeyStore.add_recovery_key(key_file, PASSPHRASE, second.public_key)
    assert sorted(KeyStore.unlock_with_recovery(key_file, second.private_key)) == [1, 2]
    assert second.public_key.hex() in KeyStore.info(key_file).recovery_public_keys
    KeyStore.remove_recovery_key(key_file, PASSPHRASE, second.public_key)
    with pytest.raises(KeyStoreError, match="not registered"):
        KeyStore.unlock_with_recovery(key_file, second.private_key)


def test_a_lost_device_is_restored_from_the_bundle(
    key_file: Path, recovery: crypto.RecoveryKeyPair, tmp_path: Path
) -> None:
    # Prepare: blobs under two generations, a bundle stored off-device, then the device is lost
    keys = KeyStore.unlock(key_file, PASSPHRASE)
    ctx1 = _context(version=1)
    blob1 = seal_blob(keys.current_key, ctx1, b"v1", key_id=1)
    KeyStore.rotate(key_file, PASSPHRASE)
    keys = KeyStore.unlock(key_file, PASSPHRASE)
    ctx2 = _context(version=2)
    blob2 = seal_blob(keys.current_key, ctx2, b"v2", key_id=2)
    bundle = KeyStore.recovery_bundle(key_file)
    key_file.unlink()
    new_path = tmp_path / "new-phone" / "keys.json"

    # Execute
    restored = KeyStore.restore(new_path, bundle, recovery.private_key, "new phone", kdf=CHEAP)

    # Assert
    assert "passphrase" not in json.loads(bundle)  # nothing to guess a passphrase against
    assert KeyStore.unlock(new_path, "new phone") == restored == keys
    assert open_blob(restored, ctx1, blob1) == b"v1"
    assert open_blob(restored, ctx2, blob2) == b"v2"
    assert KeyStore.unlock_with_recovery(new_path, recovery.private_key) == keys
    assert stat.S_IMODE(new_path.stat().st_mode) == 0o600


def test_a_bundle_is_not_a_key_file(key_file: Path, tmp_path: Path) -> None:
    bundle_path = tmp_path / "bundle.json"
    bundle_path.write_bytes(KeyStore.recovery_bundle(key_file))

    with pytest.raises(KeyStoreError, match="recovery bundle, not a key file"):
        KeyStore.unlock(bundle_path, PASSPHRASE)


def test_restore_refuses_an_existing_path(key_file: Path, recovery: crypto.RecoveryKeyPair) -> None:
    bundle = KeyStore.recovery_bundle(key_file)
    before = _snapshot(key_file)

    with pytest.raises(KeyStoreError, match="already exists"):
        KeyStore.restore(key_file, bundle, recovery.private_key, "x", kdf=CHEAP)

    assert _snapshot(key_file) == before


def test_no_bundle_without_recovery_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    KeyStore.create(path, PASSPHRASE, kdf=CHEAP)

    with pytest.raises(KeyStoreError, match="add_recovery_key"):
        KeyStore.recovery_bundle(path)


# --- the recovery list is bound to the master keys -----------------------------------


def _plant(doc: dict[str, Any], change: str, keep: bytes = b"") -> crypto.RecoveryKeyPair:
    """Change the recovery part the way someone without the keys can; their key pair.

    A removed or swapped recovery key is never ``keep`` (the one the test opens with).
    """
    planted = crypto.recovery_keypair()
    other = next(i for i, e in enumerate(doc["recovery"]) if e["public_key"] != keep.hex())
    store_id = bytes.fromhex(doc["store_id"])
    key_ids = [k["key_id"] for k in doc["passphrase"]["keys"]]

    def wrap_for(public: bytes, key_id: int) -> str:
        aad = b"lorafleet/keyfile/v1\x00" + store_id + key_id.to_bytes(4, "little")
        return crypto.wrap_for_recipient(public, crypto.random_key(), aad).hex()

    if change == "recovery key added":
        entry = {
            "public_key": planted.public_key.hex(),
            "keys": [{"key_id": k, "wrapped": wrap_for(planted.public_key, k)} for k in key_ids],
        }
        doc["recovery"].append(entry)
    elif change == "recovery key swapped":
        doc["recovery"][other]["public_key"] = planted.public_key.hex()
    elif change == "recovery key removed":
        del doc["recovery"][other]
    elif change == "recovery copy replaced":
        own = bytes.fromhex(doc["recovery"][0]["public_key"])
        doc["recovery"][0]["keys"][0]["wrapped"] = wrap_for(own, key_ids[0])
    elif change == "generation added to the recovery part":
        for entry in doc["recovery"]:
            own = bytes.fromhex(entry["public_key"])
            entry["keys"].append({"key_id": 99, "wrapped": wrap_for(own, 99)})
    return planted


PLANTS = [
    "recovery key added",
    "recovery key swapped",
    "recovery key removed",
    "recovery copy replaced",
    "generation added to the recovery part",
]


@pytest.mark.parametrize("change", PLANTS)
@pytest.mark.parametrize("operation", ["unlock", "rotate", "change_passphrase", "add_recovery_key"])
def test_a_changed_recovery_list_is_refused_before_anything_is_wrapped(
    key_file: Path, recovery: crypto.RecoveryKeyPair, change: str, operation: str
) -> None:
    # Prepare: two registered recovery keys, then the file changed by someone keyless
    KeyStore.add_recovery_key(key_file, PASSPHRASE, crypto.recovery_keypair().public_key)
    doc = json.loads(key_file.read_text())
    _plant(doc, change)
    key_file.write_text(json.dumps(doc))
    before = _snapshot(key_file)
    run = {
        "unlock": lambda: KeyStore.unlock(key_file, PASSPHRASE),
        "rotate": lambda: KeyStore.rotate(key_file, PASSPHRASE),
        "change_passphrase": lambda: KeyStore.change_passphrase(key_file, PASSPHRASE, "new"),
        "add_recovery_key": lambda: KeyStore.add_recovery_key(
            key_file, PASSPHRASE, crypto.recovery_keypair().public_key
        ),
    }[operation]

    # Execute
    with pytest.raises(KeyFileTamperedError, match="refusing it") as info:
        run()

    # Assert
    assert "\n" not in str(info.value)
    assert _snapshot(key_file) == before


@pytest.mark.parametrize("change", PLANTS)
def test_a_bundle_with_a_changed_recovery_list_does_not_restore(
    key_file: Path, recovery: crypto.RecoveryKeyPair, tmp_path: Path, change: str
) -> None:
    # Prepare: two registered recovery keys; the bundle changed by someone keyless
    KeyStore.add_recovery_key(key_file, PASSPHRASE, crypto.recovery_keypair().public_key)
    doc = json.loads(KeyStore.recovery_bundle(key_file))
    doc["passphrase"] = {"keys": [{"key_id": 1}]}  # _plant reads the generations from here
    _plant(doc, change, keep=recovery.public_key)
    del doc["passphrase"]
    target = tmp_path / "new" / "keys.json"

    # Execute / Assert
    with pytest.raises(KeyFileTamperedError, match="refusing it"):
        KeyStore.restore(target, json.dumps(doc).encode(), recovery.private_key, "new", kdf=CHEAP)
    assert not target.exists()


def _strip_tag(path: Path) -> bytes:
    doc = json.loads(path.read_text())
    del doc["recovery_tag"]
    return json.dumps(doc).encode()


def test_an_older_file_without_the_tag_opens_and_gets_it_at_the_next_change(
    key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a file as lorafleet wrote it before the tag existed
    key_file.write_bytes(_strip_tag(key_file))

    # Execute
    with caplog.at_level(logging.WARNING):
        keys = KeyStore.unlock(key_file, PASSPHRASE)
    KeyStore.rotate(key_file, PASSPHRASE)

    # Assert: accepted with a warning naming the keys; tagged (and checked) from then on
    assert sorted(keys) == [1] and "no recovery_tag" in caplog.text
    assert "recovery_tag" in json.loads(key_file.read_text())
    doc = json.loads(key_file.read_text())
    _plant(doc, "recovery key added")
    key_file.write_text(json.dumps(doc))
    with pytest.raises(KeyFileTamperedError):
        KeyStore.rotate(key_file, PASSPHRASE)


def test_adopting_an_untagged_file_drops_its_unprovable_recovery_keys(
    key_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the server strips the tag and plants its key
    doc = json.loads(_strip_tag(key_file))
    planted = _plant(doc, "recovery key added")
    target = tmp_path / "new" / "keys.json"
    target.parent.mkdir()

    # Execute
    with caplog.at_level(logging.WARNING):
        keys = KeyStore.adopt(target, json.dumps(doc).encode(), PASSPHRASE)
    KeyStore.rotate(target, PASSPHRASE)

    # Assert: the passphrase opens it; no recovery key, least of all the planted one
    assert sorted(keys) == [1] and "dropping them" in caplog.text
    assert KeyStore.info(target).recovery_public_keys == ()
    with pytest.raises(KeyStoreError, match="not registered"):
        KeyStore.unlock_with_recovery(target, planted.private_key)


def test_restoring_an_untagged_bundle_keeps_only_the_key_used(
    key_file: Path, recovery: crypto.RecoveryKeyPair, tmp_path: Path
) -> None:
    # Prepare
    bundle_path = tmp_path / "bundle.json"
    bundle_path.write_bytes(KeyStore.recovery_bundle(key_file))
    doc = json.loads(_strip_tag(bundle_path))
    doc["passphrase"] = {"keys": [{"key_id": 1}]}
    planted = _plant(doc, "recovery key added")
    del doc["passphrase"]
    target = tmp_path / "new" / "keys.json"

    # Execute
    KeyStore.restore(target, json.dumps(doc).encode(), recovery.private_key, "new", kdf=CHEAP)
    KeyStore.rotate(target, "new")

    # Assert
    assert KeyStore.info(target).recovery_public_keys == (recovery.public_key.hex(),)
    assert sorted(KeyStore.unlock_with_recovery(target, recovery.private_key)) == [1, 2]
    with pytest.raises(KeyStoreError, match="not registered"):
        KeyStore.unlock_with_recovery(target, planted.private_key)


def test_an_older_generation_than_one_seen_is_a_rollback(
    key_file: Path, recovery: crypto.RecoveryKeyPair, tmp_path: Path
) -> None:
    # Prepare: generation 1 saved aside; the device then sees generation 2
    old = key_file.read_bytes()
    KeyStore.rotate(key_file, PASSPHRASE)
    seen = SeenGenerations(tmp_path / "seen.json")
    seen.note_file(key_file)
    target = tmp_path / "new" / "keys.json"
    target.parent.mkdir()

    # Execute / Assert
    with pytest.raises(KeyFileRollbackError, match="generation 2"):
        KeyStore.adopt(target, old, PASSPHRASE, seen=seen)
    with pytest.raises(KeyFileRollbackError, match="rollback"):
        KeyStore.restore(target, old, recovery.private_key, "new", kdf=CHEAP, seen=seen)
    assert not target.exists()
    assert sorted(KeyStore.adopt(target, key_file.read_bytes(), PASSPHRASE, seen=seen)) == [1, 2]


# --- damaged files -----------------------------------------------------------------


def _edit(doc: dict[str, Any], change: str) -> None:
    if change == "extra member":
        doc["comment"] = "hi"
    elif change == "newer version":
        doc["format_version"] = 2
    elif change == "bad hex":
        doc["passphrase"]["keys"][0]["wrapped"] = "zz" * 60
    elif change == "short wrap":
        doc["passphrase"]["keys"][0]["wrapped"] = "00" * 59
    elif change == "huge kdf cost":
        kdf = doc["passphrase"]["kdf"]
        kdf["memory_kib" if kdf["name"] == "argon2id" else "log2_n"] = 2**30
    elif change == "duplicate key id":
        doc["passphrase"]["keys"].append(dict(doc["passphrase"]["keys"][0]))
    elif change == "old generation tampered":
        wrapped = doc["passphrase"]["keys"][0]["wrapped"]
        doc["passphrase"]["keys"][0]["wrapped"] = ("1" if wrapped[40] == "0" else "0").join(
            [wrapped[:40], wrapped[41:]]
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("extra member", "unexpected"),
        ("newer version", "upgrade lorafleet"),
        ("bad hex", "damaged"),
        ("short wrap", "120 hex"),
        ("huge kdf cost", "damaged"),
        ("duplicate key id", "appears twice"),
        ("old generation tampered", "was altered"),
    ],
)
def test_damaged_key_files_give_one_clear_error(key_file: Path, change: str, message: str) -> None:
    # Prepare
    KeyStore.rotate(key_file, PASSPHRASE)
    doc = json.loads(key_file.read_text())
    _edit(doc, change)
    key_file.write_text(json.dumps(doc))
    before = _snapshot(key_file)

    # Execute
    with pytest.raises(KeyStoreError, match=message) as info:
        KeyStore.unlock(key_file, PASSPHRASE)

    # Assert
    assert not isinstance(info.value, WrongPassphraseError) and "\n" not in str(info.value)
    assert _snapshot(key_file) == before


@pytest.mark.parametrize("content", [b"", b"not json", b"\xff\xfe", b"[]", b"[" * 100000])
def test_garbage_is_damaged_not_a_crash(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(content)

    with pytest.raises(KeyStoreError, match="damaged"):
        KeyStore.unlock(path, PASSPHRASE)


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="is a directory"):
        KeyStore.unlock(tmp_path, PASSPHRASE)


# --- secrets stay secret -----------------------------------------------------------


def test_no_key_or_passphrase_reaches_logs_reprs_or_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    path = tmp_path / "keys.json"
    pair = crypto.recovery_keypair()
    texts: list[str] = []

    # Execute: every operation, with DEBUG logging on
    with caplog.at_level(logging.DEBUG):
        keys = KeyStore.create(path, PASSPHRASE, recovery_public_keys=[pair.public_key], kdf=CHEAP)
        KeyStore.rotate(path, PASSPHRASE)
        KeyStore.change_passphrase(path, PASSPHRASE, PASSPHRASE + "!")
        keys = KeyStore.unlock_with_recovery(path, pair.private_key)
        for call in (
            lambda: KeyStore.unlock(path, PASSPHRASE),
            lambda: KeyStore.create(path, PASSPHRASE, kdf=CHEAP),
        ):
            with pytest.raises(LorafleetError) as info:
                call()
            texts.append(str(info.value))
    texts += [caplog.text, repr(keys), str(keys), repr(KeyStore.info(path))]

    # Assert
    secrets = [PASSPHRASE, pair.private_key.hex(), *(k.hex() for k in keys.values())]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert repr(keys) == "UnlockedKeys(key_ids=[1, 2], current_key_id=2)"


def test_unlocked_keys_is_a_read_only_mapping() -> None:
    keys = UnlockedKeys({2: bytes(32), 1: bytes(range(32))})

    assert list(keys) == [1, 2] and keys.current_key == bytes(32)
    with pytest.raises(TypeError):
        keys[3] = bytes(32)  # type: ignore[index]


# --- the key-file reader in docs/envelope.md ---------------------------------------


def _doc_example() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (code,) = [b for b in blocks if b.startswith("# decrypt_without_lorafleet.py")]
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]  # type: ignore[union-attr]
        for n in ast.walk(ast.parse(code))
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert imported <= {"cryptography", "json", "struct", "unicodedata"}, imported
    namespace: dict[str, Any] = {"__name__": "decrypt_without_lorafleet"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("kdf_name", ["argon2id", "scrypt"])
def test_the_documented_reader_opens_key_files_and_blobs_without_lorafleet(
    tmp_path: Path, kdf_name: str
) -> None:
    # Prepare: a rotated key file with a recovery key, and one blob per generation
    if kdf_name == "argon2id" and not crypto.argon2id_available():
        pytest.skip("OpenSSL without Argon2id")
    kdf: crypto.KdfParams = (
        crypto.Argon2idParams(iterations=1, memory_kib=64, lanes=2)
        if kdf_name == "argon2id"
        else crypto.ScryptParams(log2_n=10)
    )
    example = _doc_example()
    path, pair = tmp_path / "keys.json", crypto.recovery_keypair()
    passphrase = "caf\u00e9 au lait"
    KeyStore.create(path, passphrase, recovery_public_keys=[pair.public_key], kdf=kdf)
    first = KeyStore.unlock(path, passphrase)
    ctx1 = _context(version=1)
    blob1 = seal_blob(first.current_key, ctx1, b"generation one", key_id=1)
    KeyStore.rotate(path, passphrase)
    keys = KeyStore.unlock(path, passphrase)
    ctx2 = _context(version=2)
    blob2 = seal_blob(keys.current_key, ctx2, b"generation two", key_id=2)

    # Execute: only the docs' code, with the passphrase typed decomposed
    by_passphrase = example["master_keys_from_passphrase"](path.read_bytes(), "cafe\u0301 au lait")
    by_recovery = example["master_keys_from_recovery"](
        KeyStore.recovery_bundle(path), pair.private_key
    )
    opened = [
        example["decrypt_blob"](
            by_passphrase,
            blob,
            user_id=ctx.user_id,
            adapter_id=ctx.adapter_id,
            version=ctx.version,
            base_sha256=ctx.base_sha256,
        )
        for ctx, blob in ((ctx1, blob1), (ctx2, blob2))
    ]

    tag_ok = example["recovery_tag_ok"]
    doc = json.loads(path.read_text())
    _plant(doc, "recovery key added")
    planted = json.dumps(doc).encode()

    # Assert
    assert by_passphrase == by_recovery == dict(keys)
    assert opened == [b"generation one", b"generation two"]
    assert tag_ok(path.read_bytes(), by_passphrase) and tag_ok(
        KeyStore.recovery_bundle(path), by_recovery
    )
    assert not tag_ok(planted, by_passphrase)


def test_the_docstring_examples_run() -> None:
    from lorafleet.client import keys

    assert doctest.testmod(keys).failed == 0
