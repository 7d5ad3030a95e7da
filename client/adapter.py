"""Personal adapters on a frozen base: built from a spec, saved as stock PEFT folders.

A is rebuilt from the cohort seed (:func:`lorafleet.protocols.seeds.derive_a`) and
frozen while the federation trains; only B is shared, so the only tensors a device ever
sends are B matrices. The final personalization may also train A on the device (a
*personal A*, :attr:`AdapterProvenance.personal_a`); such a version keeps its A with its
B, hashes both, and is backed up whole. On disk an adapter is a standard PEFT folder
(``adapter_config.json`` + ``adapter_model.safetensors``), which stock
``peft.PeftModel.from_pretrained`` loads, plus ``lorafleet_adapter.json`` holding the
spec and provenance. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from lorafleet.client.layout import PROVENANCE_FILE as PROVENANCE_FILE
from lorafleet.client.layout import read_provenance as read_provenance
from lorafleet.protocols.atomic import atomic_directory
from lorafleet.protocols.encoding import content_hash
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.federation import BTensors as BTensors
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.seeds import derive_a
from lorafleet.protocols.spec import AdapterSpec

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


ATensors = dict[str, npt.NDArray[np.float32]]
"""A matrices keyed by module path, shape ``(r, in_features)``: a personal A."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _matches(name: str, target: str) -> bool:
    # peft's own rule for a list of target names: the full name or its last components.
    return name == target or name.endswith("." + target)


def lora_targets(model: torch.nn.Module, spec: AdapterSpec) -> list[tuple[str, int]]:
    """``(module_path, in_features)`` of every Linear the spec adapts, in model order.

    Raises
    ------
    SpecError
        If a target name matches no Linear layer (the message lists the names there are).
    """
    found: list[tuple[str, int]] = []
    unmatched = set(spec.target_modules)
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            raise LorafleetError("this base already carries a LoRA adapter; load a fresh base")
        if not isinstance(module, torch.nn.Linear):
            continue
        linear_names.add(name.rsplit(".", 1)[-1])
        hits = [t for t in spec.target_modules if _matches(name, t)]
        if hits:
            unmatched.difference_update(hits)
            found.append((name, module.in_features))
    if unmatched:
        raise SpecError(
            f"target module(s) {sorted(unmatched)} match no Linear layer of this base; "
            f"choose from {sorted(linear_names)}"
        )
    return found


def _lora_layers(peft_model: torch.nn.Module) -> dict[str, LoraLayer]:
    """LoRA layers keyed by their module path in the base (without peft's prefix)."""
    inner = (
        cast(torch.nn.Module, peft_model.base_model.model)
        if isinstance(peft_model, PeftModel)
        else peft_model
    )
    return {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _a_b(layer: LoraLayer) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The (A, B) Linear modules of one LoRA layer; A is (r, in), B is (out, r)."""
    return (
        cast(torch.nn.Linear, layer.lora_A[ADAPTER_NAME]),
        cast(torch.nn.Linear, layer.lora_B[ADAPTER_NAME]),
    )


def adapter_layers(
    peft_model: torch.nn.Module,
) -> dict[str, tuple[torch.nn.Linear, torch.nn.Linear]]:
    """The ``(A, B)`` Linear modules of every adapted layer, keyed by module path."""
    return {path: _a_b(layer) for path, layer in _lora_layers(peft_model).items()}


def materialize(
    model: torch.nn.Module,
    spec: AdapterSpec,
    *,
    base_sha256: str,
    b: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
) -> PeftModel:
    """Wrap ``model`` with the spec's adapter: seeded frozen A, B from ``b`` or zeros.

    The base model is modified in place (peft injects the LoRA layers); its own weights
    stay frozen.

    Parameters
    ----------
    model
        The frozen base causal LM.
    spec
        Adapter spec; its ``base_sha256`` must equal ``base_sha256``.
    base_sha256
        Manifest digest of the loaded base, checked against the spec.
    b
        Starting B matrices (a prior or a saved personal adapter); zeros if omitted.

    Examples
    --------
    >>> peft_model = materialize(base.model, spec, base_sha256=base.sha256)  # doctest: +SKIP
    >>> sorted(get_b(peft_model))[:1]  # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj']
    """
    if spec.base_sha256 != base_sha256:
        raise IntegrityError(
            f"adapter spec is for base {spec.base_sha256[:12]}…, but the loaded base is "
            f"{base_sha256[:12]}…; load the base the adapter was made for"
        )
    targets = lora_targets(model, spec)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # annotated int; peft divides by r
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    layers = _lora_layers(peft_model)
    dtype = _DTYPES[spec.dtype]
    with torch.no_grad():
        for path, fan_in in targets:
            lin_a, lin_b = _a_b(layers[path])
            lin_a.to(dtype)
            lin_b.to(dtype)
            lin_a.weight.copy_(torch.from_numpy(derive_a(spec, path, fan_in)))  # (r, in)
            lin_a.weight.requires_grad_(False)
            lin_b.weight.zero_()  # (out, r)
            lin_b.weight.requires_grad_(True)
    if b is not None:
        set_b(peft_model, b)
    log.debug("materialized rank-%d adapter on %d modules", spec.rank, len(targets))
    return peft_model


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the bare base inside the block; the adapter and its frozen A come back after.

    peft's own ``disable_adapter()`` re-marks every adapter weight trainable when it
    exits, which would silently make the seeded A trainable and the saved adapter
    unreadable; this restores each parameter's ``requires_grad`` as it was.
    """
    if not isinstance(model, PeftModel):
        raise SpecError("the bare base can only be used on a model with an adapter")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with model.disable_adapter():
            yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def get_b(peft_model: torch.nn.Module) -> BTensors:
    """Copy of every B matrix as float32 NumPy, keyed by module path; shape ``(out, r)``."""
    return {
        path: _a_b(layer)[1].weight.detach().to(torch.float32).cpu().numpy().copy()
        for path, layer in _lora_layers(peft_model).items()
    }


def _copy_in(
    peft_model: torch.nn.Module, values: Mapping[str, npt.NDArray[np.floating[Any]]], kind: str
) -> None:
    """Copy ``kind`` ("A" or "B") matrices in place, refusing any that do not fit."""
    layers = _lora_layers(peft_model)
    missing, extra = sorted(set(layers) - set(values)), sorted(set(values) - set(layers))
    if missing or extra:
        raise IntegrityError(
            f"{kind} tensors do not fit this adapter: missing {missing[:3]}, unexpected "
            f"{extra[:3]}; was it made with another spec?"
        )
    which = 0 if kind == "A" else 1
    with torch.no_grad():
        for path, layer in layers.items():
            weight = _a_b(layer)[which].weight
            value = np.asarray(values[path])
            if tuple(value.shape) != tuple(weight.shape):
                raise IntegrityError(
                    f"{kind} for {path} has shape {tuple(value.shape)}, expected "
                    f"{tuple(weight.shape)}"
                )
            if not np.isfinite(value).all():
                raise IntegrityError(f"{kind} for {path} contains NaN or Inf")
            weight.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))


