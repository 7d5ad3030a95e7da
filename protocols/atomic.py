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

from lorafleet.protocols.errors import LorafleetError

TMP_PREFIX = ".lorafleet-tmp-"


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _explain(exc: OSError, target: Path) -> LorafleetError:
    if exc.errno == errno.ENOSPC:
        return LorafleetError(
            f"disk full while writing {target}; free some space and retry (nothing was replaced)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LorafleetError(
            f"cannot write {target}: permission denied; choose a writable location"
        )
    return LorafleetError(f"cannot write {target}: {exc.strerror or exc} (nothing was replaced)")


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` all at once; on any failure the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
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
        raise _explain(exc, path) from None


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds.

    ``target`` must not exist yet (versions are immutable). If the block raises, or the
    disk fills, the temporary directory is removed and ``target`` is never created.
    """
    target = Path(target)
    if target.exists():
        raise LorafleetError(f"{target} already exists; versions are never overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target.parent))
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
        raise _explain(exc, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
