"""Where and in what precision the device computes: one place decides, and logs it.

``auto`` picks CUDA when present, else the CPU. On a CUDA GPU with bf16 it means bf16
(fp32 without). On a CPU it means what the measured device profile chose
(:mod:`lorafleet.client.device`): bf16 where the CPU has native bf16 (AVX-512-BF16, AMX,
ARM bf16) and a bf16 matmul measured faster than fp32, else fp32. bf16 stores the frozen
base's weights in bf16 (half the memory) and computes under bf16 autocast while the
adapter stays fp32; on such CPUs that trained B about 2x faster than fp32 at the same
held-out loss (docs/benchmarks.md), while on an AVX2-only CPU bf16 is emulated and many
times slower. The choice is logged once per process. Users override either choice
explicitly, and an explicit precision is never second-guessed:
``fp32`` (exact reference), ``bf16-mixed`` (fp32 weights, bf16 autocast), or ``int8``
(CPU only): the base is loaded in bf16 as for ``bf16``, and training runs its frozen
matrix multiplies in int8 through :mod:`lorafleet.client.qtrain`; evaluation and
generation use the bf16 base. ``nf4`` (CUDA only) loads the frozen base 4-bit NF4 through
bitsandbytes with bf16 compute, for GPUs with little memory; B stays fp32 either way.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

import torch

from lorafleet.protocols.errors import SpecError

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16-mixed", "bf16", "int8", "nf4"]
ConcretePrecision = Literal["fp32", "bf16-mixed", "bf16", "int8", "nf4"]


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
    if precision not in ("fp32", "bf16-mixed", "bf16", "int8", "nf4"):
        raise SpecError(
            f"unknown precision {precision!r}; use auto, fp32, bf16-mixed, bf16, int8 or nf4"
        )
    if precision == "int8" and device.type != "cpu":
        raise SpecError(f"precision int8 is a CPU training path; on {device.type} use bf16")
    if precision == "nf4" and device.type != "cuda":
        raise SpecError(
            "precision nf4 (bitsandbytes 4-bit) needs a CUDA GPU; on the CPU use int8 or bf16"
        )
    return precision


def base_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """Dtype to load the frozen base in: bf16 for ``bf16``, ``int8`` and ``nf4``, else fp32."""
    concrete = resolve_precision(precision, device)
    return torch.bfloat16 if concrete in ("bf16", "int8", "nf4") else torch.float32


def base_quantization(precision: Precision, device: torch.device) -> Literal["nf4"] | None:
    """How :func:`~lorafleet.client.base.load_base` should quantize the base at load time."""
    return "nf4" if resolve_precision(precision, device) == "nf4" else None


def autocast_context(
    precision: Precision, device: torch.device
) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast for bf16, bf16-mixed and int8 (its evaluation); a no-op for fp32."""
    if resolve_precision(precision, device) != "fp32":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place_on(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model`` to ``device``, except a 4-bit base, which bitsandbytes already placed."""
    get_base: Any = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    if getattr(inner, "is_loaded_in_4bit", False):
        return
    model.to(device)
