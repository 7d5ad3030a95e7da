"""The gRPC ``BackupService``: encrypted blobs of enrolled devices, per user, key-blind.

Calls (see ``protocols/v1/backup.proto`` and ``docs/backup.md``):

``Enroll``
    A device spends a one-time enrolment token (``Registry.issue_enrolment_token``) on
    its Ed25519 public key and learns the user pseudonym it acts for.
``PutBlob`` / ``UploadStatus``
    Client-streamed, resumable upload of one blob (an LFEN envelope or the device's key
    file), into the content-addressed :class:`~lorafleet.server.blob_store.BlobStore`;
    its metadata goes to the registry once every byte has arrived and matched its
    sha256.
``GetBlob`` / ``ListBlobs``
    Server-streamed download from an offset, and a keyset-paged listing, of the caller's
    own user's blobs only.
``DeleteUserData``
    Erasure on request: every blob, unfinished upload, registry record and enrolled
    device of the caller's user.
``ReportVersions``
    Metadata of the caller's personal adapter versions after an SDK ``train`` (lineage,
    scores, size; never content) or a rollback (the version in use): recorded under the
    caller's user through :func:`lorafleet.server.reports.device_report` and
    :meth:`Registry.record_reports`, the path the Flower round replies' reports take. A
    report that names another user is PERMISSION_DENIED.

Every call but ``Enroll`` is signed (:mod:`lorafleet.protocols.request_auth`): the
servicer checks the timestamp window, verifies the signature with the public key the
request names, looks that key up among enrolled devices, refuses a revoked one and
remembers the nonce, before it reads anything. A wrong signature gets the same answer
whether its key is enrolled, revoked or unknown. A ``keyfile`` blob must be at most
1 MiB and shaped like a key file (``protocols/keyfile.py``).
A blob of another user is NOT_FOUND, exactly like a blob that does not exist, so a
device learns nothing about other users' blob ids.

Failures carry a status code a client acts on:

===================  =================================================================
UNAUTHENTICATED      no/malformed/wrong signature, stale timestamp, replayed nonce,
                     unknown device, bad enrolment token
PERMISSION_DENIED    revoked device; another user named in DeleteUserData
INVALID_ARGUMENT     malformed request, resume offset beyond what the server holds,
                     an adapter blob that is not an envelope for its blob id, a
                     keyfile blob that is not shaped like a key file
NOT_FOUND            no such blob for this user
ALREADY_EXISTS       blob id, adapter version or device key already taken
RESOURCE_EXHAUSTED   blob over the size limit (1 MiB for a key file), more bytes than
                     promised, replay cache full
ABORTED              the same upload is running on another call
DATA_LOSS            upload does not match its sha256 (it is discarded), stored blob lost
UNAVAILABLE          the registry database cannot be reached
===================  =================================================================
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn

import grpc
from google.protobuf.message import Message

from lorafleet.protocols import envelope
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.keyfile import MAX_KEYFILE_BYTES, check_keyfile_shape
from lorafleet.protocols.request_auth import RequestAuthError, SignedRequest, parse_metadata
from lorafleet.protocols.serde import report_request_from_proto
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.protocols.v1 import backup_pb2, backup_pb2_grpc
from lorafleet.server.base_service import ServerTLS
from lorafleet.server.blob_store import (
    BlobNotFoundError,
    BlobStore,
    BlobTooLargeError,
    UploadBusyError,
)
from lorafleet.server.registry import (
    AdapterId,
    AdapterRecord,
    AuthorizationError,
    BlobRecord,
    ConflictError,
    DeviceRecord,
    NotFoundError,
    Registry,
    RegistryValueError,
    UnavailableError,
    UserId,
)
from lorafleet.server.reports import device_report

__all__ = [
    "DEFAULT_WINDOW_S",
    "KINDS",
    "METHODS",
    "BackupServicer",
    "ReplayCache",
    "serve_backup",
]

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 300.0
"""Signed requests are accepted this many seconds either side of the server's clock."""
DEFAULT_MAX_NONCES = 1_000_000
"""Nonces remembered at most (about 100 MB); past it, requests wait for old ones to expire."""
CHUNK_BYTES = 1 << 20
"""Bytes per GetBlob message, and what clients send per PutBlob message."""
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
"""Largest gRPC message either side accepts."""
KINDS = ("adapter", "keyfile")
"""Blob kinds: an adapter envelope, or the device key file (for a passphrase restore)."""
_SERVICE = "/lorafleet.v1.BackupService/"
METHODS = {
    name: _SERVICE + name
    for name in (
        "Enroll",
        "PutBlob",
        "UploadStatus",
        "GetBlob",
        "ListBlobs",
        "DeleteUserData",
        "ReportVersions",
    )
}
"""Full gRPC method names, as signed by clients."""
_TOUCH_EVERY = timedelta(seconds=60)
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000


