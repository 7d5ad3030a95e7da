"""The registry's tables, as SQLAlchemy Core metadata shared by the code and the migrations.

One schema serves SQLite and PostgreSQL. Its shape follows the questions asked of it at
a million adapters:

- ``users`` are pseudonymous ids only; the pseudonym column sorts bytewise on both
  backends (collation ``C`` on PostgreSQL, SQLite's default ``BINARY``), so a prefix is a
  contiguous key range and the console's user search is one index range scan.
- ``specs`` holds each adapter spec once (a cohort shares one), keyed by its fingerprint,
  with the base model hash in an indexed column.
- ``adapter_versions`` are immutable (a trigger refuses any ``UPDATE``) and carry the
  provenance columns; ``(adapter_id, version)`` is unique, a parent must be an existing
  version of the same adapter (a composite foreign key), and ``user_id`` is repeated here
  so "latest version of a user" and "a page of a user's history" are single index scans.
  The parent key has no ``ON DELETE`` action: a version with children cannot be deleted
  alone, only together with its whole lineage (erasing the user or the adapter).
- ``adapters.pinned_version`` is the rollback pointer: NULL follows the newest version.
- ``prior_versions``/``active_priors`` are the shared prior's versions and its pointer;
  ``prior_evaluations`` the devices' scores of a prior version (mean and spread of one
  round's validation losses) and ``prior_decisions`` the promotion rule's verdicts
  (promoted or held, by the policy or an operator, with the reason and the scores
  compared), appended and never rewritten; ``rounds`` the federated rounds, ``evaluations`` metrics reported after a version was
  stored, ``blobs`` the backup service's metadata of opaque encrypted blobs.
- ``devices`` are a user's enrolled devices (an Ed25519 public key each, for the backup
  service's signed requests) and the Flower SuperNodes the coordinator has seen; a
  revoked row stays, so its key can never be enrolled again. ``enrolment_tokens`` keep
  only the sha256 of a one-time token. ``audit_log`` records every operator action and
  ``controls`` holds operator switches (such as pausing training) as JSON.

Every table that holds personal data reaches ``users`` through ``ON DELETE CASCADE``, so
erasing a user cannot leave rows behind; the registry also deletes them explicitly to
count them. Integer ids are never reused (SQLite ``AUTOINCREMENT``, PostgreSQL
sequences): an id seen once names the same row forever.

Migrations in ``migrations/versions`` create exactly this schema; a test compares them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so migrations can name what they alter on both backends."""

VERSION_TABLE = "lorafleet_registry_version"
"""Alembic's bookkeeping table; prefixed so the registry can share a database."""

PSEUDONYM_LEN = 128
NAME_LEN = 128
HASH_LEN = 64

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def id_type() -> TypeEngine[int]:
    """64-bit ids on PostgreSQL; on SQLite ``INTEGER`` so the key is the rowid alias."""
    return BigInteger().with_variant(Integer(), "sqlite")


def bytewise_string(length: int) -> TypeEngine[str]:
    """A string that sorts by code point on both backends (prefix = contiguous range)."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends.

    PostgreSQL stores ``timestamptz``; SQLite stores text without an offset, so values
    are normalized to UTC on the way in and get their UTC tzinfo back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes; send UTC (naive on SQLite, which stores no offset)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("registry timestamps must be timezone-aware (UTC)")
        if value.tzinfo is not UTC:  # the registry's own timestamps already are (hot path)
            value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Give back an aware UTC datetime whichever backend stored it."""
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _autoincrement_pk() -> Column[int]:
    return Column("id", id_type(), primary_key=True, autoincrement=True)


