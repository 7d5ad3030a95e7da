"""The adapter registry: identity, immutable versions with provenance, priors, rounds, blobs.

One :class:`Registry` object serves the coordinator's strategy (it records rounds,
priors and the versions clients report), the console (it pages through users and
histories) and the backup service (it keeps blob metadata). It is safe to share between
threads: every call takes a pooled connection for one short transaction.

Design notes, each a reason rather than a rule:

- **Versions are immutable.** ``add_version`` refuses a version number its adapter
  already has, a parent the adapter does not have, and a spec other than the adapter's;
  a database trigger refuses any ``UPDATE`` of a stored version. Rolling back moves a
  pointer (:meth:`Registry.set_current`), it never rewrites history.
- **Built for a million adapters.** Every lookup the console and the backup service make
  is one index scan (see ``models``); listings page by keyset (``after=`` the last key
  seen), so page 20,000 costs what page 1 does; writes come in batches
  (:meth:`Registry.add_versions`, :meth:`Registry.ensure_users`,
  :meth:`Registry.create_adapters`) that validate once and insert with ``executemany``.
- **Errors a user can fix are one line.** Unknown ids raise
  :class:`~lorafleet.server.registry.errors.NotFoundError`, rewrites
  :class:`~lorafleet.server.registry.errors.ConflictError`; constraint failures from the
  database are diagnosed into those rather than surfacing driver messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError

from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry.database import (
    create_registry_engine,
    describe_connect_failure,
    migrate,
    parse_url,
    write_connection,
)
from lorafleet.server.registry.errors import (
    AuthorizationError,
    ConflictError,
    NotFoundError,
    RegistryError,
    RegistryValueError,
    UnavailableError,
)
from lorafleet.server.registry.lookups import Prepared, fetch, prepare
from lorafleet.server.registry.models import (
    active_priors,
    adapter_versions,
    adapters,
    audit_log,
    blobs,
    controls,
    devices,
    enrolment_tokens,
    evaluations,
    prior_decisions,
    prior_evaluations,
    prior_versions,
    request_nonces,
    rounds,
    specs,
    users,
)
from lorafleet.server.registry.records import (
    DEVICE_KINDS,
    AdapterId,
    AdapterRecord,
    AuditRecord,
    BlobRecord,
    Counts,
    DecidedBy,
    DeviceId,
    DeviceKind,
    DeviceRecord,
    DeviceReport,
    ErasureCounts,
    EvaluationId,
    EvaluationRecord,
    NewVersion,
    Page,
    PriorDecision,
    PriorDecisionRecord,
    PriorEvaluationId,
    PriorEvaluationRecord,
    PriorId,
    PriorRecord,
    ReportCounts,
    RoundId,
    RoundRecord,
    RoundStatus,
    UserId,
    UserRecord,
    VersionId,
    VersionRecord,
    check_count,
    check_label,
    check_limit,
    check_prefix,
    check_pseudonym,
    check_sha256,
    check_size,
    metrics_from_json,
    metrics_to_json,
)

log = logging.getLogger(__name__)

UserRef = UserId | str
"""A user by registry id or by pseudonym; every method that takes a user takes either."""

SpecRef = AdapterSpec | str
"""A cohort by its spec or the spec's fingerprint."""

_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's parameter limits
_T = TypeVar("_T")

_v, _a, _u = adapter_versions, adapters, users
_VERSION_COLUMNS = (
    _v.c.id,
    _v.c.adapter_id,
    _v.c.user_id,
    _u.c.pseudonym,
    _a.c.name,
    _a.c.spec_fingerprint,
    _v.c.version,
    _v.c.parent,
    _v.c.prior_version,
    _v.c.round,
    _v.c.content_hash,
    _v.c.size_bytes,
    _v.c.num_params,
    _v.c.metrics_json,
    _v.c.created_at,
    _v.c.registered_at,
)
_VERSIONS_JOINED = _v.join(_a, _a.c.id == _v.c.adapter_id).join(_u, _u.c.id == _v.c.user_id)


def _versions_select() -> Select[Any]:
    return select(*_VERSION_COLUMNS).select_from(_VERSIONS_JOINED)


_HOT_LOOKUPS: dict[str, Callable[[], Select[Any]]] = {
    "by_id": lambda: _versions_select().where(_v.c.id == bindparam("id")),
    "latest_of_adapter": lambda: (
        _versions_select()
        .where(_v.c.adapter_id == bindparam("adapter_id"))
        .order_by(_v.c.version.desc())
        .limit(1)
    ),
    "latest_of_pseudonym": lambda: (
        _versions_select()
        .where(_u.c.pseudonym == bindparam("pseudonym"))
        .order_by(_v.c.id.desc())
        .limit(1)
    ),
    "latest_of_user": lambda: (
        _versions_select()
        .where(_v.c.user_id == bindparam("user_id"))
        .order_by(_v.c.id.desc())
        .limit(1)
    ),
}
"""The version lookups the console and backup service make most, compiled once each."""


def prior_ref(spec_fingerprint: str, version: int) -> str:
    """The string a prior version is known by in provenance: ``<fingerprint[:16]>/v<n>``.

    Examples
    --------
    >>> prior_ref("ab" * 32, 3)
    'abababababababab/v3'
    """
    return f"{spec_fingerprint[:16]}/v{version}"


def _now() -> datetime:
    return datetime.now(UTC)


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _bulk_insert(
    conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], **constants: Any
) -> None:
    """INSERT ``rows`` with the driver's ``executemany``; ``constants`` go in every row.

    SQLAlchemy's own executemany runs every value through its type processing, per row;
    at 10,000 rows a batch that costs more than the database does. Here the statement is
    compiled once for the dialect (so it is exactly the table's INSERT), the constants
    (timestamps) are processed once, and only columns whose type needs processing are
    processed per row.
    """
    if not rows:
        return
    dialect = conn.dialect
    varying = list(rows[0])
    columns = varying + list(constants)
    compiled = insert(table).compile(dialect=dialect, column_keys=columns)

    def processor(name: str) -> Any:
        return table.c[name].type.dialect_impl(dialect).bind_processor(dialect)

    fixed = {}
    for name, value in constants.items():
        proc = processor(name)
        fixed[name] = proc(value) if proc is not None else value
    procs = [(name, proc) for name in varying if (proc := processor(name)) is not None]
    params: list[Any] = []
    for row in rows:
        values = {**row, **fixed}
        for name, proc in procs:
            values[name] = proc(values[name])
        params.append(values)
    if compiled.positiontup is not None:  # qmark/format drivers (SQLite) take tuples
        order = compiled.positiontup
        params = [tuple(values[name] for name in order) for values in params]
    conn.exec_driver_sql(compiled.string, params)


def _max_id(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.max(table.c.id))).scalar() or 0)


def _ids_since(
    conn: Connection,
    table: Table,
    max_before: int,
    columns: tuple[str, str],
    keys: Sequence[tuple[Any, Any]],
) -> dict[tuple[Any, Any], int]:
    """Ids of the rows this transaction just inserted, by their unique key.

    Ids only grow (SQLite ``AUTOINCREMENT`` under the write lock this transaction holds;
    PostgreSQL sequences with the default ``CACHE 1``), so every row inserted after
    ``max_before`` was read has a larger id: one primary-key range scan finds them.
    Rows other writers committed meanwhile are filtered out by key (the key is unique, so
    none can share one of ours). This replaces ``INSERT ... RETURNING`` under
    ``executemany``, which SQLite cannot return in parameter order, so SQLAlchemy would
    insert one row per statement; a plain ``executemany`` plus this scan is several times
    faster there and as fast on PostgreSQL.
    """
    first, second = table.c[columns[0]], table.c[columns[1]]
    wanted = set(keys)
    out: dict[tuple[Any, Any], int] = {}
    query = select(table.c.id, first, second).where(table.c.id > max_before)
    for row_id, a, b in conn.execute(query):
        if (a, b) in wanted:
            out[(a, b)] = int(row_id)
    missing = wanted.difference(out)
    if missing:  # pragma: no cover - would mean ids were reused, which the schema forbids
        raise RegistryError(f"{table.name}: {len(missing)} inserted rows not found by id")
    return out


def _node_key(node_id: int) -> str:
    """A Flower node id (unsigned 64-bit) as the registry stores it: decimal text."""
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id < 2**64:
        raise RegistryValueError(f"node id must be an integer in 0..2**64-1, got {node_id!r}")
    return str(node_id)


def _prefix_upper(prefix: str) -> str:
    # Pseudonyms sort bytewise and are ASCII, so every string starting with `prefix` lies
    # in [prefix, prefix with its last character incremented).
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


_K = TypeVar("_K", int, str)


def _keyset_page(
    conn: Connection,
    query: Select[Any],
    key: Any,
    *,
    after: _K | None,
    before: _K | None,
    limit: int,
    ascending: bool,
    record: Callable[[Row[Any]], _T],
    key_of: Callable[[_T], _K],
) -> Page[_T, _K]:
    """One page of ``query`` in ``key`` order: the rows after ``after`` or before ``before``.

    A page reached backwards (``before``) is read in reverse key order and turned round,
    so it costs one index range scan like a forward page. Whether a neighbouring page
    exists is known from the extra row of that scan in its own direction, and from one
    ``LIMIT 1`` probe in the other (only when a cursor was given: the first page has no
    page before it), so "previous" and "next" links never lead to an empty page.
    """
    check_limit(limit)
    if after is not None and before is not None:
        raise RegistryValueError("page with after= or before=, not both")

    def later(cursor: _K) -> Any:
        return key > cursor if ascending else key < cursor

    def earlier(cursor: _K) -> Any:
        return key < cursor if ascending else key > cursor

    def exists(condition: Any) -> bool:
        return conn.execute(query.where(condition).limit(1)).first() is not None

    def fetch(ordered: Select[Any]) -> list[_T]:
        return [record(row) for row in conn.execute(ordered)]

    forward, backward = (key.asc(), key.desc()) if ascending else (key.desc(), key.asc())
    if before is None:
        narrowed = query if after is None else query.where(later(after))
        found = fetch(narrowed.order_by(forward).limit(limit + 1))
        items = found[:limit]
        has_next = len(found) > limit
        has_prev = after is not None and bool(items) and exists(earlier(key_of(items[0])))
    else:
        found = fetch(query.where(earlier(before)).order_by(backward).limit(limit + 1))
        items = found[:limit][::-1]
        has_prev = len(found) > limit
        has_next = bool(items) and exists(later(key_of(items[-1])))
    return Page(
        tuple(items),
        key_of(items[-1]) if has_next else None,
        key_of(items[0]) if has_prev else None,
    )