# --- errors and status codes ----------------------------------------------------------


class _Unauthenticated(LorafleetError):
    """The caller is not who it claims, or cannot be told apart from a replay."""


class _Denied(LorafleetError):
    """The caller is known but may not do this."""


class _Exists(LorafleetError):
    """The request would overwrite something that is never overwritten."""


class _Exhausted(LorafleetError):
    """A limit of the server is reached."""


class _Invalid(LorafleetError):
    """A malformed request (beyond what the protocols layer's SpecError covers)."""


_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (_Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (RequestAuthError, grpc.StatusCode.UNAUTHENTICATED),
    (AuthorizationError, grpc.StatusCode.UNAUTHENTICATED),
    (_Denied, grpc.StatusCode.PERMISSION_DENIED),
    (_Invalid, grpc.StatusCode.INVALID_ARGUMENT),
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (RegistryValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (BlobNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (_Exists, grpc.StatusCode.ALREADY_EXISTS),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (BlobTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (_Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadBusyError, grpc.StatusCode.ABORTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def _abort(context: grpc.ServicerContext, exc: LorafleetError) -> NoReturn:
    """End the call with the status code that fits ``exc``, and its one-line message."""
    code = next((c for kind, c in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
    message = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
    if code in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
        logger.error("backup service: %s", message)
    else:
        logger.info("backup service refused a request: %s (%s)", message, code.name)
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - grpc always raises


# --- replay protection ----------------------------------------------------------------


class ReplayCache:
    """Nonces of recently accepted requests, in the registry, forgotten once too old.

    A request is only accepted within ``window_s`` of the server clock, so a nonce
    needs remembering for ``2 * window_s`` after it was first seen, no longer: older
    copies are refused by the timestamp check. The nonces live in the registry's
    ``request_nonces`` table, so a restarted service (or another replica on the same
    registry) still refuses a captured request. The cache is bounded: when it holds
    ``max_entries`` nonces that are all still needed, new requests are refused
    (RESOURCE_EXHAUSTED, retry shortly) rather than forgetting one, which would open a
    replay.

    Examples
    --------
    >>> registry = Registry.open("sqlite://")
    >>> ReplayCache(registry, window_s=300, max_entries=10).add(b"k" * 32, b"n" * 16, now=0.0)
    >>> ReplayCache(registry, window_s=300, max_entries=10).add(b"k" * 32, b"n" * 16, now=1.0)
    Traceback (most recent call last):
    ...
    lorafleet.server.backup_service._Unauthenticated: request replayed: its nonce was already used
    """

    def __init__(self, registry: Registry, *, window_s: float, max_entries: int) -> None:
        self.registry = registry
        self.window_s = window_s
        self.max_entries = max_entries

    def add(self, key: bytes, nonce: bytes, *, now: float) -> None:
        """Record a nonce of ``key``; raise if it was seen within the last two windows."""
        outcome = self.registry.remember_nonce(
            key,
            nonce,
            now=datetime.fromtimestamp(now, UTC),
            keep_until=datetime.fromtimestamp(now + 2 * self.window_s, UTC),
            max_entries=self.max_entries,
        )
        if outcome == "replayed":
            raise _Unauthenticated("request replayed: its nonce was already used")
        if outcome == "full":
            raise _Exhausted("the server is handling too many requests; retry in a minute")


# --- the servicer ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Caller:
    """An authenticated device and the user it acts for."""

    device: DeviceRecord
    user_id: UserId
    pseudonym: str

    @property
    def owner(self) -> str:
        """The blob store's label for this user's unfinished uploads."""
        return str(int(self.user_id))


@dataclass(frozen=True)
class _Header:
    """A validated PutBlob header."""

    blob_id: str
    kind: str
    adapter: str
    version: int
    spec: AdapterSpec | None
    size: int
    sha256: str
    offset: int


def _hex(value: object, size: int, what: str) -> str:
    if (
        not isinstance(value, str)
        or len(value) != size
        or any(c not in "0123456789abcdef" for c in value)
    ):
        raise _Invalid(f"{what} must be {size} lowercase hex characters, got {value!r:.80}")
    return value


def _check_envelope(head: bytes, blob_id: str, size: int) -> None:
    """The public header of an LFEN envelope (docs/envelope.md) names this blob and size.

    Checking it means a stored adapter blob's sha256 determines its blob id (the id is
    inside the hashed bytes), so one content-addressed object never backs two blob ids.
    """
    if len(head) < envelope.HEADER_BYTES:
        raise _Invalid(f"blob {blob_id} is shorter than an envelope header")
    magic, version, key_id, raw_id, body = struct.unpack_from("<4sBI16sQ", head)
    if magic != envelope.MAGIC or version != envelope.FORMAT_VERSION or key_id == 0:
        raise _Invalid(f"blob {blob_id} is not a format-{envelope.FORMAT_VERSION} LFEN envelope")
    if raw_id.hex() != blob_id:
        raise _Invalid(f"blob {blob_id} holds the envelope of blob {raw_id.hex()}")
    if envelope.HEADER_BYTES + body != size:
        raise _Invalid(f"blob {blob_id}: its envelope header announces another size")


def _check_keyfile(data: bytes, blob_id: str) -> None:
    """A keyfile blob is shaped like a key file (the device checks its contents)."""
    try:
        check_keyfile_shape(data)
    except IntegrityError as exc:
        raise _Invalid(f"keyfile blob {blob_id}: {exc}") from None


class BackupServicer(backup_pb2_grpc.BackupServiceServicer):
    """Answers the backup calls from a registry (metadata, devices) and a blob store.

    Parameters
    ----------
    registry
        Users, devices, enrolment tokens and blob metadata.
    store
        The encrypted bytes; its ``max_blob_bytes`` is the upload size limit.
    window_s
        Accepted clock difference of a signed request, either side.
    max_nonces
        Bound of the replay cache (see :class:`ReplayCache`).
    clock
        Seconds since the epoch (tests move it).
    """

    def __init__(
        self,
        registry: Registry,
        store: BlobStore,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        max_nonces: int = DEFAULT_MAX_NONCES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(window_s, int | float) or not 1 <= window_s <= 86400:
            raise SpecError(f"window_s must be 1..86400 seconds, got {window_s!r}")
        if isinstance(max_nonces, bool) or not isinstance(max_nonces, int) or max_nonces < 1:
            raise SpecError(f"max_nonces must be a positive integer, got {max_nonces!r}")
        self.registry = registry
        self.store = store
        self.window_s = float(window_s)
        self.clock = clock
        self.replays = ReplayCache(registry, window_s=self.window_s, max_entries=max_nonces)
        self._adapters: dict[AdapterId, AdapterRecord] = {}

    # --- authentication ---------------------------------------------------------------

    def _authenticate(
        self, context: grpc.ServicerContext, method: str, message: Message
    ) -> _Caller:
        """Check the request's signature metadata; the caller it proves, or raise."""
        signed: SignedRequest = parse_metadata(context.invocation_metadata())
        now = self.clock()
        skew = signed.timestamp_ms / 1000 - now
        if abs(skew) > self.window_s:
            raise _Unauthenticated(
                f"request timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                f"the server's clock (at most {self.window_s:.0f} s allowed); set the "
                "device's clock and retry"
            )
        # The signature is checked against the key the request names before that key is
        # looked up, so a caller without the private key learns nothing about the device
        # (enrolled, revoked or unknown): every such request gets this one answer.
        if not signed.verify(method, message):
            raise _Unauthenticated("request signature does not verify")
        device = self.registry.find_device_by_key(signed.public_key)
        if device is None or device.kind != "device" or device.user_id is None:
            raise _Unauthenticated("this device key is not enrolled; enrol the device first")
        if device.revoked:
            raise _Denied(f"device {device.id} was revoked; enrol it again with a new token")
        self.replays.add(signed.public_key, signed.nonce, now=now)
        last = device.last_seen_at
        if last is None or datetime.now(UTC) - last > _TOUCH_EVERY:
            self.registry.touch_device(device.id)
        return _Caller(device, device.user_id, device.pseudonym or str(device.user_id))

    # --- Enroll -----------------------------------------------------------------------

    def Enroll(
        self, request: backup_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> backup_pb2.EnrollResponse:
        """Spend a one-time enrolment token on the device's public key."""
        try:
            if len(request.public_key) != 32:
                raise _Invalid("public_key must be a raw 32-byte Ed25519 key")
            device = self.registry.redeem_enrolment_token(
                request.token, bytes(request.public_key), name=request.name
            )
        except LorafleetError as exc:
            _abort(context, exc)
        logger.info("enrolled device %d", device.id)
        return backup_pb2.EnrollResponse(device_id=int(device.id), user=device.pseudonym or "")

    # --- uploads ----------------------------------------------------------------------

    def _header(self, msg: backup_pb2.PutBlobRequest) -> _Header:
        if msg.WhichOneof("part") != "header":
            raise _Invalid("the first PutBlob message must be a header")
        h = msg.header
        _hex(h.blob_id, 32, "blob_id")
        _hex(h.sha256, 64, "sha256")
        if h.kind not in KINDS:
            raise _Invalid(f"kind must be one of {list(KINDS)}, got {h.kind!r:.40}")
        spec: AdapterSpec | None = None
        if h.kind == "adapter":
            if not h.adapter:
                raise _Invalid("an adapter blob needs the adapter's name")
            if not 1 <= h.version < 2**31:
                raise _Invalid(f"adapter version must be 1..2**31-1, got {h.version}")
            try:
                spec = AdapterSpec.from_dict(json.loads(h.spec_json))
            except (ValueError, TypeError, AttributeError, RecursionError) as exc:
                raise _Invalid(f"spec_json is not an adapter spec ({exc})") from None
        elif h.adapter or h.version or h.spec_json:
            raise _Invalid("a keyfile blob has no adapter, version or spec")
        elif h.size > MAX_KEYFILE_BYTES:
            raise _Exhausted(
                f"a key file is at most {MAX_KEYFILE_BYTES} bytes; this one announces {h.size}"
            )
        if h.size < 1:
            raise _Invalid("size must be at least 1 byte")
        if h.offset > h.size:
            raise _Invalid(f"offset {h.offset} is past the blob's size {h.size}")
        return _Header(
            h.blob_id, h.kind, h.adapter, int(h.version), spec, int(h.size), h.sha256, h.offset
        )

    def _stored(self, caller: _Caller, blob_id: str) -> BlobRecord | None:
        """The caller's recorded blob ``blob_id``; None if absent or another user's."""
        try:
            record = self.registry.get_blob_meta(blob_id)
        except NotFoundError:
            return None
        return record if record.user_id == caller.user_id else None

    def _adapter(self, adapter_id: AdapterId) -> AdapterRecord:
        cached = self._adapters.get(adapter_id)
        if cached is None:
            cached = self.registry.get_adapter(adapter_id)
            self._adapters[adapter_id] = cached
        return cached

    def _check_new(self, caller: _Caller, h: _Header) -> BlobRecord | None:
        """Refuse what would overwrite; the stored record if this exact blob is stored."""
        try:
            existing = self.registry.get_blob_meta(h.blob_id)
        except NotFoundError:
            existing = None
        if existing is not None:
            same = existing.user_id == caller.user_id and (
                existing.sha256,
                existing.size_bytes,
            ) == (
                h.sha256,
                h.size,
            )
            if not same:
                raise _Exists(f"blob id {h.blob_id} is taken; upload under a new blob id")
            # A retry of a stored blob: nothing to do; of a lost one: take the bytes again.
            return existing if self.store.exists(existing.sha256) else None
        if h.kind == "adapter":
            assert h.spec is not None
            adapter = self.registry.find_adapter(caller.user_id, h.adapter)
            if adapter is not None:
                if adapter.spec != h.spec:
                    raise _Exists(
                        f"adapter {h.adapter!r} is backed up with another spec; back this "
                        "profile up under another adapter name"
                    )
                for record in self._all_blobs(caller.user_id, adapter.id):
                    if record.version == h.version:
                        raise _Exists(
                            f"version {h.version} of adapter {h.adapter!r} is already backed "
                            f"up as blob {record.blob_id}"
                        )
        return None

    def _all_blobs(self, user: UserId, adapter_id: AdapterId | None = None) -> Iterator[BlobRecord]:
        after: int | None = None
        while True:
            page = self.registry.list_blobs(user, adapter_id=adapter_id, after=after, limit=1000)
            yield from page.items
            if page.next_after is None:
                return
            after = page.next_after

    def _record(self, caller: _Caller, h: _Header, sha256: str) -> BlobRecord:
        adapter_id: AdapterId | None = None
        version: int | None = None
        if h.kind == "adapter":
            assert h.spec is not None
            found = self.registry.find_adapter(caller.user_id, h.adapter)
            if found is None:
                try:
                    adapter_id = self.registry.create_adapter(caller.user_id, h.adapter, h.spec)
                except ConflictError:  # created meanwhile by another call
                    again = self.registry.find_adapter(caller.user_id, h.adapter)
                    if again is None:
                        raise
                    adapter_id = again.id
            else:
                adapter_id = found.id
            version = h.version
        return self.registry.put_blob_meta(
            caller.user_id,
            h.blob_id,
            size_bytes=h.size,
            sha256=sha256,
            kind=h.kind,
            adapter_id=adapter_id,
            version=version,
        )

    def _info(self, record: BlobRecord) -> backup_pb2.BlobInfo:
        adapter, spec_json = "", ""
        if record.adapter_id is not None:
            found = self._adapter(record.adapter_id)
            adapter = found.name
            spec_json = json.dumps(found.spec.to_dict(), sort_keys=True)
        return backup_pb2.BlobInfo(
            blob_id=record.blob_id,
            kind=record.kind,
            adapter=adapter,
            version=record.version or 0,
            spec_json=spec_json,
            size=record.size_bytes,
            sha256=record.sha256,
            created_at_ms=int(record.created_at.timestamp() * 1000),
        )

    def PutBlob(
        self, request_iterator: Iterable[backup_pb2.PutBlobRequest], context: grpc.ServicerContext
    ) -> backup_pb2.PutBlobResponse:
        """Receive a header, then the blob's bytes from its offset; store when complete."""
        try:
            stream = iter(request_iterator)
            first = next(stream, None)
            if first is None:
                raise _Invalid("PutBlob needs a header message first")
            caller = self._authenticate(context, METHODS["PutBlob"], first)
            h = self._header(first)
            done = self._check_new(caller, h)
            if done is not None:
                return backup_pb2.PutBlobResponse(
                    complete=True, received=done.size_bytes, blob=self._info(done)
                )
            with self.store.upload(
                caller.owner, h.blob_id, size=h.size, sha256=h.sha256, offset=h.offset
            ) as upload:
                for msg in stream:
                    if msg.WhichOneof("part") == "header":
                        raise _Invalid("only the first PutBlob message may be a header")
                    upload.write(msg.data)
                if not upload.complete:
                    logger.info(
                        "upload of blob %s paused at %d of %d bytes",
                        h.blob_id,
                        upload.received,
                        h.size,
                    )
                    return backup_pb2.PutBlobResponse(complete=False, received=upload.received)
                try:
                    if h.kind == "adapter":
                        _check_envelope(upload.head(envelope.HEADER_BYTES), h.blob_id, h.size)
                    else:
                        _check_keyfile(upload.head(h.size), h.blob_id)
                except _Invalid:
                    upload.close()
                    self.store.discard_upload(caller.owner, h.blob_id)
                    raise
                sha = upload.commit()
            record = self._record(caller, h, sha)
        except LorafleetError as exc:
            _abort(context, exc)
        logger.info("stored %s blob %s of user %d", h.kind, h.blob_id, caller.user_id)
        return backup_pb2.PutBlobResponse(
            complete=True, received=record.size_bytes, blob=self._info(record)
        )

    def UploadStatus(
        self, request: backup_pb2.UploadStatusRequest, context: grpc.ServicerContext
    ) -> backup_pb2.UploadStatusResponse:
        """How much of an upload the server holds (all of it once stored)."""
        try:
            caller = self._authenticate(context, METHODS["UploadStatus"], request)
            _hex(request.blob_id, 32, "blob_id")
            stored = self._stored(caller, request.blob_id)
            if stored is not None and self.store.exists(stored.sha256):
                return backup_pb2.UploadStatusResponse(complete=True, received=stored.size_bytes)
            state = self.store.upload_state(caller.owner, request.blob_id)
        except LorafleetError as exc:
            _abort(context, exc)
        return backup_pb2.UploadStatusResponse(
            complete=False, received=0 if state is None else state.received
        )

    # --- downloads and listings -------------------------------------------------------

    def GetBlob(
        self, request: backup_pb2.GetBlobRequest, context: grpc.ServicerContext
    ) -> Iterator[backup_pb2.BlobChunk]:
        """Stream one of the caller's blobs from ``request.offset``."""
        try:
            caller = self._authenticate(context, METHODS["GetBlob"], request)
            _hex(request.blob_id, 32, "blob_id")
            record = self._stored(caller, request.blob_id)
            if record is None:
                raise BlobNotFoundError(f"no blob {request.blob_id} among this user's blobs")
            if request.offset > record.size_bytes:
                raise _Invalid(
                    f"offset {request.offset} is past the end of blob {record.blob_id} "
                    f"({record.size_bytes} bytes)"
                )
            try:
                size = self.store.size(record.sha256)
            except BlobNotFoundError:
                size = -1
            if size != record.size_bytes:
                raise IntegrityError(
                    f"blob {record.blob_id} is recorded but its bytes are lost or damaged; "
                    "upload it again from a device that has it"
                )
            info = self._info(record)
            chunks = self.store.iter_chunks(record.sha256, request.offset, CHUNK_BYTES)
        except LorafleetError as exc:
            _abort(context, exc)
        offset = request.offset
        first = True
        for data in chunks:
            if not context.is_active():
                return
            yield backup_pb2.BlobChunk(offset=offset, data=data, info=info if first else None)
            offset += len(data)
            first = False
        if first:  # nothing left to send: the metadata still arrives
            yield backup_pb2.BlobChunk(offset=offset, data=b"", info=info)

    def ListBlobs(
        self, request: backup_pb2.ListBlobsRequest, context: grpc.ServicerContext
    ) -> backup_pb2.ListBlobsResponse:
        """One page of the caller's blobs, newest first."""
        try:
            caller = self._authenticate(context, METHODS["ListBlobs"], request)
            limit = request.page_size or _DEFAULT_PAGE
            if not 1 <= limit <= _MAX_PAGE:
                raise _Invalid(f"page_size must be 0..{_MAX_PAGE}, got {limit}")
            after: int | None = None
            if request.page_token:
                token = request.page_token
                if not token.isascii() or not token.isdigit() or len(token) > 19:
                    raise _Invalid("page_token is not one this server gave")
                after = int(token)
            adapter_id: AdapterId | None = None
            if request.adapter:
                found = self.registry.find_adapter(caller.user_id, request.adapter)
                if found is None:
                    return backup_pb2.ListBlobsResponse()
                adapter_id = found.id
            page = self.registry.list_blobs(
                caller.user_id, adapter_id=adapter_id, after=after, limit=limit
            )
            infos = [self._info(r) for r in page.items]
        except LorafleetError as exc:
            _abort(context, exc)
        return backup_pb2.ListBlobsResponse(
            blobs=infos, next_page_token="" if page.next_after is None else str(page.next_after)
        )

    # --- erasure ----------------------------------------------------------------------

    def _shared_elsewhere(self, sha256: str, user: UserId) -> bool:
        """Whether another user's blob record names the same bytes (never, in practice)."""
        return self.registry.blob_shared_with_others(sha256, user)

    def DeleteUserData(
        self, request: backup_pb2.DeleteUserDataRequest, context: grpc.ServicerContext
    ) -> backup_pb2.DeleteUserDataResponse:
        """Erase every blob, upload, record and device of the caller's user."""
        try:
            caller = self._authenticate(context, METHODS["DeleteUserData"], request)
            if request.user != caller.pseudonym:
                raise _Denied(
                    "DeleteUserData must name the caller's own user as confirmation; a device "
                    "can only erase its own user's data"
                )
            n_blobs, n_bytes = 0, 0
            # The bytes go first: if anything fails midway, a retry finds the records
            # and deletes what is left, so nothing stays that the user asked to erase.
            for record in list(self._all_blobs(caller.user_id)):
                if not self._shared_elsewhere(record.sha256, caller.user_id):
                    n_bytes += self.store.delete(record.sha256)
                n_blobs += 1
            uploads, held = self.store.erase_owner_uploads(caller.owner)
            counts = self.registry.erase_user(caller.user_id)
        except LorafleetError as exc:
            _abort(context, exc)
        self._adapters.clear()
        logger.info(
            "erased user %d on request of device %d: %d blobs, %d uploads, %d registry rows",
            caller.user_id,
            caller.device.id,
            n_blobs,
            uploads,
            counts.total,
        )
        return backup_pb2.DeleteUserDataResponse(
            blobs=n_blobs + uploads, bytes=n_bytes + held, registry_rows=counts.total
        )

    # --- version reports --------------------------------------------------------------

    def ReportVersions(
        self, request: backup_pb2.ReportVersionsRequest, context: grpc.ServicerContext
    ) -> backup_pb2.ReportVersionsResponse:
        """Record the caller's adapter reports (metadata only) under the caller's user."""
        try:
            caller = self._authenticate(context, METHODS["ReportVersions"], request)
            spec, reports = report_request_from_proto(request)
            for report in reports:
                if report.user and report.user != caller.pseudonym:
                    raise _Denied(
                        "a device reports only for the user it is enrolled for; leave the "
                        "report's user empty or name this device's own user"
                    )
            for name in sorted({r.adapter for r in reports}):
                found = self.registry.find_adapter(caller.user_id, name)
                if found is not None and found.spec != spec:
                    raise _Exists(
                        f"adapter {name!r} is registered with another spec; report this "
                        "profile under another adapter name"
                    )
            items = [device_report(r, pseudonym=caller.pseudonym, spec=spec) for r in reports]
            counts = self.registry.record_reports(items)
        except LorafleetError as exc:
            _abort(context, exc)
        logger.info(
            "device %d reported %d adapter versions, %d evaluations, %d pointer moves",
            caller.device.id,
            counts.versions,
            counts.evaluations,
            counts.pointers,
        )
        return backup_pb2.ReportVersionsResponse(
            versions=counts.versions,
            evaluations=counts.evaluations,
            pointers=counts.pointers,
            skipped=counts.skipped,
        )


def serve_backup(
    servicer: BackupServicer,
    address: str = "127.0.0.1:0",
    *,
    tls: ServerTLS | None = None,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for the ``BackupService`` and return it with its port.

    Parameters
    ----------
    servicer
        The servicer, with its registry and blob store.
    address
        ``host:port``; port 0 picks a free one. Default loopback only.
    tls
        Certificate and key; ``None`` serves plain text, which only loopback (tests, a
        TLS-terminating proxy on the same host) should use: the CLI refuses otherwise.
    max_workers
        Concurrent calls served.

    Returns
    -------
    tuple[grpc.Server, int]
        The started server (stop it with ``server.stop(grace)``) and the bound port.

    Examples
    --------
    >>> servicer = BackupServicer(Registry.open("sqlite://"), BlobStore(Path("blobs")))  # doctest: +SKIP
    >>> server, port = serve_backup(servicer)  # doctest: +SKIP
    >>> server.stop(None)  # doctest: +SKIP
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    backup_pb2_grpc.add_BackupServiceServicer_to_server(servicer, server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls.private_key, tls.certificate_chain)])
            port = server.add_secure_port(address, creds)
    except RuntimeError:
        port = 0
    if port == 0:
        raise LorafleetError(
            f"cannot listen on {address!r}: the port is in use, the host is not an address of "
            "this machine, or it is not host:port; pass a free host:port, or port 0"
        )
    server.start()
    logger.info(
        "backup service listening on %s (port %d, %s)",
        address,
        port,
        "TLS" if tls else "plain text",
    )
    return server, port
