"""The device side of a gradient-aligned shared A: its sketch, and training on a checked A.

The sketch must be exactly ``G^T Omega`` of the base's own gradient (else the summed
sketch aims the cohort's A at the wrong directions), computed through whichever forward
the device trains with; and a device must train on the A the round names and no other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorafleet.client import federated
from lorafleet.client.adapter import adapter_layers, get_a, get_b, materialize, seeded_a
from lorafleet.client.base import load_base
from lorafleet.client.data import Example, encode_blocks
from lorafleet.client.federated import DeviceData, run_round
from lorafleet.client.layout import shared_a_path
from lorafleet.client.profile import Profile
from lorafleet.client.sketch import gradient_sketch
from lorafleet.client.train import cycle_batches
from lorafleet.protocols.encoding import encode_tensors
from lorafleet.protocols.errors import IntegrityError, LorafleetError
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.shared_a import (
    a_from_sketch,
    normalize_sketch,
    shared_a_digest,
    sketch_signs,
)
from lorafleet.protocols.spec import AdapterSpec
from tests.client.test_personal_a import NOTE_TEXT
from tests.client.test_train import NOTES


def _expected_sketch(
    tiny_model_dir: Path, spec: AdapterSpec, passes: int, batches: int, seed: int
) -> dict[str, np.ndarray]:
    """``G^T Omega`` from autograd on the base weights themselves, normalized as devices do."""
    base = load_base(tiny_model_dir)
    model = materialize(base.model, spec, base_sha256=base.sha256)
    blocks = encode_blocks([Example(text=t) for t in NOTES], base.tokenizer, seq_len=32)
    order = cycle_batches(blocks, 4, torch.Generator().manual_seed(seed))
    chosen = [next(order) for _ in range(batches)]
    weights = {p: b.weight for p, (_, b) in adapter_layers(model).items()}
    bases = {}
    for name, module in model.base_model.model.named_modules():
        if name in weights:
            bases[name] = module.base_layer.weight
            module.base_layer.weight.requires_grad_(True)
    with model.disable_adapter():
        for batch in chosen:
            out = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
            out.loss.backward()
    expected = {}
    for path, w in bases.items():
        omega = np.concatenate(
            [sketch_signs(spec, path, int(w.shape[0]), j) for j in range(passes)], axis=1
        )
        g = w.grad.detach().double().numpy()
        expected[path] = g.T @ omega
    return normalize_sketch(expected)


@pytest.mark.parametrize("precision", ["fp32", "fp32-lean"])
def test_the_sketch_is_the_bases_gradient_times_the_public_signs(
    tiny_model_dir: Path, precision: str
) -> None:
    # Prepare
    base = load_base(tiny_model_dir)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=base.sha256, rank=4)
    model = materialize(base.model, spec, base_sha256=base.sha256)
    blocks = encode_blocks([Example(text=t) for t in NOTES], base.tokenizer, seq_len=32)
    b_before = {k: v + 0.01 for k, v in get_b(model).items()}
    federated.set_b(model, b_before)
    a_before = get_a(model)

    # Execute
    sketch = gradient_sketch(
        model,
        spec,
        blocks,
        passes=3,
        batches=2,
        batch_size=4,
        precision=precision,
        device="cpu",
        seed=5,
    )

    # Assert: every module's sketch matches autograd's G^T Omega, and A and B are put back
    expected = _expected_sketch(tiny_model_dir, spec, passes=3, batches=2, seed=5)
    assert set(sketch) == set(expected)
    for path, value in sketch.items():
        assert value.shape == expected[path].shape == (32, 12)
        np.testing.assert_allclose(value, expected[path], atol=2e-5, rtol=1e-3)
    for path, b in get_b(model).items():
        np.testing.assert_array_equal(b, b_before[path])
    for path, a in get_a(model).items():
        np.testing.assert_array_equal(a, a_before[path])
    assert all(not a.weight.requires_grad for a, _ in adapter_layers(model).values())


def _setup(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[AdapterSpec, dict[str, Any]]:
    monkeypatch.setattr(federated, "_WORKERS", {})
    (tmp_path / "notes.txt").write_text(NOTE_TEXT)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=load_base(tiny_model_dir).sha256, rank=4)
    return spec, {"base_source": str(tiny_model_dir), "precision": "fp32", "device": "cpu"}


def test_a_device_sketches_in_round_0_then_trains_and_saves_on_the_shared_a(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    spec, kwargs = _setup(tiny_model_dir, tmp_path, monkeypatch)
    data = DeviceData.from_path(tmp_path / "notes.txt")
    profile = tmp_path / "p"

    # Execute: the sketch round, the coordinator's A from it, a train round on that A
    sketch, metrics = run_round(
        RoundInstruction(round=0, spec=spec, prior_version="zero", mode="sketch", seq_len=32),
        None,
        data,
        profile,
        **kwargs,
    )
    assert sketch is not None
    a = a_from_sketch(sketch, spec.rank)
    digest = shared_a_digest(a)
    path = shared_a_path(profile, digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_tensors(a))
    instr = RoundInstruction(
        round=1,
        spec=spec,
        prior_version="zero",
        personal_steps=4,
        prior_steps=4,
        lr=0.05,
        seq_len=32,
        shared_a=digest,
    )
    delta, _ = run_round(instr, None, data, profile, **kwargs)

    # Assert: round 0 saved nothing and sent one unit-norm sketch column block per module
    total = np.sqrt(sum(float(np.square(v.astype(np.float64)).sum()) for v in sketch.values()))
    assert abs(total - 1.0) < 1e-5 and metrics.base_loss == metrics.prior_loss
    assert all(v.shape == (32, 4 * 4) for v in sketch.values())
    # The round's delta is B only; the version it saved holds the shared A, not the seeded A
    assert delta is not None and all(v.shape[1] == 4 for v in delta.values())
    saved = Profile.open(profile)
    provenance, _, saved_a = saved.read(saved.current_version() or 0)
    assert provenance.personal_a and saved_a is not None
    for module, value in a.items():
        np.testing.assert_array_equal(saved_a[module], value)
    # The warm worker goes back to the seeded A for the next user
    worker = next(iter(federated._WORKERS.values()))
    seeded = seeded_a(worker.model, spec)
    for module, value in get_a(worker.model).items():
        np.testing.assert_array_equal(value, seeded[module])


def test_a_device_refuses_a_missing_or_tampered_shared_a(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an A the coordinator scaled up by 10 after the devices' checks were written
    spec, kwargs = _setup(tiny_model_dir, tmp_path, monkeypatch)
    data = DeviceData.from_path(tmp_path / "notes.txt")
    sketch, _ = run_round(
        RoundInstruction(round=0, spec=spec, prior_version="zero", mode="sketch", seq_len=32),
        None,
        data,
        tmp_path / "p",
        **kwargs,
    )
    assert sketch is not None
    scaled = {k: v * 10 for k, v in a_from_sketch(sketch, spec.rank).items()}
    digest = shared_a_digest(scaled)
    instr = RoundInstruction(
        round=1, spec=spec, prior_version="zero", seq_len=32, prior_steps=2, shared_a=digest
    )

    # Execute / Assert
    with pytest.raises(LorafleetError, match="not cached on this device"):
        run_round(instr, None, data, tmp_path / "p", **kwargs)
    path = shared_a_path(tmp_path / "p", digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_tensors(scaled))
    with pytest.raises(IntegrityError, match="orthogonal rows of norm"):
        run_round(instr, None, data, tmp_path / "p", **kwargs)
    assert Profile.version_numbers(tmp_path / "p") == []


def test_a_profile_keeps_the_first_shared_a_and_refuses_another(tmp_path: Path) -> None:
    from lorafleet.client.flower_app import store_shared_a

    spec = AdapterSpec(base_model_id="tiny", base_sha256="0" * 64, rank=2)
    rng = np.random.default_rng(0)
    first = a_from_sketch({"p": rng.normal(size=(6, 8))}, 2)
    second = a_from_sketch({"p": rng.normal(size=(6, 8))}, 2)

    def instr(a: dict[str, np.ndarray]) -> RoundInstruction:
        return RoundInstruction(
            round=1, spec=spec, prior_version="zero", shared_a=shared_a_digest(a)
        )

    store_shared_a(encode_tensors(first), instr(first), tmp_path)
    store_shared_a(encode_tensors(first), instr(first), tmp_path)  # sent again: fine
    assert shared_a_path(tmp_path, shared_a_digest(first)).is_file()
    with pytest.raises(IntegrityError, match="digest the round names"):
        store_shared_a(encode_tensors(second), instr(first), tmp_path / "fresh")
    with pytest.raises(IntegrityError, match="another shared A"):
        store_shared_a(encode_tensors(second), instr(second), tmp_path)
    assert not shared_a_path(tmp_path, shared_a_digest(second)).exists()
