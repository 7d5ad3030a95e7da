"""Where and in what precision the device computes: one place decides, and logs it.

``auto`` picks CUDA when present, else the CPU. On a CUDA GPU with bf16 it means bf16
(fp32 without). On a CPU it means what the measured device profile chose
(:mod:`lorafleet.client.device`), always one of the lean training paths below:

- a CPU with native bf16 (AVX-512-BF16, AMX, ARM bf16) whose bf16 matmul measured faster
  than fp32: ``bf16-lean``, or ``int8`` where the int8 kernel measured clearly faster;
- any other CPU (every AVX2-only x86 laptop, Apple M1), where bf16 is emulated and many
  times slower: ``fp32-lean``, or ``int8-fp32`` where the int8 kernel measured clearly
  faster than fp32. Nothing on that side computes in bf16.

The choice is logged once per process (``lorafleet device`` shows it). Users override
it explicitly, and an explicit precision is never second-guessed. Each precision is one
:class:`PrecisionPlan` in :data:`PLANS` (a registry, not an if-chain):

``fp32``
    The exact reference: fp32 weights, the model's own (peft) forward.
``bf16-mixed``
    fp32 weights, bf16 autocast.
``bf16``
    bf16 base weights (half the memory), bf16 autocast; the adapter stays fp32.
``fp32-lean``, ``bf16-lean``
    The same weights as ``fp32``/``bf16``, but training runs the lean forward of
    :mod:`lorafleet.client.qtrain` (fused q/k/v and gate/up, eager attention, fused
    chunked lm_head + cross-entropy; no autocast).
``int8``
    bf16 base; training runs its frozen matmuls in int8 (W8A8) and everything else in
    bf16 through the lean forward. CPU only.
``int8-fp32``
    fp32 base; int8 frozen matmuls with every other operation in fp32, for CPUs without
    native bf16. CPU only.
``nf4``
    CUDA only: the frozen base 4-bit NF4 through bitsandbytes with bf16 compute.

The lean paths train the same B as the peft forward, so they produce the same stock
personal adapter; evaluation and generation always use the model's own forward. On a
base the lean forward does not support (not Llama-family) the trainer falls back to the
plan's ``fallback`` precision and logs why. B stays fp32 on every path.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from lorafleet.protocols.errors import SpecError

log = logging.getLogger(__name__)

Precision = Literal[
    "auto", "fp32", "bf16-mixed", "bf16", "fp32-lean", "bf16-lean", "int8", "int8-fp32", "nf4"
]
ConcretePrecision = Literal[
    "fp32", "bf16-mixed", "bf16", "fp32-lean", "bf16-lean", "int8", "int8-fp32", "nf4"
]
LeanMatmuls = Literal["fp32", "bf16", "int8"]
LeanCompute = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class PrecisionPlan:
    """What one concrete precision means for loading, training and evaluating.

    Examples
    --------
    >>> PLANS["int8-fp32"].lean
    ('int8', 'fp32')
    >>> PLANS["int8-fp32"].autocast, PLANS["int8-fp32"].base_dtype
    (False, torch.float32)
    """

    base_dtype: torch.dtype = field(metadata={"help": "dtype the frozen base is loaded in"})
    autocast: bool = field(metadata={"help": "bf16 autocast around the model's own forward"})
    lean: tuple[LeanMatmuls, LeanCompute] | None = field(
        default=None,
        metadata={"help": "(frozen matmuls, compute) of qtrain's lean training forward"},
    )
    fallback: ConcretePrecision | None = field(
        default=None,
        metadata={"help": "peft-forward precision used where the lean forward cannot run"},
    )
    devices: tuple[str, ...] = ("cpu", "cuda")
    quantization: Literal["nf4"] | None = None


PLANS: dict[str, PrecisionPlan] = {
    "fp32": PrecisionPlan(torch.float32, autocast=False),
    "bf16-mixed": PrecisionPlan(torch.float32, autocast=True),
    "bf16": PrecisionPlan(torch.bfloat16, autocast=True),
    "fp32-lean": PrecisionPlan(torch.float32, False, ("fp32", "fp32"), "fp32", ("cpu",)),
    "bf16-lean": PrecisionPlan(torch.bfloat16, True, ("bf16", "bf16"), "bf16", ("cpu",)),
    "int8": PrecisionPlan(torch.bfloat16, True, ("int8", "bf16"), "bf16", ("cpu",)),
    "int8-fp32": PrecisionPlan(torch.float32, False, ("int8", "fp32"), "fp32", ("cpu",)),
    "nf4": PrecisionPlan(torch.bfloat16, True, devices=("cuda",), quantization="nf4"),
}
"""Every concrete precision; ``Precision`` lists the same names plus ``auto``."""

PRECISIONS: tuple[str, ...] = get_args(Precision)


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), checked."""
    if device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device: %s (auto)", chosen)
        return chosen
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise SpecError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            f"device {device!r} asked for, but no CUDA GPU is available; use cpu or auto"
        )
    if chosen.type not in ("cpu", "cuda"):
        raise SpecError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return chosen


_ANNOUNCED: set[str] = set()


def _auto_cpu_precision() -> ConcretePrecision:
    """The device profile's choice (measured once per machine), logged once per process."""
    from lorafleet.client.device import device_profile

    profile = device_profile()
    line = f"precision auto -> {profile.choice}: {profile.reason}"
    if line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        log.info("%s", line)
    return profile.choice


def resolve_precision(precision: Precision, device: torch.device) -> ConcretePrecision:
    """The concrete precision for ``precision`` on ``device``.

    ``auto`` on a CPU asks the measured device profile (cached per machine, so this is
    cheap after the first call); any other value is returned as given once checked.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return _auto_cpu_precision()
    plan = PLANS.get(precision)
    if plan is None:
        raise SpecError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if device.type not in plan.devices:
        if plan.quantization == "nf4":
            raise SpecError(
                "precision nf4 (bitsandbytes 4-bit) needs a CUDA GPU; on the CPU use int8 or bf16"
            )
        fix = "bf16" if plan.base_dtype == torch.bfloat16 else "fp32"
        raise SpecError(
            f"precision {precision} is a CPU training path; on {device.type} use {fix} or auto"
        )
    return precision


def precision_plan(precision: Precision, device: torch.device) -> PrecisionPlan:
    """The :class:`PrecisionPlan` of ``precision`` once resolved on ``device``."""
    return PLANS[resolve_precision(precision, device)]


def base_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """Dtype to load the frozen base in: bf16 for the bf16 plans, ``int8`` and ``nf4``."""
    return precision_plan(precision, device).base_dtype


def base_quantization(precision: Precision, device: torch.device) -> Literal["nf4"] | None:
    """How :func:`~lorafleet.client.base.load_base` should quantize the base at load time."""
    return precision_plan(precision, device).quantization


def autocast_context(
    precision: Precision, device: torch.device
) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast where the plan says so (bf16 plans, int8's evaluation); else a no-op.

    Never for ``fp32``, ``fp32-lean`` or ``int8-fp32``: on a CPU without native bf16 an
    autocast evaluation would be emulated and many times slower.
    """
    if precision_plan(precision, device).autocast:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place_on(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model`` to ``device``, except a 4-bit base, which bitsandbytes already placed."""
    get_base: Any = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    if getattr(inner, "is_loaded_in_4bit", False):
        return
    model.to(device)
