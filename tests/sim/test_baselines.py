"""The experiment's baselines train on every precision a device may pick (#12, #13).

`auto` picks a lean B-only path (int8-fp32 on AVX2 CPUs); the reviewer's full-LoRA
baselines must then run on that family's peft forward instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorafleet.client.base import load_base
from lorafleet.client.data import Example, encode_blocks
from lorafleet.client.runtime import ConcretePrecision
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.sim.baselines import Lab


@pytest.mark.parametrize("precision", ["fp32-lean", "int8-fp32"])
def test_a_full_lora_baseline_trains_where_the_device_path_is_b_only(
    tiny_model_dir: Path, precision: ConcretePrecision
) -> None:
    # Prepare
    base = load_base(tiny_model_dir)
    spec = AdapterSpec(
        base_model_id="tiny",
        base_sha256=base.sha256,
        rank=4,
        alpha=8.0,
        target_modules=("q_proj", "v_proj"),
        cohort_seed=3,
    )
    lab = Lab(base, spec, precision=precision, device="cpu")
    notes = [Example(text=f"Pixel sleeps on radiator {i} every evening.") for i in range(12)]
    blocks = encode_blocks(notes, base.tokenizer, seq_len=32)
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
