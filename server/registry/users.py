"""Registry area: users, their adapters, immutable versions, evaluations, device reports.

The :class:`UsersMixin` part of :class:`~lorafleet.server.registry.store.Registry`; see
that module for the design notes (immutable versions, keyset paging, batched writes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Select,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry._base import (
    RegistryBase,
    UserRef,
    _a,
    _bulk_insert,
    _chunks,
    _ids_since,
    _keyset_page,
    _max_id,
    _now,
    _u,
    _v,
)
from lorafleet.server.registry.database import describe_connect_failure
from lorafleet.server.registry.errors import (
    ConflictError,
    NotFoundError,
    RegistryValueError,
    UnavailableError,
)
from lorafleet.server.registry.lookups import fetch, prepare
from lorafleet.server.registry.models import blobs, devices, enrolment_tokens, evaluations, users
from lorafleet.server.registry.records import (
    AdapterId,
    AdapterRecord,
    DeviceReport,
    ErasureCounts,
    EvaluationId,
    EvaluationRecord,
    NewVersion,
    Page,
    ReportCounts,
    UserId,
    UserRecord,
    VersionId,
    VersionRecord,
    check_label,
    check_limit,
    check_prefix,
    check_pseudonym,
    check_sha256,
    metrics_from_json,
    metrics_to_json,
)

log = logging.getLogger(__name__)

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


def _prefix_upper(prefix: str) -> str:
    # Pseudonyms sort bytewise and are ASCII, so every string starting with `prefix` lies
    # in [prefix, prefix with its last character incremented).
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class UsersMixin(RegistryBase):
    """Users, adapters, versions (with provenance), evaluations and device reports."""

    # ------------------------------------------------------------------ users

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
        version; a version the adapter already holds is skipped with the evaluation it
        came with (a retried round, a repeated reply or a retried backup-channel report),
        and one whose parent the registry never heard of (neither stored nor earlier in
        the batch) is stored with ``parent=None``
        and the parent's number kept as the metric
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
            repeated: set[int] = set()  # reports of a version already stored: no new evaluation
            for r, aid in placed:
                prov = r.provenance
                if prov is None:
                    continue
                key = (aid, prov.version)
                if key in batch:
                    log.warning("adapter %d: version %d reported twice; kept the first", *key)
                    skipped += 1
                    repeated.add(id(r))
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
                    repeated.add(id(r))
                    continue
                metrics = dict(prov.metrics)
                parent = prov.parent
                # The parent may be stored already or come earlier in this batch (a device
                # sending the reports it queued while offline): every key in ``batch`` is
                # stored or inserted before this row (a parent is always an earlier
                # version), so the link names a row that exists.
                if (
                    parent is not None
                    and (aid, parent) not in stored
                    and (aid, parent) not in batch
                ):
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
                if r.evaluation is None or r.evaluated is None or id(r) in repeated:
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
