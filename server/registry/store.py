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

Layout: :class:`Registry` is a facade composing one mixin per area, so each module stays
readable on its own; all of them build on ``_base.RegistryBase`` (the engine, the
read/write transactions, the spec and user lookups and the batch/paging helpers that
more than one area uses):

- ``users.py``: users, adapters, versions, evaluations and device reports;
- ``priors.py``: cohort priors, their promotion (evaluations and decisions) and rounds;
- ``devices.py``: blob metadata, devices and Flower nodes, the audit log and controls.

This module keeps what spans the areas: opening, closing and :meth:`Registry.counts`.
Import :class:`Registry` and :func:`prior_ref` from here or from the package, never from
an area module.
"""

from __future__ import annotations

import os
from typing import Literal

from sqlalchemy import Engine, Table, func, select

from lorafleet.server.registry._base import SpecRef as SpecRef
from lorafleet.server.registry._base import UserRef as UserRef
from lorafleet.server.registry._base import _a, _v
from lorafleet.server.registry.database import create_registry_engine, migrate, parse_url
from lorafleet.server.registry.devices import DevicesMixin
from lorafleet.server.registry.errors import RegistryError
from lorafleet.server.registry.models import blobs, prior_versions, rounds, users
from lorafleet.server.registry.priors import PriorsMixin
from lorafleet.server.registry.priors import prior_ref as prior_ref
from lorafleet.server.registry.records import Counts
from lorafleet.server.registry.users import UsersMixin

__all__ = ["Registry", "SpecRef", "UserRef", "prior_ref"]


class Registry(UsersMixin, PriorsMixin, DevicesMixin):
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