def set_b(peft_model: torch.nn.Module, b: Mapping[str, npt.NDArray[np.floating[Any]]]) -> None:
    """Load B matrices in place, refusing missing, extra, mis-shaped or non-finite ones."""
    _copy_in(peft_model, b, "B")


def get_a(peft_model: torch.nn.Module) -> ATensors:
    """Copy of every A matrix as float32 NumPy, keyed by module path; shape ``(r, in)``."""
    return {
        path: _a_b(layer)[0].weight.detach().to(torch.float32).cpu().numpy().copy()
        for path, layer in _lora_layers(peft_model).items()
    }


@functools.lru_cache(maxsize=1024)
def _seeded(spec: AdapterSpec, path: str, fan_in: int) -> torch.Tensor:
    """``derive_a`` for one module, kept: the warm worker and ONNX generation ask each call.

    Never handed out to be written: callers copy it or compare against it.
    """
    return torch.from_numpy(derive_a(spec, path, fan_in))


def seeded_a(peft_model: torch.nn.Module, spec: AdapterSpec) -> ATensors:
    """The A every device rebuilds from ``spec``'s seed, for this model's adapted layers."""
    return {
        path: _seeded(spec, path, int(_a_b(layer)[0].weight.shape[1])).numpy().copy()
        for path, layer in _lora_layers(peft_model).items()
    }


def has_seeded_a(peft_model: torch.nn.Module, spec: AdapterSpec) -> bool:
    """Whether every A of the model is the spec's seeded A (in the A's own dtype)."""
    for path, layer in _lora_layers(peft_model).items():
        weight = _a_b(layer)[0].weight.detach().cpu()
        expected = _seeded(spec, path, int(weight.shape[1])).to(weight.dtype)
        if not torch.equal(weight, expected):
            return False
    return True


def load_a(peft_model: torch.nn.Module, a: Mapping[str, npt.NDArray[np.floating[Any]]]) -> None:
    """Copy A values in place, refusing missing, extra, mis-shaped or non-finite ones.

    Leaves ``requires_grad`` as it is, so a training run can put its best A back and
    go on training it; :func:`set_a` is the form that also freezes A.
    """
    _copy_in(peft_model, a, "A")


