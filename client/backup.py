"""Encrypted backup of a profile to the coordinator, and restore on a new device.

Three layers, each usable alone:

1. :class:`DeviceIdentity` and :class:`BackupClient`: a device enrolls once with a
   one-time token (its Ed25519 key pair is made here and the private half stays in a
   0600 file beside the key file), then every call is signed
   (:mod:`lorafleet.protocols.request_auth`). Uploads resume where they stopped;
   downloads resume from an offset and are checked against the blob's sha256.
2. :func:`pack_version` / :func:`unpack_archive` (:mod:`lorafleet.client.archive`): one
   adapter version of a profile as one plaintext: its B packed, the folder's other
   files and ``profile.json``; the PEFT folder is rebuilt from the seed on restore.
3. :func:`backup_profile` / :func:`restore_profile` / :func:`obtain_keys`: seal a
   version in an LFEN envelope (:mod:`lorafleet.protocols.envelope`) bound to user,
   adapter, version and base, upload it (and the key file, for a passphrase restore);
   fetch, open, check and install it on another device.

A restore changes nothing on disk until everything checked: the blob's sha256, the
envelope's tag (which binds the user, adapter, version and base the device asked for,
so another user's blob or an older version under a newer number does not open), the
archive's hashes and the adapter's content hash. It never moves a profile back to an
older version than it has unless told to (``allow_downgrade=True``). The archive format
is in ``docs/backup.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from lorafleet.client.adapter import read_b, read_provenance
from lorafleet.client.archive import (
    ARCHIVE_MAGIC,
    BACKUP_PACKING,
    AdapterArchive,
    pack_version,
    same_adapter_files,
    unpack_archive,
)
from lorafleet.client.keys import KeyStore, SeenGenerations, UnlockedKeys
from lorafleet.client.profile import ADAPTERS_DIR, CURRENT_FILE, PROFILE_FILE, Profile
from lorafleet.protocols import crypto
from lorafleet.protocols.atomic import atomic_directory, atomic_write_bytes, writing
from lorafleet.protocols.encoding import Packing
from lorafleet.protocols.envelope import BlobContext, new_blob_id, open_blob, seal_blob
from lorafleet.protocols.errors import (
    IntegrityError,
    KeyStoreError,
    LorafleetError,
    MissingKeyFileError,
    SpecError,
)
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.reports import AdapterReport
from lorafleet.protocols.request_auth import sign_request
from lorafleet.protocols.serde import report_request_to_proto
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.protocols.transport import is_loopback, read_root_certificate
from lorafleet.protocols.v1 import backup_pb2, backup_pb2_grpc

__all__ = [
    "ARCHIVE_MAGIC",
    "BACKUP_PACKING",
    "AdapterArchive",
    "BackupAuthError",
    "BackupClient",
    "BackupDataLossError",
    "BackupError",
    "BackupRecord",
    "BlobInfo",
    "DeviceIdentity",
    "ErasureReport",
    "PendingKeyFile",
    "ReportReceipt",
    "backup_profile",
    "obtain_keys",
    "pack_version",
    "restore_profile",
    "unpack_archive",
]

logger = logging.getLogger(__name__)

DEVICE_FORMAT = "lorafleet-device"
"""Value of a device identity file's ``format`` member."""
CHUNK_BYTES = 1 << 20
"""Bytes per PutBlob message (the server sends GetBlob in pieces of the same size)."""
_MAX_MESSAGE = 4 * CHUNK_BYTES + (1 << 16)
_MIN_RATE = 256 * 1024  # bytes/s below which a transfer counts as stalled
_SERVICE = "/lorafleet.v1.BackupService/"
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}\Z")
_T = TypeVar("_T")


class BackupError(LorafleetError):
    """The backup server refused or failed a call; ``code`` is its gRPC status name."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class BackupAuthError(BackupError):
    """The server does not accept this device: not enrolled, revoked, or clock skew."""


class BackupDataLossError(BackupError, IntegrityError):
    """The server holds a blob's record but its bytes are damaged or lost (DATA_LOSS)."""


