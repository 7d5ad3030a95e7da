"""Adapter specs: the few hundred bytes from which every device rebuilds an adapter.

A spec names the base model (by id and manifest sha256), the LoRA shape (rank, alpha,
target modules) and the cohort seed. Everything in it is plain data with a canonical JSON
form, so its fingerprint is the same on every platform and can be signed, stored in the
registry and compared cheaply.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lorafleet.protocols.errors import SpecError

AInit = Literal["kaiming_uniform", "sign"]
"""How the frozen A matrices are drawn from the cohort seed.

``kaiming_uniform`` matches peft's default A init (uniform in +-1/sqrt(fan_in));
``sign`` draws +-1/sqrt(fan_in) with equal probability. Both are computed from raw
64-bit generator output with exact IEEE arithmetic, so they are bit-identical everywhere.
"""

Dtype = Literal["float32", "bfloat16", "float16"]

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
"""The modules a spec adapts unless told otherwise (the LoRA paper's choice)."""

SPEC_FORMAT = 1
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_MAX_RANK = 1024


@dataclass(frozen=True)
class AdapterSpec:
    """The shape and seed of a personal adapter, shared by a cohort of users.

    Two devices holding the same spec build bit-identical frozen A matrices, so only B
    is ever trained or sent, and B from many users can be averaged exactly.

    Examples
    --------
    >>> spec = AdapterSpec(base_model_id="smollm2-135m-instruct", base_sha256="0" * 64)
    >>> spec.rank, spec.target_modules
    (8, ('q_proj', 'v_proj'))
    >>> AdapterSpec.from_json(spec.to_json()) == spec
    True
    """

    base_model_id: str = field(metadata={"help": "Human-readable base model name or hub id."})
    base_sha256: str = field(
        metadata={
            "help": "sha256 of the base model's manifest; adapters for another base are refused."
        }
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r (1..1024)."})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."}
    )
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGETS,
        metadata={"help": "Names (suffixes) of the Linear modules that get an adapter."},
    )
    cohort_seed: int = field(
        default=0, metadata={"help": "Seed of the frozen A matrices (0..2**63-1)."}
    )
    a_init: AInit = field(default="kaiming_uniform", metadata={"help": "Scheme for drawing A."})
    dtype: Dtype = field(default="float32", metadata={"help": "dtype of A and B on the device."})

    def __post_init__(self) -> None:
        if not self.base_model_id or not isinstance(self.base_model_id, str):
            raise SpecError("adapter spec: base_model_id must be a non-empty string")
        if not isinstance(self.base_sha256, str) or not _SHA256.match(self.base_sha256):
            raise SpecError(
                f"adapter spec: base_sha256 must be 64 lowercase hex characters, got {self.base_sha256!r}"
            )
        if (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, int)
            or not 1 <= self.rank <= _MAX_RANK
        ):
            raise SpecError(
                f"adapter spec: rank must be an integer in 1..{_MAX_RANK}, got {self.rank!r}"
            )
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise SpecError(f"adapter spec: alpha must be a positive number, got {self.alpha!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, tuple | list):
            raise SpecError(
                f"adapter spec: target_modules must be a list of module names, got {targets!r}"
            )
        if not targets:
            raise SpecError("adapter spec: target_modules is empty; name at least one, e.g. q_proj")
        for name in targets:
            if not isinstance(name, str) or not _MODULE_NAME.match(name):
                raise SpecError(f"adapter spec: {name!r} is not a valid module name")
        if len(set(targets)) != len(targets):
            raise SpecError(f"adapter spec: target_modules has duplicates: {list(targets)}")
        # Canonical order, so the same set of targets always fingerprints the same.
        object.__setattr__(self, "target_modules", tuple(sorted(targets)))
        object.__setattr__(self, "alpha", float(self.alpha))
        if (
            isinstance(self.cohort_seed, bool)
            or not isinstance(self.cohort_seed, int)
            or not 0 <= self.cohort_seed < 2**63
        ):
            raise SpecError(
                f"adapter spec: cohort_seed must be an integer in 0..2**63-1, got {self.cohort_seed!r}"
            )
        if self.a_init not in ("kaiming_uniform", "sign"):
            raise SpecError(
                f"adapter spec: a_init must be 'kaiming_uniform' or 'sign', got {self.a_init!r}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SpecError(
                f"adapter spec: dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )

    @property
    def scaling(self) -> float:
        """Factor peft applies to ``B @ A``: ``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, with the format version, for JSON and protobuf."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["format"] = SPEC_FORMAT
        return data

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; the input of :meth:`fingerprint`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON; equal specs have equal fingerprints everywhere."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        """Rebuild a spec, refusing unknown keys and future formats with a clear error."""
        if not isinstance(data, dict):
            raise SpecError(f"adapter spec: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise SpecError(
                f"adapter spec: format {fmt!r} is not supported by this lorafleet (expects {SPEC_FORMAT}); upgrade lorafleet"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"adapter spec: unknown field(s) {unknown}")
        if "target_modules" in data and isinstance(data["target_modules"], list):
            data["target_modules"] = tuple(data["target_modules"])
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise SpecError(f"adapter spec: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> AdapterSpec:
        """Parse :meth:`to_json` output (or any JSON object with the same fields)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"adapter spec: not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None
        return cls.from_dict(data)
