"""What a device tells the coordinator about its personal adapter: metadata, never weights.

After a round a device reports which version of its personal adapter it uses and, when
the round saved a new version, that version's identity and lineage (version, parent,
spec fingerprint, base sha256, the prior it started from, the round), how it was
trained and scored (examples, validation and, when the device has one, test loss) and
its size. The coordinator records the new version as an immutable row with provenance
plus an evaluation row, and a ``current`` older than the newest as the rollback pointer
it is. No tensor, no text, no path travels: the adapter itself stays on the device.

A device that opts out (node or run setting ``report-versions = false``) sends no
report at all. Everything here is validated on construction because reports arrive from
devices the coordinator does not control: a malformed one raises :class:`SpecError`
naming the field, so the coordinator can log one line and skip it.

On the wire a report is flat scalars: a Flower ``ConfigRecord`` under :data:`REPORT_KEY`
in a plain reply, and fields prefixed :data:`SECURE_REPORT_PREFIX` beside the metrics in
a SecAgg+ reply (the only plaintext Flower's SecAgg+ mod lets through). An SDK ``train``
on a device enrolled for backup sends the same fields through the backup service's
signed ``ReportVersions`` call (:mod:`lorafleet.protocols.serde`); such a version has
no round, and no prior unless it started from one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from lorafleet.protocols.errors import SpecError

REPORT_KEY = "lorafleet.adapter"
"""Record of a plain reply that carries the device's :class:`AdapterReport`."""
SECURE_REPORT_PREFIX = "lorafleet-adapter."
"""Prefix of the report's fields among a SecAgg+ reply's plaintext metrics."""

MAX_VERSION = 2**31 - 1
"""Versions, parents and rounds are 32-bit integers in the registry."""
MAX_SIZE_BYTES = 2**40
"""An adapter version larger than 1 TiB is a lie or a bug (rank-8 adapters are MBs)."""
MAX_LOSS = 1e6
"""Cross-entropy of any real model is far below this; larger values are refused."""
MAX_EXAMPLES = 10**9
"""The most training examples a report may claim (as ``RoundMetrics`` allows)."""
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}\Z")
_PRIOR_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_R = TypeVar("_R")


def _fail(what: str) -> SpecError:
    return SpecError(f"adapter report: {what}")