def set_a(
    peft_model: torch.nn.Module,
    spec: AdapterSpec,
    a: Mapping[str, npt.NDArray[np.floating[Any]]] | None,
) -> None:
    """Load A in place, frozen: a personal A, or ``None`` for the spec's seeded A.

    Training a personal A turns ``requires_grad`` on again
    (:class:`lorafleet.client.train.TrainConfig` ``a_lr``). A warm model that served one
    user's personal A must get the seeded A back before it serves anything else, hence
    the ``None`` form.
    """
    load_a(peft_model, seeded_a(peft_model, spec) if a is None else a)
    for layer in _lora_layers(peft_model).values():
        _a_b(layer)[0].weight.requires_grad_(False)


def set_weights(
    peft_model: torch.nn.Module,
    spec: AdapterSpec,
    b: Mapping[str, npt.NDArray[np.floating[Any]]],
    a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
) -> None:
    """Load one adapter version: its B, and its personal A or the seeded one."""
    set_b(peft_model, b)
    set_a(peft_model, spec, a)


def b_content_hash(
    spec: AdapterSpec,
    b: Mapping[str, npt.NDArray[np.floating[Any]]],
    a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
) -> str:
    """Content hash of one adapter version: its spec, its B and its personal A if any.

    Without a personal A the hash is of B alone, as it always was (the seeded A follows
    from the spec, which the hash binds); a personal A's tensors join under
    ``"<module path>:A"``, a name no module path can take.
    """
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in b.items()}
    if a is not None:
        tensors.update({f"{k}:A": np.asarray(v, dtype=np.float32) for k, v in a.items()})
    return content_hash(tensors, spec_fingerprint=spec.fingerprint())


def save_adapter(peft_model: PeftModel, folder: Path, provenance: AdapterProvenance) -> None:
    """Write an immutable adapter version as a stock PEFT folder plus provenance.

    The folder appears complete or not at all: it is assembled under a temporary name and
    renamed into place, so a killed process or a full disk leaves earlier versions intact.
    A version that says its A is seeded must hold exactly the seeded A: a trained A
    saved under that claim would fail every later read.
    """
    b = get_b(peft_model)
    if not provenance.personal_a and not has_seeded_a(peft_model, provenance.spec):
        raise IntegrityError(
            "the adapter's A is not the spec's seeded A; save it with personal_a=True"
        )
    a = get_a(peft_model) if provenance.personal_a else None
    actual = b_content_hash(provenance.spec, b, a)
    if actual != provenance.content_hash:
        raise IntegrityError("provenance content_hash does not match the adapter being saved")
    with atomic_directory(Path(folder)) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / PROVENANCE_FILE).write_text(provenance.to_json(), encoding="utf-8")


def read_adapter(folder: Path, provenance: AdapterProvenance) -> tuple[BTensors, ATensors | None]:
    """B and the personal A (None: seeded) of a saved adapter, verified.

    Raises
    ------
    IntegrityError
        If the weights file is missing or corrupt, its tensors do not hash to the
        recorded content hash, or (for a seeded-A version) its A differs from the one
        the spec's seed produces.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise IntegrityError(f"adapter weights missing: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(
            f"adapter weights at {path} are corrupt ({exc}); restore a backup"
        ) from None
    b: BTensors = {}
    a: ATensors = {}
    spec = provenance.spec
    for key, value in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise IntegrityError(f"unexpected tensor {key!r} in {path}")
        module, _, kind = key[len(_PEFT_PREFIX) :].rpartition(".lora_")
        if kind == "B.weight":
            b[module] = value.astype(np.float32)
        elif kind == "A.weight":
            if provenance.personal_a:
                if value.ndim != 2 or value.shape[0] != spec.rank:
                    raise IntegrityError(f"A for {module} in {path} has shape {value.shape}")
                a[module] = value.astype(np.float32)
                continue
            expected = derive_a(spec, module, int(value.shape[1]))
            if value.shape != expected.shape or not np.array_equal(
                value.astype(np.float32), expected
            ):
                raise IntegrityError(
                    f"A for {module} in {path} does not match the spec's seed; the adapter is corrupt"
                )
        else:
            raise IntegrityError(f"unexpected tensor {key!r} in {path}")
    personal = a if provenance.personal_a else None
    if personal is not None and sorted(personal) != sorted(b):
        raise IntegrityError(f"adapter weights at {path} pair A and B of different modules")
    if b_content_hash(spec, b, personal) != provenance.content_hash:
        raise IntegrityError(f"adapter weights at {path} do not match their recorded content hash")
    return b, personal


def read_b(folder: Path, provenance: AdapterProvenance) -> BTensors:
    """B of a saved adapter, after :func:`read_adapter` verified the whole version.

    Only for callers that need B alone (a check, a B-only comparison); loading a
    version into a model takes :func:`read_adapter`, which also returns a personal A.
    """
    return read_adapter(folder, provenance)[0]
