"""Backup and restore of a profile through a real loopback backup server.

Each attack or mistake the issue names (a flipped byte, a truncated blob, a blob swapped
between two users, an older version replayed as newer, a wrong passphrase, a missing
key file) must give one clear error and leave the local profile and key file exactly as
they were.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from lorafleet.client.backup import (
    BackupClient,
    BackupDataLossError,
    DeviceIdentity,
    backup_profile,
    obtain_keys,
    pack_version,
    restore_profile,
    unpack_archive,
)
from lorafleet.client.keys import KeyStore, UnlockedKeys
from lorafleet.client.profile import Profile
from lorafleet.client.sdk import PersonalModel
from lorafleet.protocols import crypto
from lorafleet.protocols.errors import (
    DecryptionError,
    IntegrityError,
    KeyStoreError,
    LorafleetError,
    MissingKeyFileError,
    WrongPassphraseError,
)
from lorafleet.server.backup_service import BackupServicer, serve_backup
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.registry import Registry
from lorafleet.server.registry.models import blobs as blobs_table

PASSPHRASE = "tide tables at the harbour"
CHEAP: crypto.KdfParams = (
    crypto.Argon2idParams(iterations=1, memory_kib=64, lanes=1)
    if crypto.argon2id_available()
    else crypto.ScryptParams(log2_n=10)
)


@pytest.fixture(scope="module")
def profile_v2(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A profile with two saved versions of random, distinct B matrices (v2 current)."""
    root = tmp_path_factory.mktemp("device-a") / "profile"
    pm = PersonalModel.open(
        root, base=tiny_model_dir, rank=4, precision="fp32", device="cpu", seq_len=32
    )
    rng = np.random.default_rng(0)
    for _ in range(2):
        pm.load_b(
            {k: rng.normal(size=v.shape).astype(np.float32) for k, v in pm.adapter_b().items()}
        )
        pm.save()
    return root


@dataclass
class Env:
    registry: Registry
    store: BlobStore
    address: str
    tmp: Path

    def enroll(self, user: str, name: str) -> BackupClient:
        self.registry.ensure_user(user)
        token = self.registry.issue_enrolment_token(user)
        return BackupClient.enroll(self.address, token, self.tmp / f"{name}.device.json", name=name)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    store = BlobStore(tmp_path / "blobs")
    server, port = serve_backup(BackupServicer(registry, store))
    try:
        yield Env(registry, store, f"127.0.0.1:{port}", tmp_path)
    finally:
        server.stop(None)
        registry.close()


@pytest.fixture
def device_a(
    env: Env, profile_v2: Path, tmp_path: Path
) -> tuple[BackupClient, Path, Path, UnlockedKeys]:
    """Maya's first device: her profile (v1, v2), key file (with a recovery key), enrolled."""
    profile = tmp_path / "a" / "profile"
    shutil.copytree(profile_v2, profile)
    key_file = tmp_path / "a" / "keys.json"
    keys = KeyStore.create(
        key_file, PASSPHRASE, recovery_public_keys=[RECOVERY.public_key], kdf=CHEAP
    )
    return env.enroll("u-maya", "phone"), profile, key_file, keys


RECOVERY = crypto.recovery_keypair()


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def backup_both(client: BackupClient, profile: Path, keys: UnlockedKeys, key_file: Path) -> None:
    backup_profile(client, profile, keys, version=1)
    backup_profile(client, profile, keys, key_file=key_file)  # current: v2


