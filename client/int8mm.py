"""The int8 W8A8 matmul of the quantized training path, on its own: torch only, no peft.

:mod:`lorafleet.client.qtrain` trains through it, and :mod:`lorafleet.client.device`
times it when profiling a CPU; keeping it apart lets the profile measure the exact
kernel training runs without importing peft and transformers (seconds).
"""

from __future__ import annotations

from typing import Any, cast

import torch

__all__ = ["EPS", "int8_linear", "quantize_rows"]

EPS = 1e-8
"""Smallest scale: an all-zero row quantizes to zeros instead of dividing by zero."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``x ~= q * scale``; q (M, K) int8, scale (M, 1) fp32."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(EPS).div_(127.0)  # (M, 1)
    q = (xf / scale).round_().clamp_(-127, 127).to(torch.int8)  # (M, K)
    return q, scale


class _Int8Matmul(torch.autograd.Function):
    """``x @ W.T`` with W int8 per output channel and x quantized per token; frozen W."""

    @staticmethod
    def forward(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        # x (M, K) bf16, wq (N, K) int8, w_scale (N,) fp32
        xq, x_scale = quantize_rows(x)
        acc = torch._int_mm(xq, wq.t())  # (M, N) int32
        return (acc.float().mul_(x_scale).mul_(w_scale)).to(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, wq, w_scale = inputs
        ctx.save_for_backward(wq, w_scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        wq, w_scale = ctx.saved_tensors
        # dL/dx = g @ W = (g * s_w) @ Wq: the per-channel scale moves onto g's columns.
        # Out of place: for an fp32 grad .float() is the grad itself, which autograd may
        # still hand to other branches (the LoRA path reads the same output gradient).
        gq, g_scale = quantize_rows(grad.float() * w_scale)  # (M, N) int8
        acc = torch._int_mm(gq, wq)  # (M, K) int32
        return acc.float().mul_(g_scale).to(grad.dtype), None, None


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` through the int8 training path's kernel, differentiable in ``x``.

    The one entry point to the W8A8 matmul, so what :mod:`lorafleet.client.device` times
    is what training runs. x (M, K) float, wq (N, K) int8, w_scale (N,) fp32 -> (M, N) in
    x's dtype.
    """
    return cast(torch.Tensor, cast(Any, _Int8Matmul).apply(x, wq, w_scale))
