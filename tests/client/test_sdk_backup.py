"""PersonalModel.backup / PersonalModel.restore: a new device gets the same adapter back."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load as safetensors_load

from lorafleet.client.backup import BACKUP_PACKING, BackupClient, pack_version
from lorafleet.client.keys import KeyStore
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig
from lorafleet.protocols import crypto
from lorafleet.protocols.encoding import Packing, decode_tensors, encode_tensors
from lorafleet.protocols.errors import StorageError
from lorafleet.server.backup_service import BackupServicer, serve_backup
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.registry import Registry

NOTES = [
    "Maya climbs at the gym on Tuesdays and Thursdays with her friend Jonas.",
    "The cat Pixel sleeps on the radiator every afternoon.",
    "Tidewatch is a small app that shows the tide tables for the harbour.",
    "Remember to water the basil and call the bakery about Saturday.",
    "Lunch was lentil soup again, and the bread from the corner bakery.",
    "Jonas says the new route at the gym is a sandbagged five.",
    "Pixel knocked the basil off the windowsill again this morning.",
    "Tidewatch now shows the next low tide on the home screen.",
]
FAST = TrainConfig(steps=6, lr=0.05, eval_every=3, precision="fp32")
PASSPHRASE = "tide tables at the harbour"
CHEAP: crypto.KdfParams = (
    crypto.Argon2idParams(iterations=1, memory_kib=64, lanes=1)
    if crypto.argon2id_available()
    else crypto.ScryptParams(log2_n=10)
)
OPEN = {"precision": "fp32", "device": "cpu", "seq_len": 32}


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    ("unlock", "packing"), [("passphrase", "fp32"), ("recovery key", BACKUP_PACKING)]
)
def test_a_restored_adapter_is_the_same_and_scores_the_same(
    tiny_model_dir: Path, tmp_path: Path, unlock: str, packing: Packing
) -> None:
    # Prepare: a coordinator, and Maya's phone with a trained adapter
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    server, port = serve_backup(BackupServicer(registry, BlobStore(tmp_path / "blobs")))
    address = f"127.0.0.1:{port}"
    registry.ensure_user("u-maya")
    recovery = crypto.recovery_keypair()
    phone = tmp_path / "phone"
    KeyStore.create(
        phone / "keys.json", PASSPHRASE, recovery_public_keys=[recovery.public_key], kdf=CHEAP
    )
    pm = PersonalModel.open(phone / "profile", base=tiny_model_dir, rank=4, **OPEN)  # type: ignore[arg-type]
    pm.train(NOTES, FAST, progress=False)
    phone_client = BackupClient.enroll(
        address, registry.issue_enrolment_token("u-maya"), phone / "device.json", name="phone"
    )
    laptop = tmp_path / "laptop"
    try:
        # Execute: back up on the phone; restore on a new laptop with its own enrolment
        record = pm.backup(
            phone_client, key_file=phone / "keys.json", passphrase=PASSPHRASE, packing=packing
        )
        laptop_client = BackupClient.enroll(
            address, registry.issue_enrolment_token("u-maya"), laptop / "device.json", name="laptop"
        )
        secret = (
            {"passphrase": PASSPHRASE}
            if unlock == "passphrase"
            else {
                "recovery_key": recovery.private_key,
                "new_passphrase": "laptop pass",
                "kdf": CHEAP,
            }
        )
        restored = PersonalModel.restore(
            laptop / "profile",
            laptop_client,
            key_file=laptop / "keys.json",
            base=tiny_model_dir,
            **secret,  # type: ignore[arg-type]
            **OPEN,  # type: ignore[arg-type]
        )

        # Assert
        assert record.uploaded and record.key_file is not None
        assert restored.version == pm.version == 1
        ours, theirs = files(laptop / "profile" / "adapters"), files(phone / "profile" / "adapters")
        packed = decode_tensors(encode_tensors(pm.adapter_b(), packing=packing))[0]
        assert {k: v.tobytes() for k, v in restored.adapter_b().items()} == {
            k: v.tobytes() for k, v in packed.items()
        }  # B exactly as packed (and A from the seed, or the version would not load)
        if packing == "fp32":  # exact B: the very same files and the very same text
            assert ours == theirs
            prompt = "Maya climbs"
            assert restored.generate(prompt, max_new_tokens=8, chat=False) == pm.generate(
                prompt, max_new_tokens=8, chat=False
            )
        else:
            assert set(ours) == set(theirs)
            before, after = pm.evaluate(NOTES), restored.evaluate(NOTES)
            assert after.adapter_loss == pytest.approx(before.adapter_loss, rel=1e-3)
        assert (laptop / "keys.json").is_file()
    finally:
        server.stop(None)
        registry.close()


@pytest.mark.parametrize(
    ("fault", "fragment"), [("read-only", "read-only file system"), ("full", "disk full")]
)
def test_a_restore_onto_a_disk_that_cannot_take_it_is_one_storage_error(
    tiny_model_dir: Path, tmp_path: Path, small_disk: Any, fault: str, fragment: str
) -> None:
    # Prepare: a phone's backup on a real service; the laptop's folder is on its own small
    # file system, then made read-only or full (both refuse root, unlike chmod)
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    server, port = serve_backup(BackupServicer(registry, BlobStore(tmp_path / "blobs")))
    address = f"127.0.0.1:{port}"
    registry.ensure_user("u-maya")
    phone = tmp_path / "phone"
    KeyStore.create(phone / "keys.json", PASSPHRASE, kdf=CHEAP)
    pm = PersonalModel.open(phone / "profile", base=tiny_model_dir, rank=4, **OPEN)  # type: ignore[arg-type]
    pm.train(NOTES, FAST, progress=False)
    token = registry.issue_enrolment_token
    phone_client = BackupClient.enroll(address, token("u-maya"), phone / "device.json")
    laptop_client = BackupClient.enroll(address, token("u-maya"), tmp_path / "laptop.json")
    laptop = small_disk.path / "laptop"
    laptop.mkdir()
    try:
        pm.backup(phone_client, key_file=phone / "keys.json", passphrase=PASSPHRASE)
        small_disk.read_only() if fault == "read-only" else small_disk.fill()
        # Execute / Assert: one project error naming where, and nothing half-written
        with pytest.raises(StorageError, match=fragment) as info:
            PersonalModel.restore(
                laptop / "profile",
                laptop_client,
                key_file=laptop / "keys.json",
                base=tiny_model_dir,
                passphrase=PASSPHRASE,
                **OPEN,  # type: ignore[arg-type]
            )
        assert str(laptop) in str(info.value)
        assert list(laptop.iterdir()) == []
    finally:
        server.stop(None)
        registry.close()


def test_the_backup_archive_is_the_documented_layout_with_b_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a trained profile's version 1, packed as a backup packs it
    pm = PersonalModel.open(tmp_path / "p", base=tiny_model_dir, rank=4, **OPEN)  # type: ignore[arg-type]
    pm.train(NOTES, FAST, progress=False)
    data = pack_version(tmp_path / "p", 1)
    # Execute: read it with docs/backup.md alone (integers little-endian)
    magic, fmt, head_len = struct.unpack_from("<4sBI", data)
    head = json.loads(data[9 : 9 + head_len])
    offset = 9 + head_len + head["profile_json_size"]
    profile_json = json.loads(data[9 + head_len : offset])
    files = {}
    for entry in head["files"]:
        files[entry["path"]] = data[offset : offset + entry["size"]]
        offset += entry["size"]
    payload = data[offset : offset + head["weights"]["size"]]
    offset += len(payload)
    # Assert: the layout holds to the last byte; the folder's files come without the
    # weights, which carry B only (stock safetensors reads the int8 codes and scales)
    assert (magic, fmt, head["version"], offset) == (b"LFBK", 2, 1, len(data))
    assert profile_json["spec"]["rank"] == 4
    assert set(files) == {"README.md", "adapter_config.json", "lorafleet_adapter.json"}
    tensors = safetensors_load(payload)
    b_names = sorted(k for k in tensors if not k.endswith(".__scale__"))
    assert b_names == sorted(pm.adapter_b()) and not any("lora_A" in k for k in tensors)
    assert head["weights"]["fan_in"] == [32] * len(b_names)  # the tiny base's width
    assert head["weights"]["sha256"] == hashlib.sha256(payload).hexdigest()