# --- device identity ------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    """An enrolled device: its registry id, its user, and its Ed25519 key pair.

    Stored as a small JSON file (mode 0600) beside the device's key file. ``repr``
    never shows the private key.
    """

    device_id: int
    user: str
    public_key: bytes
    private_key: bytes = field(repr=False)
    name: str = "device"

    def __post_init__(self) -> None:
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int):
            raise SpecError(f"device_id must be an integer, got {self.device_id!r}")
        if not isinstance(self.user, str) or not self.user:
            raise SpecError("device identity: user must be a non-empty pseudonym")
        for what, key in (("public", self.public_key), ("private", self.private_key)):
            if not isinstance(key, bytes) or len(key) != 32:
                raise SpecError(f"device identity: {what} key must be 32 bytes")
        if crypto.signing_public_key(self.private_key) != self.public_key:
            raise KeyStoreError("device identity: the private key does not match the public key")

    def save(self, path: Path | str) -> None:
        """Write the identity to ``path`` (mode 0600); refuses to replace an existing file."""
        path = Path(path)
        if path.exists():
            raise KeyStoreError(
                f"{path} already exists (an enrolled device identity); move it away first"
            )
        doc = {
            "format": DEVICE_FORMAT,
            "format_version": 1,
            "device_id": self.device_id,
            "user": self.user,
            "name": self.name,
            "public_key": self.public_key.hex(),
            "private_key": self.private_key.hex(),
        }
        atomic_write_bytes(
            path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=0o600
        )

    @classmethod
    def load(cls, path: Path | str) -> DeviceIdentity:
        """Read an identity written by :meth:`save`.

        Raises
        ------
        MissingKeyFileError
            No file at ``path``: enroll this device first.
        KeyStoreError
            The file is damaged.
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingKeyFileError(
                f"no device identity at {path}: enroll this device first "
                "(BackupClient.enroll with a token from the operator)"
            ) from None
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"device identity {path} is unreadable ({exc})") from None
        try:
            if doc["format"] != DEVICE_FORMAT or doc["format_version"] != 1:
                raise ValueError("unknown format")
            return cls(
                device_id=int(doc["device_id"]),
                user=str(doc["user"]),
                name=str(doc.get("name", "device")),
                public_key=bytes.fromhex(doc["public_key"]),
                private_key=bytes.fromhex(doc["private_key"]),
            )
        except (KeyError, TypeError, ValueError, SpecError) as exc:
            raise KeyStoreError(
                f"device identity {path} is damaged ({exc}); enroll the device again"
            ) from None


# --- blob metadata --------------------------------------------------------------------


@dataclass(frozen=True)
class BlobInfo:
    """What the server says about one stored blob (untrusted until the envelope opens)."""

    blob_id: str
    kind: str
    adapter: str
    version: int
    spec: AdapterSpec | None
    size: int
    sha256: str
    created_at: datetime

    @classmethod
    def from_proto(cls, msg: backup_pb2.BlobInfo) -> BlobInfo:
        """Parse a BlobInfo message; IntegrityError if the server sent nonsense."""
        spec = None
        if msg.spec_json:
            try:
                spec = AdapterSpec.from_dict(json.loads(msg.spec_json))
            except (ValueError, TypeError, AttributeError) as exc:
                raise IntegrityError(
                    f"the server sent an unreadable spec for blob {msg.blob_id!r:.40} ({exc})"
                ) from None
        return cls(
            blob_id=msg.blob_id,
            kind=msg.kind,
            adapter=msg.adapter,
            version=int(msg.version),
            spec=spec,
            size=int(msg.size),
            sha256=msg.sha256,
            created_at=datetime.fromtimestamp(msg.created_at_ms / 1000, UTC),
        )


@dataclass(frozen=True)
class ErasureReport:
    """What DeleteUserData removed on the server."""

    blobs: int
    bytes: int
    registry_rows: int


@dataclass(frozen=True)
class ReportReceipt:
    """What ReportVersions recorded: new versions, evaluation rows, pointer moves, skips."""

    versions: int
    evaluations: int
    pointers: int
    skipped: int


@dataclass(frozen=True)
class BackupRecord:
    """The result of :func:`backup_profile`: the adapter blob, and the key file's if sent."""

    adapter: BlobInfo
    key_file: BlobInfo | None
    uploaded: bool
    """False when this version was already backed up with the same content."""


# --- the client -----------------------------------------------------------------------


def _credentials(
    address: str, root_cert: bytes | Path | None, insecure: bool
) -> grpc.ChannelCredentials | None:
    if insecure:
        return None
    if root_cert is None:
        # TLS by default: plain text only to this machine itself (tests, a local proxy).
        return None if is_loopback(address) else grpc.ssl_channel_credentials()
    pem = read_root_certificate(root_cert)
    return grpc.ssl_channel_credentials(root_certificates=pem)


