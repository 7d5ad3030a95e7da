"""Registry area: blob metadata, enrolled devices and Flower nodes, the audit log, controls.

The :class:`DevicesMixin` part of :class:`~lorafleet.server.registry.store.Registry`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Row, Select, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from lorafleet.server.registry._base import RegistryBase, UserRef, _a, _keyset_page, _now
from lorafleet.server.registry.errors import (
    AuthorizationError,
    ConflictError,
    NotFoundError,
    RegistryValueError,
)
from lorafleet.server.registry.models import (
    audit_log,
    blobs,
    controls,
    devices,
    enrolment_tokens,
    request_nonces,
    users,
)
from lorafleet.server.registry.records import (
    DEVICE_KINDS,
    AdapterId,
    AuditRecord,
    BlobRecord,
    DeviceId,
    DeviceKind,
    DeviceRecord,
    Page,
    UserId,
    check_label,
    check_limit,
    check_sha256,
    check_size,
)

log = logging.getLogger(__name__)


def _node_key(node_id: int) -> str:
    """A Flower node id (unsigned 64-bit) as the registry stores it: decimal text."""
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id < 2**64:
        raise RegistryValueError(f"node id must be an integer in 0..2**64-1, got {node_id!r}")
    return str(node_id)


class DevicesMixin(RegistryBase):
    """Blob metadata, devices (enrolment, nonces, revocation), the audit log, controls."""

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
