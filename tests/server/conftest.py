"""Fixtures for the coordinator's tests: a real PostgreSQL server on loopback, and registry URLs.

``registry_url`` is parametrized over both backends, so every registry test runs on
SQLite (the embedded default) and on PostgreSQL (the production choice). PostgreSQL is a
throwaway cluster that this session starts once (``initdb`` + ``pg_ctl``, a few seconds)
in a temporary folder, listening on 127.0.0.1 only, and stops at the end; each test gets
its own fresh database on it.

- ``LORAFLEET_TEST_POSTGRES_URL=postgresql+psycopg://user@host:port/db`` uses an existing
  server instead (the user must be allowed to ``CREATE DATABASE``).
- Without PostgreSQL's server binaries the PostgreSQL cases fail and say what to install
  (Debian's ``postgresql``; CI installs it), unless ``LORAFLEET_SKIP_POSTGRES=1``.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_USER = "lorafleet"
_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or in "
    "/usr/lib/postgresql/*/bin; install Debian's `postgresql` package "
    "(sudo apt-get install postgresql; .ci/run installs it), point "
    "LORAFLEET_TEST_POSTGRES_URL at a server, or set LORAFLEET_SKIP_POSTGRES=1 to skip"
)


@dataclass
class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    host: str
    port: int
    user: str
    admin_db: str
    _counter: itertools.count[int]

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=self.admin_db, autocommit=True
        ) as conn:
            for statement in statements:
                conn.execute(statement)

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL."""
        name = f"lorafleet_{prefix}_{os.getpid()}_{next(self._counter)}"
        self._admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database :meth:`create_database` made, even with connections left open."""
        name = url.rsplit("/", 1)[-1]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _find_pg_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_db_owner(argv: list[str], owner: str | None) -> list[str]:
    # initdb and postgres refuse to run as root; run them as the folder's owner.
    if owner is None:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", owner, "--", *argv]
    return ["su", owner, "-s", "/bin/sh", "-c", " ".join(_quote(a) for a in argv)]


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _run(argv: list[str], *, cwd: Path, what: str) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for this test session (started here unless one is given)."""
    if os.environ.get("LORAFLEET_SKIP_POSTGRES") == "1":
        pytest.skip("LORAFLEET_SKIP_POSTGRES=1: PostgreSQL cases skipped")
    given = os.environ.get("LORAFLEET_TEST_POSTGRES_URL")
    if given:
        from sqlalchemy.engine import make_url

        url = make_url(given)
        yield PostgresServer(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or PG_USER,
            admin_db=url.database or "postgres",
            _counter=itertools.count(),
        )
        return
    bindir = _find_pg_bin()
    if bindir is None:
        pytest.fail(_INSTALL_HINT, pytrace=False)
    owner: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(
                "running as root and there is no `postgres` user to run initdb as; install "
                "Debian's `postgresql` package (it creates the user) or run the tests as "
                "another user",
                pytrace=False,
            )
        owner = "postgres"
    # Not under pytest's tmp folder: that one is private to this user, and the server
    # runs as `postgres` when we are root.
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    data = root / "data"
    port = _free_port()
    if owner is not None:
        shutil.chown(root, user=owner)
    try:
        _run(
            _as_db_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "--auth=trust",
                    "-U",
                    PG_USER,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                owner,
            ),
            cwd=root,
            what="initdb",
        )
        options = (
            f"-k {root} -p {port} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _run(
            _as_db_owner(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(root / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                owner,
            ),
            cwd=root,
            what="starting PostgreSQL (see its log: server.log in the data folder's parent)",
        )
        try:
            yield PostgresServer("127.0.0.1", port, PG_USER, "postgres", itertools.count())
        finally:
            subprocess.run(
                _as_db_owner(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                    owner,
                ),
                cwd=root,
                capture_output=True,
                timeout=60,
                check=False,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty registry database, on each backend in turn."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)
