"""A fast training path for the personal adapter on a quantized frozen base (CPU first).

B-only training never updates the base, so every base matrix multiply can run on a
cheaper copy of it as long as the gradient that reaches B stays close to the exact one.
This module runs one training step of a Llama-family peft model through its own lean
forward, reading the model's modules but never changing them:

- **int8 frozen matmuls** (``weights="int8"``): each frozen Linear's weight is quantized
  once, symmetric per output channel, and multiplied with activations quantized per
  token (W8A8) by ``torch._int_mm`` (VNNI on x86). The backward pass multiplies the
  per-token-quantized output gradient with the same int8 weight. Per-token scales matter:
  one scale per tensor puts SmolLM2-135M's held-out loss 14% up, per token 1%.
  ``down_proj`` stays in bf16 by default: its input (``silu(gate) * up``) has the largest
  outliers, and quantizing it alone costs as much loss as all the others together. With
  fp32 everywhere else (below) it is int8 too, and so are the lm_head's logits: there the
  alternative is an fp32 matmul, and int8 there bought 1.2x the step for +0.2% held-out
  loss (``DEFAULT_INT8_MODULES_FP32``).
- **bf16 everywhere else** (``compute="bf16"``, precision ``int8``), as the ``bf16``
  precision does, with RMSNorm and softmax in fp32 internally; or **fp32 everywhere
  else** (``compute="fp32"``, precision ``int8-fp32``) on CPUs without native bf16, where
  every bf16 operation is emulated and many times slower. B keeps its fp32 master copy
  (the optimizer steps fp32 B).
- **No quantization at all** (``weights="fp32"`` or ``"bf16"``; precisions ``fp32-lean``
  and ``bf16-lean``): the leaner step below alone, which is what ``auto`` trains with
  where int8 does not measure faster (:mod:`lorafleet.client.device`).
- **Eager attention**: at training lengths (128 tokens) two batched matmuls beat the CPU
  flash-attention kernel, whose backward alone took a fifth of a bf16 step.
- **A fused, chunked lm_head + cross-entropy** over the positions that carry a label: the
  ``(tokens, vocab)`` logits are never materialized in fp32 at once, the softmax runs in
  the compute dtype (a bf16 one writes half the bytes of fp32's; the log-softmax and
  exp passes it replaced took as long as the lm_head matmul), and the gradient with
  respect to the hidden states is computed in the same pass.
- **RMSNorm with its own backward**: autograd's, through the fp32 round trip, kept and
  converted every intermediate.
- **Compiled decoder layers, on request** (``compile=True``): ``torch.compile`` fuses each
  layer's element-wise work (norms, rotary, SiLU, the LoRA branches' adds) into
  generated C++ kernels. It needs a C++ compiler on the device and costs a compile on
  the first step (tens of seconds on two cores, a few seconds from inductor's on-disk
  cache afterwards), so it is off unless asked for; without a compiler the step runs
  eager and says so once.

The result is a stock personal adapter: the same B parameters, read and written by
:func:`lorafleet.client.adapter.get_b` / ``set_b``. Held-out evaluation keeps using the
model's own forward on the normal base.

Examples
--------
>>> fast = prepare_quantized_model(peft_model)  # doctest: +SKIP
>>> loss = fast.loss(input_ids, attention_mask, labels)  # doctest: +SKIP
>>> loss.backward()  # gradients land in the model's B matrices  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import platform
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch._dynamo.exc import TorchDynamoException

from lorafleet.client.int8mm import (
    Int8Kernel,
    Int8Weight,
    default_kernel,
    int8_forward,
    quantize_weight,
)
from lorafleet.client.int8mm import int8_linear as int8_linear
from lorafleet.client.int8mm import quantize_rows as quantize_rows
from lorafleet.client.layout import cache_root
from lorafleet.protocols.errors import SpecError

log = logging.getLogger(__name__)

FrozenWeights = Literal["int8", "bf16", "fp32"]
"""How the frozen base multiplies: int8 W8A8, bf16, or fp32 (the exact reference)."""

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"
"""In ``int8_modules``: the logits of the fused lm_head + cross-entropy from the int8 weight.
Only the forward: the gradient's ``probs @ W`` keeps the compute dtype, since per-row int8
would round the many small probabilities of a row to zero and bias it."""
DEFAULT_INT8_MODULES_FP32 = (*LINEAR_NAMES, LM_HEAD)
"""What ``int8-fp32`` quantizes: everything, since there the alternative is an fp32 matmul,
about 2.4x slower than fbgemm's int8 one on AVX2 kernels. Adding ``down_proj`` and the
lm_head's logits cost +0.2% held-out loss after 20 steps of the training benchmark, for
1.2x the step's speed (AMD Zen 5 restricted to AVX2, docs/benchmarks.md)."""
DEFAULT_INT8_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
"""What ``int8`` (bf16 elsewhere) quantizes. ``down_proj`` and the lm_head stay bf16: with bf16
as the alternative they gained little where measured (1.6% of the step on a Zen 5, whose
bf16 matmuls run about as fast as its int8 ones), and ``down_proj``'s input carries the
largest activation outliers. Not measured on a Zen 4, where int8 runs 1.6x bf16."""
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ADAPTER_NAME = "default"  # the adapter name lorafleet.client.adapter.materialize uses


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`prepare_quantized_model` builds the fast training forward.

    Examples
    --------
    >>> QuantConfig().weights
    'int8'
    >>> QuantConfig(weights="bf16").compute_dtype
    torch.bfloat16
    >>> QuantConfig(compute="fp32").compute_dtype  # int8 matmuls, everything else fp32
    torch.float32
    """

    weights: FrozenWeights = field(
        default="int8",
        metadata={"help": "int8 (W8A8 frozen matmuls), bf16, or fp32 (exact reference)."},
    )
    int8_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Linear names (last component, or lm_head) quantized when weights is "
            "int8; None: by the compute dtype (DEFAULT_INT8_MODULES for bf16, "
            "DEFAULT_INT8_MODULES_FP32 for fp32)."
        },
    )
    ce_chunk: int = field(
        default=256, metadata={"help": "Labelled positions per lm_head + cross-entropy chunk."}
    )
    compute: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "Dtype of everything but the int8 matmuls: auto is fp32 for fp32 weights, "
            "else bf16; fp32 suits CPUs without native bf16, where bf16 work is emulated."
        },
    )

    compile: bool = field(
        default=False,
        metadata={
            "help": "Compile each decoder layer with torch.compile (inductor; needs a C++ "
            "compiler): faster steps after a first step that compiles."
        },
    )

    int8_kernel: Literal["auto", "int_mm", "fbgemm"] = field(
        default="auto",
        metadata={
            "help": "int8 matmul kernel: int_mm (oneDNN, for CPUs with VNNI/AMX), fbgemm "
            "(AVX2 without VNNI), or auto (by the CPU, lorafleet.client.int8mm)."
        },
    )

    def __post_init__(self) -> None:
        if self.int8_kernel not in ("auto", "int_mm", "fbgemm"):
            raise SpecError(
                "quantized training: int8_kernel must be auto, int_mm or fbgemm, "
                f"got {self.int8_kernel!r}"
            )
        if self.compute not in ("auto", "bf16", "fp32"):
            raise SpecError(
                f"quantized training: compute must be auto, bf16 or fp32, got {self.compute!r}"
            )
        mismatch = {("bf16", "fp32"): "fp32", ("fp32", "bf16"): "bf16"}.get(
            (self.weights, self.compute)
        )
        if mismatch is not None:
            raise SpecError(
                f"quantized training: weights {self.weights} with compute {self.compute} "
                f"mixes two paths; use weights {mismatch} (compute follows it)"
            )
        if self.weights not in ("int8", "bf16", "fp32"):
            raise SpecError(
                f"quantized training: weights must be int8, bf16 or fp32, got {self.weights!r}"
            )
        unknown = sorted(set(self.quantized_modules) - {*LINEAR_NAMES, LM_HEAD})
        if unknown:
            raise SpecError(
                f"quantized training: int8_modules {unknown} are not Linear names of a Llama "
                f"layer; choose from {[*LINEAR_NAMES, LM_HEAD]}"
            )
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            chosen = set(group) & set(self.quantized_modules)
            if chosen and chosen != set(group):
                raise SpecError(
                    f"quantized training: {list(group)} share one matmul; put all or none "
                    f"of them in int8_modules, got {sorted(chosen)}"
                )
        if not isinstance(self.compile, bool):
            raise SpecError(
                f"quantized training: compile must be true or false, got {self.compile!r}"
            )
        if (
            isinstance(self.ce_chunk, bool)
            or not isinstance(self.ce_chunk, int)
            or self.ce_chunk < 1
        ):
            raise SpecError(
                f"quantized training: ce_chunk must be an integer >= 1, got {self.ce_chunk!r}"
            )

    @property
    def quantized_modules(self) -> tuple[str, ...]:
        """``int8_modules`` as set, or the compute dtype's default (with weights int8)."""
        if self.int8_modules is not None:
            return self.int8_modules
        if self.compute_dtype == torch.float32:
            return DEFAULT_INT8_MODULES_FP32
        return DEFAULT_INT8_MODULES

    @property
    def kernel(self) -> Int8Kernel:
        """The int8 kernel to run: as set, or by the CPU's int8 dot products for ``auto``."""
        if self.int8_kernel != "auto":
            return self.int8_kernel
        from lorafleet.client.device import this_cpu

        return default_kernel(this_cpu().native_int8)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: ``compute`` if set, else fp32 for fp32 weights, bf16 otherwise."""
        if self.compute != "auto":
            return torch.float32 if self.compute == "fp32" else torch.bfloat16
        return torch.float32 if self.weights == "fp32" else torch.bfloat16


# --------------------------------------------------------------------------- frozen linears


@dataclass
class _Lora:
    """One LoRA branch: the model's own A and B parameters, read live at every call.

    Live, not copied: a personal A (``TrainConfig.a_lr``) trains through this branch,
    and a warm model that gets another user's A (or the seeded one back) must never
    run a stale copy. Casting the (r, in) A per call costs nothing next to the matmuls.
    """

    a: torch.Tensor  # (r, in): the model's own nn.Parameter, frozen unless A trains
    b: torch.Tensor  # (out, r): the model's own nn.Parameter
    scaling: float

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + scaling * x @ A.T @ B.T``, with no extra pass over the (M, out) output.

        The scaling goes on the narrow (M, r) side and the sum inside the second matmul
        (``addmm``).
        """
        u = F.linear(x, self.a.to(x.dtype)) * self.scaling  # (M, r)
        return torch.addmm(base, u, self.b.to(x.dtype).t())  # (M, out); grads are fp32


