"""Crash-safe writes, for device and coordinator alike: no half-written file, ever.

Files are written to a temporary sibling, flushed to disk, then renamed over the target
(rename is atomic on POSIX file systems). Directories are built under a temporary name
and renamed into place once complete, so a reader sees the old state or the new one,
never a mixture.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorafleet.protocols.errors import LorafleetError, StorageError

TMP_PREFIX = ".lorafleet-tmp-"


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, target: Path) -> StorageError:
    """The one-line :class:`StorageError` for an ``OSError`` met while writing ``target``.

    Examples
    --------
    >>> print(storage_error(OSError(errno.EROFS, "Read-only file system"), Path("/p/current")))
    cannot write /p/current: read-only file system; remount it read-write or choose a writable location (nothing was replaced)
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "disk full" if exc.errno == errno.ENOSPC else "over the disk quota or size limit"
        return StorageError(
            f"cannot write {target}: {why}; free some space and retry (nothing was replaced)"
        )
    if exc.errno == errno.EROFS:
        fix = "remount it read-write or choose a writable location"
        return StorageError(
            f"cannot write {target}: read-only file system; {fix} (nothing was replaced)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError(
            f"cannot write {target}: permission denied; make it writable or choose a writable "
            "location (nothing was replaced)"
        )
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return StorageError(
            f"cannot write {target}: a file stands where a folder is expected "
            f"({exc.filename or target}); move it away or choose another location"
        )
    return StorageError(f"cannot write {target}: {exc.strerror or exc} (nothing was replaced)")


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn any ``OSError`` of the block into the :class:`StorageError` for ``target``."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, Path(target)) from None


def _make_parents(folder: Path, created: list[Path]) -> None:
    """Create ``folder`` and its missing ancestors, recording each in ``created``.

    ``created`` lists them deepest first, so a failure part-way can still be undone.
    """
    missing: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for parent in reversed(missing):
        parent.mkdir(exist_ok=True)
        created.insert(0, parent)


def _remove_empty(created: list[Path]) -> None:
    """Undo :func:`_make_parents` after a failed write (only folders still empty)."""
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` all at once; on any failure the old file stays.

    Raises
    ------
    StorageError
        The folder cannot be created or written (read-only, full disk, a file in the
        way); ``path`` is unchanged and no temporary file is left.
    """
    path = Path(path)
    created: list[Path] = []
    try:
        _make_parents(path.parent, created)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    except OSError as exc:
        _remove_empty(created)
        raise storage_error(exc, path) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise storage_error(exc, path) from None


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds.

    ``target`` must not exist yet (versions are immutable). If the block raises, or the
    disk fills, the temporary directory is removed and ``target`` is never created; an
    ``OSError`` (read-only, full disk) becomes a :class:`StorageError` naming ``target``.
    """
    target = Path(target)
    if target.exists():
        raise LorafleetError(f"{target} already exists; versions are never overwritten")
    created: list[Path] = []
    try:
        _make_parents(target.parent, created)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target.parent))
    except OSError as exc:
        _remove_empty(created)
        raise storage_error(exc, target) from None
    try:
        yield tmp
        # Every file and folder inside must be on disk before the rename publishes them.
        for child in sorted(tmp.rglob("*"), reverse=True):
            if child.is_dir():
                fsync_dir(child)
            else:
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise storage_error(exc, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def remove_stale_temporaries(folder: Path) -> int:
    """Delete leftovers of writes that a killed process never finished; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for child in folder.iterdir():
        if child.name.startswith(TMP_PREFIX):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed += 1
    return removed