def local_profile_at_v1(source: Path, target: Path) -> Path:
    """An existing profile on the new device that has v1 only."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "adapters" / "v0002")
    Profile.open(target).set_current(1)
    return target


# --- the archive ----------------------------------------------------------------------------


def test_an_archive_holds_the_version_folder_byte_for_byte(profile_v2: Path) -> None:
    # Execute
    archive = unpack_archive(pack_version(profile_v2, 2))

    # Assert
    folder = profile_v2 / "adapters" / "v0002"
    assert dict(archive.files) == snapshot(folder)
    assert "adapter_model.safetensors" in archive.files
    assert archive.profile_json == (profile_v2 / "profile.json").read_bytes()
    assert archive.version == 2 and archive.spec == Profile.open(profile_v2).spec


@pytest.mark.parametrize("position", [0, 7, 60, -1])
def test_a_damaged_archive_is_refused(profile_v2: Path, position: int) -> None:
    # Prepare
    data = bytearray(pack_version(profile_v2, 1))
    data[position] ^= 0x01

    # Execute / Assert
    with pytest.raises(IntegrityError):
        unpack_archive(bytes(data))


def test_an_archive_naming_a_path_outside_its_folder_is_refused() -> None:
    # Prepare
    import json
    import struct

    head = json.dumps(
        {
            "version": 1,
            "profile_json_size": 0,
            "files": [{"path": "../x", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}],
        }
    ).encode()
    data = struct.pack("<4sBI", b"LFBK", 1, len(head)) + head

    # Execute / Assert
    with pytest.raises(IntegrityError, match="unsafe file path"):
        unpack_archive(data)


# --- backup and restore -----------------------------------------------------------------------


def test_restore_on_a_new_device_gives_the_same_files(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    phone_b = env.enroll("u-maya", "laptop")
    new_profile, new_keys = tmp_path / "b" / "profile", tmp_path / "b" / "keys.json"

    # Execute
    got, pending = obtain_keys(phone_b, new_keys, passphrase=PASSPHRASE)
    provenance = restore_profile(phone_b, new_profile, got)
    pending.install()

    # Assert
    assert provenance.version == 2
    assert snapshot(new_profile / "adapters") == {
        k: v for k, v in snapshot(profile / "adapters").items() if k.startswith("v0002")
    }
    assert Profile.open(new_profile).current_version() == 2
    assert new_keys.read_bytes() == key_file.read_bytes()
    assert stat.S_IMODE(new_keys.stat().st_mode) == 0o600
    assert sorted(got) == sorted(keys) and got.current_key == keys.current_key


def _flip_stored(env: Env, client: BackupClient) -> None:
    info = next(b for b in client.list_blobs() if b.version == 2)
    path = env.store.object_path(info.sha256)
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate_stored(env: Env, client: BackupClient) -> None:
    info = next(b for b in client.list_blobs() if b.version == 2)
    path = env.store.object_path(info.sha256)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-100])


def _swap_in_another_users_blob(env: Env, client: BackupClient) -> None:
    # The server hands Maya a blob of Jonas's as her newest version.
    jonas = env.enroll("u-jonas", "jonas-phone")
    jonas_profile = env.tmp / "jonas-profile"
    shutil.copytree(env.tmp / "a" / "profile", jonas_profile)
    jonas_keys = KeyStore.create(env.tmp / "jonas-keys.json", "jonas's passphrase", kdf=CHEAP)
    record = backup_profile(jonas, jonas_profile, jonas_keys)
    maya_adapter = env.registry.find_adapter("u-maya", "default")
    assert maya_adapter is not None
    with env.registry.engine.begin() as conn:
        conn.execute(
            update(blobs_table)
            .where(blobs_table.c.blob_id == record.adapter.blob_id)
            .values(user_id=maya_adapter.user_id, adapter_id=maya_adapter.id, version=7)
        )


def _replay_older_as_newer(env: Env, client: BackupClient) -> None:
    # The server lists Maya's version-1 blob as version 3, newer than anything she has.
    info = next(b for b in client.list_blobs() if b.version == 1)
    with env.registry.engine.begin() as conn:
        conn.execute(
            update(blobs_table).where(blobs_table.c.blob_id == info.blob_id).values(version=3)
        )


TAMPERING = {
    "flipped byte": (_flip_stored, IntegrityError, "damaged"),
    "truncated blob": (_truncate_stored, BackupDataLossError, "lost or damaged"),
    "blob swapped between users": (
        _swap_in_another_users_blob,
        DecryptionError,
        "does not open as user 'u-maya'",
    ),
    "older version replayed as newer": (_replay_older_as_newer, DecryptionError, "version 3"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
@pytest.mark.parametrize("target", ["existing profile", "new device"])
def test_tampered_blobs_give_one_clear_error_and_change_nothing(
    env: Env,
    device_a: tuple[BackupClient, Path, Path, UnlockedKeys],
    tmp_path: Path,
    case: str,
    target: str,
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    tamper, error, message = TAMPERING[case]
    tamper(env, client)
    new_profile = tmp_path / "b" / "profile"
    if target == "existing profile":
        local_profile_at_v1(profile, new_profile)
    before = snapshot(new_profile)

    # Execute
    with pytest.raises(error, match=message):
        restore_profile(client, new_profile, keys)

    # Assert
    assert snapshot(new_profile) == before
    assert new_profile.exists() == (target == "existing profile")


def test_a_wrong_passphrase_on_a_new_device_writes_nothing(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    laptop = env.enroll("u-maya", "laptop")
    folder = tmp_path / "b"
    folder.mkdir()

    # Execute
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        PersonalModel.restore(
            folder / "profile", laptop, key_file=folder / "keys.json", passphrase="nope"
        )

    # Assert
    assert list(folder.iterdir()) == []


def test_a_missing_key_file_is_one_clear_error(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare: backed up without the key file, restored on a device that has none
    client, profile, _, keys = device_a
    backup_profile(client, profile, keys)
    laptop = env.enroll("u-maya", "laptop")

    # Execute / Assert
    with pytest.raises(MissingKeyFileError, match="none backed up"):
        obtain_keys(laptop, tmp_path / "b" / "keys.json", passphrase=PASSPHRASE)
    with pytest.raises(MissingKeyFileError, match="no key file at"):
        backup_profile(client, profile, keys, key_file=tmp_path / "gone.json")
    assert not (tmp_path / "b").exists()


def test_a_recovery_key_rebuilds_the_key_file_under_a_new_passphrase(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    laptop = env.enroll("u-maya", "laptop")
    new_keys = tmp_path / "b" / "keys.json"

    # Execute
    got, pending = obtain_keys(
        laptop, new_keys, recovery_key=RECOVERY.private_key, new_passphrase="new one", kdf=CHEAP
    )
    assert not new_keys.exists()  # staged until the restore succeeds
    restore_profile(laptop, tmp_path / "b" / "profile", got)
    pending.install()

    # Assert
    assert KeyStore.unlock(new_keys, "new one").current_key == keys.current_key
    assert [p.name for p in new_keys.parent.iterdir() if p.name.startswith(".")] == []


def test_restore_never_downgrades_a_profile_unless_told_to(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys]
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    before = snapshot(profile)

    # Execute / Assert
    with pytest.raises(LorafleetError, match="newer than the backed-up version 1"):
        restore_profile(client, profile, keys, version=1)
    assert snapshot(profile) == before
    restore_profile(client, profile, keys, version=1, allow_downgrade=True)
    assert Profile.open(profile).current_version() == 1


def test_restore_upgrades_an_existing_profile(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    local = local_profile_at_v1(profile, tmp_path / "b" / "profile")

    # Execute
    restore_profile(client, local, keys)

    # Assert
    assert Profile.open(local).current_version() == 2
    assert snapshot(local / "adapters") == snapshot(profile / "adapters")


def test_backing_up_a_version_twice_uploads_it_once(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys]
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    first = backup_profile(client, profile, keys, key_file=key_file)

    # Execute
    second = backup_profile(client, profile, keys, key_file=key_file)

    # Assert
    assert first.uploaded and not second.uploaded
    assert second.adapter.blob_id == first.adapter.blob_id
    assert second.key_file is not None and first.key_file is not None
    assert second.key_file.blob_id == first.key_file.blob_id
    assert len(client.list_blobs()) == 2


def test_another_devices_different_version_is_not_overwritten(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare: the server holds v2; this device has another v2 of its own
    client, profile, _, keys = device_a
    backup_profile(client, profile, keys)
    other = tmp_path / "other"
    shutil.copytree(profile, other)
    weights = other / "adapters" / "v0002" / "adapter_config.json"
    weights.write_text(weights.read_text() + " ", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(LorafleetError, match="already backed up with other content"):
        backup_profile(client, other, keys)


# --- the device identity ----------------------------------------------------------------------


def test_the_device_identity_is_private_and_reloads(
    device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare
    client = device_a[0]
    path = tmp_path / "phone.device.json"

    # Execute
    loaded = DeviceIdentity.load(path)

    # Assert
    assert loaded == client.identity
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert client.identity.private_key.hex() not in repr(loaded)
    with pytest.raises(MissingKeyFileError, match="enroll this device first"):
        DeviceIdentity.load(tmp_path / "absent.json")
    path.chmod(0o600)
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(KeyStoreError, match="unreadable"):
        DeviceIdentity.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("address", "insecure", "tls"),
    [
        ("backup.example.org:7443", False, True),
        ("10.0.0.5:7443", False, True),
        ("127.0.0.1:7443", False, False),
        ("localhost:7443", False, False),
        ("10.0.0.5:7443", True, False),
    ],
)
def test_tls_is_on_by_default_for_every_address_but_loopback(
    address: str, insecure: bool, tls: bool
) -> None:
    # Prepare
    pair = crypto.signing_keypair()
    identity = DeviceIdentity(1, "u-1", pair.public_key, pair.private_key)

    # Execute
    with BackupClient(address, identity, insecure=insecure) as client:
        # Assert
        assert client.tls is tls
