"""The coordinator's store of encrypted blobs: content-addressed files, resumable uploads.

The store holds opaque bytes; it never sees a key and never parses what it stores
(the backup service checks the envelope header, the registry holds the metadata).
Layout under the store's root::

    objects/<sha[:2]>/<sha256>          a finished blob, read-only, named by its sha256
    uploads/<owner>/<blob_id>.part      the bytes received so far of an unfinished upload
    uploads/<owner>/<blob_id>.json      what that upload promised: size and sha256

Writes are crash-safe: received bytes are flushed to disk (``fsync``) before an upload
call returns, so the length of a ``.part`` file is what a client may resume from; a
finished upload is hashed in full, checked against the sha256 it promised, and renamed
into ``objects/`` in one step (the directory is flushed too). A crash leaves either the
partial upload or the finished object, never a half-written object. An upload whose
bytes do not match its promised sha256 is discarded: the client starts it again.

``owner`` is an opaque label chosen by the caller (the backup service uses the
registry's user id), so one user's unfinished uploads can be listed and erased
without touching anyone else's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lorafleet.protocols.atomic import atomic_write_bytes, fsync_dir
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError

__all__ = [
    "DEFAULT_MAX_BLOB_BYTES",
    "BlobNotFoundError",
    "BlobStore",
    "BlobTooLargeError",
    "Upload",
    "UploadBusyError",
    "UploadState",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BLOB_BYTES = 512 * 2**20
"""512 MiB: ten times a rank-64 adapter on a 1B-parameter base; raise it per deployment."""
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_BLOB_ID = re.compile(r"^[0-9a-f]{32}\Z")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_HASH_BUF = 1 << 20
_TMP_PREFIX = ".tmp-"


class BlobNotFoundError(LorafleetError):
    """The store holds no blob (or no unfinished upload) by that name."""


class BlobTooLargeError(LorafleetError):
    """A blob larger than the store's limit, or more bytes than an upload promised."""


class UploadBusyError(LorafleetError):
    """The same upload is being written by another call right now."""


@dataclass(frozen=True)
class UploadState:
    """An unfinished upload: what it promised and how many bytes are on disk."""

    blob_id: str
    size: int
    sha256: str
    received: int


def _check_sha256(sha256: object) -> str:
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise SpecError(f"sha256 must be 64 lowercase hex characters, got {sha256!r:.80}")
    return sha256


def _check_blob_id(blob_id: object) -> str:
    if not isinstance(blob_id, str) or not _BLOB_ID.match(blob_id):
        raise SpecError(f"blob id must be 32 lowercase hex characters, got {blob_id!r:.80}")
    return blob_id


def _check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not _OWNER.match(owner):
        raise SpecError(f"blob owner must be 1-64 letters, digits, '_' or '-', got {owner!r:.80}")
    return owner


def _storage_error(exc: OSError, where: Path) -> LorafleetError:
    if exc.errno == errno.ENOSPC:
        return LorafleetError(f"blob store {where}: disk full; free some space (nothing stored)")
    return LorafleetError(f"blob store {where}: {exc.strerror or exc}")


