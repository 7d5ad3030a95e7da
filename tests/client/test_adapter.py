from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.client.adapter import (
    WEIGHTS_FILE,
    b_content_hash,
    get_b,
    materialize,
    read_b,
    read_provenance,
    save_adapter,
    set_b,
)
from lorafleet.client.base import load_base
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.seeds import derive_a
from lorafleet.protocols.spec import AdapterSpec


def spec_for(sha: str, **kw: object) -> AdapterSpec:
    args: dict[str, object] = {
        "base_model_id": "tiny",
        "base_sha256": sha,
        "rank": 4,
        "cohort_seed": 11,
    }
    args.update(kw)
    return AdapterSpec(**args)  # type: ignore[arg-type]


def random_b(model: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in get_b(model).items()}


def test_materialize_seeds_a_freezes_it_and_trains_only_b(tiny_model_dir: Path) -> None:
    # Prepare
    base = load_base(tiny_model_dir)
    spec = spec_for(base.sha256)
    # Execute
    model = materialize(base.model, spec, base_sha256=base.sha256)
    # Assert
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2  # 2 layers x (q_proj, v_proj)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight.detach().numpy()
    assert np.array_equal(a, derive_a(spec, "model.layers.0.self_attn.q_proj", 32))
    assert all(np.count_nonzero(b) == 0 for b in get_b(model).values())


def test_zero_b_leaves_the_base_logits_unchanged(tiny_model_dir: Path) -> None:
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    plain = load_base(tiny_model_dir)
    expected = plain.model(input_ids=ids).logits
    base = load_base(tiny_model_dir)
    model = materialize(base.model, spec_for(base.sha256), base_sha256=base.sha256)
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"target_modules": ("q_proj", "qkv")}, SpecError, "match no Linear"),
        ({"base_sha256": "cd" * 32}, IntegrityError, "load the base the adapter was made for"),
    ],
)
def test_bad_spec_for_this_base_is_refused(
    tiny_model_dir: Path, kwargs: dict[str, object], error: type[Exception], fragment: str
) -> None:
    base = load_base(tiny_model_dir)
    spec = spec_for(base.sha256, **kwargs)
    with pytest.raises(error, match=fragment):
        materialize(base.model, spec, base_sha256=base.sha256)


def test_set_b_refuses_wrong_shapes_and_nan(tiny_model_dir: Path) -> None:
    base = load_base(tiny_model_dir)
    model = materialize(base.model, spec_for(base.sha256), base_sha256=base.sha256)
    b = get_b(model)
    key = next(iter(b))
    with pytest.raises(IntegrityError, match="shape"):
        set_b(model, {**b, key: np.zeros((3, 3), np.float32)})
    with pytest.raises(IntegrityError, match="NaN"):
        set_b(model, {**b, key: np.full_like(b[key], np.nan)})
    with pytest.raises(IntegrityError, match="missing"):
        set_b(model, {key: b[key]})


def _saved(tiny_model_dir: Path, folder: Path) -> tuple[PeftModel, AdapterSpec]:
    base = load_base(tiny_model_dir)
    spec = spec_for(base.sha256)
    model = materialize(base.model, spec, base_sha256=base.sha256)
    set_b(model, random_b(model))
    prov = AdapterProvenance(spec=spec, version=1, content_hash=b_content_hash(spec, get_b(model)))
    save_adapter(model, folder, prov)
    return model, spec


def test_saved_adapter_loads_in_stock_peft_with_identical_logits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    ours, _ = _saved(tiny_model_dir, tmp_path / "v1")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    expected = ours(input_ids=ids).logits
    # Execute: a user with nothing but transformers + peft
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stock = PeftModel.from_pretrained(plain, tmp_path / "v1")
    # Assert
    got = stock(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(got, fresh(input_ids=ids).logits, atol=1e-4)  # B really acts


def test_read_b_round_trips_and_verifies_content(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _ = _saved(tiny_model_dir, tmp_path / "v1")
    prov = read_provenance(tmp_path / "v1")
    b = read_b(tmp_path / "v1", prov)
    assert all(np.array_equal(b[k], v) for k, v in get_b(model).items())


def test_corrupt_adapter_file_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    _saved(tiny_model_dir, tmp_path / "v1")
    path = tmp_path / "v1" / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a bit flip inside the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        read_b(tmp_path / "v1", read_provenance(tmp_path / "v1"))
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(IntegrityError, match="corrupt"):
        read_b(tmp_path / "v1", read_provenance(tmp_path / "v1"))


def test_versions_are_never_overwritten(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, spec = _saved(tiny_model_dir, tmp_path / "v1")
    before = (tmp_path / "v1" / WEIGHTS_FILE).read_bytes()
    prov = AdapterProvenance(spec=spec, version=1, content_hash=b_content_hash(spec, get_b(model)))
    with pytest.raises(LorafleetError, match="never overwritten"):
        save_adapter(model, tmp_path / "v1", prov)
    assert (tmp_path / "v1" / WEIGHTS_FILE).read_bytes() == before


def test_a_folder_without_provenance_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(LorafleetError, match="not a lorafleet adapter folder"):
        read_provenance(tmp_path)