def _channel(
    address: str, root_cert: bytes | Path | None, insecure: bool
) -> tuple[grpc.Channel, bool]:
    if not isinstance(address, str) or ":" not in address:
        raise LorafleetError(f"backup server address must be 'host:port', got {address!r}")
    creds = _credentials(address, root_cert, insecure)
    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
    ]
    if creds is None:
        return grpc.insecure_channel(address, options=options), False
    return grpc.secure_channel(address, creds, options=options), True


def _rpc_error(exc: grpc.RpcError, address: str, what: str) -> BackupError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else str(exc)) or ""
    details = details.strip().splitlines()[0][:300] if details.strip() else "no details"
    name = code.name if code is not None else "UNKNOWN"
    if code in _AUTH_CODES:
        return BackupAuthError(f"backup server {address} refused {what}: {details}", name)
    if code == grpc.StatusCode.UNAVAILABLE:
        return BackupError(
            f"cannot reach the backup server at {address} ({details}); check the address "
            "and network, then retry",
            name,
        )
    if code == grpc.StatusCode.DATA_LOSS:
        return BackupDataLossError(f"backup server {address}: {what} failed: {details}", name)
    return BackupError(f"backup server {address}: {what} failed ({name}): {details}", name)


class BackupClient:
    """Signed calls to a coordinator's ``BackupService`` on behalf of one enrolled device.

    Parameters
    ----------
    address
        ``host:port`` of the backup service.
    identity
        The enrolled device (see :meth:`enroll`, :meth:`open`).
    tls_root_cert
        PEM certificate (bytes or a file) the server's certificate must chain to. By
        default the system's trusted roots are used, except for a loopback address,
        which is reached in plain text.
    insecure
        Plain text even to a remote host (only for a private network that is encrypted
        anyway); never the default.
    timeout
        Seconds a call may wait for the server; transfers get more, at 256 KiB/s.
    retries
        How often an interrupted upload or download is resumed before giving up.
    send_reports
        Whether :meth:`report_versions` tells the coordinator about this device's adapter
        versions (metadata only, ``docs/privacy.md``). False is the opt-out: the call
        sends nothing, so the coordinator learns no more than backups reveal.

    Examples
    --------
    >>> client = BackupClient.enroll("backup.example:7443", token, "~/.app/device.json")  # doctest: +SKIP
    >>> info = client.put_blob(new_blob_id(), sealed, kind="keyfile")  # doctest: +SKIP
    """

    def __init__(
        self,
        address: str,
        identity: DeviceIdentity,
        *,
        tls_root_cert: bytes | Path | None = None,
        insecure: bool = False,
        timeout: float = 30.0,
        retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        send_reports: bool = True,
    ) -> None:
        self.address = address
        self.identity = identity
        self.send_reports = send_reports
        self.timeout = timeout
        self.retries = retries
        self._sleep = sleep
        self._channel, self.tls = _channel(address, tls_root_cert, insecure)
        self._stub = backup_pb2_grpc.BackupServiceStub(self._channel)

    @property
    def user(self) -> str:
        """The user pseudonym this device acts for (bound into every envelope)."""
        return self.identity.user

    # --- lifecycle --------------------------------------------------------------------

    @classmethod
    def enroll(
        cls,
        address: str,
        token: str,
        identity_path: Path | str,
        *,
        name: str | None = None,
        tls_root_cert: bytes | Path | None = None,
        insecure: bool = False,
        timeout: float = 30.0,
        send_reports: bool = True,
    ) -> BackupClient:
        """Enroll this device with a one-time token and save its identity at ``identity_path``.

        A fresh Ed25519 key pair is made here; only its public half is sent. The
        identity file is written (mode 0600) once the server accepted the key.
        """
        identity_path = Path(identity_path).expanduser()
        if identity_path.exists():
            raise KeyStoreError(
                f"{identity_path} already holds an enrolled device identity; open it with "
                "BackupClient.open, or move it away to enroll again"
            )
        label = name if name is not None else _default_device_name()
        if not _NAME.match(label):
            raise SpecError(
                f"device name {label!r} is not valid: use 1-128 letters, digits and . _ : @ + = -"
            )
        pair = crypto.signing_keypair()
        channel, _ = _channel(address, tls_root_cert, insecure)
        with channel:
            stub = backup_pb2_grpc.BackupServiceStub(channel)
            try:
                reply = stub.Enroll(
                    backup_pb2.EnrollRequest(token=token, public_key=pair.public_key, name=label),
                    timeout=timeout,
                )
            except grpc.RpcError as exc:
                raise _rpc_error(exc, address, "enrolment") from None
        identity = DeviceIdentity(
            device_id=int(reply.device_id),
            user=reply.user,
            public_key=pair.public_key,
            private_key=pair.private_key,
            name=label,
        )
        identity.save(identity_path)
        logger.info("enrolled this device as %d for user %s", identity.device_id, identity.user)
        return cls(
            address,
            identity,
            tls_root_cert=tls_root_cert,
            insecure=insecure,
            timeout=timeout,
            send_reports=send_reports,
        )

    @classmethod
    def open(cls, address: str, identity_path: Path | str, **kwargs: Any) -> BackupClient:
        """A client for a device enrolled earlier (its identity file at ``identity_path``)."""
        return cls(address, DeviceIdentity.load(Path(identity_path).expanduser()), **kwargs)

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> BackupClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls ------------------------------------------------------------------------

    def _metadata(self, method: str, message: Message) -> tuple[tuple[str, str], ...]:
        return sign_request(
            self.identity.private_key,
            _SERVICE + method,
            message,
            public_key=self.identity.public_key,
        )

    def _unary(self, method: str, request: Message, what: str) -> Any:
        call = getattr(self._stub, method)
        try:
            return call(request, metadata=self._metadata(method, request), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.address, what) from None

    def _transfer_timeout(self, size: int) -> float:
        return self.timeout + size / _MIN_RATE

    def _retrying(self, what: str, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt``, again after a pause when the failure is transient."""
        for n in range(self.retries + 1):
            try:
                return attempt()
            except BackupError as exc:
                if n == self.retries or exc.code not in {c.name for c in _RETRYABLE}:
                    raise
                pause = min(8.0, 0.5 * 2**n)
                logger.warning("%s interrupted (%s); resuming in %.1f s", what, exc, pause)
                self._sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def upload_status(self, blob_id: str) -> tuple[bool, int]:
        """(stored, bytes held) of a blob this device is uploading."""
        reply = self._unary(
            "UploadStatus", backup_pb2.UploadStatusRequest(blob_id=blob_id), "an upload status"
        )
        return bool(reply.complete), int(reply.received)

    def put_blob(
        self,
        blob_id: str,
        data: bytes,
        *,
        kind: str = "adapter",
        adapter: str = "",
        version: int = 0,
        spec: AdapterSpec | None = None,
        resume: bool = True,
    ) -> BlobInfo:
        """Upload one blob, resuming after interruptions; returns what the server stored.

        With ``resume`` (the default) the server is first asked how much of this blob
        id it holds from an earlier, interrupted call, and only the rest is sent; pass
        ``resume=False`` for a blob id made just now, to save that round trip.
        Interruptions during this call are resumed either way.

        Raises
        ------
        BackupError
            The server refused it (``code`` says why: ALREADY_EXISTS, RESOURCE_EXHAUSTED,
            ...), or it could not be reached after ``retries`` attempts.
        """
        sha = hashlib.sha256(data).hexdigest()
        spec_json = "" if spec is None else json.dumps(spec.to_dict(), sort_keys=True)
        restarted = False
        fresh = not resume

        def attempt() -> BlobInfo:
            nonlocal restarted, fresh
            offset = 0
            if not fresh:  # a resume or a retry: ask how much the server kept
                complete, held = self.upload_status(blob_id)
                offset = len(data) if complete else held
            fresh = False
            header = backup_pb2.PutBlobRequest(
                header=backup_pb2.BlobHeader(
                    blob_id=blob_id,
                    kind=kind,
                    adapter=adapter,
                    version=version,
                    spec_json=spec_json,
                    size=len(data),
                    sha256=sha,
                    offset=offset,
                )
            )

            def messages() -> Iterator[backup_pb2.PutBlobRequest]:
                yield header
                view = memoryview(data)
                for start in range(offset, len(data), CHUNK_BYTES):
                    yield backup_pb2.PutBlobRequest(data=bytes(view[start : start + CHUNK_BYTES]))

            try:
                reply = self._stub.PutBlob(
                    messages(),
                    metadata=self._metadata("PutBlob", header),
                    timeout=self._transfer_timeout(len(data) - offset),
                )
            except grpc.RpcError as exc:
                err = _rpc_error(exc, self.address, f"the upload of blob {blob_id}")
                if err.code == "DATA_LOSS" and not restarted:
                    restarted = True  # the server discarded it: send it again from 0
                    err.code = "ABORTED"
                raise err from None
            if not reply.complete:
                raise BackupError(
                    f"the upload of blob {blob_id} stopped at {reply.received} bytes", "ABORTED"
                )
            return BlobInfo.from_proto(reply.blob)

        info = self._retrying(f"upload of blob {blob_id}", attempt)
        if (info.sha256, info.size) != (sha, len(data)):
            raise IntegrityError(f"the server recorded blob {blob_id} with another hash or size")
        logger.info("uploaded %s blob %s (%d bytes)", kind, blob_id, len(data))
        return info

    def get_blob(self, blob_id: str, *, expected: BlobInfo | None = None) -> bytes:
        """Download one of this user's blobs, resuming after interruptions.

        Raises
        ------
        IntegrityError
            The bytes do not match the sha256 the server recorded for the blob (or the
            ``expected`` one), or their size differs: damaged or truncated in storage.
        BackupError
            NOT_FOUND, or the server could not be reached.
        """
        buf = bytearray()
        info: BlobInfo | None = expected

        def attempt() -> None:
            nonlocal info
            request = backup_pb2.GetBlobRequest(blob_id=blob_id, offset=len(buf))
            size = info.size if info is not None else 64 * CHUNK_BYTES
            try:
                stream = self._stub.GetBlob(
                    request,
                    metadata=self._metadata("GetBlob", request),
                    timeout=self._transfer_timeout(size),
                )
                for chunk in stream:
                    if chunk.HasField("info"):
                        told = BlobInfo.from_proto(chunk.info)
                        if info is not None and (told.sha256, told.size) != (
                            info.sha256,
                            info.size,
                        ):
                            raise IntegrityError(
                                f"the server describes blob {blob_id} differently from its "
                                "listing (another sha256 or size); it was replaced"
                            )
                        info = told
                    if chunk.offset != len(buf):
                        raise IntegrityError(
                            f"the server sent bytes of blob {blob_id} out of order"
                        )
                    buf.extend(chunk.data)
                    if info is not None and len(buf) > info.size:
                        raise IntegrityError(f"the server sent more bytes of blob {blob_id}")
            except grpc.RpcError as exc:
                raise _rpc_error(exc, self.address, f"the download of blob {blob_id}") from None

        self._retrying(f"download of blob {blob_id}", attempt)
        if info is None:
            raise IntegrityError(f"the server sent no description of blob {blob_id}")
        if len(buf) != info.size:
            raise IntegrityError(
                f"blob {blob_id} is truncated: {len(buf)} of its {info.size} bytes arrived"
            )
        if hashlib.sha256(buf).hexdigest() != info.sha256:
            raise IntegrityError(
                f"blob {blob_id} is damaged: its bytes do not match its recorded sha256"
            )
        return bytes(buf)

    def list_blobs(self, *, adapter: str | None = None) -> list[BlobInfo]:
        """Every blob of this device's user (of one adapter if given), newest first."""
        out: list[BlobInfo] = []
        token = ""
        while True:
            request = backup_pb2.ListBlobsRequest(
                adapter=adapter or "", page_size=1000, page_token=token
            )
            reply = self._unary("ListBlobs", request, "the blob listing")
            out.extend(BlobInfo.from_proto(b) for b in reply.blobs)
            token = reply.next_page_token
            if not token:
                return out

    def delete_user_data(self) -> ErasureReport:
        """Erase everything the server holds of this user, this device's enrolment too."""
        request = backup_pb2.DeleteUserDataRequest(user=self.user)
        reply = self._unary("DeleteUserData", request, "the erasure")
        logger.info("erased this user's data on %s", self.address)
        return ErasureReport(int(reply.blobs), int(reply.bytes), int(reply.registry_rows))

    def report_versions(
        self, spec: AdapterSpec, reports: Sequence[AdapterReport]
    ) -> ReportReceipt | None:
        """Tell the coordinator about this device's adapter versions: metadata, never B.

        Each report names the version in use and, if one was saved, its lineage and
        scores (:class:`~lorafleet.protocols.reports.AdapterReport`, the format of the
        Flower round replies); the coordinator records them under this device's user.
        Retried on a transient failure (recording is idempotent: a version the registry
        holds is skipped). Returns None, having sent nothing, when ``send_reports`` is
        off.

        Examples
        --------
        >>> client.report_versions(spec, [AdapterReport(adapter="default", current=2)])  # doctest: +SKIP
        ReportReceipt(versions=0, evaluations=0, pointers=1, skipped=0)
        """
        if not self.send_reports:
            logger.debug("version reports are off for this device; nothing sent")
            return None
        request = report_request_to_proto(spec, reports)
        reply = self._retrying(
            "a version report", lambda: self._unary("ReportVersions", request, "a version report")
        )
        return ReportReceipt(
            int(reply.versions), int(reply.evaluations), int(reply.pointers), int(reply.skipped)
        )


def _default_device_name() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-._")[:100]
    return host or "device"


# --- backup and restore ---------------------------------------------------------------


def _context(user: str, adapter: str, version: int, spec: AdapterSpec, blob_id: str) -> BlobContext:
    return BlobContext(user, adapter, version, spec.base_sha256, blob_id)


def _open_archive(
    client: BackupClient, keys: Mapping[int, bytes], info: BlobInfo
) -> AdapterArchive:
    """Fetch, open and parse one adapter blob; check it is what it was listed as."""
    if info.spec is None:
        raise IntegrityError(f"the server lists adapter blob {info.blob_id} without its spec")
    sealed = client.get_blob(info.blob_id, expected=info)
    context = _context(client.user, info.adapter, info.version, info.spec, info.blob_id)
    archive = unpack_archive(open_blob(keys, context, sealed))
    if archive.version != info.version or archive.spec != info.spec:
        raise IntegrityError(
            f"blob {info.blob_id} holds version {archive.version} of another spec, not the "
            f"version {info.version} it was sealed as: refusing it"
        )
    return archive


def backup_profile(
    client: BackupClient,
    profile_root: Path | str,
    keys: UnlockedKeys,
    *,
    adapter: str = "default",
    version: int | None = None,
    key_file: Path | str | None = None,
    packing: Packing = BACKUP_PACKING,
) -> BackupRecord:
    """Seal one version of a profile (the current one by default) and upload it.

    The archive carries B only, packed as ``packing`` (:func:`pack_version`); A is
    rebuilt from the seed on restore. If that version is already backed up, its blob is
    fetched and compared: the same adapter (up to B's packing, so a restored device
    backing up again finds its own version) means nothing to do; another adapter
    (another device's history under the same adapter name) is refused, since versions
    are never overwritten. ``key_file``, if given, is uploaded too (once per change) so
    a new device can restore with the passphrase alone; its keys are wrapped, never in
    the clear.
    """
    root = Path(profile_root)
    profile = Profile.open(root)
    wanted = version if version is not None else profile.current_version()
    if wanted is None:
        raise LorafleetError(f"profile {root} has no saved adapter version to back up yet")
    if not _NAME.match(adapter):
        raise SpecError(f"adapter name {adapter!r} is not valid: use 1-128 letters and digits")
    key_bytes = _read_key_file(Path(key_file)) if key_file is not None else None
    plaintext = pack_version(root, wanted, packing=packing)
    mine = unpack_archive(plaintext)
    listed = client.list_blobs(adapter=adapter)
    same = [b for b in listed if b.kind == "adapter" and b.version == wanted]
    uploaded = False
    if same:
        theirs = _open_archive(client, keys, same[0])
        if not same_adapter_files(
            mine.files, theirs.files, packings=(mine.packing, theirs.packing)
        ):
            raise LorafleetError(
                f"version {wanted} of adapter {adapter!r} is already backed up with other "
                "content (another device's history?); back this profile up under another "
                "adapter name"
            )
        info = same[0]
    else:
        blob_id = new_blob_id()
        context = _context(client.user, adapter, wanted, profile.spec, blob_id)
        sealed = seal_blob(keys.current_key, context, plaintext, key_id=keys.current_key_id)
        info = client.put_blob(
            blob_id,
            sealed,
            kind="adapter",
            adapter=adapter,
            version=wanted,
            spec=profile.spec,
            resume=False,
        )
        uploaded = True
    key_info = None
    if key_bytes is not None:
        key_info = _upload_key_file(client, key_bytes, client.list_blobs())
        assert key_file is not None
        SeenGenerations.beside(Path(key_file)).note_file(Path(key_file))
    return BackupRecord(adapter=info, key_file=key_info, uploaded=uploaded)


def _read_key_file(path: Path) -> bytes:
    KeyStore.info(path)  # MissingKeyFileError / KeyStoreError with the usual advice
    return path.read_bytes()


def _upload_key_file(client: BackupClient, data: bytes, listed: list[BlobInfo]) -> BlobInfo:
    key_blobs = [b for b in listed if b.kind == "keyfile"]
    sha = hashlib.sha256(data).hexdigest()
    if key_blobs and key_blobs[0].sha256 == sha:  # newest first: unchanged since last time
        return key_blobs[0]
    return client.put_blob(new_blob_id(), data, kind="keyfile", resume=False)


@dataclass
class PendingKeyFile:
    """A key file fetched from the server, installed only once a restore succeeded."""

    path: Path
    staged: Path | None

    def install(self) -> None:
        """Move the fetched key file into place (no-op if the device already had one)."""
        if self.staged is None:
            return
        if self.path.exists():
            raise KeyStoreError(f"{self.path} appeared during the restore; not replacing it")
        os.replace(self.staged, self.path)
        self.staged.with_name(self.staged.name + ".lock").unlink(missing_ok=True)
        self.staged = None

    def discard(self) -> None:
        """Delete the staged copy (a failed restore); never hides the restore's own error.

        On a read-only or failing disk there may be nothing to delete and no way to
        delete it: that is no reason to replace the error the caller is handling.
        """
        if self.staged is not None:
            for leftover in (self.staged, self.staged.with_name(self.staged.name + ".lock")):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
            self.staged = None


def obtain_keys(
    client: BackupClient,
    key_file: Path | str,
    *,
    passphrase: str | None = None,
    recovery_key: bytes | None = None,
    new_passphrase: str | None = None,
    kdf: crypto.KdfParams | None = None,
) -> tuple[UnlockedKeys, PendingKeyFile]:
    """The user's master keys on this device, fetching the key file if it lacks one.

    With the device's own key file at ``key_file``, it is unlocked with the passphrase
    (or the recovery key). Without one, the newest key file the user backed up is
    fetched and unlocked (passphrase, :meth:`KeyStore.adopt`) or rebuilt under
    ``new_passphrase`` (recovery key, :meth:`KeyStore.restore`); it is staged beside
    ``key_file`` and written there only by :meth:`PendingKeyFile.install`, so a failed
    restore leaves no file behind.

    The server is not trusted with the key file: its recovery keys must match the
    ``recovery_tag`` the user's own keys wrote, and its newest generation must not be
    older than the one recorded in ``<key_file>.seen``
    (:class:`~lorafleet.client.keys.SeenGenerations`, updated here and by
    :func:`backup_profile`).

    Raises
    ------
    WrongPassphraseError
        The passphrase does not unlock the key file.
    MissingKeyFileError
        No key file on this device and none backed up.
    KeyFileTamperedError
        The fetched key file's recovery keys were changed (the server added one).
    KeyFileRollbackError
        The server offered an older key file than this device has seen.
    """
    path = Path(key_file).expanduser()
    if (passphrase is None) == (recovery_key is None):
        raise SpecError("give exactly one of passphrase and recovery_key")
    seen = SeenGenerations.beside(path)
    if path.exists():
        if passphrase is not None:
            keys = KeyStore.unlock(path, passphrase)
        else:
            assert recovery_key is not None
            keys = KeyStore.unlock_with_recovery(path, recovery_key)
        seen.note_file(path)
        return keys, PendingKeyFile(path, None)
    if recovery_key is not None and not new_passphrase:
        raise SpecError("restoring with a recovery key needs new_passphrase for the new key file")
    key_blobs = [b for b in client.list_blobs() if b.kind == "keyfile"]
    if not key_blobs:
        raise MissingKeyFileError(
            f"no key file at {path} and none backed up for user {client.user}: the blobs "
            "cannot be opened on this device; copy the key file here, or restore it with "
            "KeyStore.restore and your recovery bundle"
        )
    data = client.get_blob(key_blobs[0].blob_id, expected=key_blobs[0])
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.restoring-{secrets.token_hex(4)}")
    pending = PendingKeyFile(path, staged)
    try:
        if passphrase is not None:
            keys = KeyStore.adopt(staged, data, passphrase, seen=seen)
        else:
            assert recovery_key is not None and new_passphrase is not None
            keys = KeyStore.restore(staged, data, recovery_key, new_passphrase, kdf=kdf, seen=seen)
    except BaseException:
        pending.discard()
        raise
    return keys, pending


def _choose(listed: list[BlobInfo], adapter: str, version: int | None) -> BlobInfo:
    candidates = [b for b in listed if b.kind == "adapter" and b.adapter == adapter]
    if version is not None:
        candidates = [b for b in candidates if b.version == version]
    if not candidates:
        have = sorted({b.version for b in listed if b.kind == "adapter" and b.adapter == adapter})
        wanted = f"version {version} of adapter" if version is not None else "adapter"
        raise LorafleetError(
            f"no backup of {wanted} {adapter!r} on the server (backed-up versions: {have}); "
            "back it up first, or name another adapter or version"
        )
    return max(candidates, key=lambda b: (b.version, b.created_at))


def restore_profile(
    client: BackupClient,
    profile_root: Path | str,
    keys: Mapping[int, bytes],
    *,
    adapter: str = "default",
    version: int | None = None,
    allow_downgrade: bool = False,
    base_source: str | None = None,
) -> AdapterProvenance:
    """Fetch one backed-up version (the newest by default) into a profile folder.

    Everything is checked before anything is written; then the version folder appears
    in one rename and ``current`` points at it. A new profile is assembled whole and
    renamed into place.

    Parameters
    ----------
    client
        The enrolled device's backup client.
    profile_root
        The profile to restore into: new (absent or empty) or the same adapter's.
    keys
        The user's master keys (:func:`obtain_keys`).
    adapter, version
        What to restore; by default the newest version of ``adapter`` on the server.
    allow_downgrade
        Let the restore make an older version current than the profile's current one.
    base_source
        For a new profile: where the base lives on this device (default: the source
        recorded on the device that made the backup).

    Raises
    ------
    DecryptionError
        The blob does not open as this user's ``adapter`` at that version and base: it
        was swapped, replayed under another version, or sealed with other keys.
    IntegrityError
        The blob is damaged or truncated, or its contents fail their hashes.
    LorafleetError
        It would move the profile back to an older version, or replace different
        files of the same version, or the profile belongs to another spec.
    """
    root = Path(profile_root).expanduser()
    info = _choose(client.list_blobs(adapter=adapter), adapter, version)
    archive = _open_archive(client, keys, info)
    spec = archive.spec
    existing = Profile.read_spec(root)
    if existing is not None:
        profile = Profile.open(root)
        if existing != spec:
            raise LorafleetError(
                f"profile {root} holds another adapter spec than the backup of {adapter!r}; "
                "restore into a new folder"
            )
        current = profile.current_version()
        if current is not None and archive.version < current and not allow_downgrade:
            raise LorafleetError(
                f"profile {root} is at version {current}, newer than the backed-up version "
                f"{archive.version}; pass allow_downgrade=True to go back to it"
            )
        folder = profile.version_dir(archive.version)
        if folder.exists():
            if not same_adapter_files(
                _folder_files(folder), archive.files, packings=(archive.packing,) * 2
            ):
                raise LorafleetError(
                    f"{folder} already holds another adapter than backed-up version "
                    f"{archive.version}; versions are never overwritten"
                )
        else:
            with profile.writing(), atomic_directory(folder) as tmp:
                _write_version(tmp, archive, spec)
        with profile.writing():
            profile.set_current(archive.version)
    else:
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise LorafleetError(
                f"{root} exists and is not a lorafleet profile; restore into a new folder"
            )
        with writing(root), contextlib.suppress(FileNotFoundError):
            root.rmdir()  # an empty folder: the assembled profile takes its place
        with atomic_directory(root) as tmp:
            _write_version(tmp / ADAPTERS_DIR / f"v{archive.version:04d}", archive, spec)
            (tmp / PROFILE_FILE).write_bytes(_profile_json(archive, base_source))
            (tmp / CURRENT_FILE).write_text(f"v{archive.version:04d}\n", encoding="utf-8")
    provenance = read_provenance(Profile.open(root).version_dir(archive.version))
    logger.info("restored version %d of adapter %r into %s", archive.version, adapter, root)
    return provenance


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write_version(folder: Path, archive: AdapterArchive, spec: AdapterSpec) -> AdapterProvenance:
    """Write the archive's files into ``folder`` and check them as an adapter version."""
    for rel, data in archive.files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    provenance = read_provenance(folder)
    if provenance.version != archive.version or provenance.spec != spec:
        raise IntegrityError(
            f"the backed-up adapter says it is version {provenance.version} of another spec, "
            f"not version {archive.version}: refusing it"
        )
    read_b(folder, provenance)  # content hash and seed-derived A are checked here
    return provenance


def _profile_json(archive: AdapterArchive, base_source: str | None) -> bytes:
    if base_source is None:
        return archive.profile_json
    try:
        record = json.loads(archive.profile_json)
    except ValueError as exc:
        raise IntegrityError(f"the backup's profile.json is unreadable ({exc})") from None
    record["base_source"] = base_source
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")
