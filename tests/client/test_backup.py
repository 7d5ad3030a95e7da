"""Backup and restore of a profile through a real loopback backup server.

Each attack or mistake the issue names (a flipped byte, a truncated blob, a blob swapped
between two users, an older version replayed as newer, a wrong passphrase, a missing
key file) must give one clear error and leave the local profile and key file exactly as
they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save
from sqlalchemy import update

from lorafleet.client.adapter import PROVENANCE_FILE, WEIGHTS_FILE, b_content_hash
from lorafleet.client.archive import pack_version_v1
from lorafleet.client.backup import (
    BACKUP_PACKING,
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
from lorafleet.protocols.encoding import (
    Packing,
    decode_tensors,
    encode_tensors,
    max_abs_error_bound,
)
from lorafleet.protocols.envelope import BlobContext, new_blob_id, seal_blob
from lorafleet.protocols.errors import (
    DecryptionError,
    IntegrityError,
    KeyFileRollbackError,
    KeyFileTamperedError,
    KeyStoreError,
    LorafleetError,
    MissingKeyFileError,
    WrongPassphraseError,
)
from lorafleet.protocols.provenance import AdapterProvenance
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


def weights(files: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    return dict(safetensors_load(files[WEIGHTS_FILE]))


def assert_same_adapter(
    restored: Mapping[str, bytes], original: Mapping[str, bytes], packing: Packing
) -> None:
    """Same files; all but weights and provenance byte for byte; A exact; B as packed."""
    assert set(restored) == set(original)
    for name in set(original) - {WEIGHTS_FILE, PROVENANCE_FILE}:
        assert restored[name] == original[name], name
    got, want = weights(restored), weights(original)
    assert set(got) == set(want)
    b = {}
    for key, value in want.items():
        if ".lora_A." in key:
            assert got[key].tobytes() == value.tobytes(), key  # rebuilt from the seed
        else:
            assert np.abs(got[key].astype(np.float64) - value).max() <= max_abs_error_bound(
                value, packing
            )
            b[key[len("base_model.model.") : -len(".lora_B.weight")]] = got[key]
    old = AdapterProvenance.from_json(original[PROVENANCE_FILE].decode())
    new = AdapterProvenance.from_json(restored[PROVENANCE_FILE].decode())
    assert new.content_hash == b_content_hash(new.spec, b)  # the hash of what it holds
    assert dataclasses.replace(new, content_hash="") == dataclasses.replace(old, content_hash="")


@pytest.mark.parametrize("packing", ["fp32", "fp16", "int8"])
def test_an_archive_carries_b_only_and_rebuilds_the_version_folder(
    profile_v2: Path, packing: Packing
) -> None:
    # Prepare
    folder = profile_v2 / "adapters" / "v0002"
    original = snapshot(folder)

    # Execute
    data = pack_version(profile_v2, 2, packing=packing)
    archive = unpack_archive(data)

    # Assert
    assert data[4] == 2 and archive.format == 2 and archive.packing == packing
    assert_same_adapter(archive.files, original, packing)
    if packing == "fp32":  # exact B: the very same folder, byte for byte
        assert dict(archive.files) == original
    b_bytes = sum(v.nbytes for k, v in weights(original).items() if ".lora_B." in k)
    assert len(data) < len(pack_version_v1(profile_v2, 2)) - b_bytes  # A is not carried
    assert archive.profile_json == (profile_v2 / "profile.json").read_bytes()
    assert archive.version == 2 and archive.spec == Profile.open(profile_v2).spec


def test_a_format_1_archive_still_unpacks_to_the_folder_byte_for_byte(profile_v2: Path) -> None:
    # Execute
    data = pack_version_v1(profile_v2, 2)
    archive = unpack_archive(data)

    # Assert
    assert data[4] == 1 and archive.format == 1 and archive.packing == "fp32"
    assert dict(archive.files) == snapshot(profile_v2 / "adapters" / "v0002")


def test_a_rebuilt_folder_loads_with_stock_peft(
    profile_v2: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    archive = unpack_archive(pack_version(profile_v2, 2))
    for name, data in archive.files.items():
        (tmp_path / name).write_bytes(data)

    # Execute
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path
    )

    # Assert
    loaded = {k: v.detach().numpy() for k, v in model.state_dict().items() if ".lora_" in k}
    expected = weights(archive.files)
    assert len(loaded) == len(expected)
    for key, value in expected.items():
        peft_key = key.replace(".weight", ".default.weight")
        assert np.array_equal(loaded[peft_key], value), key


def split_v2(data: bytes) -> tuple[dict[str, Any], bytes, list[bytes], bytes]:
    """Header, profile.json, files and B payload of a format-2 archive."""
    (size,) = struct.unpack_from("<I", data, 5)
    head = json.loads(data[9 : 9 + size])
    pos = 9 + size
    profile_json = data[pos : pos + head["profile_json_size"]]
    pos += len(profile_json)
    blobs = []
    for entry in head["files"]:
        blobs.append(data[pos : pos + entry["size"]])
        pos += entry["size"]
    return head, profile_json, blobs, data[pos:]


def join_v2(head: dict[str, Any], profile_json: bytes, blobs: list[bytes], payload: bytes) -> bytes:
    """A format-2 archive whose sizes and sha256s all agree: only its content is wrong."""
    head = {**head, "profile_json_size": len(profile_json)}
    head["files"] = [
        {"path": e["path"], "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
        for e, b in zip(head["files"], blobs, strict=True)
    ]
    head["weights"] = {
        **head["weights"],
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    raw = json.dumps(head).encode()
    return b"".join(
        [struct.pack("<4sBI", b"LFBK", 2, len(raw)), raw, profile_json, *blobs, payload]
    )


def _with_b(edit: Callable[[dict[str, np.ndarray], list[int]], None]) -> Callable[..., bytes]:
    def craft(
        head: dict[str, Any], profile_json: bytes, blobs: list[bytes], payload: bytes
    ) -> bytes:
        b = decode_tensors(payload)[0]
        fan_in = list(head["weights"]["fan_in"])
        edit(b, fan_in)
        head["weights"]["fan_in"] = fan_in
        return join_v2(head, profile_json, blobs, encode_tensors(b, packing="int8"))

    return craft


def _extra_module(b: dict[str, np.ndarray], fan_in: list[int]) -> None:
    b["model.layers.0.mlp.up_proj"] = np.zeros((64, 4), np.float32)
    fan_in.append(32)


def _other_rank(b: dict[str, np.ndarray], fan_in: list[int]) -> None:
    name = sorted(b)[0]
    b[name] = np.zeros((b[name].shape[0], 5), np.float32)


def _unsafe_name(b: dict[str, np.ndarray], fan_in: list[int]) -> None:
    name = sorted(b)[-1]
    b["model..q_proj"] = b.pop(name)


def _short_widths(b: dict[str, np.ndarray], fan_in: list[int]) -> None:
    fan_in.pop()


def _absurd_width(b: dict[str, np.ndarray], fan_in: list[int]) -> None:
    fan_in[0] = 1 << 40


def _weights_listed_as_a_file(
    head: dict[str, Any], profile_json: bytes, blobs: list[bytes], payload: bytes
) -> bytes:
    head["files"].append({"path": WEIGHTS_FILE})
    return join_v2(head, profile_json, [*blobs, b"x"], payload)


def _provenance_of_another_version(
    head: dict[str, Any], profile_json: bytes, blobs: list[bytes], payload: bytes
) -> bytes:
    i = [e["path"] for e in head["files"]].index(PROVENANCE_FILE)
    record = json.loads(blobs[i])
    record["version"], record["parent"] = 1, None
    blobs[i] = json.dumps(record).encode()
    return join_v2(head, profile_json, blobs, payload)


def _spec_of_another_rank(
    head: dict[str, Any], profile_json: bytes, blobs: list[bytes], payload: bytes
) -> bytes:
    record = json.loads(profile_json)
    record["spec"]["rank"] = 8
    return join_v2(head, json.dumps(record).encode(), blobs, payload)


HOSTILE = {
    "B for a module the spec does not target": (_with_b(_extra_module), "do not name"),
    "B of another rank": (_with_b(_other_rank), r"not \(out_features, 4\)"),
    "an unsafe module path": (_with_b(_unsafe_name), "do not name"),
    "fewer input widths than B matrices": (_with_b(_short_widths), "widths do not match"),
    "an absurd input width": (_with_b(_absurd_width), "input width of"),
    "the weights file among the plain files": (_weights_listed_as_a_file, "twice"),
    "the provenance of another version": (_provenance_of_another_version, "version 1 of another"),
    "a spec of another rank": (_spec_of_another_rank, "another spec"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_in_one_line(profile_v2: Path, case: str) -> None:
    # Prepare: well-formed bytes (sizes, sha256s agree) whose content does not fit the spec
    craft, message = HOSTILE[case]
    data = craft(*split_v2(pack_version(profile_v2, 2)))

    # Execute / Assert
    with pytest.raises(IntegrityError, match=message) as info:
        unpack_archive(data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("entry", ["a file", "the B matrices"])
def test_an_entry_listed_without_its_sha256_is_refused(profile_v2: Path, entry: str) -> None:
    # Prepare: a header that drops one sha256 (nothing to compare is not a match)
    head, profile_json, blobs, payload = split_v2(pack_version(profile_v2, 2))
    data = join_v2(head, profile_json, blobs, payload)
    (size,) = struct.unpack_from("<I", data, 5)
    head = json.loads(data[9 : 9 + size])
    del (head["files"][0] if entry == "a file" else head["weights"])["sha256"]
    raw = json.dumps(head).encode()
    data = struct.pack("<4sBI", b"LFBK", 2, len(raw)) + raw + data[9 + size :]

    # Execute / Assert
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        unpack_archive(data)


def test_the_crafting_helpers_leave_an_untouched_archive_valid(profile_v2: Path) -> None:
    # Guards the hostile cases above: they fail for their edit, not for the re-packing.
    data = pack_version(profile_v2, 2)
    assert unpack_archive(join_v2(*split_v2(data))).files == unpack_archive(data).files


@pytest.mark.parametrize("position", [0, 7, 60, -1])
def test_a_damaged_archive_is_refused(profile_v2: Path, position: int) -> None:
    # Prepare
    data = bytearray(pack_version(profile_v2, 1))
    data[position] ^= 0x01

    # Execute / Assert
    with pytest.raises(IntegrityError):
        unpack_archive(bytes(data))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("fmt", [1, 2])
def test_any_damage_to_an_archive_is_an_integrity_error_never_a_traceback(
    profile_v2: Path, fmt: int, data: st.DataObject
) -> None:
    # Prepare: flipped bytes anywhere (the JSON header included) or a truncation
    raw = bytearray(pack_version(profile_v2, 1) if fmt == 2 else pack_version_v1(profile_v2, 1))
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    for _ in range(data.draw(st.integers(1, 3), label="flips")):
        if raw:
            position = data.draw(st.integers(0, len(raw) - 1), label="position")
            raw[position] ^= data.draw(st.integers(1, 255), label="xor")

    # Execute / Assert: refused in one line, or (a flip that keeps the header's JSON and
    # every check intact, e.g. in a key's spelling it ignores) a checked archive
    try:
        archive = unpack_archive(bytes(raw))
    except IntegrityError as exc:
        assert "\n" not in str(exc)
    else:
        assert archive.version == 1 and WEIGHTS_FILE in archive.files


def test_a_folder_the_seed_cannot_rebuild_byte_for_byte_is_backed_up_whole(
    profile_v2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a weights file laid out otherwise than peft's (extra metadata)
    profile = tmp_path / "profile"
    shutil.copytree(profile_v2, profile)
    path = profile / "adapters" / "v0002" / WEIGHTS_FILE
    path.write_bytes(safetensors_save(safetensors_load(path.read_bytes()), metadata={"by": "x"}))

    # Execute
    data = pack_version(profile, 2)

    # Assert: format 1, restoring the very same files
    assert data[4] == 1
    assert dict(unpack_archive(data).files) == snapshot(profile / "adapters" / "v0002")
    assert "cannot be rebuilt from its seed" in caplog.text


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


def test_restore_on_a_new_device_gives_the_same_adapter(
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

    # Assert: the same adapter (A from the seed, B as packed), readable as a version
    assert provenance.version == 2
    assert [p.name for p in (new_profile / "adapters").iterdir()] == ["v0002"]
    restored = snapshot(new_profile / "adapters" / "v0002")
    assert_same_adapter(restored, snapshot(profile / "adapters" / "v0002"), BACKUP_PACKING)
    assert Profile.open(new_profile).current_version() == 2
    assert Profile.open(new_profile).read(2)[0] == provenance
    assert new_keys.read_bytes() == key_file.read_bytes()
    assert stat.S_IMODE(new_keys.stat().st_mode) == 0o600
    assert sorted(got) == sorted(keys) and got.current_key == keys.current_key


def _flip_stored(env: Env, client: BackupClient, keys: UnlockedKeys) -> None:
    info = next(b for b in client.list_blobs() if b.version == 2)
    path = env.store.object_path(info.sha256)
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate_stored(env: Env, client: BackupClient, keys: UnlockedKeys) -> None:
    info = next(b for b in client.list_blobs() if b.version == 2)
    path = env.store.object_path(info.sha256)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-100])


def _swap_in_another_users_blob(env: Env, client: BackupClient, keys: UnlockedKeys) -> None:
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


def _replay_older_as_newer(env: Env, client: BackupClient, keys: UnlockedKeys) -> None:
    # The server lists Maya's version-1 blob as version 3, newer than anything she has.
    info = next(b for b in client.list_blobs() if b.version == 1)
    with env.registry.engine.begin() as conn:
        conn.execute(
            update(blobs_table).where(blobs_table.c.blob_id == info.blob_id).values(version=3)
        )


def _serve_a_hostile_archive(env: Env, client: BackupClient, keys: UnlockedKeys) -> None:
    # An archive that opens (sealed with Maya's keys, as version 3) but holds a B for a
    # module the spec does not target: only the archive's own checks can stop it.
    profile = env.tmp / "a" / "profile"
    head, profile_json, blobs, payload = split_v2(pack_version(profile, 2))
    head["version"] = 3
    i = [e["path"] for e in head["files"]].index(PROVENANCE_FILE)
    blobs[i] = json.dumps({**json.loads(blobs[i]), "version": 3, "parent": 2}).encode()
    craft, _ = HOSTILE["B for a module the spec does not target"]
    _upload_archive(client, keys, profile, craft(head, profile_json, blobs, payload))


TAMPERING = {
    "flipped byte": (_flip_stored, IntegrityError, "damaged"),
    "truncated blob": (_truncate_stored, BackupDataLossError, "lost or damaged"),
    "blob swapped between users": (
        _swap_in_another_users_blob,
        DecryptionError,
        "does not open as user 'u-maya'",
    ),
    "older version replayed as newer": (_replay_older_as_newer, DecryptionError, "version 3"),
    "a hostile archive under the user's keys": (
        _serve_a_hostile_archive,
        IntegrityError,
        "do not name",
    ),
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
    tamper(env, client, keys)
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


# --- a malicious coordinator and the key file ---------------------------------------------


def _upload_as_newest(env: Env, data: bytes) -> None:
    """The coordinator stores ``data`` as Maya's newest key file.

    It needs no stolen credential: it issues enrolment tokens itself, so it enrols a
    device of its own for her and uploads through the real service.
    """
    rogue = env.enroll("u-maya", f"coordinator-{len(list(env.tmp.glob('coordinator-*')))}")
    info = rogue.put_blob(new_blob_id(), data, kind="keyfile")
    newest = next(b for b in rogue.list_blobs() if b.kind == "keyfile")
    assert newest.blob_id == info.blob_id  # what a restoring device fetches


def _plant_recovery_key(env: Env, *, strip_tag: bool = False) -> crypto.RecoveryKeyPair:
    """Append the coordinator's own X25519 recovery entry to Maya's stored key file."""
    reader = env.enroll("u-maya", "coordinator-reader")
    stored = next(b for b in reader.list_blobs() if b.kind == "keyfile")
    doc = json.loads(reader.get_blob(stored.blob_id, expected=stored))
    planted = crypto.recovery_keypair()
    store_id = bytes.fromhex(doc["store_id"])
    wraps = []
    for entry in doc["passphrase"]["keys"]:  # it cannot wrap her keys, so it wraps its own
        aad = b"lorafleet/keyfile/v1\x00" + store_id + entry["key_id"].to_bytes(4, "little")
        wrapped = crypto.wrap_for_recipient(planted.public_key, crypto.random_key(), aad)
        wraps.append({"key_id": entry["key_id"], "wrapped": wrapped.hex()})
    doc["recovery"].append({"public_key": planted.public_key.hex(), "keys": wraps})
    if strip_tag:  # pretend the file predates the tag
        del doc["recovery_tag"]
    _upload_as_newest(env, json.dumps(doc, indent=2, sort_keys=True).encode())
    return planted


@pytest.mark.parametrize("unlock_with", ["passphrase", "recovery key"])
def test_a_coordinator_that_plants_its_own_recovery_key_is_refused(
    env: Env,
    device_a: tuple[BackupClient, Path, Path, UnlockedKeys],
    tmp_path: Path,
    unlock_with: str,
) -> None:
    # Prepare
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    _plant_recovery_key(env)
    laptop = env.enroll("u-maya", "laptop")
    new_keys = tmp_path / "b" / "keys.json"
    how: dict[str, Any] = (
        {"passphrase": PASSPHRASE}
        if unlock_with == "passphrase"
        else {"recovery_key": RECOVERY.private_key, "new_passphrase": "new one", "kdf": CHEAP}
    )

    # Execute
    with pytest.raises(KeyFileTamperedError, match=r"recovery keys .* were changed") as info:
        obtain_keys(laptop, new_keys, **how)

    # Assert: one line, and no key file (staged or not) for a later rotate to use
    assert "\n" not in str(info.value)
    assert [p.name for p in new_keys.parent.iterdir()] == []


def test_rotate_refuses_a_key_file_with_a_planted_recovery_key(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare: the planted file copied onto a device by hand, past obtain_keys
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    _plant_recovery_key(env)
    laptop = env.enroll("u-maya", "laptop")
    newest = next(b for b in laptop.list_blobs() if b.kind == "keyfile")
    copied = tmp_path / "copied-keys.json"
    copied.write_bytes(laptop.get_blob(newest.blob_id, expected=newest))
    before = copied.read_bytes()

    # Execute / Assert: no new generation is wrapped for anyone
    with pytest.raises(KeyFileTamperedError, match="refusing it"):
        KeyStore.rotate(copied, PASSPHRASE)
    assert copied.read_bytes() == before


def test_a_planted_key_in_a_file_stripped_of_its_tag_never_gets_a_later_generation(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare: the coordinator also removes the tag, posing as a file from before it
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    planted = _plant_recovery_key(env, strip_tag=True)
    laptop = env.enroll("u-maya", "laptop")
    new_keys = tmp_path / "b" / "keys.json"

    # Execute: restore, rotate, back the new key file up (what the coordinator waits for)
    got, pending = obtain_keys(laptop, new_keys, passphrase=PASSPHRASE)
    restore_profile(laptop, tmp_path / "b" / "profile", got)
    pending.install()
    KeyStore.rotate(new_keys, PASSPHRASE)
    record = backup_profile(
        laptop, tmp_path / "b" / "profile", KeyStore.unlock(new_keys, PASSPHRASE), key_file=new_keys
    )

    # Assert: the unprovable recovery keys were dropped, so the new generation is
    # wrapped for nobody but the passphrase; the planted key opens nothing
    assert record.key_file is not None
    uploaded = tmp_path / "uploaded.json"
    uploaded.write_bytes(laptop.get_blob(record.key_file.blob_id, expected=record.key_file))
    assert KeyStore.info(uploaded).key_ids == (1, 2)
    assert KeyStore.info(uploaded).recovery_public_keys == ()
    with pytest.raises(KeyStoreError, match="not registered"):
        KeyStore.unlock_with_recovery(uploaded, planted.private_key)


def test_an_older_key_file_served_as_newest_is_a_rollback(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare: generation 1 backed up, then generation 2; the laptop restores (sees 2)
    client, profile, key_file, keys = device_a
    backup_both(client, profile, keys, key_file)
    generation_1 = key_file.read_bytes()
    KeyStore.rotate(key_file, PASSPHRASE)
    backup_profile(client, profile, KeyStore.unlock(key_file, PASSPHRASE), key_file=key_file)
    laptop = env.enroll("u-maya", "laptop")
    new_keys = tmp_path / "b" / "keys.json"
    got, pending = obtain_keys(laptop, new_keys, passphrase=PASSPHRASE)
    pending.install()
    assert sorted(got) == [1, 2]
    new_keys.unlink()  # the laptop loses its key file (its record of generations stays)
    _upload_as_newest(env, generation_1)  # the coordinator serves the old one as newest

    # Execute / Assert
    with pytest.raises(KeyFileRollbackError, match=r"generation 2 .* rollback"):
        obtain_keys(laptop, new_keys, passphrase=PASSPHRASE)
    assert not new_keys.exists()


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
    assert snapshot(local / "adapters" / "v0001") == snapshot(profile / "adapters" / "v0001")
    assert_same_adapter(
        snapshot(local / "adapters" / "v0002"),
        snapshot(profile / "adapters" / "v0002"),
        BACKUP_PACKING,
    )


def _upload_archive(
    client: BackupClient, keys: UnlockedKeys, profile: Path, plaintext: bytes
) -> None:
    """Seal and upload an archive as backup_profile does, whatever its plaintext."""
    spec = Profile.open(profile).spec
    version = json.loads(plaintext[9 : 9 + struct.unpack_from("<I", plaintext, 5)[0]])["version"]
    blob_id = new_blob_id()
    context = BlobContext(client.user, "default", version, spec.base_sha256, blob_id)
    sealed = seal_blob(keys.current_key, context, plaintext, key_id=keys.current_key_id)
    client.put_blob(blob_id, sealed, kind="adapter", adapter="default", version=version, spec=spec)


def test_an_archive_an_old_device_uploaded_still_restores_byte_for_byte(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare: version 2 backed up by the old code path (archive format 1)
    client, profile, _, keys = device_a
    _upload_archive(client, keys, profile, pack_version_v1(profile, 2))
    new_profile = tmp_path / "b" / "profile"

    # Execute
    provenance = restore_profile(env.enroll("u-maya", "laptop"), new_profile, keys)

    # Assert
    assert provenance.version == 2
    assert snapshot(new_profile / "adapters") == {
        k: v for k, v in snapshot(profile / "adapters").items() if k.startswith("v0002")
    }
    assert not backup_profile(client, profile, keys).uploaded  # the new format sees it as the same


def test_a_restored_device_backing_up_the_same_version_uploads_nothing(
    env: Env, device_a: tuple[BackupClient, Path, Path, UnlockedKeys], tmp_path: Path
) -> None:
    # Prepare: the laptop restores v2 (B as packed), then backs its profile up
    client, profile, _, keys = device_a
    first = backup_profile(client, profile, keys)
    laptop = env.enroll("u-maya", "laptop")
    restore_profile(laptop, tmp_path / "b" / "profile", keys)

    # Execute
    again = backup_profile(laptop, tmp_path / "b" / "profile", keys)

    # Assert
    assert not again.uploaded and again.adapter.blob_id == first.adapter.blob_id


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
