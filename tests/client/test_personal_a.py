"""A personal A: trained on the device with B, saved, verified, reloaded, never leaked.

The federation shares B only and every device rebuilds the same seeded A; the final
personalization may also train A (``TrainConfig.a_lr``, ``RoundInstruction.personal_a_lr``).
Such a version must keep its A wherever the adapter goes (profile, SDK, exports), be
refused when its A was tampered with, and never leave its A in a warm worker that serves
the next user.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorafleet.client import federated
from lorafleet.client.adapter import (
    WEIGHTS_FILE,
    get_a,
    get_b,
    has_seeded_a,
    materialize,
    read_adapter,
    seeded_a,
    set_a,
)
from lorafleet.client.archive import (
    pack_version,
    pack_version_v1,
    same_adapter_files,
    unpack_archive,
)
from lorafleet.client.base import load_base
from lorafleet.client.data import Example, TokenBlocks, encode_blocks
from lorafleet.client.federated import DeviceData, blend_with_prior, run_round
from lorafleet.client.layout import read_provenance
from lorafleet.client.profile import Profile
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import LocalTrainer, TrainConfig, train_adapter
from lorafleet.protocols.encoding import Packing, encode_tensors, max_abs_error_bound
from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.spec import AdapterSpec
from tests.client.test_train import NOTES


def setup(tiny_model_dir: Path) -> tuple[Any, AdapterSpec, TokenBlocks]:
    base = load_base(tiny_model_dir)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=base.sha256, rank=4, alpha=8)
    model = materialize(base.model, spec, base_sha256=base.sha256)
    blocks = encode_blocks([Example(text=t) for t in NOTES], base.tokenizer, seq_len=32)
    return model, spec, blocks


def random_a(model: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in get_a(model).items()}


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp32-lean"])
def test_a_lr_trains_a_with_b_and_leaves_a_frozen_after(
    tiny_model_dir: Path, precision: str
) -> None:
    # Prepare: the lean path (qtrain) must read A live for A to train through it
    model, spec, blocks = setup(tiny_model_dir)
    config = TrainConfig(steps=12, lr=5e-2, a_lr=1e-2, eval_every=4, precision=precision)  # type: ignore[arg-type]

    # Execute
    result = train_adapter(model, blocks, blocks, config)

    # Assert: A moved off the seed, training helped, and A is frozen again
    assert not has_seeded_a(model, spec)
    assert result.heldout_loss_after < result.heldout_loss_before
    assert all(not a.requires_grad for n, a in model.named_parameters() if "lora_A" in n)
    assert all(b.requires_grad for n, b in model.named_parameters() if "lora_B" in n)


def test_without_a_lr_a_stays_the_seeded_one(tiny_model_dir: Path) -> None:
    model, spec, blocks = setup(tiny_model_dir)
    train_adapter(model, blocks, blocks, TrainConfig(steps=4, lr=5e-2, precision="fp32"))
    assert has_seeded_a(model, spec)


def test_a_trains_at_its_own_rate_and_a_restart_scales_both(tiny_model_dir: Path) -> None:
    model, _, _ = setup(tiny_model_dir)
    config = TrainConfig(lr=4e-2, a_lr=1e-3, warmup_steps=0, precision="fp32")
    trainer = LocalTrainer(model, config)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [4e-2, 1e-3]
    trainer.restart(2e-2)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [2e-2, 5e-4]


def test_the_best_a_comes_back_with_the_best_b(tiny_model_dir: Path) -> None:
    # Prepare: a rate that overshoots, so the best state is an early one
    model, _, blocks = setup(tiny_model_dir)
    config = TrainConfig(steps=6, lr=5.0, a_lr=5.0, eval_every=1, patience=0, precision="fp32")
    seen: list[tuple[float, dict[str, np.ndarray]]] = []
    real = LocalTrainer.evaluate

    def evaluate(self: LocalTrainer, held: TokenBlocks) -> float:
        loss = real(self, held)
        seen.append((loss, get_a(self.model)))
        return loss

    # Execute
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalTrainer, "evaluate", evaluate)
        result = train_adapter(model, blocks, blocks, config)

    # Assert: the model holds the A of the best evaluation
    best_a = min(seen, key=lambda s: s[0])[1]
    assert result.heldout_loss_after == pytest.approx(min(s[0] for s in seen))
    assert all(np.array_equal(get_a(model)[k], best_a[k]) for k in best_a)


def test_a_bad_a_lr_is_one_clear_error() -> None:
    with pytest.raises(SpecError, match="a_lr must be >= 0"):
        TrainConfig(a_lr=-1e-3)


# --- storage ------------------------------------------------------------------------------


def test_a_personal_a_is_saved_hashed_and_read_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    model, spec, _ = setup(tiny_model_dir)
    a = random_a(model, 1)
    set_a(model, spec, a)
    profile = Profile.create(tmp_path / "p", spec, base_source=str(tiny_model_dir))

    # Execute
    saved = profile.save(model, get_b(model), a=a)
    provenance, b, got = profile.read(saved.version)

    # Assert
    assert provenance.personal_a and saved.personal_a
    assert got is not None and all(np.array_equal(got[k], a[k]) for k in a)
    assert b.keys() == a.keys()


def test_a_seeded_version_keeps_its_old_file_and_hash(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, spec, _ = setup(tiny_model_dir)
    profile = Profile.create(tmp_path / "p", spec, base_source=str(tiny_model_dir))
    saved = profile.save(model, get_b(model))
    raw = json.loads((profile.version_dir(saved.version) / "lorafleet_adapter.json").read_text())
    assert "personal_a" not in raw and not saved.personal_a
    assert profile.read(saved.version)[2] is None


def test_a_trained_a_saved_as_seeded_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, spec, _ = setup(tiny_model_dir)
    set_a(model, spec, random_a(model, 2))
    profile = Profile.create(tmp_path / "p", spec, base_source=str(tiny_model_dir))
    with pytest.raises(IntegrityError, match="personal_a=True"):
        profile.save(model, get_b(model))


def test_a_tampered_personal_a_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a saved personal-A version whose A is then changed on disk
    from safetensors.numpy import load_file, save_file

    model, spec, _ = setup(tiny_model_dir)
    a = random_a(model, 3)
    set_a(model, spec, a)
    profile = Profile.create(tmp_path / "p", spec, base_source=str(tiny_model_dir))
    version = profile.save(model, get_b(model), a=a).version
    path = profile.version_dir(version) / WEIGHTS_FILE
    tensors = load_file(str(path))
    key = next(k for k in tensors if ".lora_A." in k)
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(path))

    # Execute / Assert
    with pytest.raises(IntegrityError, match="content hash"):
        profile.read(version)


def _personal_a_profile(tiny_model_dir: Path, root: Path) -> tuple[int, Any, Any]:
    pm = PersonalModel.open(root, base=tiny_model_dir, rank=4, precision="fp32")
    a = random_a(pm.model, 4)
    b = {k: np.full_like(v, 0.01) for k, v in pm.adapter_b().items()}
    pm.load_b(b, a)
    return pm.save().version, a, b


def _restore(archive: Any, folder: Path) -> tuple[Any, Any]:
    folder.mkdir()
    for name, data in archive.files.items():
        (folder / name).write_bytes(data)
    return read_adapter(folder, read_provenance(folder))


@pytest.mark.parametrize("packing", ["fp32", "int8"])
def test_a_personal_a_travels_packed_with_b_in_a_backup_archive(
    tiny_model_dir: Path, tmp_path: Path, packing: Packing
) -> None:
    # Prepare
    version, a, b = _personal_a_profile(tiny_model_dir, tmp_path / "p")
    whole = len(pack_version_v1(tmp_path / "p", version))

    # Execute
    data = pack_version(tmp_path / "p", version, packing=packing)
    archive = unpack_archive(data)
    got_b, got_a = _restore(archive, tmp_path / "restored")

    # Assert: format 3 (no seed rebuilds a trained A); exact in fp32, within the bound in int8
    assert archive.format == 3 and archive.packing == packing
    assert got_a is not None and sorted(got_a) == sorted(a)
    for want, got in ((a, got_a), (b, got_b)):
        for k in want:
            bound = max_abs_error_bound(want[k], packing)
            assert np.max(np.abs(got[k].astype(np.float64) - want[k])) <= bound, k
    if packing == "fp32":
        assert (
            archive.files[WEIGHTS_FILE]
            == (Profile.open(tmp_path / "p").version_dir(version) / WEIGHTS_FILE).read_bytes()
        )
    else:
        # A and B in int8 against both in fp32 (the folder's small files aside; on this
        # tiny model the headers weigh, bench/backup_size.py measures the real ratio)
        sizes = _split(data)[0]["weights"]
        assert len(data) < whole
        assert sizes["size"] + sizes["a"]["size"] < 0.75 * len(archive.files[WEIGHTS_FILE])
    # the same version again is "the same" (nothing is uploaded twice), a changed A is not
    mine = {
        p.name: p.read_bytes() for p in Profile.open(tmp_path / "p").version_dir(version).iterdir()
    }
    assert same_adapter_files(mine, archive.files, packings=("fp32", packing))
    other_a = {k: v + 0.05 for k, v in got_a.items()}
    blob = unpack_archive(_swap_a(data, other_a, packing))
    assert not same_adapter_files(mine, blob.files, packings=("fp32", packing))


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """An archive's header and the bytes after it."""
    (size,) = struct.unpack_from("<I", data, 5)
    return json.loads(data[9 : 9 + size]), data[9 + size :]


