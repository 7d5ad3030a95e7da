"""What every area of the registry shares: transactions, spec and user lookups, batch SQL.

:class:`RegistryBase` holds the engine and the caches; the area mixins (``users``,
``priors``, ``devices``) build on it and :class:`~lorafleet.server.registry.store.Registry`
composes them. The module-level helpers here (keyset paging, ``executemany`` inserts, the
ids those inserts made) are the ones more than one area uses; a helper only one area needs
lives in that area's module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Row, Select, Table, func, insert, select
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry.database import describe_connect_failure, write_connection
from lorafleet.server.registry.errors import (
    NotFoundError,
    RegistryError,
    RegistryValueError,
    UnavailableError,
)
from lorafleet.server.registry.lookups import Prepared
from lorafleet.server.registry.models import adapter_versions, adapters, specs, users
from lorafleet.server.registry.records import (
    Page,
    UserId,
    check_limit,
    check_pseudonym,
    check_sha256,
)

UserRef = UserId | str
"""A user by registry id or by pseudonym; every method that takes a user takes either."""

SpecRef = AdapterSpec | str
"""A cohort by its spec or the spec's fingerprint."""

_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's parameter limits
_T = TypeVar("_T")

_v, _a, _u = adapter_versions, adapters, users


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


class RegistryBase:
    """The state every registry area shares and the lookups they all make.

    Not used on its own: :class:`~lorafleet.server.registry.store.Registry` is the
    object to build (with its ``open``).
    """

    def __init__(self, engine: Engine, url: URL) -> None:
        """Wrap an engine that :meth:`open` built and migrated; use :meth:`open` instead."""
        self._engine = engine
        self._url = url
        self._specs_by_fp: dict[str, AdapterSpec] = {}
        self._fp_by_spec: dict[AdapterSpec, str] = {}
        self._prepared: dict[str, Prepared] = {}

    # ------------------------------------------------------------------ transactions

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

    # ------------------------------------------------------------------ user lookup (every area)

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
