"""Engines and migrations: one code path for SQLite (embedded) and PostgreSQL (production).

A registry URL is either ``sqlite:///path/to/registry.db`` (or a bare path), or
``postgresql+psycopg://user:password@host:5432/dbname`` (``postgresql://`` is read as
psycopg 3, the driver lorafleet installs). Opening it:

- tunes SQLite on every new connection: WAL (readers never block the writer), foreign
  keys on, a busy timeout instead of instant ``database is locked``, ``synchronous=NORMAL``
  (durable across crashes of the process; in WAL mode only a power cut can lose the last
  commits), and explicit ``BEGIN`` / ``BEGIN IMMEDIATE`` so transactions are real
  (pysqlite's own transaction handling skips DDL and upgrades locks too late);
- migrates the schema to head with alembic, programmatically (no ``alembic.ini``), under
  an advisory lock on PostgreSQL so coordinators starting together migrate once;
- turns a bad URL, a server that cannot be reached, or a schema newer than this
  lorafleet into one :class:`~lorafleet.server.registry.errors.RegistryError` line that
  names the host and port and the fix, never the password.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import StaticPool

from lorafleet.server.registry.errors import RegistryError, UnavailableError
from lorafleet.server.registry.models import VERSION_TABLE

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_CACHE_KIB = 65_536  # per connection; the page cache that keeps hot index pages
PG_CONNECT_TIMEOUT_S = 10
_PG_MIGRATION_LOCK = 0x6C6F7261666C6565  # "lorafleet" as an advisory lock key
WRITE_OPTION = "lorafleet_write"
"""Execution option marking a connection that will write; SQLite then takes the write
lock at ``BEGIN`` (``BEGIN IMMEDIATE``) instead of failing on upgrade under contention."""

_URL_HINT = "use sqlite:///path/to/registry.db or postgresql+psycopg://user@host:5432/dbname"


def parse_url(url: str | os.PathLike[str]) -> URL:
    """Read a registry URL or a bare SQLite path; refuse anything else in one line.

    Examples
    --------
    >>> parse_url("postgresql://me:pw@db:5432/reg").drivername
    'postgresql+psycopg'
    >>> parse_url("/srv/lorafleet/registry.db").render_as_string()
    'sqlite:////srv/lorafleet/registry.db'
    """
    if isinstance(url, os.PathLike) or "://" not in str(url):
        path = Path(url).expanduser()
        if not str(url).strip():
            raise RegistryError(f"registry URL is empty; {_URL_HINT}")
        return URL.create("sqlite", database=str(path.absolute()))
    raw = str(url)
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise RegistryError(
            f"registry URL {_redact_raw(raw)!r} is not a database URL; {_URL_HINT}"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":  # SQLAlchemy's default would be psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg")
        if not parsed.database:
            raise RegistryError(
                f"registry URL {parsed.render_as_string(hide_password=True)!r} names no database; "
                "add it after the host, e.g. postgresql+psycopg://user@host:5432/lorafleet"
            )
        return parsed
    if backend == "sqlite":
        return parsed
    raise RegistryError(
        f"registry URL {parsed.render_as_string(hide_password=True)!r}: backend {backend!r} is "
        f"not supported; {_URL_HINT}"
    )


def _redact_raw(raw: str) -> str:
    # user:password@ -> user:***@ in a string SQLAlchemy could not parse.
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", raw)


def is_memory(url: URL) -> bool:
    """Whether ``url`` is an in-memory SQLite database (tests, throwaway tools)."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def create_registry_engine(url: URL, *, echo: bool = False) -> Engine:
    """An engine tuned for the registry on either backend; connects lazily."""
    if url.get_backend_name() == "sqlite":
        connect_args: dict[str, Any] = {
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
        }
        if is_memory(url):
            engine = create_engine(url, echo=echo, connect_args=connect_args, poolclass=StaticPool)
        else:
            Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, echo=echo, connect_args=connect_args)
        _tune_sqlite(engine)
        return engine
    connect_args = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    return create_engine(
        url,
        echo=echo,
        connect_args=connect_args,
        pool_pre_ping=True,
        insertmanyvalues_page_size=1000,
    )


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level; the "begin" hook below emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            cursor.execute("PRAGMA temp_store=MEMORY")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def describe_connect_failure(url: URL, exc: BaseException) -> str:
    """One line for a failed connection: where, why (driver's words), and what to do.

    The password never appears: the URL is rendered with it hidden and any occurrence in
    the driver's message is masked.
    """
    orig = getattr(exc, "orig", exc)
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    if url.get_backend_name() == "sqlite":
        return (
            f"cannot open the SQLite registry {url.database!r} ({reason}); check that the "
            "folder exists and is writable, or pass another path"
        )
    host = url.host or "localhost (Unix socket)"
    port = url.port or 5432
    where = f"PostgreSQL at {host}:{port}"
    # psycopg: 'connection failed: connection to server at "h", port p failed: <reason>'
    short = reason.rsplit("failed: ", 1)[-1].strip() or reason
    lowered = reason.lower()
    if "password" in lowered or "authentication" in lowered:
        fix = f"check the user name and password in the registry URL (user {url.username!r})"
    elif "does not exist" in lowered and "database" in lowered:
        fix = f"create the database (createdb -h {host} -p {port} {url.database}) or fix its name in the URL"
    else:
        fix = "start the server, or fix the host and port in the registry URL"
    return f"cannot reach the registry's {where} ({short}); {fix}"


@contextmanager
def write_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a write transaction (``BEGIN IMMEDIATE`` on SQLite); commits on exit."""
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            yield conn


def alembic_config(url: str | None = None) -> Config:
    """An alembic config for the registry's migrations, built in code (no ``alembic.ini``).

    Developers creating a revision can use it from Python::

        from alembic import command
        command.revision(alembic_config("sqlite:///dev.db"), "add x", autogenerate=True)
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@cache
def head_revision() -> str:
    """The newest schema revision this lorafleet ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships a revision
        raise RuntimeError(f"no registry migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(conn: Connection) -> str | None:
    """The schema revision recorded in the database (None for an empty database)."""
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def migrate(engine: Engine, url: URL) -> str:
    """Bring the schema to head; a no-op (one query) when it already is. Returns the head.

    Raises
    ------
    RegistryError
        The database records a revision this lorafleet does not know (it was migrated by
        a newer lorafleet), or a migration failed.
    UnavailableError
        The database cannot be reached.
    """
    head = head_revision()
    shown = url.render_as_string(hide_password=True)
    try:
        with write_connection(engine) as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                )
            current = current_revision(conn)
            if current == head:
                return head
            script = ScriptDirectory.from_config(alembic_config())
            if current is not None:
                try:
                    script.get_revision(current)
                except CommandError:
                    raise RegistryError(
                        f"registry {shown} has schema revision {current!r}, newer than this "
                        f"lorafleet knows (head {head!r}); upgrade lorafleet"
                    ) from None
            log.info("migrating registry %s from %s to %s", shown, current or "empty", head)
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise UnavailableError(describe_connect_failure(url, exc)) from None
    return head