def _join(fmt: int, head: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(head).encode()
    return struct.pack("<4sBI", b"LFBK", fmt, len(raw)) + raw + body


def _packed_a(a: dict[str, np.ndarray], packing: Packing) -> tuple[dict[str, Any], bytes]:
    """Format 3's A section (transposed, as the archive packs it) and its header entry."""
    payload = encode_tensors({k: v.T for k, v in a.items()}, packing=packing)
    return {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}, payload


def _swap_a(data: bytes, a: dict[str, np.ndarray], packing: Packing) -> bytes:
    """The archive with another A, every size and sha256 made to agree."""
    head, body = _split(data)
    body = body[: len(body) - head["weights"]["a"]["size"]]
    head["weights"]["a"], payload = _packed_a(a, packing)
    return _join(data[4], head, body + payload)


def test_an_archive_that_mixes_up_seeded_and_personal_a_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a personal-A version (format 3) and a seeded one (format 2) of one profile
    version, a, _ = _personal_a_profile(tiny_model_dir, tmp_path / "p")
    data = pack_version(tmp_path / "p", version)
    head, body = _split(data)
    a_entry = head["weights"].pop("a")
    # format 3 relabelled as 2, the A payload dropped: a personal A claimed, B only carried
    as_v2 = _join(2, head, body[: -a_entry["size"]])
    # an A whose shapes are another rank's
    wrong_shape = _swap_a(
        data, {k: np.zeros((5, v.shape[1]), np.float32) for k, v in a.items()}, "int8"
    )
    # an A payload packed otherwise than B
    other_packing = _swap_a(data, a, "fp16")
    # a seeded-A version's archive (format 2) with an A appended and the format set to 3
    pm = PersonalModel.open(tmp_path / "p", precision="fp32")
    pm.load_b(pm.adapter_b())
    seeded = pack_version(tmp_path / "p", pm.save().version)
    head3, body3 = _split(seeded)
    head3["weights"]["a"], payload = _packed_a(a, "int8")
    seeded_with_a = _join(3, head3, body3 + payload)

    # Execute / Assert: one line each
    with pytest.raises(IntegrityError, match="carries B only"):
        unpack_archive(as_v2)
    with pytest.raises(IntegrityError, match=r"packed with shape .*, not \(\d+, 4\)"):
        unpack_archive(wrong_shape)
    with pytest.raises(IntegrityError, match="packs A and B differently"):
        unpack_archive(other_packing)
    assert unpack_archive(seeded).format == 2
    with pytest.raises(IntegrityError, match="says A comes from the seed"):
        unpack_archive(seeded_with_a)


def test_the_sdk_reloads_a_personal_a_and_load_b_alone_resets_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    pm = PersonalModel.open(tmp_path / "p", base=tiny_model_dir, rank=4, precision="fp32")
    a = random_a(pm.model, 5)
    pm.load_b(pm.adapter_b(), a)
    pm.save()

    # Execute
    again = PersonalModel.open(tmp_path / "p", precision="fp32")
    loaded = again.adapter_a()
    again.load_b(again.adapter_b())

    # Assert
    assert loaded is not None and all(np.array_equal(loaded[k], a[k]) for k in a)
    assert again.adapter_a() is None  # a prior's B goes with the seeded A


# --- the device's round -------------------------------------------------------------------


def test_the_blend_moves_a_along_with_b(tiny_model_dir: Path) -> None:
    # Prepare: trained = prior + delta on both A and B; the prior's A is the seeded one
    model, spec, _ = setup(tiny_model_dir)
    prior_b = {k: np.zeros_like(v) for k, v in get_b(model).items()}
    prior_a = seeded_a(model, spec)
    trained_a = random_a(model, 6)
    set_a(model, spec, trained_a)
    seen: list[dict[str, np.ndarray]] = []

    def loss() -> float:
        seen.append(get_a(model))
        return 1.0 if len(seen) != 2 else 0.5  # the second candidate (weight 0.5) wins

    # Execute
    _, weight = blend_with_prior(model, prior_b, 2.0, 2.0, loss, prior_a=prior_a)

    # Assert
    assert weight == 0.5
    got = get_a(model)
    for k in got:
        np.testing.assert_allclose(
            got[k], prior_a[k] + 0.5 * (trained_a[k] - prior_a[k]), rtol=1e-6
        )


NOTE_TEXT = "\n\n".join(
    f"Note {i}: Maya climbs with Jonas and feeds the cat Pixel." for i in range(12)
)


def test_a_personalize_round_saves_a_personal_a_and_the_worker_forgets_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr(federated, "_WORKERS", {})
    (tmp_path / "notes.txt").write_text(NOTE_TEXT)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=load_base(tiny_model_dir).sha256, rank=4)
    instr = RoundInstruction(
        round=1,
        spec=spec,
        prior_version="zero",
        mode="personalize",
        personal_steps=8,
        prior_steps=0,
        lr=1e-3,
        personal_lr=5e-2,
        personal_a_lr=2e-2,
        seq_len=32,
        blend=False,
    )
    kwargs: dict[str, Any] = {
        "base_source": str(tiny_model_dir),
        "precision": "fp32",
        "device": "cpu",
    }

    # Execute
    run_round(instr, None, DeviceData.from_path(tmp_path / "notes.txt"), tmp_path / "p", **kwargs)
    evaluated = run_round(
        RoundInstruction(round=1, spec=spec, prior_version="zero", mode="evaluate", seq_len=32),
        None,
        DeviceData.from_path(tmp_path / "notes.txt"),
        tmp_path / "p",
        **kwargs,
    )[1]

    # Assert: the version has its own A, the evaluate round scored it (not the seeded A),
    # and the warm worker went back to the seeded A
    profile = Profile.open(tmp_path / "p")
    provenance, _, a = profile.read(profile.current_version() or 0)
    assert provenance.personal_a and a is not None
    assert provenance.metrics["personal_a"] == 1.0
    assert evaluated.personal_loss == pytest.approx(provenance.metrics["personal_loss"], rel=1e-4)
    (worker,) = federated._WORKERS.values()
    assert has_seeded_a(worker.model, spec)


def test_personal_a_lr_is_optional_on_the_wire_and_checked() -> None:
    spec = AdapterSpec(base_model_id="m", base_sha256="0" * 64)
    config = RoundInstruction(round=1, spec=spec, prior_version="zero").to_config()
    del config["personal-a-lr"]
    assert RoundInstruction.from_config(config).personal_a_lr == 0.0
    for bad in (-1e-3, 1.0, float("nan")):
        with pytest.raises(SpecError, match="personal_a_lr"):
            RoundInstruction.from_config({**config, "personal-a-lr": bad})


def test_a_model_with_a_personal_a_is_not_seeded(tiny_model_dir: Path) -> None:
    model, spec, _ = setup(tiny_model_dir)
    assert has_seeded_a(model, spec)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1e-3)
    assert not has_seeded_a(model, spec)
    set_a(model, spec, None)
    assert has_seeded_a(model, spec)
