"""The coordinator's store of frozen bases: content-addressed files plus chunked manifests.

Layout under the store's root::

    objects/<sha256>            one read-only copy of each distinct file, named by its hash
    manifests/<digest>.json     the chunked manifest of each published base

A file shared by two bases (a tokenizer, say) is stored once. Files are *copied* in,
never hard-linked: a later edit of the source folder must not change what the store
serves. Every chunk is checked against its manifest hash when it is read, so a
damaged object is refused rather than sent.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

from lorafleet.protocols.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChunkedFile,
    ChunkedManifest,
    ChunkHasher,
    FileChunk,
    check_digest,
)
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.manifest import BaseManifest, ManifestFile, build_manifest

__all__ = ["BaseNotFoundError", "BaseStore"]

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_COPY_BUF = 1 << 20


class BaseNotFoundError(LorafleetError):
    """The store holds no base with the digest asked for."""


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename, flushed to disk first."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BaseStore:
    """Published bases, addressed by manifest digest, read back chunk by chunk.

    Parameters
    ----------
    root
        The store's folder; created on first publish.
    chunk_size
        Bytes per chunk for bases published from now on (a base keeps the chunk size
        it was first published with, so clients resuming a download see the same chunks).

    Examples
    --------
    >>> import tempfile
    >>> src = Path(tempfile.mkdtemp())
    >>> _ = (src / "config.json").write_text("{}")
    >>> store = BaseStore(Path(tempfile.mkdtemp()))
    >>> m = store.publish(src, "demo")
    >>> store.read_chunk(m.digest(), "config.json", 0).data
    b'{}'
    """

    def __init__(self, root: Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        ChunkHasher(chunk_size)  # validates the chunk size now, not at the first publish
        self.root = Path(root).expanduser()
        self.chunk_size = chunk_size
        self._objects = self.root / "objects"
        self._manifests = self.root / "manifests"
        self._cache: dict[str, ChunkedManifest] = {}
        self._lock = threading.Lock()

    # --- publishing ------------------------------------------------------------------

    def publish(self, source: Path, name: str | None = None) -> ChunkedManifest:
        """Copy a base into the store and return its chunked manifest.

        Parameters
        ----------
        source
            A model folder (every file in it except hidden ones, as
            :func:`~lorafleet.protocols.manifest.build_manifest` lists them) or a single
            file such as a ``.gguf`` (a manifest of that one file under its own name).
            The digest is the one :func:`lorafleet.client.base.load_base` computes for
            the same folder or file.
        name
            Label for messages; default the folder's name or the file's stem.

        Returns
        -------
        ChunkedManifest
            Its :meth:`~ChunkedManifest.digest` names the base in train messages.

        Raises
        ------
        LorafleetError
            ``source`` does not exist or the store cannot be written.
        IntegrityError
            A source file changed while it was being copied.
        """
        src = Path(source).expanduser()
        if src.is_dir():
            folder, base = src, build_manifest(src, name or src.resolve().name)
        elif src.is_file():
            folder = src.parent
            base = build_manifest(folder, name or src.stem, [src.name])
        else:
            raise LorafleetError(
                f"cannot publish {src}: no such file or folder; pass a model folder or a .gguf file"
            )
        digest = base.digest()
        existing = self._published(digest)
        if existing is not None:
            logger.info("base %s (%s…) is already in the store", base.name, digest[:12])
            return existing
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._manifests.mkdir(parents=True, exist_ok=True)
            files = tuple(self._store_file(folder / f.path, f) for f in base.files)
            manifest = ChunkedManifest(base.name, files, base.format)
            _write_atomic(self._manifest_path(digest), manifest.to_json().encode("utf-8"))
        except OSError as exc:
            raise LorafleetError(
                f"cannot write the base store {self.root}: {exc.strerror or exc}; free some "
                "disk space or choose another folder"
            ) from None
        with self._lock:
            self._cache[digest] = manifest
        logger.info(
            "published base %s (%s…): %d files, %d bytes, %d chunks",
            manifest.name,
            digest[:12],
            len(manifest.files),
            manifest.total_size,
            manifest.total_chunks,
        )
        return manifest

    def _published(self, digest: str) -> ChunkedManifest | None:
        """The stored manifest of ``digest`` if it and all its objects are present."""
        try:
            manifest = self.get_manifest(digest)
        except BaseNotFoundError:
            return None
        for f in manifest.files:
            obj = self._objects / f.sha256
            if not obj.is_file() or obj.stat().st_size != f.size:
                return None
        return manifest

    def _store_file(self, src: Path, expected: ManifestFile) -> ChunkedFile:
        """Copy one file into ``objects/`` (unless there) and hash its chunks, in one pass."""
        target = self._objects / expected.sha256
        hasher = ChunkHasher(self.chunk_size)
        buf = bytearray(_COPY_BUF)
        view = memoryview(buf)
        present = target.is_file() and target.stat().st_size == expected.size
        tmp: Path | None = None
        try:
            with open(src, "rb") as fin:
                if present:  # only the chunk hashes are needed
                    while n := fin.readinto(buf):
                        hasher.update(view[:n])
                else:
                    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self._objects)
                    tmp = Path(tmp_name)
                    with os.fdopen(fd, "wb") as fout:
                        while n := fin.readinto(buf):
                            hasher.update(view[:n])
                            fout.write(view[:n])
                        fout.flush()
                        os.fsync(fout.fileno())
            chunked = hasher.finish(expected.path)
            if chunked.manifest_file() != expected:
                raise IntegrityError(
                    f"{src} changed while it was being published (sha256 {chunked.sha256}, "
                    f"expected {expected.sha256}); publish it again once it is stable"
                )
            if tmp is not None:
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
                tmp = None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return chunked

    # --- reading ---------------------------------------------------------------------

    def _manifest_path(self, digest: str) -> Path:
        return self._manifests / f"{digest}.json"

    def get_manifest(self, digest: str) -> ChunkedManifest:
        """The chunked manifest of the base with manifest digest ``digest``.

        Raises
        ------
        SpecError
            ``digest`` is not 64 lowercase hex characters.
        BaseNotFoundError
            The store holds no such base.
        IntegrityError
            The stored manifest is damaged.
        """
        check_digest(digest)
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None:
            return cached
        try:
            text = self._manifest_path(digest).read_bytes()
        except FileNotFoundError:
            raise BaseNotFoundError(
                f"the base store {self.root} has no base with manifest digest {digest}; "
                "publish it first"
            ) from None
        except OSError as exc:
            raise LorafleetError(
                f"cannot read the manifest of {digest} in {self.root}: {exc.strerror or exc}"
            ) from None
        manifest = ChunkedManifest.from_json(text)
        if manifest.digest() != digest:
            raise IntegrityError(
                f"the stored manifest {self._manifest_path(digest)} has digest "
                f"{manifest.digest()}, not the one its name says; publish the base again"
            )
        with self._lock:
            self._cache[digest] = manifest
        return manifest

    def base_manifest(self, digest: str) -> BaseManifest:
        """The plain base manifest (no chunk data) of ``digest``."""
        return self.get_manifest(digest).base

    def digests(self) -> list[str]:
        """Manifest digests of every published base, sorted."""
        if not self._manifests.is_dir():
            return []
        found = (p.name.removesuffix(".json") for p in self._manifests.glob("*.json"))
        return sorted(d for d in found if len(d) == 64 and not d.startswith("."))

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str):
            return False
        try:
            check_digest(digest)
        except SpecError:
            return False
        return self._manifest_path(digest).is_file()

    def read_chunk(self, digest: str, path: str, index: int) -> FileChunk:
        """Read chunk ``index`` of file ``path`` of base ``digest``, verified.

        Raises
        ------
        BaseNotFoundError
            No such base.
        SpecError
            No such file in the base, or the index is out of range.
        IntegrityError
            The stored object is missing or damaged; publish the base again.
        """
        manifest = self.get_manifest(digest)
        f = manifest.file(path)
        offset, length = f.chunk_span(index)
        obj = self._objects / f.sha256
        try:
            with open(obj, "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
        except OSError as exc:
            raise IntegrityError(
                f"the base store object {obj} for {path!r} of {digest[:12]}… cannot be read "
                f"({exc.strerror or exc}); publish the base again"
            ) from None
        try:
            f.verify_chunk(index, data)
        except IntegrityError as exc:
            raise IntegrityError(
                f"the base store object {obj} is damaged: {exc}; publish the base again"
            ) from None
        return FileChunk(path, index, offset, data, f.chunk_sha256[index])
