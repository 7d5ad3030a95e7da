"""The int8 W8A8 matmul of the quantized training path, on its own: torch only, no peft.

:mod:`lorafleet.client.qtrain` trains through it, and :mod:`lorafleet.client.device`
times it when profiling a CPU; keeping it apart lets the profile measure the exact
kernel training runs without importing peft and transformers (seconds).

Two kernels compute the same product, weights symmetric int8 per output channel and
activations symmetric int8 per token (row):

- ``int_mm``: ``torch._int_mm`` (oneDNN). Fast where the CPU has int8 dot products
  (AVX-512-VNNI, AVX-VNNI, AMX); on an AVX2-only CPU it measured 20-30x *slower* than an
  fp32 matmul, so it is never the default there.
- ``fbgemm``: fbgemm's dynamic int8 Linear (``quantized::linear_dynamic``), whose AVX2
  kernels multiply int8 without VNNI. It quantizes its input with one scale per tensor,
  which alone costs SmolLM2-135M 14% held-out loss; dividing each row by its own
  absolute maximum first (and multiplying the output rows back) makes that one scale a
  per-token scale, since a Linear acts on every row alone. Its weights are quantized to
  7 bits (-63..63): AVX2's int8 multiply-add (``vpmaddubsw``) adds two 8-bit x 8-bit
  products into a saturating 16-bit sum, which put 9% error on a small Linear's output;
  255 x 63 x 2 fits. Quantizing the activations to 7 bits instead (fbgemm's
  ``reduce_range``) doubled the error where a few input channels are outliers, as in an
  LLM's activations (7.7% against 4.1%, and 3.8% for ``int_mm``); without outliers all
  three are 1-2%.

:func:`default_kernel` picks between them from the CPU's int8 capability.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

__all__ = [
    "EPS",
    "Int8Kernel",
    "Int8Weight",
    "default_kernel",
    "int8_forward",
    "int8_grad_input",
    "int8_linear",
    "quantize_rows",
    "quantize_weight",
]

EPS = 1e-8
"""Smallest scale: an all-zero row quantizes to zeros instead of dividing by zero."""

Int8Kernel = Literal["int_mm", "fbgemm"]


FBGEMM_WEIGHT_MAX = 63
"""fbgemm's weights use 7 bits so AVX2's 16-bit pair sums cannot saturate (module doc)."""


def quantize_rows(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``x ~= q * scale``; q (M, K) int8 in ``[-qmax, qmax]``, scale (M, 1) fp32."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(EPS).div_(float(qmax))  # (M, 1)
    q = (xf / scale).round_().clamp_(-qmax, qmax).to(torch.int8)  # (M, K)
    return q, scale


def fbgemm_available() -> bool:
    """Whether this torch build has fbgemm's quantized kernels (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def default_kernel(native_int8: bool) -> Int8Kernel:
    """``int_mm`` where the CPU has int8 dot products (or fbgemm is missing), else ``fbgemm``."""
    return "int_mm" if native_int8 or not fbgemm_available() else "fbgemm"


def _prepack(q: torch.Tensor, scale: torch.Tensor | None = None) -> Any:
    """The packed form fbgemm reads of the int8 matrix ``q`` (out, in), as a Linear weight.

    With ``scale`` (out,) fbgemm applies the per-output-channel scale itself while it
    dequantizes, which saves an element-wise pass over every output.
    """
    with warnings.catch_warnings():  # quantized tensors are deprecated, the kernels are not
        warnings.simplefilter("ignore", UserWarning)
        if scale is None:
            qt = torch._make_per_tensor_quantized_tensor(q.contiguous(), 1.0, 0)
        else:
            zero = torch.zeros(q.shape[0], dtype=torch.long)
            qt = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qt, None)


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """A frozen weight quantized once for :func:`int8_linear`, in its kernel's layout."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) fp32, per output channel
    kernel: Int8Kernel
    packed: tuple[Any, Any] | None = None  # fbgemm: W (N, K) and W.T (K, N) or None, packed


def quantize_weight(
    w: torch.Tensor, kernel: Int8Kernel = "int_mm", *, grad_input: bool = True
) -> Int8Weight:
    """Quantize ``w`` (N, K) symmetric int8 per output channel for ``kernel``.

    ``grad_input=False`` skips fbgemm's packed ``W.T``, which only the backward
    (:func:`int8_grad_input`) reads: the lm_head's int8 copy serves its logits alone.
    """
    q, scale = quantize_rows(w, FBGEMM_WEIGHT_MAX if kernel == "fbgemm" else 127)  # (N, K), (N, 1)
    scale = scale.squeeze(1).contiguous()
    packed = None
    if kernel == "fbgemm":
        # the forward's packed W carries its scale; the backward's W.T scales the gradient first
        forward = _prepack(q, scale)
        packed = (forward, _prepack(q.t()) if grad_input else None)
    return Int8Weight(q.contiguous(), scale, kernel, packed)


def _fbgemm_rows(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """``x @ Wq.T`` through fbgemm with one int8 scale per row of ``x`` (see module doc)."""
    xf = x.float()
    row_max = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(EPS)  # (M, 1)
    y: torch.Tensor = torch.ops.quantized.linear_dynamic(xf / row_max, packed, False)
    return y.mul_(row_max)


def int8_forward(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """``x @ W.T`` with x quantized per token: the forward of :func:`int8_linear`, no autograd.

    x (M, K) float -> (M, N) in x's dtype.
    """
    if weight.packed is not None:
        return _fbgemm_rows(x, weight.packed[0]).to(x.dtype)  # (M, N), weight scale applied
    xq, x_scale = quantize_rows(x)
    acc_i = torch._int_mm(xq, weight.q.t())  # (M, N) int32
    return (acc_i.float().mul_(x_scale).mul_(weight.scale)).to(x.dtype)


def int8_grad_input(grad: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """``grad @ W`` with grad quantized per row: the backward of :func:`int8_linear`.

    grad (M, N) float -> (M, K) in grad's dtype. The frozen W has no gradient of its own.
    """
    # dL/dx = g @ W = (g * s_w) @ Wq: the per-channel scale moves onto g's columns.
    # Out of place: for an fp32 grad .float() is the grad itself, which autograd may
    # still hand to other branches (the LoRA path reads the same output gradient).
    scaled = grad.float() * weight.scale  # (M, N)
    if weight.packed is not None:
        if weight.packed[1] is None:
            raise ValueError("this int8 weight was quantized without its gradient's W.T")
        return _fbgemm_rows(scaled, weight.packed[1]).to(grad.dtype)  # (M, K)
    gq, g_scale = quantize_rows(scaled)  # (M, N) int8
    acc = torch._int_mm(gq, weight.q)  # (M, K) int32
    return acc.float().mul_(g_scale).to(grad.dtype)


class _Int8Matmul(torch.autograd.Function):
    """``x @ W.T`` with W int8 per output channel and x quantized per token; frozen W."""

    @staticmethod
    def forward(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
        return int8_forward(x, weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return int8_grad_input(grad, ctx.weight), None


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """``x @ W.T`` through the int8 training path's kernel, differentiable in ``x``.

    The one entry point to the W8A8 matmul, so what :mod:`lorafleet.client.device` times
    is what training runs. x (M, K) float -> (M, N) in x's dtype.

    Examples
    --------
    >>> w, x = torch.randn(6, 8), torch.randn(3, 8)
    >>> y = int8_linear(x, quantize_weight(w, default_kernel(native_int8=False)))
    >>> bool(((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.05)
    True
    """
    return cast(torch.Tensor, cast(Any, _Int8Matmul).apply(x, weight))