@dataclass
class _Linear:
    """Frozen Linears that read the same input, fused into one matmul, plus LoRA branches.

    ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` each become one matrix
    multiply (and, in int8, one activation quantization) instead of three and two.
    """

    weight: torch.Tensor | Int8Weight  # (sum(sizes), in): int8, or the compute dtype
    bias: torch.Tensor | None  # (sum(sizes),)
    sizes: tuple[int, ...]
    loras: tuple[_Lora | None, ...]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        if isinstance(self.weight, Int8Weight):
            y = int8_linear(x2, self.weight)
        else:
            y = F.linear(x2, self.weight)
        if self.bias is not None:
            y = y + self.bias
        parts = torch.split_with_sizes(y, list(self.sizes), dim=-1) if len(self.sizes) > 1 else [y]
        outs = []
        for part, lora in zip(parts, self.loras, strict=True):
            out = part if lora is None else lora.add_to(part, x2)
            outs.append(out.reshape(*lead, -1))
        return tuple(outs)


def _fused_linear(
    modules: list[torch.nn.Module], *, kernel: Int8Kernel | None, dtype: torch.dtype
) -> _Linear:
    """The fast stand-in of frozen (possibly LoRA-wrapped) ``nn.Linear`` s with one input.

    ``kernel`` None keeps the weight in the compute dtype; else it is quantized to int8
    for that kernel.
    """
    weights, biases, sizes, loras = [], [], [], []
    for module in modules:
        lora: LoraLayer | None = module if isinstance(module, LoraLayer) else None
        base = lora.get_base_layer() if lora is not None else module
        if not isinstance(base, torch.nn.Linear):
            raise SpecError(
                f"quantized training: expected a Linear layer, found {type(base).__name__}"
            )
        weights.append(base.weight.detach())
        biases.append(None if base.bias is None else base.bias.detach())
        sizes.append(int(base.out_features))
        branch = None
        if lora is not None and ADAPTER_NAME in lora.lora_A:
            a = cast(torch.nn.Linear, lora.lora_A[ADAPTER_NAME]).weight
            b = cast(torch.nn.Linear, lora.lora_B[ADAPTER_NAME]).weight
            branch = _Lora(a, b, float(lora.scaling[ADAPTER_NAME]))
        loras.append(branch)
    w = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)  # (sum(out), in)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [b if b is not None else w.new_zeros(n) for b, n in zip(biases, sizes, strict=True)]
        ).to(dtype)
    if kernel is not None:
        return _Linear(quantize_weight(w, kernel), bias, tuple(sizes), tuple(loras))
    return _Linear(w.to(dtype).contiguous(), bias, tuple(sizes), tuple(loras))


