"""Provenance of one adapter version: where it came from and how good it was.

The device writes this next to every saved adapter and the registry stores the same
record, so a version can be traced to its base, seed, parent, prior and round without
anyone reading the adapter itself. Versions are immutable; a rollback moves a pointer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.spec import AdapterSpec

PROVENANCE_FORMAT = 1


@dataclass(frozen=True)
class AdapterProvenance:
    """Identity and lineage of one immutable adapter version.

    Examples
    --------
    >>> spec = AdapterSpec(base_model_id="m", base_sha256="0" * 64)
    >>> p = AdapterProvenance(spec=spec, version=1, content_hash="1" * 64)
    >>> AdapterProvenance.from_json(p.to_json()) == p
    True
    """

    spec: AdapterSpec
    version: int = field(metadata={"help": "1, 2, ... per adapter; never reused."})
    content_hash: str = field(
        metadata={
            "help": "protocols.encoding.content_hash of the B tensors (and of A, for a personal A)."
        }
    )
    parent: int | None = field(
        default=None, metadata={"help": "Version this one was trained from."}
    )
    prior_version: str | None = field(
        default=None, metadata={"help": "Shared prior it started from."}
    )
    round: int | None = field(default=None, metadata={"help": "Federated round that produced it."})
    created_at: str = field(default="", metadata={"help": "UTC ISO-8601 time of creation."})
    metrics: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Client-side evaluation, e.g. heldout_loss_after."}
    )
    personal_a: bool = field(
        default=False,
        metadata={
            "help": "A was trained on the device too (stored with B and hashed with it); "
            "False: A is the spec's seeded A, rebuilt from the seed and checked against it."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise SpecError(
                f"adapter provenance: version must be an integer >= 1, got {self.version!r}"
            )
        if self.parent is not None and not (
            isinstance(self.parent, int) and 1 <= self.parent < self.version
        ):
            raise SpecError(
                f"adapter provenance: parent must be an earlier version than {self.version}, got {self.parent!r}"
            )
        if not isinstance(self.personal_a, bool):
            raise SpecError(
                f"adapter provenance: personal_a must be true or false, got {self.personal_a!r}"
            )
        for key, value in self.metrics.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise SpecError(
                    f"adapter provenance: metric {key!r} must be a finite number, got {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON, the registry and protobuf.

        ``personal_a`` appears only when true, so a seeded-A version's file is what it
        was before the field existed, and a lorafleet too old to know personal A refuses
        such a version (an unknown field) instead of pairing its B with the seeded A.
        """
        out: dict[str, Any] = {
            "format": PROVENANCE_FORMAT,
            "spec": self.spec.to_dict(),
            "version": self.version,
            "content_hash": self.content_hash,
            "parent": self.parent,
            "prior_version": self.prior_version,
            "round": self.round,
            "created_at": self.created_at,
            "metrics": dict(sorted(self.metrics.items())),
        }
        if self.personal_a:
            out["personal_a"] = True
        return out

    def to_json(self) -> str:
        """Pretty, sorted JSON; humans read these files next to their adapters."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterProvenance:
        """Rebuild a record, refusing unknown formats and fields with a clear error."""
        if not isinstance(data, dict):
            raise SpecError("adapter provenance: expected a JSON object")
        data = dict(data)
        fmt = data.pop("format", PROVENANCE_FORMAT)
        if fmt != PROVENANCE_FORMAT:
            raise SpecError(
                f"adapter provenance: format {fmt!r} is not supported; upgrade lorafleet"
            )
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SpecError(f"adapter provenance: unknown field(s) {unknown}")
        try:
            spec = AdapterSpec.from_dict(data.pop("spec"))
            return cls(spec=spec, **data)
        except (KeyError, TypeError) as exc:
            raise SpecError(f"adapter provenance: missing or bad field ({exc})") from None

    @classmethod
    def from_json(cls, text: str) -> AdapterProvenance:
        """Parse :meth:`to_json` output."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"adapter provenance: not valid JSON ({exc.msg})") from None