def _integer(name: str, value: object, low: int, high: int) -> int:
    """An int in [low, high]; an integral float (how some transports carry ints) too."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _text(name: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        shown = value[:80] if isinstance(value, str) else value
        raise _fail(f"{name} must be {rule}, got {shown!r}")
    return value


def _loss(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not 0 <= value <= MAX_LOSS:
        raise _fail(f"{name} must be a finite loss in [0, {MAX_LOSS:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class VersionReport:
    """A personal adapter version the device saved in this round (its metadata only).

    Examples
    --------
    >>> v = VersionReport(version=2, parent=1, spec_fingerprint="a" * 64,
    ...     base_sha256="b" * 64, content_hash="c" * 64, prior_version="abcd/v1",
    ...     round=1, num_examples=24, val_loss=2.5, size_bytes=1200)
    >>> VersionReport.from_config(v.to_config()) == v
    True
    """

    version: int
    spec_fingerprint: str
    base_sha256: str
    content_hash: str
    """sha256 of the B tensors (``protocols.encoding.content_hash``): it says whether two
    versions are equal, not what they hold."""
    num_examples: int
    val_loss: float
    size_bytes: int
    prior_version: str | None = None
    """The prior the version started from; None for one trained alone (an SDK ``train``)."""
    round: int | None = None
    """The federated round that saved it; None outside a round (an SDK ``train``)."""
    parent: int | None = None
    test_loss: float | None = None
    created_at: str = ""

    def __post_init__(self) -> None:
        version = _integer("version", self.version, 1, MAX_VERSION)
        object.__setattr__(self, "version", version)
        if self.parent is not None:
            object.__setattr__(self, "parent", _integer("parent", self.parent, 1, version - 1))
        for name in ("spec_fingerprint", "base_sha256", "content_hash"):
            _text(name, getattr(self, name), _SHA256, "64 lowercase hex characters")
        if self.prior_version is not None:
            _text("prior_version", self.prior_version, _PRIOR_REF, "a prior reference such as zero")
        if self.round is not None:
            object.__setattr__(self, "round", _integer("round", self.round, 0, MAX_VERSION))
        object.__setattr__(
            self, "num_examples", _integer("num_examples", self.num_examples, 0, MAX_EXAMPLES)
        )
        object.__setattr__(self, "val_loss", _loss("val_loss", self.val_loss))
        if self.test_loss is not None:
            object.__setattr__(self, "test_loss", _loss("test_loss", self.test_loss))
        object.__setattr__(
            self, "size_bytes", _integer("size_bytes", self.size_bytes, 0, MAX_SIZE_BYTES)
        )
        if not isinstance(self.created_at, str) or len(self.created_at) > 64:
            shown = str(self.created_at)[:80]
            raise _fail(f"created_at must be an ISO-8601 time of <= 64 characters, got {shown!r}")
        if self.created_at:
            try:
                datetime.fromisoformat(self.created_at)
            except ValueError:
                raise _fail(f"created_at is not an ISO-8601 time: {self.created_at!r}") from None

    def to_config(self) -> dict[str, int | float | str]:
        """Flat scalars (hyphenated names); unset optional fields are left out."""
        return {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VersionReport:
        """Parse :meth:`to_config` output; a missing, extra or bad field is a SpecError."""
        return _build(cls, _kwargs(cls, config))


@dataclass(frozen=True)
class AdapterReport:
    """A device's report after a round: the version in use, and the one saved, if any.

    ``current`` is the version the device uses now: the saved one after a round that
    saved, an older one after a rollback on the device (the coordinator moves its
    pointer; versions are never rewritten). ``user`` is a label the device is known by
    (its user folder in a simulation, the node setting ``user`` on a SuperNode); the
    coordinator uses it as the pseudonym only when told to trust devices
    (``user-pseudonym = "device"``), and otherwise keys the pseudonym on the node.

    Examples
    --------
    >>> r = AdapterReport(adapter="default", current=3)
    >>> AdapterReport.from_config(r.to_config()) == r
    True
    >>> AdapterReport.from_config({"adapter": "default", "current": -1})
    Traceback (most recent call last):
    ...
    lorafleet.protocols.errors.SpecError: adapter report: current must be an integer in [1, 2147483647], got -1
    """

    adapter: str
    current: int
    saved: VersionReport | None = None
    user: str = ""

    def __post_init__(self) -> None:
        _text("adapter", self.adapter, _LABEL, "1-128 letters, digits and . _ : @ + = -")
        object.__setattr__(self, "current", _integer("current", self.current, 1, MAX_VERSION))
        if self.user:
            _text("user", self.user, _LABEL, "1-128 letters, digits and . _ : @ + = -")
        if self.saved is not None and not isinstance(self.saved, VersionReport):
            raise _fail("saved must be a VersionReport")

    def to_config(self) -> dict[str, int | float | str]:
        """Flat scalars: the pointer, the label if any, and the saved version's fields."""
        out: dict[str, int | float | str] = {"adapter": self.adapter, "current": self.current}
        if self.user:
            out["user"] = self.user
        if self.saved is not None:
            out.update(self.saved.to_config())
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AdapterReport:
        """Parse :meth:`to_config` output, refusing anything an honest device never sends."""
        config = dict(config)
        head: dict[str, Any] = {
            k: config.pop(k) for k in ("adapter", "current", "user") if k in config
        }
        saved = VersionReport.from_config(config) if config else None
        return _build(cls, {**_kwargs(cls, head, skip=("saved",)), "saved": saved})

    def to_secure_fields(self) -> dict[str, int | float | str]:
        """The report as prefixed fields beside a SecAgg+ reply's metrics."""
        return {SECURE_REPORT_PREFIX + k: v for k, v in self.to_config().items()}

    @classmethod
    def from_secure_fields(cls, fields_: Mapping[str, Any]) -> AdapterReport | None:
        """The report among a SecAgg+ reply's plaintext fields; None when it has none."""
        n = len(SECURE_REPORT_PREFIX)
        found = {k[n:]: v for k, v in fields_.items() if k.startswith(SECURE_REPORT_PREFIX)}
        return cls.from_config(found) if found else None


def _kwargs(
    cls: type[Any], config: Mapping[str, Any], *, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Constructor arguments from hyphenated keys; unknown or missing keys are refused."""
    names = {f.name.replace("_", "-"): f.name for f in fields(cls) if f.name not in skip}
    unknown = sorted(str(k)[:40] for k in config if k not in names)
    if unknown:
        raise _fail(f"unknown field(s) {unknown[:5]}")
    return {names[k]: v for k, v in config.items()}


def _build(cls: type[_R], kwargs: Mapping[str, Any]) -> _R:
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise _fail(str(exc).split(".", 1)[-1].strip()) from None
