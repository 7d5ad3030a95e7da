"""What the registry hands back: frozen records, typed ids and keyset pages.

Records are plain immutable values read in one query, so the console and the backup
service can cache, compare and serialize them without a session or lazy loading. Ids
are ``NewType`` integers, so passing an adapter id where a version id belongs is a type
error, not a wrong row.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, NewType, TypeVar

from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry.errors import RegistryValueError

UserId = NewType("UserId", int)
AdapterId = NewType("AdapterId", int)
VersionId = NewType("VersionId", int)
EvaluationId = NewType("EvaluationId", int)
PriorId = NewType("PriorId", int)
RoundId = NewType("RoundId", int)
DeviceId = NewType("DeviceId", int)
PriorEvaluationId = NewType("PriorEvaluationId", int)

RoundStatus = Literal["running", "finished", "failed"]
PriorDecision = Literal["promoted", "held"]
DecidedBy = Literal["policy", "operator"]
DeviceKind = Literal["device", "supernode"]
DEVICE_KINDS: tuple[DeviceKind, ...] = ("device", "supernode")

T = TypeVar("T")
C = TypeVar("C", int, str)

MAX_PAGE = 1000
_PSEUDONYM = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}\Z")
_PREFIX = re.compile(r"^[A-Za-z0-9._:@+=-]{0,128}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}\Z")
PSEUDONYM_CHARS = "letters, digits and . _ : @ + = -"
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # one, not one per call


@dataclass(frozen=True)
class Page(Generic[T, C]):
    """One page of a keyset-paginated listing.

    Pass ``next_after`` back as ``after`` for the next page; it is None on the last page.
    Pass ``prev_before`` back as ``before`` for the page before this one; it is None on
    the first. Keyset (not offset) paging costs the same at page 1 and page 20,000, and
    rows added while someone pages never shift or repeat what they already saw.
    """

    items: tuple[T, ...]
    next_after: C | None
    prev_before: C | None = None


@dataclass(frozen=True)
class UserRecord:
    """A pseudonymous user: the registry never holds a name, an email or a device id."""

    id: UserId
    pseudonym: str
    created_at: datetime


@dataclass(frozen=True)
class AdapterRecord:
    """A user's named adapter and its spec (fixed for the adapter's life).

    ``pinned_version`` is the rollback pointer: None means the newest version is current.
    """

    id: AdapterId
    user_id: UserId
    pseudonym: str
    name: str
    spec: AdapterSpec
    pinned_version: int | None
    created_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    """One immutable adapter version: its provenance exactly as stored, plus sizes."""

    id: VersionId
    adapter_id: AdapterId
    user_id: UserId
    pseudonym: str
    adapter_name: str
    provenance: AdapterProvenance
    size_bytes: int
    num_params: int | None
    registered_at: datetime

    @property
    def version(self) -> int:
        """The per-adapter version number (1, 2, ...)."""
        return self.provenance.version


@dataclass(frozen=True)
class NewVersion:
    """One version to store with :meth:`Registry.add_versions` (the batched write)."""

    adapter_id: AdapterId
    provenance: AdapterProvenance
    size_bytes: int
    num_params: int | None = None

    def __post_init__(self) -> None:
        check_size("size_bytes", self.size_bytes)
        if self.num_params is not None:
            check_size("num_params", self.num_params)


@dataclass(frozen=True)
class DeviceReport:
    """One device's adapter report, checked by the coordinator, for the registry to record.

    Built by the coordinator from a device's round reply (metadata only). ``provenance``
    is a new version to store (with ``size_bytes``), ``evaluation`` the metrics the
    device measured on version ``evaluated`` in round ``round``, ``current`` the version
    the device uses (an older one is a rollback: the adapter's pointer moves). A report
    without a new version never creates a user or an adapter.
    """

    pseudonym: str
    adapter: str
    spec: AdapterSpec
    current: int | None = None
    provenance: AdapterProvenance | None = None
    size_bytes: int = 0
    evaluation: Mapping[str, float] | None = None
    evaluated: int | None = None
    round: int | None = None

    def __post_init__(self) -> None:
        check_pseudonym(self.pseudonym)
        check_label("adapter name", self.adapter)
        check_size("size_bytes", self.size_bytes)
        if not isinstance(self.spec, AdapterSpec):
            raise RegistryValueError(f"spec must be an AdapterSpec, got {type(self.spec).__name__}")
        if self.provenance is not None and self.provenance.spec != self.spec:
            raise RegistryValueError("a reported version must have the report's spec")
        if self.evaluation is not None:
            metrics_to_json(self.evaluation)  # finite numbers with names, or refused here


@dataclass(frozen=True)
class ReportCounts:
    """What :meth:`Registry.record_reports` wrote, and how many reports it skipped."""

    users: int = 0
    adapters: int = 0
    versions: int = 0
    evaluations: int = 0
    pointers: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class EvaluationRecord:
    """Metrics measured on a version after it was stored (by the server or a client)."""

    id: EvaluationId
    version_id: VersionId
    source: str
    round: int | None
    metrics: dict[str, float]
    created_at: datetime


@dataclass(frozen=True)
class PriorRecord:
    """One version of a cohort's shared prior B̄; ``ref`` is what provenance records."""

    id: PriorId
    ref: str
    spec_fingerprint: str
    version: int
    round: int | None
    content_hash: str
    size_bytes: int
    metrics: dict[str, float]
    created_at: datetime
    active: bool


@dataclass(frozen=True)
class PriorEvaluationRecord:
    """Devices' scores of one prior version in one round: mean and spread, never a device's."""

    id: PriorEvaluationId
    prior_id: PriorId
    ref: str
    round: int | None
    source: str
    devices: int
    metrics: dict[str, float]
    created_at: datetime


@dataclass(frozen=True)
class PriorDecisionRecord:
    """One verdict on a prior version: promoted (made active) or held, and why.

    ``against`` is the active version it was compared with (None: the zero prior, or an
    operator's decision); the scores are the promotion rule's numbers (None when an
    operator decided).
    """

    id: int
    spec_fingerprint: str
    prior_id: PriorId
    ref: str
    against: str | None
    round: int | None
    decision: PriorDecision
    decided_by: DecidedBy
    reason: str
    candidate_score: float | None
    active_score: float | None
    tolerance: float | None
    created_at: datetime


@dataclass(frozen=True)
class RoundRecord:
    """A federated round of one cohort: who took part, who dropped, what it cost."""

    id: RoundId
    spec_fingerprint: str
    number: int
    status: RoundStatus
    config: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None
    participants: int | None
    dropouts: int | None
    refused: int | None
    bytes_up: int | None
    bytes_down: int | None
    prior_ref: str | None
    dp_epsilon: float | None = None
    dp_delta: float | None = None

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to finish on the coordinator's clock; None while running."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class BlobRecord:
    """Metadata of one opaque encrypted blob; the registry never sees its plaintext."""

    id: int
    blob_id: str
    user_id: UserId
    adapter_id: AdapterId | None
    version: int | None
    kind: str
    size_bytes: int
    sha256: str
    created_at: datetime


@dataclass(frozen=True)
class DeviceRecord:
    """An enrolled device of a user, or a Flower SuperNode the coordinator has seen.

    A device carries the raw 32-byte Ed25519 public key that verifies its signed backup
    requests; a SuperNode carries its Flower node id. Revocation keeps the row (and so
    the key), so a revoked key can never be enrolled again under a fresh id.
    """

    id: DeviceId
    kind: DeviceKind
    user_id: UserId | None
    pseudonym: str | None
    name: str
    public_key: bytes | None
    node_id: int | None
    enrolled_at: datetime
    last_seen_at: datetime | None
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        """True once an operator (or the user) revoked it; its requests are refused."""
        return self.revoked_at is not None


@dataclass(frozen=True)
class AuditRecord:
    """One operator action: who did what to which target, and when (coordinator clock)."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class ErasureCounts:
    """Rows deleted by :meth:`Registry.erase_user`, per table (all zero: nothing held)."""

    users: int = 0
    adapters: int = 0
    versions: int = 0
    evaluations: int = 0
    blobs: int = 0
    devices: int = 0

    @property
    def total(self) -> int:
        """All rows deleted."""
        return (
            self.users
            + self.adapters
            + self.versions
            + self.evaluations
            + self.blobs
            + self.devices
        )


@dataclass(frozen=True)
class Counts:
    """How much the registry holds; the console's front page."""

    users: int
    adapters: int
    versions: int
    prior_versions: int
    rounds: int
    blobs: int


def check_pseudonym(pseudonym: str) -> str:
    """Refuse a pseudonym outside the allowed alphabet, naming it and the rule."""
    if not isinstance(pseudonym, str) or not _PSEUDONYM.match(pseudonym):
        raise RegistryValueError(
            f"pseudonym {pseudonym!r} is not valid: use 1-128 {PSEUDONYM_CHARS} "
            "(e.g. a hex digest; never a name or an email)"
        )
    return pseudonym


def check_prefix(prefix: str) -> str:
    """Refuse a search prefix that no pseudonym could start with."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise RegistryValueError(
            f"search prefix {prefix!r} is not valid: pseudonyms only contain {PSEUDONYM_CHARS}"
        )
    return prefix


def check_label(what: str, value: str) -> str:
    """Adapter names, blob ids, kinds, sources: short, printable, no spaces."""
    if not isinstance(value, str) or not _LABEL.match(value):
        raise RegistryValueError(
            f"{what} {value!r} is not valid: use 1-128 {PSEUDONYM_CHARS}, starting with a letter or digit"
        )
    return value


def check_sha256(what: str, value: str) -> str:
    """A lowercase hex sha256, as ``protocols.encoding.content_hash`` writes it."""
    if not isinstance(value, str) or not _SHA256.match(value):
        raise RegistryValueError(f"{what} must be 64 lowercase hex characters, got {value!r}")
    return value


def check_size(what: str, value: int) -> int:
    """A byte or element count: a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RegistryValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def check_count(what: str, value: int | None) -> int | None:
    """An optional non-negative count (participants, dropouts, bytes)."""
    return None if value is None else check_size(what, value)


def check_limit(limit: int) -> int:
    """A page size in 1..MAX_PAGE; bigger pages belong in an export, not a listing."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise RegistryValueError(f"page limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
    return limit


def metrics_to_json(metrics: Mapping[str, float]) -> str:
    """Canonical JSON of finite metrics; Python's float repr round-trips exactly."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise RegistryValueError(f"metric names must be non-empty strings, got {key!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise RegistryValueError(f"metric {key!r} must be a finite number, got {value!r}")
        clean[key] = value
    return _CANONICAL.encode(clean)


def metrics_from_json(text: str) -> dict[str, float]:
    """Inverse of :func:`metrics_to_json`."""
    data: dict[str, float] = json.loads(text)
    return data
