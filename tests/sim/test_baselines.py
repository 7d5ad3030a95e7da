"""The experiment's baselines train on every precision a device may pick (#12, #13).

`auto` picks a lean path (int8-fp32 on AVX2 CPUs); the reviewer's full-LoRA baselines
train A and B through it too, the same stock LoRA the peft forward trains.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lorafleet.client.base import load_base
from lorafleet.client.data import Example, TokenBlocks, encode_blocks
from lorafleet.client.runtime import ConcretePrecision
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.sim.baselines import Lab


def _lab(tiny_model_dir: Path, precision: ConcretePrecision) -> tuple[Lab, TokenBlocks]:
    """A lab with stock peft's targets on the tiny base, and twelve notes' blocks."""
    base = load_base(tiny_model_dir)
    spec = AdapterSpec(
        base_model_id="tiny",
        base_sha256=base.sha256,
        rank=4,
        alpha=8.0,
        target_modules=("q_proj", "v_proj"),
        cohort_seed=3,
    )
    notes = [Example(text=f"Pixel sleeps on radiator {i} every evening.") for i in range(12)]
    return Lab(base, spec, precision=precision, device="cpu"), encode_blocks(
        notes, base.tokenizer, seq_len=32
    )


@pytest.mark.parametrize("precision", ["fp32-lean", "int8-fp32"])
def test_a_full_lora_baseline_trains_where_the_device_path_is_b_only(
    tiny_model_dir: Path, precision: ConcretePrecision
) -> None:
    # Prepare
    lab, blocks = _lab(tiny_model_dir, precision)
    config = TrainConfig(steps=3, lr=1e-2, precision=precision, eval_every=0, warmup_steps=0)
    start = lab.peft_init(seed=0)

    # Execute: a full LoRA (A and B), then lorafleet's B only, from the same lab
    full, full_steps = lab.train(start, blocks, config)
    b_only, b_steps = lab.train(lab.zero_b, blocks, config)

    # Assert: both trained; A moved only in the full LoRA, and the lab's A is the seeded one
    assert full_steps == b_steps == 3
    moved_a = [k for k in full if k.endswith(":A") and not np.array_equal(full[k], start[k])]
    assert moved_a, "the full LoRA's A did not train"
    assert any(np.abs(full[k]).max() > 0 for k in full if k.endswith(":B"))
    assert set(b_only) == set(lab.zero_b)
    assert any(np.abs(v).max() > 0 for v in b_only.values())
    for path, (lin_a, _) in lab.layers.items():
        assert np.array_equal(lin_a.weight.detach().numpy(), lab.seeded_a[path].numpy())


def test_a_full_lora_trains_the_same_on_the_lean_forward_as_on_the_peft_forward(
    tiny_model_dir: Path,
) -> None:
    # Prepare: stock peft's init, trained three steps in fp32 through each forward
    lab, blocks = _lab(tiny_model_dir, "fp32")
    start = lab.peft_init(seed=0)
    states: dict[str, dict[str, np.ndarray]] = {}
    for precision in ("fp32", "fp32-lean"):
        config = TrainConfig(steps=3, lr=1e-2, precision=precision, eval_every=0, warmup_steps=0)

        # Execute
        states[precision], _ = lab.train(start, blocks, config)

    # Assert: A and B moved, and the same on both forwards (fp32 sums reordered)
    peft, lean = states["fp32"], states["fp32-lean"]
    assert set(peft) == set(lean)
    assert all(not np.array_equal(peft[k], start[k]) for k in peft)
    for k in peft:
        np.testing.assert_allclose(lean[k], peft[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_the_labs_personalization_never_ends_worse_on_validation_than_its_start(
    tiny_model_dir: Path,
) -> None:
    # Prepare: a start trained on text like the validation notes (a "prior"), and personal
    # training notes unlike them, at a rate where plain training ends worse than the start
    base = load_base(tiny_model_dir)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=base.sha256, rank=4, cohort_seed=5)
    lab = Lab(base, spec, precision="fp32", device="cpu")
    val = encode_blocks(
        [Example(text=f"The ferry to island {i} leaves at dawn.") for i in range(4)],
        base.tokenizer,
        seq_len=32,
    )
    train = encode_blocks(
        [Example(text=f"qz {i * 7919 % 1000} kk vv {i} ##") for i in range(12)],
        base.tokenizer,
        seq_len=32,
    )
    warm = TrainConfig(steps=4, lr=1e-2, precision="fp32", eval_every=0, warmup_steps=0)
    start, _ = lab.train(lab.zero_b, val, warm)
    plain = TrainConfig(steps=8, lr=0.2, a_lr=0.05, precision="fp32", eval_every=0, warmup_steps=0)
    config = replace(plain, eval_every=2, patience=3)
    wrecked, _ = lab.train(start, train, plain)
    assert lab.loss(wrecked, val) > lab.loss(start, val)  # the test means something

    # Execute: the device's final step, as the cold start runs it
    state, steps, mix = lab.personalize(start, train, val, config)

    # Assert: a full LoRA (the personal A), never worse on validation than the start, and
    # the lab's A back to the seeded one for the next user
    assert {k.rsplit(":", 1)[1] for k in state} == {"A", "B"}
    assert 1 <= steps <= 8 and mix in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert lab.loss(state, val) <= lab.loss(start, val) + 1e-5
    for path, (lin_a, _) in lab.layers.items():
        assert np.array_equal(lin_a.weight.detach().numpy(), lab.seeded_a[path].numpy())