class Upload:
    """One call's worth of bytes appended to an unfinished upload; see :meth:`BlobStore.upload`.

    Use it as a context manager: :meth:`write` the bytes in order, then :meth:`commit`
    once all have arrived. Leaving the block without committing flushes what was
    received, so the next call can resume from :attr:`received`.
    """

    def __init__(
        self,
        store: BlobStore,
        owner: str,
        state: UploadState,
        fh: BinaryIO,
        hasher: Any,
        release: _Releaser,
    ) -> None:
        self._store = store
        self._owner = owner
        self._state = state
        self._fh: BinaryIO | None = fh
        self._hasher = hasher
        self._release = release
        self.received = state.received
        """Bytes of the blob on disk (or in flight to it) so far."""

    @property
    def size(self) -> int:
        """The blob's promised total size."""
        return self._state.size

    @property
    def complete(self) -> bool:
        """Whether every promised byte has been received."""
        return self.received == self._state.size

    def write(self, data: bytes) -> None:
        """Append the next bytes; more than the promised size raises :class:`BlobTooLargeError`."""
        if self._fh is None:
            raise LorafleetError("this upload is closed; start a new one to send more bytes")
        if self.received + len(data) > self._state.size:
            raise BlobTooLargeError(
                f"blob {self._state.blob_id}: {self.received + len(data)} bytes sent, more "
                f"than the {self._state.size} its upload promised"
            )
        try:
            self._fh.write(data)
        except OSError as exc:
            raise _storage_error(exc, self._store.root) from None
        self._hasher.update(data)
        self.received += len(data)

    def head(self, n: int) -> bytes:
        """The first ``n`` received bytes (an envelope header, for a caller to check)."""
        if self._fh is None:
            raise LorafleetError("this upload is closed")
        self._fh.flush()
        path = self._store._part_path(self._owner, self._state.blob_id)
        with open(path, "rb") as fh:
            return fh.read(n)

    def commit(self) -> str:
        """Check the whole blob against its sha256 and store it; returns the sha256.

        Raises
        ------
        LorafleetError
            Not every promised byte has arrived.
        IntegrityError
            The bytes do not match the promised sha256; the upload is discarded, so
            the client must send it again from offset 0.
        """
        if self._fh is None:
            raise LorafleetError("this upload is closed")
        if not self.complete:
            raise LorafleetError(
                f"blob {self._state.blob_id}: {self.received} of {self._state.size} bytes "
                "received; send the rest before committing"
            )
        self._flush()
        fh, self._fh = self._fh, None
        fh.close()
        sha: str = self._hasher.hexdigest()
        store, owner, blob_id = self._store, self._owner, self._state.blob_id
        try:
            if sha != self._state.sha256:
                store.discard_upload(owner, blob_id)
                raise IntegrityError(
                    f"blob {blob_id}: the bytes received have sha256 {sha[:16]}..., not the "
                    f"promised {self._state.sha256[:16]}...; upload it again from offset 0"
                )
            store._install(store._part_path(owner, blob_id), sha)
            store._meta_path(owner, blob_id).unlink(missing_ok=True)
        finally:
            self._release.release()
        logger.info("stored blob %s (%d bytes, sha256 %s...)", blob_id, self.received, sha[:12])
        return sha

    def _flush(self) -> None:
        assert self._fh is not None
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise _storage_error(exc, self._store.root) from None

    def close(self) -> None:
        """Flush what was received to disk and release the upload (idempotent)."""
        if self._fh is None:
            return
        try:
            self._flush()
        finally:
            fh, self._fh = self._fh, None
            fh.close()
            self._release.release()

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobStore:
    """Encrypted blobs on disk, by sha256, with resumable uploads.

    Parameters
    ----------
    root
        The store's folder; created if missing.
    max_blob_bytes
        Largest blob accepted; a bigger upload is refused before any byte is written.

    Examples
    --------
    >>> import hashlib, tempfile
    >>> store = BlobStore(Path(tempfile.mkdtemp()))
    >>> data = b"sealed bytes"
    >>> sha = hashlib.sha256(data).hexdigest()
    >>> with store.upload("7", "0" * 32, size=len(data), sha256=sha) as up:
    ...     up.write(data)
    ...     _ = up.commit()
    >>> store.read(sha)
    b'sealed bytes'
    """

    def __init__(self, root: Path, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        if isinstance(max_blob_bytes, bool) or not isinstance(max_blob_bytes, int):
            raise SpecError(f"max_blob_bytes must be an integer, got {max_blob_bytes!r}")
        if max_blob_bytes < 1:
            raise SpecError(f"max_blob_bytes must be at least 1, got {max_blob_bytes}")
        self.root = Path(root).expanduser()
        self.max_blob_bytes = max_blob_bytes
        self._objects = self.root / "objects"
        self._uploads = self.root / "uploads"
        self._busy: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._uploads.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error(exc, self.root) from None

    # --- paths -----------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 is (or would be) stored."""
        _check_sha256(sha256)
        return self._objects / sha256[:2] / sha256

    def _part_path(self, owner: str, blob_id: str) -> Path:
        return self._uploads / owner / f"{blob_id}.part"

    def _meta_path(self, owner: str, blob_id: str) -> Path:
        return self._uploads / owner / f"{blob_id}.json"

    # --- uploads ---------------------------------------------------------------------

    def upload_state(self, owner: str, blob_id: str) -> UploadState | None:
        """The unfinished upload of ``blob_id`` by ``owner``, or None if there is none."""
        _check_owner(owner)
        _check_blob_id(blob_id)
        meta_path = self._meta_path(owner, blob_id)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            received = self._part_path(owner, blob_id).stat().st_size
            state = UploadState(blob_id, int(meta["size"]), _check_sha256(meta["sha256"]), received)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, SpecError) as exc:
            logger.warning("discarding damaged upload state %s (%s)", meta_path, exc)
            self.discard_upload(owner, blob_id)
            return None
        if state.received > state.size:
            self.discard_upload(owner, blob_id)
            return None
        return state

    def _claim(self, owner: str, blob_id: str) -> _Releaser:
        """Mark one upload busy until the returned releaser is released."""
        key = (owner, blob_id)
        with self._lock:
            if key in self._busy:
                raise UploadBusyError(
                    f"blob {blob_id} is being uploaded by another call; wait for it to end"
                )
            self._busy.add(key)

        def release() -> None:
            with self._lock:
                self._busy.discard(key)

        return _Releaser(release)

    def upload(
        self, owner: str, blob_id: str, *, size: int, sha256: str, offset: int = 0
    ) -> Upload:
        """Start (or resume at ``offset``) the upload of one blob; returns an :class:`Upload`.

        Parameters
        ----------
        owner
            Who uploads (an opaque label); unfinished uploads are kept per owner.
        blob_id
            32 lowercase hex characters.
        size, sha256
            What the whole blob will be. A resumed upload must promise the same; one
            that promises otherwise starts again from 0 (``offset`` must then be 0).
        offset
            Where the bytes of this call start: 0, or at most what
            :meth:`upload_state` reports (received bytes past it are dropped).

        Raises
        ------
        BlobTooLargeError
            ``size`` is over the store's limit.
        UploadBusyError
            Another call is writing this upload right now.
        SpecError
            A malformed argument, or ``offset`` beyond what the store holds.
        """
        _check_owner(owner)
        _check_blob_id(blob_id)
        _check_sha256(sha256)
        for name, value in (("size", size), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{name} must be a non-negative integer, got {value!r}")
        if size > self.max_blob_bytes:
            raise BlobTooLargeError(
                f"blob {blob_id} is {size} bytes, over this store's limit of "
                f"{self.max_blob_bytes}; the operator can raise --max-blob-mb"
            )
        if offset > size:
            raise SpecError(f"offset {offset} is past the blob's size {size}")
        releaser = self._claim(owner, blob_id)
        try:
            state = self.upload_state(owner, blob_id)
            if state is not None and (state.size, state.sha256) != (size, sha256):
                logger.info("upload %s promised another blob before; starting it again", blob_id)
                self.discard_upload(owner, blob_id)
                state = None
            held = 0 if state is None else state.received
            if offset > held:
                raise SpecError(
                    f"upload of blob {blob_id} cannot resume at byte {offset}: the server "
                    f"holds {held} bytes of it; resume from {held}"
                )
            part = self._part_path(owner, blob_id)
            try:
                part.parent.mkdir(parents=True, exist_ok=True)
                if state is None:
                    meta = json.dumps({"size": size, "sha256": sha256}).encode("ascii")
                    atomic_write_bytes(self._meta_path(owner, blob_id), meta, mode=0o600)
                fh = open(part, "r+b" if state is not None else "w+b")  # noqa: SIM115
            except OSError as exc:
                raise _storage_error(exc, self.root) from None
            try:
                fh.truncate(offset)
                fh.seek(0)
                hasher = hashlib.sha256()
                remaining = offset
                while remaining:
                    block = fh.read(min(_HASH_BUF, remaining))
                    if not block:
                        raise IntegrityError(f"upload {blob_id} is shorter than it was")
                    hasher.update(block)
                    remaining -= len(block)
                fh.seek(offset)
            except BaseException:
                fh.close()
                raise
            state = UploadState(blob_id, size, sha256, offset)
        except BaseException:
            releaser.release()
            raise
        return Upload(self, owner, state, fh, hasher, releaser)

    def discard_upload(self, owner: str, blob_id: str) -> int:
        """Delete an unfinished upload; returns the bytes it held (0 if there was none)."""
        part = self._part_path(owner, blob_id)
        try:
            held = part.stat().st_size
        except OSError:
            held = 0
        part.unlink(missing_ok=True)
        self._meta_path(owner, blob_id).unlink(missing_ok=True)
        return held

    def uploads_of(self, owner: str) -> list[UploadState]:
        """Every unfinished upload of ``owner``."""
        _check_owner(owner)
        folder = self._uploads / owner
        if not folder.is_dir():
            return []
        found = []
        for meta in sorted(folder.glob("*.json")):
            blob_id = meta.name.removesuffix(".json")
            if _BLOB_ID.match(blob_id) and (state := self.upload_state(owner, blob_id)):
                found.append(state)
        return found

    def erase_owner_uploads(self, owner: str) -> tuple[int, int]:
        """Delete every unfinished upload of ``owner``; returns (uploads, bytes)."""
        _check_owner(owner)
        folder = self._uploads / owner
        if not folder.is_dir():
            return 0, 0
        parts = list(folder.glob("*.part"))
        held = sum(p.stat().st_size for p in parts if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        return len(parts), held

    def _install(self, part: Path, sha256: str) -> None:
        """Move a verified upload into ``objects/`` (read-only), durably."""
        target = self.object_path(sha256)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(part, 0o444)
            os.replace(part, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise _storage_error(exc, self.root) from None

    # --- finished blobs --------------------------------------------------------------

    def put(self, data: bytes) -> str:
        """Store ``data`` in one piece (tests, tools); returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if len(data) > self.max_blob_bytes:
            raise BlobTooLargeError(
                f"blob is {len(data)} bytes, over this store's limit of {self.max_blob_bytes}"
            )
        if self.exists(sha):
            return sha
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self._uploads)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self._install(Path(tmp), sha)
        except OSError as exc:
            raise _storage_error(exc, self.root) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return sha

    def exists(self, sha256: str) -> bool:
        """Whether a finished blob with this sha256 is stored."""
        return self.object_path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """Size of a stored blob; :class:`BlobNotFoundError` if there is none."""
        try:
            return self.object_path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFoundError(f"the blob store holds no blob {sha256[:16]}...") from None

    def read(self, sha256: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a stored blob, from ``offset``, at most ``length`` (all by default)."""
        path = self.object_path(sha256)
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read() if length is None else fh.read(length)
        except FileNotFoundError:
            raise BlobNotFoundError(f"the blob store holds no blob {sha256[:16]}...") from None
        except OSError as exc:
            raise _storage_error(exc, self.root) from None

    def iter_chunks(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        """Stream a stored blob from ``offset`` in pieces of ``chunk_size`` bytes."""
        path = self.object_path(sha256)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed in finally across yields
        except FileNotFoundError:
            raise BlobNotFoundError(f"the blob store holds no blob {sha256[:16]}...") from None
        try:
            fh.seek(offset)
            while block := fh.read(chunk_size):
                yield block
        finally:
            fh.close()

    def verify(self, sha256: str) -> bool:
        """Whether the stored blob still hashes to its name (a damaged disk says False)."""
        hasher = hashlib.sha256()
        for block in self.iter_chunks(sha256, 0, _HASH_BUF):
            hasher.update(block)
        return hasher.hexdigest() == sha256

    def delete(self, sha256: str) -> int:
        """Delete a stored blob; returns its size (0 if it was not there)."""
        path = self.object_path(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _storage_error(exc, self.root) from None
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)
        return size


class _Releaser:
    """Calls a function once, on the first :meth:`release` (frees a busy-upload mark)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def release(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()
