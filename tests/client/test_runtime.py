"""Device and precision choice: what each precision means where, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorafleet.client import PersonalModel, TrainConfig
from lorafleet.client.base import load_base
from lorafleet.client.cli import PRECISION_CHOICES
from lorafleet.client.runtime import (
    PLANS,
    PRECISIONS,
    autocast_context,
    base_dtype,
    base_quantization,
    resolve_precision,
)
from lorafleet.protocols.errors import LorafleetError, SpecError

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("precision", "concrete", "dtype", "quantization"),
    [
        ("fp32", "fp32", torch.float32, None),
        ("bf16-mixed", "bf16-mixed", torch.float32, None),
        ("bf16", "bf16", torch.bfloat16, None),
        ("int8", "int8", torch.bfloat16, None),
        ("fp32-lean", "fp32-lean", torch.float32, None),
        ("bf16-lean", "bf16-lean", torch.bfloat16, None),
        ("int8-fp32", "int8-fp32", torch.float32, None),
    ],
)
def test_each_cpu_precision_resolves_to_a_base_dtype(
    precision: str, concrete: str, dtype: torch.dtype, quantization: str | None
) -> None:
    # Execute / Assert
    assert resolve_precision(precision, CPU) == concrete  # type: ignore[arg-type]
    assert base_dtype(precision, CPU) == dtype  # type: ignore[arg-type]
    assert base_quantization(precision, CPU) == quantization  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("precision", "autocast"),
    [("fp32", False), ("fp32-lean", False), ("int8-fp32", False), ("bf16", True), ("int8", True)],
)
def test_only_bf16_plans_evaluate_under_autocast(precision: str, autocast: bool) -> None:
    # An fp32 plan under bf16 autocast would be emulated on an AVX2 CPU (many times slower)
    with autocast_context(precision, CPU):  # type: ignore[arg-type]
        dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype

    assert dtype == (torch.bfloat16 if autocast else torch.float32)


def test_every_precision_has_one_plan_and_one_cli_spelling() -> None:
    assert set(PLANS) == set(PRECISIONS) - {"auto"}
    assert list(PRECISION_CHOICES) == list(PRECISIONS)


@pytest.mark.parametrize("precision", ["fp32-lean", "bf16-lean", "int8", "int8-fp32"])
def test_the_lean_cpu_paths_are_refused_on_a_gpu(precision: str) -> None:
    with pytest.raises(SpecError, match=f"precision {precision} is a CPU training path"):
        resolve_precision(precision, torch.device("cuda"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("precision", "error"),
    [("nf4", "needs a CUDA GPU"), ("fp8", "unknown precision 'fp8'")],
)
def test_a_precision_the_cpu_cannot_run_is_one_clear_error(precision: str, error: str) -> None:
    # Execute / Assert
    with pytest.raises(SpecError, match=error) as exc:
        resolve_precision(precision, CPU)  # type: ignore[arg-type]
    assert "\n" not in str(exc.value)


def test_opening_a_profile_in_nf4_on_the_cpu_is_refused_before_loading(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Execute / Assert
    with pytest.raises(SpecError, match="nf4"):
        PersonalModel.open(tmp_path / "p", base=tiny_model_dir, precision="nf4", device="cpu")
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_loading_a_base_in_nf4_without_a_gpu_names_what_is_missing(tiny_model_dir: Path) -> None:
    # Execute / Assert: bitsandbytes missing, or no CUDA GPU: either way one line
    with pytest.raises(LorafleetError, match="nf4 needs"):
        load_base(tiny_model_dir, quantization="nf4", dtype=torch.bfloat16)


@pytest.mark.gpu
def test_an_nf4_base_trains_an_exact_fp32_b_on_the_gpu(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a 4-bit NF4 base on the GPU (needs bitsandbytes: pip install 'lorafleet[gpu]')
    pm = PersonalModel.open(
        tmp_path / "p", base=tiny_model_dir, rank=4, precision="nf4", device="cuda", seq_len=32
    )
    notes = [f"Maya climbs at Crux Yard on day {i} and logs route {i % 7}." for i in range(40)]
    # Execute
    report = pm.train(
        notes, TrainConfig(steps=6, lr=0.05, eval_every=3, precision="nf4"), progress=False
    )
    reply = pm.generate("Maya climbs", max_new_tokens=4, chat=False)
    # Assert
    assert report.result.heldout_loss_after < report.result.heldout_loss_before
    assert all(b.dtype == np.float32 for b in pm.adapter_b().values())
    assert isinstance(reply, str)