specs = Table(
    "specs",
    metadata,
    Column("fingerprint", String(HASH_LEN), primary_key=True),
    Column("spec_json", Text, nullable=False),
    Column("base_model_id", String(256), nullable=False),
    Column("base_sha256", String(HASH_LEN), nullable=False, index=True),
    Column("cohort_seed", BigInteger, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

users = Table(
    "users",
    metadata,
    _autoincrement_pk(),
    Column("pseudonym", bytewise_string(PSEUDONYM_LEN), nullable=False, unique=True),
    Column("created_at", UtcDateTime, nullable=False),
    sqlite_autoincrement=True,
)

adapters = Table(
    "adapters",
    metadata,
    _autoincrement_pk(),
    Column("user_id", id_type(), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(NAME_LEN), nullable=False),
    Column(
        "spec_fingerprint",
        String(HASH_LEN),
        ForeignKey("specs.fingerprint"),
        nullable=False,
        index=True,
    ),
    # The rollback pointer: NULL follows the newest version, a number pins that version.
    Column("pinned_version", Integer, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("user_id", "name"),
    sqlite_autoincrement=True,
)

adapter_versions = Table(
    "adapter_versions",
    metadata,
    _autoincrement_pk(),
    Column("adapter_id", id_type(), ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", id_type(), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("parent", Integer, nullable=True),
    Column("prior_version", String(NAME_LEN), nullable=True),
    Column("round", Integer, nullable=True),
    Column("content_hash", String(HASH_LEN), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("num_params", BigInteger, nullable=True),
    Column("metrics_json", Text, nullable=False),
    # The provenance's own created_at string, kept verbatim so the record round-trips.
    Column("created_at", String(64), nullable=False),
    Column("registered_at", UtcDateTime, nullable=False),
    UniqueConstraint("adapter_id", "version"),
    ForeignKeyConstraint(
        ["adapter_id", "parent"],
        ["adapter_versions.adapter_id", "adapter_versions.version"],
        name="fk_adapter_versions_parent",
    ),
    Index("ix_adapter_versions_user_id_id", "user_id", "id"),
    sqlite_autoincrement=True,
)


def _evaluation_columns() -> list[Column[Any]]:
    """Who measured, in which round, what (a JSON object of metrics), when."""
    return [
        Column("source", String(32), nullable=False),
        Column("round", Integer, nullable=True),
        Column("metrics_json", Text, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
    ]


evaluations = Table(
    "evaluations",
    metadata,
    _autoincrement_pk(),
    Column(
        "version_id",
        id_type(),
        ForeignKey("adapter_versions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    *_evaluation_columns(),
    Index("ix_evaluations_version_id_id", "version_id", "id"),
    sqlite_autoincrement=True,
)

prior_versions = Table(
    "prior_versions",
    metadata,
    _autoincrement_pk(),
    Column("ref", String(NAME_LEN), nullable=False, unique=True),
    Column("spec_fingerprint", String(HASH_LEN), ForeignKey("specs.fingerprint"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("round", Integer, nullable=True),
    Column("content_hash", String(HASH_LEN), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("metrics_json", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("spec_fingerprint", "version"),
    sqlite_autoincrement=True,
)

active_priors = Table(
    "active_priors",
    metadata,
    Column("spec_fingerprint", String(HASH_LEN), ForeignKey("specs.fingerprint"), primary_key=True),
    Column("prior_id", id_type(), ForeignKey("prior_versions.id"), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

prior_evaluations = Table(
    "prior_evaluations",
    metadata,
    _autoincrement_pk(),
    Column("prior_id", id_type(), ForeignKey("prior_versions.id"), nullable=False),
    Column("devices", Integer, nullable=False),
    *_evaluation_columns(),
    Index("ix_prior_evaluations_prior_id_id", "prior_id", "id"),
    sqlite_autoincrement=True,
)

prior_decisions = Table(
    "prior_decisions",
    metadata,
    _autoincrement_pk(),
    # The candidate, and the active version it was compared with (NULL: the zero prior).
    Column("prior_id", id_type(), ForeignKey("prior_versions.id"), nullable=False),
    Column("against_id", id_type(), ForeignKey("prior_versions.id"), nullable=True),
    Column("spec_fingerprint", String(HASH_LEN), ForeignKey("specs.fingerprint"), nullable=False),
    Column("round", Integer, nullable=True),
    Column("decision", String(16), nullable=False),
    Column("decided_by", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    # The promotion rule's numbers (NULL when an operator decided).
    *(
        Column(name, Float, nullable=True)
        for name in ("candidate_score", "active_score", "tolerance")
    ),
    Column("created_at", UtcDateTime, nullable=False),
    # A cohort's decisions in order; a version's decisions.
    Index("ix_prior_decisions_spec_fingerprint_id", "spec_fingerprint", "id"),
    Index("ix_prior_decisions_prior_id_id", "prior_id", "id"),
    sqlite_autoincrement=True,
)

rounds = Table(
    "rounds",
    metadata,
    _autoincrement_pk(),
    Column("spec_fingerprint", String(HASH_LEN), ForeignKey("specs.fingerprint"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("config_json", Text, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("participants", Integer, nullable=True),
    Column("dropouts", Integer, nullable=True),
    Column("refused", Integer, nullable=True),
    Column("bytes_up", BigInteger, nullable=True),
    Column("bytes_down", BigInteger, nullable=True),
    Column("prior_ref", String(NAME_LEN), nullable=True),
    # Differential privacy spent by the prior up to and including this round (None: no DP).
    Column("dp_epsilon", Float, nullable=True),
    Column("dp_delta", Float, nullable=True),
    UniqueConstraint("spec_fingerprint", "number"),
    Index("ix_rounds_spec_fingerprint_id", "spec_fingerprint", "id"),
    sqlite_autoincrement=True,
)

blobs = Table(
    "blobs",
    metadata,
    _autoincrement_pk(),
    Column("blob_id", String(NAME_LEN), nullable=False, unique=True),
    Column("user_id", id_type(), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("adapter_id", id_type(), ForeignKey("adapters.id", ondelete="CASCADE"), nullable=True),
    Column("version", Integer, nullable=True),
    Column("kind", String(32), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(HASH_LEN), nullable=False, index=True),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_blobs_user_id_id", "user_id", "id"),
    Index("ix_blobs_adapter_id_version", "adapter_id", "version"),
    sqlite_autoincrement=True,
)

devices = Table(
    "devices",
    metadata,
    _autoincrement_pk(),
    Column("kind", String(16), nullable=False),
    Column("user_id", id_type(), ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
    Column("name", String(NAME_LEN), nullable=False),
    Column("public_key", LargeBinary(32), nullable=True, unique=True),
    # Flower node ids are unsigned 64-bit: kept as decimal text, which both backends hold
    # exactly (a signed BIGINT overflows above 2**63).
    Column("node_id", String(20), nullable=True, unique=True),
    Column("enrolled_at", UtcDateTime, nullable=False),
    Column("last_seen_at", UtcDateTime, nullable=True),
    Column("revoked_at", UtcDateTime, nullable=True),
    Index("ix_devices_user_id_id", "user_id", "id"),
    Index("ix_devices_kind_id", "kind", "id"),
    sqlite_autoincrement=True,
)

enrolment_tokens = Table(
    "enrolment_tokens",
    metadata,
    _autoincrement_pk(),
    Column("user_id", id_type(), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("token_sha256", String(HASH_LEN), nullable=False, unique=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("used_at", UtcDateTime, nullable=True),
    Index("ix_enrolment_tokens_user_id", "user_id"),
    sqlite_autoincrement=True,
)

audit_log = Table(
    "audit_log",
    metadata,
    _autoincrement_pk(),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", String(NAME_LEN), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(256), nullable=False),
    Column("detail_json", Text, nullable=False),
    sqlite_autoincrement=True,
)

controls = Table(
    "controls",
    metadata,
    Column("key", String(NAME_LEN), primary_key=True),
    Column("value_json", Text, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

request_nonces = Table(
    "request_nonces",
    metadata,
    # The backup service's replay cache: the nonce of every accepted signed request, kept
    # until its timestamp is too old to pass the clock check, so a restart forgets none.
    Column("public_key", LargeBinary(32), primary_key=True),
    Column("nonce", LargeBinary(16), primary_key=True),
    Column("expires_at", UtcDateTime, nullable=False),
    Index("ix_request_nonces_expires_at", "expires_at"),
)

IMMUTABLE_TABLES = ("adapter_versions", "prior_versions")
"""Tables whose rows a database trigger refuses to ``UPDATE`` (see the first migration)."""