# --------------------------------------------------------------------------- fused lm_head + CE


_UNDERFLOW = -80.0  # log-probabilities below this may have lost their digits to underflow


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    The gradient with respect to ``hidden`` is computed in the forward pass, chunk by
    chunk, so neither the (n, vocab) logits nor their softmax ever exist at once.
    """

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        qweight: Int8Weight | None,
        need_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden (n, H), weight (V, H) frozen, targets (n,) long; qweight: int8 weight (V, H)
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # (n, H): d(sum of CE)/d hidden; an evaluation skips its matmul, as costly as the logits'
        grad = torch.empty_like(hidden) if need_grad else hidden.new_empty((0,))
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            # The softmax in the logits' own dtype (it accumulates in fp32 either way):
            # for bf16 logits that writes half the bytes of an fp32 log-softmax and skips
            # its exp pass, and the gradient matmul needs bf16 probabilities anyway. A
            # bf16 probability is exact to 2^-8 of itself, so each token's loss is exact
            # to about 0.004 nats (the loss only reports progress), and the gradient stays
            # within bf16 rounding of fp32's (tests/client/test_qtrain.py holds both).
            logits = F.linear(h, weight) if qweight is None else int8_forward(h, qweight)
            probs = torch.softmax(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            log_pt = probs[rows, t].float().log_()  # -inf where the probability underflowed
            lost = log_pt < _UNDERFLOW  # a target 80+ nats below the top: exact, row by row
            if bool(lost.any()):
                exact = torch.log_softmax(logits[lost], dim=-1, dtype=torch.float32)
                log_pt[lost] = exact.gather(1, t[lost].unsqueeze(1)).squeeze(1)
            total -= log_pt.sum()
            if need_grad:
                probs[rows, t] -= 1.0  # d(CE)/d(logits)
                grad[start : start + chunk] = probs @ weight  # (c, H)
        return total / max(n, 1), grad

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.n = max(int(inputs[0].shape[0]), 1)
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _grad_unused: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_loss.to(grad.dtype) / ctx.n), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 256,
    qweight: Int8Weight | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T``, fused and chunked.

    Equals ``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` for a frozen
    ``weight``; only ``hidden`` gets a gradient. With ``qweight`` (``weight`` quantized
    by :func:`quantize_weight`) the logits come from the int8 matmul, hidden quantized
    per row, and the gradient's matmul still reads ``weight``. Outside autograd (under
    ``no_grad``, or ``hidden`` needing no gradient) only the loss is computed: the
    gradient's matmul costs as much as the logits'.

    Examples
    --------
    >>> h, w = torch.randn(5, 4), torch.randn(7, 4)
    >>> t = torch.tensor([0, 1, 2, 3, 6])
    >>> ref = F.cross_entropy(F.linear(h, w), t)
    >>> bool(torch.allclose(linear_cross_entropy(h, w, t, chunk=2), ref))
    True
    """
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    loss, _ = cast(Any, _LinearCrossEntropy).apply(
        hidden, weight, targets, chunk, qweight, need_grad
    )
    return cast(torch.Tensor, loss)