class Registry:
    """The coordinator's adapter registry on SQLite or PostgreSQL.

    Build it with :meth:`open`, which migrates the schema to the newest revision.

    Examples
    --------
    >>> from lorafleet.protocols import AdapterProvenance, AdapterSpec
    >>> spec = AdapterSpec(base_model_id="smollm2-135m-instruct", base_sha256="0" * 64)
    >>> with Registry.open("sqlite://") as reg:
    ...     user = reg.ensure_user("u-3f9a")
    ...     adapter = reg.create_adapter(user, "default", spec)
    ...     v1 = reg.add_version(
    ...         adapter, AdapterProvenance(spec=spec, version=1, content_hash="1" * 64),
    ...         size_bytes=1234,
    ...     )
    ...     reg.latest_user_version("u-3f9a").provenance == v1.provenance
    True
    """

    def __init__(self, engine: Engine, url: URL) -> None:
        """Wrap an engine that :meth:`open` built and migrated; use :meth:`open` instead."""
        self._engine = engine
        self._url = url
        self._specs_by_fp: dict[str, AdapterSpec] = {}
        self._fp_by_spec: dict[AdapterSpec, str] = {}
        self._prepared: dict[str, Prepared] = {}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, url: str | os.PathLike[str], *, echo: bool = False) -> Registry:
        """Open (creating if needed) the registry at ``url`` and migrate it to head.

        Parameters
        ----------
        url
            ``sqlite:///path/to/registry.db``, a bare file path (SQLite), ``sqlite://``
            (in memory), or ``postgresql+psycopg://user:password@host:5432/dbname``.
        echo
            Log every SQL statement (debugging only).

        Raises
        ------
        RegistryError
            The URL is malformed or names an unsupported backend, or the database was
            migrated by a newer lorafleet.
        UnavailableError
            The server cannot be reached or the SQLite file cannot be opened; the message
            names host and port (never the password) and the fix.
        """
        parsed = parse_url(url)
        try:
            engine = create_registry_engine(parsed, echo=echo)
        except ImportError as exc:
            raise RegistryError(
                f"registry URL {parsed.render_as_string(hide_password=True)}: its driver is "
                f"not installed ({exc}); install lorafleet[server]"
            ) from None
        try:
            migrate(engine, parsed)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, parsed)

    @property
    def url(self) -> str:
        """The registry's URL with the password hidden, safe to log and display."""
        return self._url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> Literal["sqlite", "postgresql"]:
        """Which backend this registry runs on."""
        return "postgresql" if self._engine.dialect.name == "postgresql" else "sqlite"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for tools that need raw SQL (backups, benchmarks)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection; the registry cannot be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self._engine.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise UnavailableError(describe_connect_failure(self._url, exc)) from None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with write_connection(self._engine) as conn:
                yield conn
        except OperationalError as exc:
            raise UnavailableError(describe_connect_failure(self._url, exc)) from None

    def _insert(self, table: Table) -> pg_dialect.Insert | sqlite_dialect.Insert:
        # Both dialects offer ON CONFLICT, with the same API.
        if self._engine.dialect.name == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    # ------------------------------------------------------------------ specs

    def _fingerprint(self, spec: AdapterSpec) -> str:
        fp = self._fp_by_spec.get(spec)
        if fp is None:
            if len(self._fp_by_spec) > 4096:
                self._fp_by_spec.clear()
            fp = self._fp_by_spec[spec] = spec.fingerprint()
            self._specs_by_fp.setdefault(fp, spec)
        return fp

    def _ensure_specs(self, conn: Connection, spec_list: Iterable[AdapterSpec]) -> None:
        unique = {self._fingerprint(s): s for s in spec_list}
        if not unique:
            return
        now = _now()
        rows = [
            {
                "fingerprint": fp,
                "spec_json": s.to_json(),
                "base_model_id": s.base_model_id,
                "base_sha256": s.base_sha256,
                "cohort_seed": s.cohort_seed,
                "created_at": now,
            }
            for fp, s in unique.items()
        ]
        conn.execute(
            self._insert(specs).on_conflict_do_nothing(index_elements=["fingerprint"]), rows
        )

    def _spec(self, conn: Connection, fingerprint: str) -> AdapterSpec:
        spec = self._specs_by_fp.get(fingerprint)
        if spec is None:
            text = conn.execute(
                select(specs.c.spec_json).where(specs.c.fingerprint == fingerprint)
            ).scalar_one()
            spec = AdapterSpec.from_json(text)
            if len(self._specs_by_fp) > 4096:
                self._specs_by_fp.clear()
            self._specs_by_fp[fingerprint] = spec
        return spec

    def _spec_fp(self, spec: SpecRef) -> str:
        if isinstance(spec, AdapterSpec):
            return self._fingerprint(spec)
        return check_sha256("spec fingerprint", spec)

    def get_spec(self, fingerprint: str) -> AdapterSpec:
        """The spec with this fingerprint (as every device rebuilds it)."""
        check_sha256("spec fingerprint", fingerprint)
        with self._read() as conn:
            known = conn.execute(
                select(specs.c.fingerprint).where(specs.c.fingerprint == fingerprint)
            ).first()
            if known is None:
                raise NotFoundError(f"no adapter spec with fingerprint {fingerprint}")
            return self._spec(conn, fingerprint)

    # ------------------------------------------------------------------ users

    def _user_id(self, conn: Connection, user: UserRef) -> UserId:
        if isinstance(user, str):
            found = conn.execute(
                select(users.c.id).where(users.c.pseudonym == check_pseudonym(user))
            ).scalar()
            if found is None:
                raise NotFoundError(
                    f"no user with pseudonym {user!r}; register it first (ensure_user)"
                )
            return UserId(int(found))
        if isinstance(user, bool) or not isinstance(user, int):
            raise RegistryValueError(f"user must be a UserId or a pseudonym, got {user!r}")
        if conn.execute(select(users.c.id).where(users.c.id == user)).first() is None:
            raise NotFoundError(f"no user with id {user}")
        return UserId(user)

    def ensure_user(self, pseudonym: str) -> UserId:
        """The id of the user with this pseudonym, registering it on first sight.

        Idempotent and safe under concurrency: two coordinators seeing the same new
        user get the same id.
        """
        return self.ensure_users([pseudonym])[pseudonym]

    def ensure_users(self, pseudonyms: Iterable[str]) -> dict[str, UserId]:
        """Batched :meth:`ensure_user`: pseudonym -> id for all of them, in one transaction."""
        wanted = list(dict.fromkeys(check_pseudonym(p) for p in pseudonyms))
        out: dict[str, UserId] = {}
        with self._write() as conn:
            for chunk in _chunks(wanted):
                for uid, pseudonym in conn.execute(
                    select(users.c.id, users.c.pseudonym).where(users.c.pseudonym.in_(chunk))
                ):
                    out[pseudonym] = UserId(int(uid))
            missing = [p for p in wanted if p not in out]
            if missing:
                now = _now()
                conn.execute(
                    self._insert(users).on_conflict_do_nothing(index_elements=["pseudonym"]),
                    [{"pseudonym": p, "created_at": now} for p in missing],
                )
                for chunk in _chunks(missing):
                    for uid, pseudonym in conn.execute(
                        select(users.c.id, users.c.pseudonym).where(users.c.pseudonym.in_(chunk))
                    ):
                        out[pseudonym] = UserId(int(uid))
        return out

    def get_user(self, user: UserRef) -> UserRecord:
        """The user record; :class:`NotFoundError` if the registry does not know it."""
        with self._read() as conn:
            uid = self._user_id(conn, user)
            row = conn.execute(select(users).where(users.c.id == uid)).one()
        return UserRecord(UserId(int(row.id)), row.pseudonym, row.created_at)

    def search_users(
        self,
        prefix: str = "",
        *,
        after: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> Page[UserRecord, str]:
        """Users whose pseudonym starts with ``prefix``, in pseudonym order, by keyset.

        One range scan of the pseudonym index: the first page of a prefix and the
        thousandth page of all users cost the same at a million users.
        """
        check_prefix(prefix)
        query = select(users.c.id, users.c.pseudonym, users.c.created_at)
        if prefix:
            query = query.where(
                users.c.pseudonym >= prefix, users.c.pseudonym < _prefix_upper(prefix)
            )
        with self._read() as conn:
            return _keyset_page(
                conn,
                query,
                users.c.pseudonym,
                after=after,
                before=before,
                limit=limit,
                ascending=True,
                record=lambda r: UserRecord(UserId(int(r.id)), r.pseudonym, r.created_at),
                key_of=lambda u: u.pseudonym,
            )

    def erase_user(self, user: UserRef) -> ErasureCounts:
        """Delete the user and everything of theirs from the registry.

        That is their adapters, versions, evaluations, blob metadata, enrolled devices and
        enrolment tokens.

        Idempotent: erasing an unknown pseudonym deletes nothing and returns zero counts,
        so a retried erasure request never fails. Shared data (specs, the prior, round
        totals) holds nothing of one user and stays. The encrypted blobs themselves live
        in the blob store; delete them there using :meth:`list_blobs` first.
        """
        with self._write() as conn:
            try:
                uid = self._user_id(conn, user)
            except NotFoundError:
                return ErasureCounts()
            version_ids = select(_v.c.id).where(_v.c.user_id == uid).scalar_subquery()
            n_evals = conn.execute(
                delete(evaluations).where(evaluations.c.version_id.in_(version_ids))
            ).rowcount
            n_blobs = conn.execute(delete(blobs).where(blobs.c.user_id == uid)).rowcount
            n_devices = conn.execute(delete(devices).where(devices.c.user_id == uid)).rowcount
            conn.execute(delete(enrolment_tokens).where(enrolment_tokens.c.user_id == uid))
            n_versions = conn.execute(delete(_v).where(_v.c.user_id == uid)).rowcount
            n_adapters = conn.execute(delete(_a).where(_a.c.user_id == uid)).rowcount
            n_users = conn.execute(delete(users).where(users.c.id == uid)).rowcount
        counts = ErasureCounts(n_users, n_adapters, n_versions, n_evals, n_blobs, n_devices)
        log.info("erased user id %d: %d rows", uid, counts.total)
        return counts

    # ------------------------------------------------------------------ adapters

    def create_adapter(self, user: UserRef, name: str, spec: AdapterSpec) -> AdapterId:
        """Register a named adapter of ``user`` with ``spec`` (fixed for its whole life).

        Raises
        ------
        ConflictError
            The user already has an adapter with this name.
        NotFoundError
            The user is unknown.
        """
        return self.create_adapters([(user, name, spec)])[0]

    def create_adapters(self, items: Iterable[tuple[UserRef, str, AdapterSpec]]) -> list[AdapterId]:
        """Batched :meth:`create_adapter`, in one transaction; ids in input order."""
        todo = [(user, check_label("adapter name", name), spec) for user, name, spec in items]
        if not todo:
            return []
        for _, _, spec in todo:
            if not isinstance(spec, AdapterSpec):
                raise RegistryValueError(f"spec must be an AdapterSpec, got {type(spec).__name__}")
        seen: set[tuple[UserRef, str]] = set()
        for user, name, _ in todo:
            if (user, name) in seen:
                raise ConflictError(f"adapter name {name!r} appears twice for user {user!r}")
            seen.add((user, name))
        now = _now()
        try:
            with self._write() as conn:
                pseudonyms = sorted({u for u, _, _ in todo if isinstance(u, str)})
                ids: dict[str, UserId] = {}
                for chunk in _chunks(pseudonyms):
                    for uid, p in conn.execute(
                        select(users.c.id, users.c.pseudonym).where(users.c.pseudonym.in_(chunk))
                    ):
                        ids[p] = UserId(int(uid))
                for p in pseudonyms:
                    if p not in ids:
                        raise NotFoundError(
                            f"no user with pseudonym {p!r}; register it first (ensure_user)"
                        )
                self._ensure_specs(conn, (s for _, _, s in todo))
                rows = [
                    {
                        "user_id": ids[u] if isinstance(u, str) else u,
                        "name": name,
                        "spec_fingerprint": self._fingerprint(spec),
                    }
                    for u, name, spec in todo
                ]
                max_before = _max_id(conn, _a)
                _bulk_insert(conn, _a, rows, pinned_version=None, created_at=now)
                keys = [(row["user_id"], row["name"]) for row in rows]
                found = _ids_since(conn, _a, max_before, ("user_id", "name"), keys)
                return [AdapterId(found[key]) for key in keys]
        except IntegrityError:
            self._diagnose_adapters(todo)
            raise ConflictError(
                "adapters changed while they were being created; retry the request"
            ) from None

    def _diagnose_adapters(self, todo: Sequence[tuple[UserRef, str, AdapterSpec]]) -> None:
        with self._read() as conn:
            for user, name, _ in todo:
                uid = self._user_id(conn, user)
                if conn.execute(
                    select(_a.c.id).where(_a.c.user_id == uid, _a.c.name == name)
                ).first():
                    raise ConflictError(
                        f"user {user!r} already has an adapter named {name!r}; pick another "
                        "name, or add a version to that adapter"
                    )

    def _adapter_record(self, conn: Connection, row: Row[Any]) -> AdapterRecord:
        return AdapterRecord(
            id=AdapterId(int(row.id)),
            user_id=UserId(int(row.user_id)),
            pseudonym=row.pseudonym,
            name=row.name,
            spec=self._spec(conn, row.spec_fingerprint),
            pinned_version=row.pinned_version,
            created_at=row.created_at,
        )

    def _adapter_query(self) -> Select[Any]:
        return select(
            _a.c.id,
            _a.c.user_id,
            _u.c.pseudonym,
            _a.c.name,
            _a.c.spec_fingerprint,
            _a.c.pinned_version,
            _a.c.created_at,
        ).join_from(_a, _u, _u.c.id == _a.c.user_id)

    def get_adapter(self, adapter_id: AdapterId) -> AdapterRecord:
        """The adapter with this id; :class:`NotFoundError` if there is none."""
        with self._read() as conn:
            row = conn.execute(self._adapter_query().where(_a.c.id == adapter_id)).first()
            if row is None:
                raise NotFoundError(f"no adapter with id {adapter_id}")
            return self._adapter_record(conn, row)

    def find_adapter(self, user: UserRef, name: str) -> AdapterRecord | None:
        """The user's adapter named ``name``, or None (an unknown user raises)."""
        with self._read() as conn:
            uid = self._user_id(conn, user)
            row = conn.execute(
                self._adapter_query().where(_a.c.user_id == uid, _a.c.name == name)
            ).first()
            return None if row is None else self._adapter_record(conn, row)

    def list_adapters(self, user: UserRef) -> list[AdapterRecord]:
        """All adapters of a user (a handful per person), by name."""
        with self._read() as conn:
            uid = self._user_id(conn, user)
            rows = conn.execute(
                self._adapter_query().where(_a.c.user_id == uid).order_by(_a.c.name)
            ).all()
            return [self._adapter_record(conn, r) for r in rows]

    def _require_adapter(self, conn: Connection, adapter_id: AdapterId) -> Row[Any, Any, Any]:
        row = conn.execute(
            select(_a.c.id, _a.c.spec_fingerprint, _a.c.pinned_version).where(_a.c.id == adapter_id)
        ).first()
        if row is None:
            raise NotFoundError(f"no adapter with id {adapter_id}")
        return row

    # ------------------------------------------------------------------ versions

    def add_version(
        self,
        adapter_id: AdapterId,
        provenance: AdapterProvenance,
        *,
        size_bytes: int,
        num_params: int | None = None,
        make_current: bool = True,
    ) -> VersionRecord:
        """Store one immutable version of an adapter, with its provenance exactly as given.

        Parameters
        ----------
        adapter_id
            The adapter (see :meth:`create_adapter`).
        provenance
            The device's record: its spec must be the adapter's, its version number new
            to the adapter, its parent (if any) a version the adapter already has.
        size_bytes
            Size of the encoded B tensors as uploaded or stored.
        num_params
            Number of trained parameters, when known.
        make_current
            Clear a rollback pin on the adapter, so the newest version is current again
            (the usual case: a user who rolled back and trains again wants the result).

        Raises
        ------
        ConflictError
            The adapter already has this version number (versions are never rewritten).
        NotFoundError
            The adapter or the parent version does not exist.
        RegistryValueError
            The provenance's spec differs from the adapter's, or a size is negative.
        """
        ids = self.add_versions(
            [NewVersion(adapter_id, provenance, size_bytes, num_params)],
            make_current=make_current,
        )
        return self.get_version(ids[0])

    def add_versions(
        self, items: Iterable[NewVersion], *, make_current: bool = True
    ) -> list[VersionId]:
        """Store many versions in one transaction, all or none; ids in input order.

        The batched write behind federated rounds and bulk imports: adapters are
        checked with one query per 500, rows go in with ``executemany``, and the
        database's constraints catch duplicates and missing parents, which are then
        diagnosed into the same errors :meth:`add_version` raises. A parent may be in the
        same batch.
        """
        todo = list(items)
        if not todo:
            return []
        seen: set[tuple[int, int]] = set()
        for item in todo:
            if not isinstance(item, NewVersion):
                raise RegistryValueError(f"expected NewVersion items, got {type(item).__name__}")
            key = (item.adapter_id, item.provenance.version)
            if key in seen:
                raise ConflictError(
                    f"version {key[1]} of adapter {key[0]} appears twice in one batch"
                )
            seen.add(key)
        # Parents before children, so a parent in the same batch exists when checked.
        order = sorted(range(len(todo)), key=lambda i: todo[i].provenance.version)
        now = _now()
        try:
            with self._write() as conn:
                owners = self._check_adapters_for(conn, todo)
                rows = []
                for i in order:
                    item, prov = todo[i], todo[i].provenance
                    rows.append(
                        {
                            "adapter_id": item.adapter_id,
                            "user_id": owners[item.adapter_id],
                            "version": prov.version,
                            "parent": prov.parent,
                            "prior_version": prov.prior_version,
                            "round": prov.round,
                            "content_hash": prov.content_hash,
                            "size_bytes": item.size_bytes,
                            "num_params": item.num_params,
                            "metrics_json": metrics_to_json(prov.metrics),
                            "created_at": prov.created_at,
                        }
                    )
                max_before = _max_id(conn, _v)
                _bulk_insert(conn, _v, rows, registered_at=now)
                found = _ids_since(conn, _v, max_before, ("adapter_id", "version"), sorted(seen))
                if make_current:
                    touched = sorted({item.adapter_id for item in todo})
                    for chunk in _chunks(touched):
                        conn.execute(
                            update(_a)
                            .where(_a.c.id.in_(chunk), _a.c.pinned_version.is_not(None))
                            .values(pinned_version=None)
                        )
        except IntegrityError:
            self._diagnose_versions(todo)
            raise ConflictError(
                "adapter versions changed while these were being stored; retry the request"
            ) from None
        return [VersionId(found[(item.adapter_id, item.provenance.version)]) for item in todo]

    def _check_adapters_for(
        self, conn: Connection, todo: Sequence[NewVersion]
    ) -> dict[AdapterId, UserId]:
        """Owner of each adapter in ``todo``; refuses unknown adapters and foreign specs."""
        wanted = sorted({item.adapter_id for item in todo})
        found: dict[int, tuple[int, str]] = {}
        for chunk in _chunks(wanted):
            for aid, uid, fp in conn.execute(
                select(_a.c.id, _a.c.user_id, _a.c.spec_fingerprint).where(_a.c.id.in_(chunk))
            ):
                found[int(aid)] = (int(uid), fp)
        for item in todo:
            entry = found.get(item.adapter_id)
            if entry is None:
                raise NotFoundError(f"no adapter with id {item.adapter_id}; create it first")
            fp = self._fingerprint(item.provenance.spec)
            if fp != entry[1]:
                raise RegistryValueError(
                    f"version {item.provenance.version} has spec {fp[:12]}…, but adapter "
                    f"{item.adapter_id} was created with spec {entry[1][:12]}…; an adapter's "
                    "spec never changes: create a new adapter for the new spec"
                )
        return {AdapterId(aid): UserId(uid) for aid, (uid, _) in found.items()}

    def _diagnose_versions(self, todo: Sequence[NewVersion]) -> None:
        batch = {(item.adapter_id, item.provenance.version) for item in todo}
        with self._read() as conn:
            existing: set[tuple[int, int]] = set()
            wanted = sorted({item.adapter_id for item in todo})
            for chunk in _chunks(wanted):
                for aid, ver in conn.execute(
                    select(_v.c.adapter_id, _v.c.version).where(_v.c.adapter_id.in_(chunk))
                ):
                    existing.add((int(aid), int(ver)))
        for item in sorted(todo, key=lambda it: it.provenance.version):
            aid, prov = item.adapter_id, item.provenance
            if (aid, prov.version) in existing:
                newest = max(v for a, v in existing if a == aid)
                raise ConflictError(
                    f"adapter {aid} already has version {prov.version}; versions are immutable: "
                    f"store this one as a new version (e.g. {newest + 1})"
                )
            if prov.parent is not None and (aid, prov.parent) not in existing | batch:
                raise NotFoundError(
                    f"parent version {prov.parent} of adapter {aid} does not exist; store the "
                    "parent first, or record parent=None"
                )

    def _version_record(self, conn: Connection | None, row: Any) -> VersionRecord:
        spec = self._specs_by_fp.get(row.spec_fingerprint)
        if spec is None:
            if conn is None:
                with self._read() as own:
                    spec = self._spec(own, row.spec_fingerprint)
            else:
                spec = self._spec(conn, row.spec_fingerprint)
        provenance = AdapterProvenance(
            spec=spec,
            version=int(row.version),
            content_hash=row.content_hash,
            parent=row.parent,
            prior_version=row.prior_version,
            round=row.round,
            created_at=row.created_at,
            metrics=metrics_from_json(row.metrics_json),
        )
        return VersionRecord(
            id=VersionId(int(row.id)),
            adapter_id=AdapterId(int(row.adapter_id)),
            user_id=UserId(int(row.user_id)),
            pseudonym=row.pseudonym,
            adapter_name=row.name,
            provenance=provenance,
            size_bytes=int(row.size_bytes),
            num_params=row.num_params,
            registered_at=row.registered_at,
        )

    def _versions(self, conn: Connection, query: Select[Any]) -> list[VersionRecord]:
        return [self._version_record(conn, row) for row in conn.execute(query)]

    @staticmethod
    def _version_query() -> Select[Any]:
        return _versions_select()

    def _lookup(self, name: str, **params: Any) -> list[VersionRecord]:
        """Run one of the hot version lookups (:mod:`.lookups`): compiled once, one execute."""
        prepared = self._prepared.get(name)
        if prepared is None:
            prepared = self._prepared[name] = prepare(_HOT_LOOKUPS[name](), self._engine.dialect)
        try:
            rows = fetch(self._engine, prepared, params)
        except self._engine.dialect.loaded_dbapi.OperationalError as exc:
            raise UnavailableError(describe_connect_failure(self._url, exc)) from None
        return [self._version_record(None, row) for row in rows]

    def get_version(self, version_id: VersionId) -> VersionRecord:
        """A version by its registry id; :class:`NotFoundError` if there is none."""
        found = self._lookup("by_id", id=version_id)
        if not found:
            raise NotFoundError(f"no adapter version with id {version_id}")
        return found[0]

    def get_adapter_version(self, adapter_id: AdapterId, version: int) -> VersionRecord:
        """Version number ``version`` of an adapter."""
        with self._read() as conn:
            found = self._versions(
                conn,
                self._version_query().where(_v.c.adapter_id == adapter_id, _v.c.version == version),
            )
            if not found:
                self._require_adapter(conn, adapter_id)
                raise NotFoundError(f"adapter {adapter_id} has no version {version}")
        return found[0]

    def latest_version(self, adapter_id: AdapterId) -> VersionRecord | None:
        """The adapter's highest version number, or None before its first version."""
        found = self._lookup("latest_of_adapter", adapter_id=adapter_id)
        if not found:
            with self._read() as conn:
                self._require_adapter(conn, adapter_id)
            return None
        return found[0]

    def latest_user_version(self, user: UserRef) -> VersionRecord | None:
        """The user's most recently stored version across all their adapters, or None.

        One index search per table (users by pseudonym, versions by ``(user_id, id)``
        backwards, the adapter by id), compiled once: the console's and the backup
        service's most frequent lookup.
        """
        if isinstance(user, str):
            found = self._lookup("latest_of_pseudonym", pseudonym=check_pseudonym(user))
        elif isinstance(user, bool) or not isinstance(user, int):
            raise RegistryValueError(f"user must be a UserId or a pseudonym, got {user!r}")
        else:
            found = self._lookup("latest_of_user", user_id=user)
        if not found:
            with self._read() as conn:
                self._user_id(conn, user)  # an unknown user raises; a new one has no versions
        return found[0] if found else None

    @staticmethod
    def _owned_by(user: UserRef) -> ColumnElement[bool]:
        # By pseudonym inside the versions query itself: one round trip, not two.
        if isinstance(user, str):
            return _u.c.pseudonym == check_pseudonym(user)
        return _v.c.user_id == user

    def current_version(self, adapter_id: AdapterId) -> VersionRecord | None:
        """The version devices should use: the pinned one after a rollback, else the newest."""
        with self._read() as conn:
            adapter = self._require_adapter(conn, adapter_id)
            query = self._version_query().where(_v.c.adapter_id == adapter_id)
            if adapter.pinned_version is not None:
                query = query.where(_v.c.version == adapter.pinned_version)
            found = self._versions(conn, query.order_by(_v.c.version.desc()).limit(1))
        return found[0] if found else None

    def set_current(self, adapter_id: AdapterId, version: int | None) -> None:
        """Move the adapter's current-version pointer: roll back (or forward) without rewriting.

        ``version=None`` clears the pin, so the newest version is current again.

        Raises
        ------
        NotFoundError
            The adapter, or that version of it, does not exist.
        """
        with self._write() as conn:
            self._require_adapter(conn, adapter_id)
            if version is not None and (
                conn.execute(
                    select(_v.c.id).where(_v.c.adapter_id == adapter_id, _v.c.version == version)
                ).first()
                is None
            ):
                raise NotFoundError(
                    f"adapter {adapter_id} has no version {version} to make current"
                )
            conn.execute(update(_a).where(_a.c.id == adapter_id).values(pinned_version=version))
        log.info("adapter %d: current version pinned to %s", adapter_id, version or "newest")

    def history(
        self, adapter_id: AdapterId, *, after: int | None = None, limit: int = 50
    ) -> Page[VersionRecord, int]:
        """An adapter's versions, newest first; pass ``next_after`` back for older ones."""
        check_limit(limit)
        query = self._version_query().where(_v.c.adapter_id == adapter_id)
        if after is not None:
            query = query.where(_v.c.version < after)
        with self._read() as conn:
            found = self._versions(conn, query.order_by(_v.c.version.desc()).limit(limit + 1))
            if not found and after is None:
                self._require_adapter(conn, adapter_id)
        items = tuple(found[:limit])
        return Page(items, items[-1].version if len(found) > limit else None)

    def user_history(
        self,
        user: UserRef,
        *,
        after: VersionId | None = None,
        before: VersionId | None = None,
        limit: int = 50,
    ) -> Page[VersionRecord, int]:
        """A user's versions across adapters, newest stored first, by keyset on the id."""
        query = self._version_query().where(self._owned_by(user))
        with self._read() as conn:
            page: Page[VersionRecord, int] = _keyset_page(
                conn,
                query,
                _v.c.id,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=lambda r: self._version_record(conn, r),
                key_of=lambda v: int(v.id),
            )
            if not page.items:
                self._user_id(conn, user)
        return page

    def find_versions_by_content(
        self, content_hash: str, *, limit: int = 50
    ) -> list[VersionRecord]:
        """Versions whose B tensors hash to ``content_hash`` (dedup, audits), oldest first."""
        check_sha256("content_hash", content_hash)
        check_limit(limit)
        with self._read() as conn:
            return self._versions(
                conn,
                self._version_query()
                .where(_v.c.content_hash == content_hash)
                .order_by(_v.c.id)
                .limit(limit),
            )

    # ------------------------------------------------------------------ evaluations

    def add_evaluation(
        self,
        version_id: VersionId,
        metrics: Mapping[str, float],
        *,
        source: str = "server",
        round: int | None = None,
    ) -> EvaluationId:
        """Record metrics measured on a stored version (the version itself never changes)."""
        check_label("evaluation source", source)
        if not metrics:
            raise RegistryValueError("an evaluation needs at least one metric")
        payload = metrics_to_json(metrics)
        try:
            with self._write() as conn:
                new_id = conn.execute(
                    insert(evaluations).returning(evaluations.c.id),
                    {
                        "version_id": version_id,
                        "source": source,
                        "round": round,
                        "metrics_json": payload,
                        "created_at": _now(),
                    },
                ).scalar_one()
        except IntegrityError:
            raise NotFoundError(f"no adapter version with id {version_id} to evaluate") from None
        return EvaluationId(int(new_id))

    def list_evaluations(self, version_id: VersionId) -> list[EvaluationRecord]:
        """Every evaluation of a version, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(evaluations)
                .where(evaluations.c.version_id == version_id)
                .order_by(evaluations.c.id)
            ).all()
        return [
            EvaluationRecord(
                id=EvaluationId(int(r.id)),
                version_id=VersionId(int(r.version_id)),
                source=r.source,
                round=r.round,
                metrics=metrics_from_json(r.metrics_json),
                created_at=r.created_at,
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ device reports

    def record_reports(self, reports: Iterable[DeviceReport]) -> ReportCounts:
        """Record one round's device reports in one transaction: versions, evaluations, pointers.

        The coordinator's write path for what devices say about their personal adapters
        (``protocols.reports``). Users and adapters appear on a device's first new
        version; a version the adapter already holds is skipped (a retried round or a
        repeated reply), and one whose parent the registry never heard of is stored
        with ``parent=None`` and the parent's number kept as the metric
        ``unrecorded_parent`` (the registry's parent link must name a stored version).
        An adapter created with another spec, a duplicate within the batch, or a
        pointer or evaluation naming an unknown version is skipped with one log line.
        Every query covers the whole batch (500 ids per ``IN``), so a round of
        thousands of devices costs a handful of statements.
        """
        todo = list(reports)
        for r in todo:
            if not isinstance(r, DeviceReport):
                raise RegistryValueError(f"expected DeviceReport items, got {type(r).__name__}")
        if not todo:
            return ReportCounts()
        skipped = 0
        now = _now()
        with self._write() as conn:
            self._ensure_specs(conn, (r.spec for r in todo))
            user_ids, new_users = self._report_users(conn, todo)
            adapters_of, new_adapters = self._report_adapters(conn, todo, user_ids)
            placed: list[tuple[DeviceReport, AdapterId]] = []
            for r in todo:
                aid = adapters_of.get((r.pseudonym, r.adapter))
                if aid is None:
                    skipped += 1  # a pointer or evaluation of an adapter never recorded
                    continue
                placed.append((r, aid))
            stored = self._report_versions(conn, [aid for _, aid in placed])
            rows, batch = [], set()
            for r, aid in placed:
                prov = r.provenance
                if prov is None:
                    continue
                key = (aid, prov.version)
                if key in batch:
                    log.warning("adapter %d: version %d reported twice; kept the first", *key)
                    skipped += 1
                    continue
                batch.add(key)
                known = stored.get(key)
                if known is not None:
                    if known[1] != prov.content_hash:
                        log.warning(
                            "adapter %d: reported version %d differs from the stored one; "
                            "versions are immutable, the report is skipped",
                            *key,
                        )
                        skipped += 1
                    continue
                metrics = dict(prov.metrics)
                parent = prov.parent
                if parent is not None and (aid, parent) not in stored:
                    metrics["unrecorded_parent"] = float(parent)
                    parent = None
                rows.append(
                    {
                        "adapter_id": aid,
                        "user_id": user_ids[r.pseudonym],
                        "version": prov.version,
                        "parent": parent,
                        "prior_version": prov.prior_version,
                        "round": prov.round,
                        "content_hash": prov.content_hash,
                        "size_bytes": r.size_bytes,
                        "num_params": None,
                        "metrics_json": metrics_to_json(metrics),
                        "created_at": prov.created_at,
                    }
                )
            max_before = _max_id(conn, _v)
            _bulk_insert(conn, _v, rows, registered_at=now)
            keys = [(row["adapter_id"], row["version"]) for row in rows]
            for key, vid in _ids_since(
                conn, _v, max_before, ("adapter_id", "version"), keys
            ).items():
                stored[key] = (vid, "")
            evaluations_rows = []
            for r, aid in placed:
                if r.evaluation is None or r.evaluated is None:
                    continue
                found = stored.get((aid, r.evaluated))
                if found is None:
                    skipped += 1
                    continue
                evaluations_rows.append(
                    {
                        "version_id": found[0],
                        "source": "device",
                        "round": r.round,
                        "metrics_json": metrics_to_json(r.evaluation),
                    }
                )
            _bulk_insert(conn, evaluations, evaluations_rows, created_at=now)
            pointers = self._report_pointers(conn, placed, stored)
        counts = ReportCounts(
            users=new_users,
            adapters=new_adapters,
            versions=len(rows),
            evaluations=len(evaluations_rows),
            pointers=pointers,
            skipped=skipped,
        )
        log.debug("recorded device reports: %s", counts)
        return counts

    def _report_users(
        self, conn: Connection, todo: Sequence[DeviceReport]
    ) -> tuple[dict[str, UserId], int]:
        """Ids of the reports' users; those with a new version are registered if new."""
        wanted = sorted({r.pseudonym for r in todo})
        found: dict[str, UserId] = {}

        def scan(names: Sequence[str]) -> None:
            for chunk in _chunks(names):
                for uid, p in conn.execute(
                    select(users.c.id, users.c.pseudonym).where(users.c.pseudonym.in_(chunk))
                ):
                    found[p] = UserId(int(uid))

        scan(wanted)
        missing = sorted({r.pseudonym for r in todo if r.provenance is not None} - set(found))
        if missing:
            conn.execute(
                self._insert(users).on_conflict_do_nothing(index_elements=["pseudonym"]),
                [{"pseudonym": p, "created_at": _now()} for p in missing],
            )
            scan(missing)
        return found, len(missing)

    def _report_adapters(
        self, conn: Connection, todo: Sequence[DeviceReport], user_ids: Mapping[str, UserId]
    ) -> tuple[dict[tuple[str, str], AdapterId], int]:
        """(pseudonym, adapter name) -> id; created on a first new version, spec checked."""
        pseudonym_of = {uid: p for p, uid in user_ids.items()}
        found: dict[tuple[str, str], tuple[AdapterId, str]] = {}

        def scan() -> None:
            for chunk in _chunks(sorted(pseudonym_of)):
                for aid, uid, name, fp in conn.execute(
                    select(_a.c.id, _a.c.user_id, _a.c.name, _a.c.spec_fingerprint).where(
                        _a.c.user_id.in_(chunk)
                    )
                ):
                    found[(pseudonym_of[uid], name)] = (AdapterId(int(aid)), fp)

        scan()
        missing = {
            (r.pseudonym, r.adapter): r.spec
            for r in todo
            if r.provenance is not None
            and r.pseudonym in user_ids
            and (r.pseudonym, r.adapter) not in found
        }
        if missing:
            conn.execute(
                self._insert(_a).on_conflict_do_nothing(index_elements=["user_id", "name"]),
                [
                    {
                        "user_id": user_ids[p],
                        "name": name,
                        "spec_fingerprint": self._fingerprint(spec),
                        "pinned_version": None,
                        "created_at": _now(),
                    }
                    for (p, name), spec in sorted(missing.items(), key=lambda kv: kv[0])
                ],
            )
            scan()
        out: dict[tuple[str, str], AdapterId] = {}
        for r in todo:
            entry = found.get((r.pseudonym, r.adapter))
            if entry is None:
                continue
            if entry[1] != self._fingerprint(r.spec):
                log.warning(
                    "user %s: adapter %r has another spec than the reported version's; skipped",
                    r.pseudonym,
                    r.adapter,
                )
                continue
            out[(r.pseudonym, r.adapter)] = entry[0]
        return out, len(missing)

    def _report_versions(
        self, conn: Connection, adapter_ids: Sequence[AdapterId]
    ) -> dict[tuple[AdapterId, int], tuple[int, str]]:
        """(adapter, version) -> (version id, content hash) for every version of them."""
        stored: dict[tuple[AdapterId, int], tuple[int, str]] = {}
        for chunk in _chunks(sorted(set(adapter_ids))):
            for vid, aid, ver, digest in conn.execute(
                select(_v.c.id, _v.c.adapter_id, _v.c.version, _v.c.content_hash).where(
                    _v.c.adapter_id.in_(chunk)
                )
            ):
                stored[(AdapterId(int(aid)), int(ver))] = (int(vid), digest)
        return stored

    def _report_pointers(
        self,
        conn: Connection,
        placed: Sequence[tuple[DeviceReport, AdapterId]],
        stored: Mapping[tuple[AdapterId, int], tuple[int, str]],
    ) -> int:
        """Move each adapter's pointer to the version its device uses; returns how many moved."""
        newest: dict[AdapterId, int] = {}
        for aid, ver in stored:
            newest[aid] = max(ver, newest.get(aid, 0))
        wanted: dict[AdapterId, int | None] = {}
        for r, aid in placed:
            if r.current is None:
                continue
            if (aid, r.current) not in stored:
                log.warning(
                    "user %s: adapter %r is at version %d, which the registry never recorded",
                    r.pseudonym,
                    r.adapter,
                    r.current,
                )
                continue
            wanted[aid] = None if r.current == newest[aid] else r.current
        pinned: dict[AdapterId, int | None] = {}
        for chunk in _chunks(sorted(wanted)):
            for aid, pin in conn.execute(
                select(_a.c.id, _a.c.pinned_version).where(_a.c.id.in_(chunk))
            ):
                pinned[AdapterId(int(aid))] = pin
        moved = 0
        for aid, pin in wanted.items():
            if pinned.get(aid) != pin:
                conn.execute(update(_a).where(_a.c.id == aid).values(pinned_version=pin))
                moved += 1
        return moved

    # ------------------------------------------------------------------ priors

    def _prior_query(self) -> Select[Any]:
        pv, ap = prior_versions, active_priors
        return select(pv, (ap.c.prior_id.is_not(None)).label("active")).join_from(
            pv,
            ap,
            and_(ap.c.spec_fingerprint == pv.c.spec_fingerprint, ap.c.prior_id == pv.c.id),
            isouter=True,
        )

    @staticmethod
    def _prior_record(row: Row[Any]) -> PriorRecord:
        return PriorRecord(
            id=PriorId(int(row.id)),
            ref=row.ref,
            spec_fingerprint=row.spec_fingerprint,
            version=int(row.version),
            round=row.round,
            content_hash=row.content_hash,
            size_bytes=int(row.size_bytes),
            metrics=metrics_from_json(row.metrics_json),
            created_at=row.created_at,
            active=bool(row.active),
        )

    def add_prior_version(
        self,
        spec: AdapterSpec,
        version: int,
        *,
        content_hash: str,
        size_bytes: int,
        round: int | None = None,
        metrics: Mapping[str, float] | None = None,
        activate: bool = True,
    ) -> PriorRecord:
        """Store a new immutable version of the cohort's shared prior B̄.

        ``activate`` points the cohort at it (new users warm-start from the active one);
        its ``ref`` is what devices record as ``prior_version`` in provenance.

        Raises
        ------
        ConflictError
            The cohort already has a prior with this version number.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistryValueError(f"prior version must be an integer >= 1, got {version!r}")
        check_sha256("content_hash", content_hash)
        check_size("size_bytes", size_bytes)
        payload = metrics_to_json(metrics or {})
        fp = self._fingerprint(spec)
        ref = prior_ref(fp, version)
        now = _now()
        try:
            with self._write() as conn:
                self._ensure_specs(conn, [spec])
                new_id = conn.execute(
                    insert(prior_versions).returning(prior_versions.c.id),
                    {
                        "ref": ref,
                        "spec_fingerprint": fp,
                        "version": version,
                        "round": round,
                        "content_hash": content_hash,
                        "size_bytes": size_bytes,
                        "metrics_json": payload,
                        "created_at": now,
                    },
                ).scalar_one()
                if activate:
                    self._point_prior(conn, fp, int(new_id))
        except IntegrityError:
            raise ConflictError(
                f"cohort {fp[:12]}… already has prior version {version}; prior versions are "
                "immutable: store it as a new version"
            ) from None
        return self.get_prior(ref)

    def _point_prior(self, conn: Connection, fp: str, prior_id: int) -> None:
        stmt = self._insert(active_priors).values(
            spec_fingerprint=fp, prior_id=prior_id, updated_at=_now()
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["spec_fingerprint"],
                set_={"prior_id": stmt.excluded.prior_id, "updated_at": stmt.excluded.updated_at},
            )
        )

    def get_prior(self, ref: str) -> PriorRecord:
        """A prior version by the ``ref`` provenance records."""
        with self._read() as conn:
            row = conn.execute(self._prior_query().where(prior_versions.c.ref == ref)).first()
        if row is None:
            raise NotFoundError(f"no prior version {ref!r}")
        return self._prior_record(row)

    def list_prior_versions(
        self,
        spec: SpecRef,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> Page[PriorRecord, int]:
        """A cohort's prior versions, newest first, each marked whether it is active."""
        fp = self._spec_fp(spec)
        query = self._prior_query().where(prior_versions.c.spec_fingerprint == fp)
        with self._read() as conn:
            return _keyset_page(
                conn,
                query,
                prior_versions.c.version,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=self._prior_record,
                key_of=lambda p: p.version,
            )

    def set_active_prior(self, spec: SpecRef, version: int) -> PriorRecord:
        """Point the cohort at one of its prior versions (an operator's rollback or pick).

        The operator overrides the promotion rule, and the decision trail says so: a
        version still awaiting its evaluation is recorded as promoted by the operator if
        it is the one picked, and as held by the operator otherwise (the coordinator
        then trains on from the picked version, not from the abandoned candidate).
        """
        fp = self._spec_fp(spec)
        pv = prior_versions
        with self._write() as conn:
            prior_id = conn.execute(
                select(pv.c.id).where(pv.c.spec_fingerprint == fp, pv.c.version == version)
            ).scalar()
            if prior_id is None:
                raise NotFoundError(f"cohort {fp[:12]}… has no prior version {version}")
            target = int(prior_id)
            pending = self._pending_prior_id(conn, fp)
            ref = prior_ref(fp, version)
            if pending is not None:
                picked = pending == target
                self._append_decision(
                    conn,
                    fp,
                    pending,
                    "promoted" if picked else "held",
                    decided_by="operator",
                    reason="made active by an operator before its evaluation"
                    if picked
                    else f"an operator made {ref} active while it awaited its evaluation",
                )
            self._point_prior(conn, fp, target)
        return self.get_prior(ref)

    # ------------------------------------------------------------------ prior promotion

    def _prior_id_of(self, conn: Connection, ref: str) -> tuple[int, str]:
        row = conn.execute(
            select(prior_versions.c.id, prior_versions.c.spec_fingerprint).where(
                prior_versions.c.ref == ref
            )
        ).first()
        if row is None:
            raise NotFoundError(f"no prior version {ref!r}")
        return int(row.id), row.spec_fingerprint

    def _pending_prior_id(self, conn: Connection, fp: str) -> int | None:
        """The cohort's newest version if it is neither active nor decided, else None."""
        pv, ap, pd = prior_versions, active_priors, prior_decisions
        newest = conn.execute(
            select(pv.c.id)
            .where(pv.c.spec_fingerprint == fp)
            .order_by(pv.c.version.desc())
            .limit(1)
        ).scalar()
        if newest is None:
            return None
        active = conn.execute(select(ap.c.prior_id).where(ap.c.spec_fingerprint == fp)).scalar()
        decided = conn.execute(select(pd.c.id).where(pd.c.prior_id == newest).limit(1)).first()
        return None if newest == active or decided is not None else int(newest)

    def pending_prior(self, spec: SpecRef) -> PriorRecord | None:
        """The candidate awaiting its evaluation: the newest version, not active, undecided.

        The coordinator trains the next round from it (its devices' validation losses
        score it on the way) and then promotes or holds it; None when there is none.
        """
        fp = self._spec_fp(spec)
        with self._read() as conn:
            pending = self._pending_prior_id(conn, fp)
            if pending is None:
                return None
            row = conn.execute(self._prior_query().where(prior_versions.c.id == pending)).one()
        return self._prior_record(row)

    def add_prior_evaluation(
        self,
        ref: str,
        metrics: Mapping[str, float],
        *,
        devices: int,
        round: int | None = None,
        source: str = "devices",
    ) -> PriorEvaluationRecord:
        """Record how ``devices`` devices scored a prior version (aggregates only).

        ``metrics`` are the aggregates the coordinator computed from the round's
        replies (mean, spread); no device's own number is stored.
        """
        check_label("evaluation source", source)
        check_size("devices", devices)
        if not metrics:
            raise RegistryValueError("a prior evaluation needs at least one metric")
        row = {"round": round, "source": source, "devices": devices}
        row["metrics_json"] = metrics_to_json(metrics)
        with self._write() as conn:
            row["prior_id"] = self._prior_id_of(conn, ref)[0]
            _bulk_insert(conn, prior_evaluations, [row], created_at=_now())
        return self.list_prior_evaluations(ref)[-1]

    @staticmethod
    def _prior_evaluation_record(row: Row[Any], ref: str) -> PriorEvaluationRecord:
        return PriorEvaluationRecord(
            id=PriorEvaluationId(int(row.id)),
            prior_id=PriorId(int(row.prior_id)),
            ref=ref,
            round=row.round,
            source=row.source,
            devices=int(row.devices),
            metrics=metrics_from_json(row.metrics_json),
            created_at=row.created_at,
        )

    def list_prior_evaluations(self, ref: str) -> list[PriorEvaluationRecord]:
        """Every evaluation of a prior version, oldest first (a few per version)."""
        pe = prior_evaluations
        with self._read() as conn:
            prior_id, _ = self._prior_id_of(conn, ref)
            rows = conn.execute(select(pe).where(pe.c.prior_id == prior_id).order_by(pe.c.id)).all()
        return [self._prior_evaluation_record(r, ref) for r in rows]

    def latest_prior_evaluations(self, refs: Iterable[str]) -> dict[str, PriorEvaluationRecord]:
        """The newest evaluation of each of these prior versions (unscored ones are absent)."""
        pv, pe = prior_versions, prior_evaluations
        out: dict[str, PriorEvaluationRecord] = {}
        with self._read() as conn:
            for chunk in _chunks(sorted(set(refs))):
                rows = conn.execute(
                    select(pe, pv.c.ref)
                    .join_from(pe, pv, pv.c.id == pe.c.prior_id)
                    .where(pv.c.ref.in_(chunk))
                    .order_by(pe.c.id)
                )
                for r in rows:  # later rows win
                    out[r.ref] = self._prior_evaluation_record(r, r.ref)
        return out

    def _append_decision(
        self,
        conn: Connection,
        fp: str,
        prior_id: int,
        decision: PriorDecision,
        *,
        decided_by: DecidedBy,
        reason: str,
        against_id: int | None = None,
        round: int | None = None,
        scores: tuple[float | None, float | None, float | None] = (None, None, None),
    ) -> int:
        candidate_score, active_score, tolerance = scores
        for name, value in zip(("candidate", "active", "tolerance"), scores, strict=True):
            if value is not None and not math.isfinite(value):
                raise RegistryValueError(f"{name} score must be finite, got {value!r}")
        return int(
            conn.execute(
                insert(prior_decisions).returning(prior_decisions.c.id),
                {
                    "spec_fingerprint": fp,
                    "prior_id": prior_id,
                    "against_id": against_id,
                    "round": round,
                    "decision": decision,
                    "decided_by": decided_by,
                    "reason": reason,
                    "candidate_score": candidate_score,
                    "active_score": active_score,
                    "tolerance": tolerance,
                    "created_at": _now(),
                },
            ).scalar_one()
        )

    def decide_prior(
        self, ref: str, decision: PriorDecision, *, reason: str, **context: Any
    ) -> PriorDecisionRecord:
        """Record the promotion rule's verdict on a prior version, and act on it.

        ``promoted`` makes the version active in the same transaction, so the pointer
        never moves without its recorded reason; ``held`` leaves the active one where it
        is. ``context`` may give ``against`` (the ref of the active version it was
        compared with), ``round``, and ``scores`` (candidate score, active score,
        tolerance).

        Raises
        ------
        ConflictError
            The version was already decided (verdicts are appended once per candidate;
            an operator overrides through :meth:`set_active_prior`).
        """
        if decision not in ("promoted", "held"):
            raise RegistryValueError(f"decision must be promoted or held, got {decision!r}")
        if not isinstance(reason, str) or not reason.strip():
            raise RegistryValueError("a decision needs a reason")
        unknown = set(context) - {"against", "round", "scores"}
        if unknown:
            raise RegistryValueError(f"decide_prior got unknown arguments {sorted(unknown)}")
        against = context.get("against")
        with self._write() as conn:
            prior_id, fp = self._prior_id_of(conn, ref)
            if conn.execute(
                select(prior_decisions.c.id).where(prior_decisions.c.prior_id == prior_id)
            ).first():
                raise ConflictError(f"prior {ref} was already decided; see its decision history")
            new_id = self._append_decision(
                conn,
                fp,
                prior_id,
                decision,
                decided_by="policy",
                reason=reason,
                against_id=None if against is None else self._prior_id_of(conn, against)[0],
                round=context.get("round"),
                scores=context.get("scores", (None, None, None)),
            )
            if decision == "promoted":
                self._point_prior(conn, fp, prior_id)
            row = conn.execute(self._decision_query().where(prior_decisions.c.id == new_id)).one()
        log.info("prior %s %s: %s", ref, decision, reason)
        return self._decision_record(row)

    @staticmethod
    def _decision_query() -> Select[Any]:
        pd = prior_decisions
        candidate, against = prior_versions.alias("candidate"), prior_versions.alias("against")
        return (
            select(pd, candidate.c.ref.label("ref"), against.c.ref.label("against_ref"))
            .join_from(pd, candidate, candidate.c.id == pd.c.prior_id)
            .outerjoin(against, against.c.id == pd.c.against_id)
        )

    @staticmethod
    def _decision_record(row: Row[Any]) -> PriorDecisionRecord:
        # Every field is the column of the same name, but ``against`` (the joined ref).
        values = dict(row._mapping)
        values["against"] = values.pop("against_ref")
        names = {f.name for f in dataclass_fields(PriorDecisionRecord)}
        return PriorDecisionRecord(**{k: v for k, v in values.items() if k in names})

    def list_prior_decisions(
        self, spec: SpecRef, *, limit: int = 1000
    ) -> list[PriorDecisionRecord]:
        """A cohort's last ``limit`` promotion decisions (one per round at most), oldest first."""
        fp = self._spec_fp(spec)
        check_limit(limit)
        newest = (
            self._decision_query()
            .where(prior_decisions.c.spec_fingerprint == fp)
            .order_by(prior_decisions.c.id.desc())
            .limit(limit)
        )
        with self._read() as conn:
            return [self._decision_record(r) for r in reversed(conn.execute(newest).all())]

    def prior_decisions_for(self, refs: Iterable[str]) -> dict[str, PriorDecisionRecord]:
        """The latest decision of each of these prior versions (undecided ones are absent)."""
        wanted = sorted(set(refs))
        out: dict[str, PriorDecisionRecord] = {}
        with self._read() as conn:
            for chunk in _chunks(wanted):
                query = self._decision_query().where(
                    prior_decisions.c.prior_id.in_(
                        select(prior_versions.c.id).where(prior_versions.c.ref.in_(chunk))
                    )
                )
                for row in conn.execute(query.order_by(prior_decisions.c.id)):
                    out[row.ref] = self._decision_record(row)  # later rows win
        return out

    def list_cohorts(self) -> list[str]:
        """Spec fingerprints of the cohorts that ran a round or hold a prior, latest first.

        A grouped scan of the rounds' and priors' cohort indexes: a deployment has a handful
        of cohorts however many users and versions it holds.
        """
        latest: dict[str, datetime] = {}
        with self._read() as conn:
            for table, column in (
                (rounds, rounds.c.started_at),
                (prior_versions, prior_versions.c.created_at),
            ):
                rows = conn.execute(
                    select(table.c.spec_fingerprint, func.max(column).label("at")).group_by(
                        table.c.spec_fingerprint
                    )
                ).all()
                for row in rows:
                    seen = latest.get(row.spec_fingerprint)
                    if seen is None or row.at > seen:
                        latest[row.spec_fingerprint] = row.at
        return sorted(latest, key=lambda fp: (latest[fp], fp), reverse=True)

    def active_prior(self, spec: SpecRef) -> PriorRecord | None:
        """The prior version new users of this cohort start from, or None (start from zero)."""
        fp = self._spec_fp(spec)
        with self._read() as conn:
            row = conn.execute(
                self._prior_query().where(
                    prior_versions.c.spec_fingerprint == fp, active_priors.c.prior_id.is_not(None)
                )
            ).first()
        return None if row is None else self._prior_record(row)

    # ------------------------------------------------------------------ rounds

    @staticmethod
    def _round_record(row: Row[Any]) -> RoundRecord:
        return RoundRecord(
            id=RoundId(int(row.id)),
            spec_fingerprint=row.spec_fingerprint,
            number=int(row.number),
            status=row.status,
            config=json.loads(row.config_json),
            started_at=row.started_at,
            finished_at=row.finished_at,
            participants=row.participants,
            dropouts=row.dropouts,
            refused=row.refused,
            bytes_up=row.bytes_up,
            bytes_down=row.bytes_down,
            prior_ref=row.prior_ref,
            dp_epsilon=row.dp_epsilon,
            dp_delta=row.dp_delta,
        )

    def start_round(
        self,
        spec: AdapterSpec,
        number: int,
        *,
        config: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> RoundRecord:
        """Record that round ``number`` of the cohort started now, with its run config.

        With ``retry`` a round that *failed* (too few updates, or a coordinator killed
        mid-round) is reopened under the same number, counting its attempts; a finished
        round is never reopened.

        Raises
        ------
        ConflictError
            The cohort already has a round with this number (that is not a failed one
            being retried).
        """
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise RegistryValueError(f"round number must be an integer >= 0, got {number!r}")
        try:
            config_json = json.dumps(dict(config or {}), sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise RegistryValueError(f"round config must be JSON-serializable ({exc})") from None
        fp = self._fingerprint(spec)
        reopened: int | None = None
        if retry:
            with self._write() as conn:
                self._ensure_specs(conn, [spec])
                row = conn.execute(
                    select(rounds.c.id, rounds.c.status, rounds.c.config_json).where(
                        rounds.c.spec_fingerprint == fp, rounds.c.number == number
                    )
                ).first()
                if row is not None:
                    if row.status != "failed":
                        raise ConflictError(
                            f"cohort {fp[:12]}… round {number} is {row.status}; only a failed round is retried"
                        )
                    previous = json.loads(row.config_json or "{}")
                    merged = {
                        **dict(config or {}),
                        "attempts": int(previous.get("attempts", 1)) + 1,
                    }
                    conn.execute(
                        update(rounds)
                        .where(rounds.c.id == row.id)
                        .values(
                            status="running",
                            config_json=json.dumps(merged, sort_keys=True, separators=(",", ":")),
                            started_at=_now(),
                            finished_at=None,
                            participants=None,
                            dropouts=None,
                            refused=None,
                            bytes_up=None,
                            bytes_down=None,
                            prior_ref=None,
                            dp_epsilon=None,
                            dp_delta=None,
                        )
                    )
                    reopened = int(row.id)
        if reopened is not None:  # read after the write transaction committed
            return self.get_round(RoundId(reopened))
        try:
            with self._write() as conn:
                self._ensure_specs(conn, [spec])
                new_id = conn.execute(
                    insert(rounds).returning(rounds.c.id),
                    {
                        "spec_fingerprint": fp,
                        "number": number,
                        "status": "running",
                        "config_json": config_json,
                        "started_at": _now(),
                    },
                ).scalar_one()
        except IntegrityError:
            raise ConflictError(
                f"cohort {fp[:12]}… already has a round {number}; round numbers are not reused"
            ) from None
        return self.get_round(RoundId(int(new_id)))

    def finish_round(
        self,
        round_id: RoundId,
        *,
        participants: int,
        dropouts: int = 0,
        refused: int = 0,
        bytes_up: int = 0,
        bytes_down: int = 0,
        prior_ref: str | None = None,
        status: RoundStatus = "finished",
        dp_epsilon: float | None = None,
        dp_delta: float | None = None,
    ) -> RoundRecord:
        """Close a running round with its totals (failed rounds too: ``status="failed"``).

        ``dp_epsilon`` is the privacy spent by the prior up to and including this round,
        at ``dp_delta``, when the federation runs with differential privacy.

        Raises
        ------
        ConflictError
            The round was already closed.
        """
        if status not in ("finished", "failed"):
            raise RegistryValueError(f"a round finishes as 'finished' or 'failed', not {status!r}")
        for what, value in (("dp_epsilon", dp_epsilon), ("dp_delta", dp_delta)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise RegistryValueError(f"{what} must be a finite number >= 0, got {value!r}")
        if dp_delta is not None and not dp_delta < 1:
            raise RegistryValueError(f"dp_delta must be below 1, got {dp_delta!r}")
        values: dict[str, Any] = {
            "dp_epsilon": None if dp_epsilon is None else float(dp_epsilon),
            "dp_delta": None if dp_delta is None else float(dp_delta),
            "participants": check_count("participants", participants),
            "dropouts": check_count("dropouts", dropouts),
            "refused": check_count("refused", refused),
            "bytes_up": check_count("bytes_up", bytes_up),
            "bytes_down": check_count("bytes_down", bytes_down),
        }
        with self._write() as conn:
            done = conn.execute(
                update(rounds)
                .where(rounds.c.id == round_id, rounds.c.status == "running")
                .values(status=status, finished_at=_now(), prior_ref=prior_ref, **values)
            ).rowcount
            if not done:
                exists = conn.execute(
                    select(rounds.c.status).where(rounds.c.id == round_id)
                ).scalar()
                if exists is None:
                    raise NotFoundError(f"no round with id {round_id}")
                raise ConflictError(f"round {round_id} is already {exists}; it cannot finish twice")
        return self.get_round(round_id)

    def get_round(self, round_id: RoundId) -> RoundRecord:
        """A round by id."""
        with self._read() as conn:
            row = conn.execute(select(rounds).where(rounds.c.id == round_id)).first()
        if row is None:
            raise NotFoundError(f"no round with id {round_id}")
        return self._round_record(row)

    def list_rounds(
        self,
        spec: SpecRef | None = None,
        *,
        after: RoundId | None = None,
        before: RoundId | None = None,
        limit: int = 50,
    ) -> Page[RoundRecord, int]:
        """Rounds, newest first (of one cohort when ``spec`` is given), by keyset on the id."""
        query = select(rounds)
        if spec is not None:
            query = query.where(rounds.c.spec_fingerprint == self._spec_fp(spec))
        with self._read() as conn:
            return _keyset_page(
                conn,
                query,
                rounds.c.id,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=self._round_record,
                key_of=lambda r: int(r.id),
            )

    # ------------------------------------------------------------------ blobs

    @staticmethod
    def _blob_record(row: Row[Any]) -> BlobRecord:
        return BlobRecord(
            id=int(row.id),
            blob_id=row.blob_id,
            user_id=UserId(int(row.user_id)),
            adapter_id=None if row.adapter_id is None else AdapterId(int(row.adapter_id)),
            version=row.version,
            kind=row.kind,
            size_bytes=int(row.size_bytes),
            sha256=row.sha256,
            created_at=row.created_at,
        )

    def put_blob_meta(
        self,
        user: UserRef,
        blob_id: str,
        *,
        size_bytes: int,
        sha256: str,
        kind: str = "adapter",
        adapter_id: AdapterId | None = None,
        version: int | None = None,
    ) -> BlobRecord:
        """Record an encrypted blob the blob store now holds for ``user``.

        Idempotent for a retried upload (same id, same metadata returns the stored
        record); a different blob under an existing id is refused, since blobs, like
        versions, are never overwritten.

        Raises
        ------
        ConflictError
            ``blob_id`` is taken by a blob with other metadata.
        NotFoundError
            The user is unknown, or ``adapter_id`` is not one of the user's adapters.
        """
        check_label("blob id", blob_id)
        check_label("blob kind", kind)
        check_size("size_bytes", size_bytes)
        check_sha256("sha256", sha256)
        if version is not None:
            check_size("version", version)
        try:
            with self._write() as conn:
                uid = self._user_id(conn, user)
                if adapter_id is not None and (
                    conn.execute(
                        select(_a.c.id).where(_a.c.id == adapter_id, _a.c.user_id == uid)
                    ).first()
                    is None
                ):
                    raise NotFoundError(f"user {user!r} has no adapter with id {adapter_id}")
                row = conn.execute(select(blobs).where(blobs.c.blob_id == blob_id)).first()
                if row is not None:
                    same = (
                        int(row.user_id) == uid
                        and row.adapter_id == adapter_id
                        and row.version == version
                        and row.kind == kind
                        and int(row.size_bytes) == size_bytes
                        and row.sha256 == sha256
                    )
                    if not same:
                        raise ConflictError(
                            f"blob id {blob_id!r} already names another blob; blobs are never "
                            "overwritten: store the new one under a new id"
                        )
                    return self._blob_record(row)
                conn.execute(
                    insert(blobs),
                    {
                        "blob_id": blob_id,
                        "user_id": uid,
                        "adapter_id": adapter_id,
                        "version": version,
                        "kind": kind,
                        "size_bytes": size_bytes,
                        "sha256": sha256,
                        "created_at": _now(),
                    },
                )
        except IntegrityError:  # a concurrent writer took the id between check and insert
            raise ConflictError(f"blob id {blob_id!r} was just stored by another writer") from None
        return self.get_blob_meta(blob_id)

    def get_blob_meta(self, blob_id: str) -> BlobRecord:
        """Metadata of one blob by its id."""
        with self._read() as conn:
            row = conn.execute(select(blobs).where(blobs.c.blob_id == blob_id)).first()
        if row is None:
            raise NotFoundError(f"no blob {blob_id!r}")
        return self._blob_record(row)

    def list_blobs(
        self,
        user: UserRef,
        *,
        adapter_id: AdapterId | None = None,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> Page[BlobRecord, int]:
        """A user's blobs (optionally of one adapter), newest first, by keyset on the id."""
        check_limit(limit)
        with self._read() as conn:
            uid = self._user_id(conn, user)
            query = select(blobs).where(blobs.c.user_id == uid)
            if adapter_id is not None:
                query = query.where(blobs.c.adapter_id == adapter_id)
            return _keyset_page(
                conn,
                query,
                blobs.c.id,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=self._blob_record,
                key_of=lambda b: b.id,
            )

    def blob_shared_with_others(self, sha256: str, user: UserRef) -> bool:
        """Whether a blob of another user names the same ciphertext (the store dedups by hash).

        Sealed blobs carry fresh random nonces, so two users never share one in practice;
        the erasure of a user still asks before it deletes a stored file.
        """
        check_sha256("sha256", sha256)
        with self._read() as conn:
            uid = self._user_id(conn, user)
            row = conn.execute(
                select(blobs.c.id).where(blobs.c.sha256 == sha256, blobs.c.user_id != uid).limit(1)
            ).first()
        return row is not None

    def delete_blob_meta(self, blob_id: str) -> bool:
        """Forget a blob the store deleted (retention); False if it was not recorded."""
        with self._write() as conn:
            return bool(conn.execute(delete(blobs).where(blobs.c.blob_id == blob_id)).rowcount)

    # ------------------------------------------------------------------ devices

    @staticmethod
    def _device_record(row: Row[Any]) -> DeviceRecord:
        return DeviceRecord(
            id=DeviceId(int(row.id)),
            kind=row.kind,
            user_id=None if row.user_id is None else UserId(int(row.user_id)),
            pseudonym=row.pseudonym,
            name=row.name,
            public_key=None if row.public_key is None else bytes(row.public_key),
            node_id=None if row.node_id is None else int(row.node_id),  # stored as text
            enrolled_at=row.enrolled_at,
            last_seen_at=row.last_seen_at,
            revoked_at=row.revoked_at,
        )

    @staticmethod
    def _device_query() -> Select[Any]:
        return select(devices, users.c.pseudonym).select_from(
            devices.outerjoin(users, devices.c.user_id == users.c.id)
        )

    @staticmethod
    def _token_digest(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    def issue_enrolment_token(self, user: UserRef, *, ttl_s: int = 86400) -> str:
        """A one-time token that enrols one device of ``user`` within ``ttl_s`` seconds.

        The token is returned once and only its sha256 is stored, so a copy of the
        database enrols nothing. The app's backend, which knows who the user is, asks
        for it and hands it to the user's device.
        """
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= 30 * 86400:
            raise RegistryValueError(
                f"enrolment token lifetime must be 1..2592000 seconds, got {ttl_s!r}"
            )
        token = secrets.token_urlsafe(32)
        now = _now()
        with self._write() as conn:
            uid = self._user_id(conn, user)
            conn.execute(
                insert(enrolment_tokens),
                {
                    "user_id": uid,
                    "token_sha256": self._token_digest(token),
                    "created_at": now,
                    "expires_at": now + timedelta(seconds=ttl_s),
                },
            )
        log.info("issued an enrolment token for user id %d (valid %d s)", uid, ttl_s)
        return token

    def redeem_enrolment_token(self, token: str, public_key: bytes, *, name: str) -> DeviceRecord:
        """Enrol a device: spend a one-time token on the device's Ed25519 public key.

        Raises
        ------
        AuthorizationError
            The token is unknown, already used or expired (one message for all three,
            so a caller learns nothing about which tokens exist).
        ConflictError
            The public key is already enrolled (or was revoked): a device makes a new key.
        """
        if not isinstance(token, str) or not 16 <= len(token) <= 256:
            raise AuthorizationError("enrolment token is not valid (ask for a new one)")
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise RegistryValueError("device public key must be a raw 32-byte Ed25519 key")
        check_label("device name", name)
        digest = self._token_digest(token)
        now = _now()
        try:
            with self._write() as conn:
                row = conn.execute(
                    select(enrolment_tokens).where(enrolment_tokens.c.token_sha256 == digest)
                ).first()
                if row is None or row.used_at is not None or row.expires_at <= now:
                    raise AuthorizationError(
                        "enrolment token is unknown, used or expired (ask for a new one)"
                    )
                spent = conn.execute(
                    update(enrolment_tokens)
                    .where(enrolment_tokens.c.id == row.id, enrolment_tokens.c.used_at.is_(None))
                    .values(used_at=now)
                ).rowcount
                if not spent:  # a concurrent redemption won
                    raise AuthorizationError(
                        "enrolment token is unknown, used or expired (ask for a new one)"
                    )
                new_id = conn.execute(
                    insert(devices).returning(devices.c.id),
                    {
                        "kind": "device",
                        "user_id": row.user_id,
                        "name": name,
                        "public_key": public_key,
                        "enrolled_at": now,
                        "last_seen_at": now,
                    },
                ).scalar_one()
        except IntegrityError:
            raise ConflictError(
                "this device key is already enrolled; generate a new key pair to enrol again"
            ) from None
        device = self.get_device(DeviceId(int(new_id)))
        log.info("enrolled device id %d for user id %s", device.id, device.user_id)
        return device

    def get_device(self, device_id: DeviceId) -> DeviceRecord:
        """A device or SuperNode by id."""
        with self._read() as conn:
            row = conn.execute(self._device_query().where(devices.c.id == device_id)).first()
        if row is None:
            raise NotFoundError(f"no device with id {device_id}")
        return self._device_record(row)

    def find_device_by_key(self, public_key: bytes) -> DeviceRecord | None:
        """The device enrolled with this Ed25519 public key (revoked ones too), or None."""
        with self._read() as conn:
            row = conn.execute(
                self._device_query().where(devices.c.public_key == public_key)
            ).first()
        return None if row is None else self._device_record(row)

    def remember_nonce(
        self,
        public_key: bytes,
        nonce: bytes,
        *,
        now: datetime,
        keep_until: datetime,
        max_entries: int,
    ) -> Literal["new", "replayed", "full"]:
        """Record a signed request's nonce until ``keep_until``; say if it was seen.

        Nonces whose ``keep_until`` has passed are forgotten first. The table survives a
        restart of the backup service and is shared by every replica on one registry,
        so a captured request replays against none of them. ``"full"``: ``max_entries``
        nonces are all still needed (the caller refuses the request rather than forget
        one, which would open a replay).
        """
        try:
            with self._write() as conn:
                conn.execute(delete(request_nonces).where(request_nonces.c.expires_at <= now))
                held = conn.execute(select(func.count()).select_from(request_nonces)).scalar_one()
                seen = conn.execute(
                    select(request_nonces.c.nonce).where(
                        request_nonces.c.public_key == public_key, request_nonces.c.nonce == nonce
                    )
                ).first()
                if seen is not None:
                    return "replayed"
                if held >= max_entries:
                    return "full"
                conn.execute(
                    insert(request_nonces),
                    {"public_key": public_key, "nonce": nonce, "expires_at": keep_until},
                )
        except IntegrityError:  # a concurrent request with the same nonce won the insert
            return "replayed"
        return "new"

    def touch_device(self, device_id: DeviceId) -> None:
        """Record that the device was seen now (the console's "last seen")."""
        with self._write() as conn:
            conn.execute(
                update(devices).where(devices.c.id == device_id).values(last_seen_at=_now())
            )

    def revoke_device(self, device_id: DeviceId) -> DeviceRecord:
        """Revoke a device or SuperNode; idempotent (a second revoke keeps the first time)."""
        with self._write() as conn:
            found = conn.execute(select(devices.c.id).where(devices.c.id == device_id)).first()
            if found is None:
                raise NotFoundError(f"no device with id {device_id}")
            conn.execute(
                update(devices)
                .where(devices.c.id == device_id, devices.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        log.info("revoked device id %d", device_id)
        return self.get_device(device_id)

    def register_node(self, node_id: int, *, name: str | None = None) -> DeviceRecord:
        """Record a Flower SuperNode the coordinator saw (insert once, then touch)."""
        key = _node_key(node_id)
        label = check_label("node name", name if name is not None else f"node-{node_id}")
        now = _now()
        with self._write() as conn:
            done = conn.execute(
                update(devices).where(devices.c.node_id == key).values(last_seen_at=now)
            ).rowcount
            if not done:
                conn.execute(
                    self._insert(devices).on_conflict_do_nothing(),
                    {
                        "kind": "supernode",
                        "name": label,
                        "node_id": key,
                        "enrolled_at": now,
                        "last_seen_at": now,
                    },
                )
        found = self.find_node(node_id)
        assert found is not None  # just written
        return found

    def find_node(self, node_id: int) -> DeviceRecord | None:
        """The SuperNode with this Flower node id, or None if never seen."""
        with self._read() as conn:
            row = conn.execute(
                self._device_query().where(devices.c.node_id == _node_key(node_id))
            ).first()
        return None if row is None else self._device_record(row)

    def revoked_node_ids(self) -> frozenset[int]:
        """Flower node ids of revoked SuperNodes: the coordinator samples none of them."""
        with self._read() as conn:
            rows = conn.execute(
                select(devices.c.node_id).where(
                    devices.c.kind == "supernode", devices.c.revoked_at.is_not(None)
                )
            ).all()
        return frozenset(int(r.node_id) for r in rows)

    def list_devices(
        self,
        *,
        kind: DeviceKind | None = None,
        user: UserRef | None = None,
        after: DeviceId | None = None,
        before: DeviceId | None = None,
        limit: int = 50,
    ) -> Page[DeviceRecord, int]:
        """Devices and SuperNodes, newest first, by keyset on the id."""
        check_limit(limit)
        if kind is not None and kind not in DEVICE_KINDS:
            raise RegistryValueError(f"device kind must be one of {DEVICE_KINDS}, got {kind!r}")
        query = self._device_query()
        with self._read() as conn:
            if user is not None:
                query = query.where(devices.c.user_id == self._user_id(conn, user))
            if kind is not None:
                query = query.where(devices.c.kind == kind)
            return _keyset_page(
                conn,
                query,
                devices.c.id,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=self._device_record,
                key_of=lambda d: int(d.id),
            )

    # ------------------------------------------------------------------ audit and controls

    def record_audit(
        self, actor: str, action: str, target: str, detail: Mapping[str, Any] | None = None
    ) -> AuditRecord:
        """Append an operator action to the audit log (rows are never updated)."""
        check_label("audit actor", actor)
        check_label("audit action", action)
        if not isinstance(target, str) or not 0 < len(target) <= 256:
            raise RegistryValueError("audit target must be a string of 1-256 characters")
        try:
            detail_json = json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise RegistryValueError(f"audit detail must be JSON-serializable ({exc})") from None
        with self._write() as conn:
            new_id = conn.execute(
                insert(audit_log).returning(audit_log.c.id),
                {
                    "at": _now(),
                    "actor": actor,
                    "action": action,
                    "target": target,
                    "detail_json": detail_json,
                },
            ).scalar_one()
            row = conn.execute(select(audit_log).where(audit_log.c.id == new_id)).one()
        return self._audit_record(row)

    @staticmethod
    def _audit_record(row: Row[Any]) -> AuditRecord:
        return AuditRecord(
            id=int(row.id),
            at=row.at,
            actor=row.actor,
            action=row.action,
            target=row.target,
            detail=json.loads(row.detail_json),
        )

    def list_audit(
        self, *, after: int | None = None, before: int | None = None, limit: int = 50
    ) -> Page[AuditRecord, int]:
        """Audit entries, newest first, by keyset on the id."""
        with self._read() as conn:
            return _keyset_page(
                conn,
                select(audit_log),
                audit_log.c.id,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=self._audit_record,
                key_of=lambda e: e.id,
            )

    def set_control(self, key: str, value: Any) -> None:
        """Set an operator switch (JSON value) that the coordinator reads each round."""
        check_label("control key", key)
        try:
            value_json = json.dumps(value, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise RegistryValueError(f"control {key!r} must be JSON-serializable ({exc})") from None
        with self._write() as conn:
            conn.execute(
                self._insert(controls)
                .values(key=key, value_json=value_json, updated_at=_now())
                .on_conflict_do_update(
                    index_elements=[controls.c.key],
                    set_={"value_json": value_json, "updated_at": _now()},
                )
            )

    def get_control(self, key: str, default: Any = None) -> Any:
        """An operator switch's value, or ``default`` if never set."""
        with self._read() as conn:
            text = conn.execute(select(controls.c.value_json).where(controls.c.key == key)).scalar()
        return default if text is None else json.loads(text)

    # ------------------------------------------------------------------ totals

    def counts(self) -> Counts:
        """Row counts of the main tables (a full count: seconds at 10^7 rows, not per page)."""
        with self._read() as conn:

            def count(table: Table) -> int:
                return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

            return Counts(
                users=count(users),
                adapters=count(_a),
                versions=count(_v),
                prior_versions=count(prior_versions),
                rounds=count(rounds),
                blobs=count(blobs),
            )
