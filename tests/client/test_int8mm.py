"""The int8 W8A8 kernels: both compute x @ W.T and its input gradient within int8 error."""

from __future__ import annotations

import pytest
import torch

from lorafleet.client.int8mm import (
    default_kernel,
    fbgemm_available,
    int8_linear,
    quantize_weight,
)

KERNELS = [
    "int_mm",
    pytest.param(
        "fbgemm",
        marks=pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no fbgemm"),
    ),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("m", "k", "n"), [(96, 32, 96), (96, 64, 32), (256, 576, 192)])
def test_each_kernel_multiplies_and_differentiates_within_int8_error(
    kernel: str, m: int, k: int, n: int
) -> None:
    # Prepare: outlier input channels, as LLM activations have
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) / k**0.5
    x = torch.randn(m, k, generator=gen)
    x[:, :2] *= 20
    x.requires_grad_(True)
    g = torch.randn(m, n, generator=gen)
    ref = x @ w.T
    (ref_grad,) = torch.autograd.grad(ref, x, g)

    # Execute
    y = int8_linear(x, quantize_weight(w, kernel))  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(y, x, g)

    # Assert: within a few % (1-2% without the outlier channels; 7-bit activations, or
    # 8-bit weights in fbgemm's saturating AVX2 sums, measured 7.7% and 9% here)
    assert y.dtype == grad.dtype == torch.float32
    assert rel_err(y.detach(), ref.detach()) < 0.05
    assert rel_err(grad, ref_grad) < 0.05


def test_the_default_kernel_follows_the_cpus_int8_dot_products() -> None:
    # oneDNN's int8 matmul is fast only with VNNI/AMX; AVX2 alone gets fbgemm's kernels
    assert default_kernel(native_int8=True) == "int_mm"
    assert default_kernel(native_int8=False) == ("fbgemm" if fbgemm_available() else "int_mm")


def test_bf16_activations_come_back_in_bf16() -> None:
    w, x = torch.randn(16, 32), torch.randn(24, 32).bfloat16()
    assert int8_linear(x, quantize_weight(w, default_kernel(False))).dtype == torch.bfloat16