# --------------------------------------------------------------------------- the model


@dataclass
class _Layer:
    input_norm: torch.Tensor  # (H,)
    post_norm: torch.Tensor  # (H,)
    qkv: _Linear  # q_proj, k_proj, v_proj fused
    o: _Linear
    gate_up: _Linear  # gate_proj, up_proj fused
    down: _Linear


class _RMSNorm(torch.autograd.Function):
    """Hugging Face's LlamaRMSNorm (normalize in fp32, scale in the input dtype), frozen weight.

    Its own backward because autograd's, through the fp32 round trip, took twice as long
    in bf16 on the CPU: it saved and converted every intermediate, where this one keeps
    the input and the per-row scale and computes the input's gradient in one fp32 pass.
    """

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))  # (..., 1) fp32
        return weight * (xf * r).to(x.dtype), r  # out of place: fp32 x.float() is x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, _grad_r: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None]:
        x, weight, r = ctx.saved_tensors
        # y = w * x * r(x): dx = r * (wg - x_hat * mean(x_hat * wg)), x_hat = x * r.
        wg = (grad * weight).float()
        x_hat = x.float() * r
        dot = (x_hat * wg).mean(-1, keepdim=True)
        return wg.sub_(x_hat.mul_(dot)).mul_(r).to(grad.dtype), None, None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with a frozen ``weight``, differentiable in ``x`` (:class:`_RMSNorm`)."""
    y, _ = cast(Any, _RMSNorm).apply(x, weight, eps)
    return cast(torch.Tensor, y)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def compiler_missing() -> str | None:
    """Why ``torch.compile`` cannot build CPU kernels here, or None when it can.

    Inductor writes C++ and builds it with the system's compiler; phones and many
    laptops have none, and the step must then stay eager instead of failing.
    """
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # any failure to find one means the same: stay eager
        return f"no C++ compiler for torch.compile ({type(exc).__name__}: {exc})"
    return None


def _compile_options(dtype: torch.dtype) -> dict[str, Any]:
    """Inductor settings for compiling the lean decoder layer in ``dtype``.

    In fp32 on x86 the kernels are generated 256 bits wide (AVX2) even where AVX-512
    exists: with torch 2.13.0 the 512-bit fp32 kernels of this layer's backward
    corrupted the heap on an AVX-512/AMX Xeon (``double free or corruption`` within the
    first steps, reproducibly), while the 256-bit ones trained with the eager losses to
    four decimals, and faster than eager. bf16 keeps inductor's default width.
    """
    if dtype == torch.float32 and platform.machine().lower() in ("x86_64", "amd64"):
        return {"cpp.simdlen": 256}
    return {}


def _inner_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a peft model (or the model itself)."""
    inner: Any = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    return cast(torch.nn.Module, inner)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the lean forward cannot run ``model``, or None where it can.

    It reimplements a Llama-family decoder (RMSNorm, rotary attention without q/k norms
    or sliding windows, a SiLU-gated MLP), so any other base has to train through its own
    forward; the trainer asks this first and falls back instead of failing.
    """
    lm = _inner_causal_lm(model)
    hf_config = getattr(lm, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or hf_config is None:
        return (
            f"the lean training forward supports Llama-family bases "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}), not {model_type!r}"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        return f"the lean training forward needs a SiLU MLP, this base uses {act!r}"
    for block in getattr(getattr(lm, "model", None), "layers", ()):
        attn = block.self_attn
        if hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None):
            return "the lean training forward does not support this base's attention variant"
    return None


class QuantizedCausalLM:
    """The fast training forward of one Llama-family peft model.

    It holds quantized (or cast) copies of the frozen weights and references to the
    model's own A and B parameters, so gradients land where the optimizer and ``get_b``
    expect them. Build it with :func:`prepare_quantized_model`.
    """

    def __init__(self, model: torch.nn.Module, config: QuantConfig) -> None:
        self.config = config
        reason = unsupported_reason(model)
        if reason is not None:
            raise SpecError(f"{reason}; use precision bf16 or fp32")
        lm = _inner_causal_lm(model)
        hf_config: Any = getattr(lm, "config", None)
        dtype = config.compute_dtype
        inner = cast(Any, lm).model
        self.embed = cast(torch.nn.Embedding, inner.embed_tokens).weight.detach()
        self.rotary = cast(Callable[..., tuple[torch.Tensor, torch.Tensor]], inner.rotary_emb)
        self.final_norm = cast(torch.Tensor, inner.norm.weight).detach().to(dtype)
        self.eps = float(hf_config.rms_norm_eps)
        self.lm_head = cast(torch.nn.Linear, cast(Any, lm).lm_head).weight.detach().to(dtype)
        int8 = set(config.quantized_modules) if config.weights == "int8" else set()
        kernel = config.kernel
        self.lm_head_q = (
            quantize_weight(self.lm_head, kernel, grad_input=False) if LM_HEAD in int8 else None
        )
        self.heads = int(hf_config.num_attention_heads)
        self.kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or self.heads)
        hidden = int(hf_config.hidden_size)
        self.head_dim = int(getattr(hf_config, "head_dim", None) or hidden // self.heads)
        self.layers: list[_Layer] = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp

            def lin(owner: Any, *names: str) -> _Linear:
                quantize = set(names) <= int8
                if not quantize and set(names) & int8:
                    raise SpecError(
                        f"quantized training: quantize all of {list(names)} or none of them"
                    )
                modules = [getattr(owner, name) for name in names]
                return _fused_linear(modules, kernel=kernel if quantize else None, dtype=dtype)

            self.layers.append(
                _Layer(
                    input_norm=block.input_layernorm.weight.detach().to(dtype),
                    post_norm=block.post_attention_layernorm.weight.detach().to(dtype),
                    qkv=lin(attn, "q_proj", "k_proj", "v_proj"),
                    o=lin(attn, "o_proj"),
                    gate_up=lin(mlp, "gate_proj", "up_proj"),
                    down=lin(mlp, "down_proj"),
                )
            )
        loras = [
            lora
            for layer in self.layers
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
            for lora in lin.loras
            if lora is not None
        ]
        self.params: list[torch.Tensor] = [lora.b for lora in loras]
        self.a_params: list[torch.Tensor] = [lora.a for lora in loras]
        if not self.params:
            raise SpecError(
                "quantized training: the model carries no adapter; materialize one first"
            )
        self._compiled_layer: Callable[..., torch.Tensor] | None = None
        compiled = "eager"
        if config.compile:
            missing = compiler_missing()
            if missing is None:
                # Inductor's default cache is under /tmp, which many systems empty at boot;
                # lorafleet's cache folder keeps the compiled layer for the next run.
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
                self._compiled_layer = torch.compile(
                    self._decoder_layer, options=_compile_options(dtype)
                )
                compiled = "compiled (torch.compile; the first step compiles)"
            else:
                log.warning("fast training forward: %s; decoder layers run eager", missing)
        log.info(
            "fast training forward: %d layers, frozen matmuls %s (int8: %s%s), compute %s, "
            "%d adapted Linears, layers %s",
            len(self.layers),
            config.weights,
            ",".join(sorted(int8)) or "none",
            f" via {kernel}" if int8 else "",
            str(dtype).removeprefix("torch."),
            len(self.params),
            compiled,
        )

    @property
    def compiled(self) -> bool:
        """Whether the decoder layers run through ``torch.compile`` (now)."""
        return self._compiled_layer is not None

    def _attention(
        self,
        layer: _Layer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        bsz, t, _ = x.shape
        q, k, v = layer.qkv(x)
        q = q.view(bsz, t, self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = k.view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, d)
        v = v.view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
        # The softmax scale rides on q's rotary (B, h, T, d) instead of the (B, h, T, T) scores.
        scale = self.head_dim**-0.5
        q = q * (cos * scale) + _rotate_half(q) * (sin * scale)
        k = k * cos + _rotate_half(k) * sin
        # Grouped-query attention without repeating k and v: the heads that share a kv head
        # (repeat_interleave's order) stack their queries, (B, kv, rep * T, d).
        rep = self.heads // self.kv_heads
        q = q.reshape(bsz, self.kv_heads, rep * t, self.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, kv, rep * T, T)
        scores = scores.view(bsz, self.kv_heads, rep, t, t).add_(mask.unsqueeze(2))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs.view(bsz, self.kv_heads, rep * t, t), v)  # (B, kv, rep*T, d)
        out = out.view(bsz, self.heads, t, self.head_dim).transpose(1, 2).reshape(bsz, t, -1)
        return layer.o(out)[0]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states before the final norm, ``(B, T, H)`` in the compute dtype."""
        dtype = self.config.compute_dtype
        bsz, t = input_ids.shape
        h = F.embedding(input_ids, self.embed).to(dtype)  # (B, T, H); no gradient needed
        positions = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(bsz, t)
        cos, sin = self.rotary(h, positions)  # (B, T, d)
        cos, sin = cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)  # (B, 1, T, d)
        allowed = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        try:
            return self._layers(h, cos, sin, mask)
        except TorchDynamoException as exc:  # compiling failed: this model runs eager now
            if not self.compiled:
                raise
            log.warning(
                "fast training forward: torch.compile failed (%s); decoder layers run eager",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            self._compiled_layer = None
            return self._layers(h, cos, sin, mask)

    def _layers(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        run = self._compiled_layer or self._decoder_layer
        for layer in self.layers:
            h = run(layer, h, cos, sin, mask)
        return h

    def _decoder_layer(
        self,
        layer: _Layer,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One decoder layer, ``(B, T, H)`` in and out; the unit ``compile`` compiles."""
        h = h + self._attention(layer, _rms_norm(h, layer.input_norm, self.eps), cos, sin, mask)
        x = _rms_norm(h, layer.post_norm, self.eps)
        gate, up = layer.gate_up(x)
        return h + layer.down(F.silu(gate) * up)[0]

    def loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over labelled tokens, as the HF model's ``.loss``.

        Differentiable with respect to the model's B matrices only.
        """
        h = self.hidden_states(input_ids, attention_mask)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != -100
        if not bool(keep.any()):
            raise SpecError("quantized training: the batch has no labelled tokens")
        rows = h[:, :-1][keep]  # (n, H) only where a label is
        rows = _rms_norm(rows, self.final_norm, self.eps)
        return linear_cross_entropy(
            rows, self.lm_head, targets[keep], chunk=self.config.ce_chunk, qweight=self.lm_head_q
        )


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[QuantConfig, QuantizedCausalLM]] = (
    weakref.WeakKeyDictionary()
)


def prepare_quantized_model(
    model: torch.nn.Module,
    config: QuantConfig | None = None,
    *,
    params: Sequence[torch.nn.Parameter] | None = None,
) -> QuantizedCausalLM:
    """The fast training forward for ``model``, a peft model from ``materialize``.

    The model itself is not changed: its frozen weights are read (and quantized into new
    tensors), its B parameters are shared. The result is kept with the model (weakly), so
    a trainer built every federated round quantizes the base once.

    Parameters
    ----------
    model
        A Llama-family peft model with a lorafleet adapter.
    config
        How to compute; int8 W8A8 frozen matmuls by default.
    params
        The parameters the caller's optimizer trains: every B matrix of the adapter,
        and possibly its A matrices (a personal A); the fast forward gives gradients to
        nothing else.

    Raises
    ------
    SpecError
        If the base is not a Llama-family causal LM, carries no adapter, or ``params``
        holds anything besides its A and B matrices.

    Examples
    --------
    >>> fast = prepare_quantized_model(peft_model, QuantConfig(weights="int8"))  # doctest: +SKIP
    >>> fast.loss(ids, mask, labels).backward()  # doctest: +SKIP
    """
    config = config or QuantConfig()
    per_model = _CACHE.setdefault(model, {})
    fast = per_model.get(config)
    if fast is None:
        with torch.no_grad():
            fast = QuantizedCausalLM(model, config)
        per_model[config] = fast
    if params is not None:
        given, b_ids = {id(p) for p in params}, {id(p) for p in fast.params}
        if not b_ids <= given or not given <= b_ids | {id(p) for p in fast.a_params}:
            raise SpecError(
                "the lean training paths train the adapter's B matrices (and A, for a "
                "personal A) only, but other parameters are trainable too; freeze them or "
                "use precision fp32"
            )
    return fast
