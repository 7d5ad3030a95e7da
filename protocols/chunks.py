"""Chunked manifests: a base manifest plus per-chunk hashes, for verified, resumable transfer.

A base model is distributed as fixed-size chunks (default 4 MiB). The
:class:`ChunkedManifest` lists, for each file of a :class:`~lorafleet.protocols.manifest.
BaseManifest`, the sha256 of every chunk, so a client refuses a damaged chunk the moment
it arrives and keeps every good one across an interrupted download.

The identity of a chunked manifest is still :meth:`BaseManifest.digest`, computed from
the files' paths, sizes and full sha256s only: chunk hashes (and the chunk size) are
extra verification data derived from the same bytes, not part of what a round or an
adapter names. A client therefore trusts the chunk hashes only as far as the manifest's
digest is the one it asked for, and verifies every file's full sha256 at the end: a
server that lied about the chunk hashes is caught there.

Pure Python and :mod:`hashlib`; the server and the client both use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.manifest import MANIFEST_FORMAT, BaseManifest, ManifestFile

__all__ = [
    "CHUNKED_MANIFEST_FORMAT",
    "DEFAULT_CHUNK_SIZE",
    "FETCH_BATCH_BYTES",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "ChunkHasher",
    "ChunkRange",
    "ChunkedFile",
    "ChunkedManifest",
    "FileChunk",
    "check_digest",
    "chunk_file",
    "chunk_manifest",
]

CHUNKED_MANIFEST_FORMAT = 1
"""Version of the chunked manifest's JSON form (the base manifest has its own)."""
DEFAULT_CHUNK_SIZE = 4 << 20
"""4 MiB: few enough chunks for a small manifest, small enough to lose little on a drop."""
MIN_CHUNK_SIZE = 4 << 10
"""4 KiB: smaller chunks would make the manifest larger than the data it describes."""
MAX_CHUNK_SIZE = 16 << 20
"""16 MiB: one chunk travels as one gRPC message, which must stay well under its limits."""
MAX_CHUNKS = 131_072
"""Most chunks one manifest may list (512 GiB at 4 MiB), so a manifest fits one message."""
FETCH_BATCH_BYTES = 64 << 20
"""Bytes a client asks for in one FetchChunks call; servers accept at least this much."""

_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is a manifest digest (64 lowercase hex characters), else raise.

    Raises
    ------
    SpecError
        Naming the bad value.

    Examples
    --------
    >>> check_digest("0" * 64) == "0" * 64
    True
    """
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise SpecError(f"base manifest digest must be 64 lowercase hex characters, got {digest!r}")
    return digest


def _num_chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)  # ceil; an empty file has no chunks


@dataclass(frozen=True)
class ChunkedFile:
    """One file of a base with the hash of each of its chunks.

    Examples
    --------
    >>> import hashlib
    >>> data = b"x" * 5000
    >>> hashes = (hashlib.sha256(data[:4096]).hexdigest(), hashlib.sha256(data[4096:]).hexdigest())
    >>> f = ChunkedFile("w.bin", 5000, hashlib.sha256(data).hexdigest(), 4096, hashes)
    >>> f.num_chunks, f.chunk_span(1)
    (2, (4096, 904))
    """

    path: str = field(metadata={"help": "Relative POSIX path inside the model folder."})
    size: int = field(metadata={"help": "Size in bytes."})
    sha256: str = field(metadata={"help": "sha256 of the whole file (covered by the digest)."})
    chunk_size: int = field(metadata={"help": "Bytes per chunk; the last one may be shorter."})
    chunk_sha256: tuple[str, ...] = field(metadata={"help": "sha256 of each chunk, in order."})

    def __post_init__(self) -> None:
        ManifestFile(self.path, self.size, self.sha256)  # validates path, size and hash
        if not _is_uint(self.chunk_size) or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise IntegrityError(
                f"chunked manifest: chunk size of {self.path!r} must be an integer from "
                f"{MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}, got {self.chunk_size!r}"
            )
        hashes = self.chunk_sha256
        if isinstance(hashes, str | bytes) or not isinstance(hashes, tuple | list):
            raise IntegrityError(
                f"chunked manifest: chunk hashes of {self.path!r} must be a list, got {hashes!r}"
            )
        expected = _num_chunks(self.size, self.chunk_size)
        if len(hashes) != expected:
            raise IntegrityError(
                f"chunked manifest: {self.path!r} ({self.size} bytes in chunks of "
                f"{self.chunk_size}) needs {expected} chunk hashes, got {len(hashes)}"
            )
        for h in hashes:
            if not isinstance(h, str) or not _SHA256.match(h):
                raise IntegrityError(
                    f"chunked manifest: chunk hash of {self.path!r} must be 64 lowercase hex "
                    f"characters, got {h!r}"
                )
        object.__setattr__(self, "chunk_sha256", tuple(hashes))

    @property
    def num_chunks(self) -> int:
        """Number of chunks (0 for an empty file)."""
        return len(self.chunk_sha256)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """Byte offset and length of chunk ``index``."""
        if not _is_uint(index) or index >= self.num_chunks:
            raise SpecError(
                f"chunk index {index!r} is out of range for {self.path!r}, which has "
                f"{self.num_chunks} chunks"
            )
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def verify_chunk(self, index: int, data: bytes) -> None:
        """Check that ``data`` is chunk ``index`` of this file.

        Raises
        ------
        IntegrityError
            The length or the sha256 differs from the manifest's, naming file and chunk.
        """
        _, length = self.chunk_span(index)
        if len(data) != length:
            raise IntegrityError(
                f"chunk {index} of {self.path!r} has {len(data)} bytes; the manifest says {length}"
            )
        got = hashlib.sha256(data).hexdigest()
        if got != self.chunk_sha256[index]:
            raise IntegrityError(
                f"chunk {index} of {self.path!r} has sha256 {got}; the manifest says "
                f"{self.chunk_sha256[index]}"
            )

    def manifest_file(self) -> ManifestFile:
        """The file as the base manifest lists it (no chunk data)."""
        return ManifestFile(self.path, self.size, self.sha256)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {
            "chunk_sha256": list(self.chunk_sha256),
            "chunk_size": self.chunk_size,
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
        }


@dataclass(frozen=True)
class ChunkedManifest:
    """A base manifest whose files carry chunk hashes; :meth:`digest` is the base's identity.

    Examples
    --------
    >>> import hashlib
    >>> h = hashlib.sha256(b"{}").hexdigest()
    >>> m = ChunkedManifest("tiny", (ChunkedFile("config.json", 2, h, 4096, (h,)),))
    >>> m.digest() == m.base.digest() == BaseManifest("tiny", (m.base.files[0],)).digest()
    True
    >>> ChunkedManifest.from_json(m.to_json()) == m
    True
    """

    name: str = field(metadata={"help": "Human-readable model name, for messages only."})
    files: tuple[ChunkedFile, ...] = field(metadata={"help": "The files, sorted by path."})
    format: int = field(
        default=MANIFEST_FORMAT, metadata={"help": "Format of the base manifest (in the digest)."}
    )
    base: BaseManifest = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        files = self.files
        if isinstance(files, str | bytes) or not isinstance(files, tuple | list):
            raise IntegrityError(f"chunked manifest: files must be a list, got {files!r}")
        for f in files:
            if not isinstance(f, ChunkedFile):
                raise IntegrityError(f"chunked manifest: expected ChunkedFile entries, got {f!r}")
        ordered = tuple(sorted(files, key=lambda f: f.path))
        object.__setattr__(self, "files", ordered)
        # The base manifest checks the name, the format, emptiness and duplicate paths.
        base = BaseManifest(self.name, tuple(f.manifest_file() for f in ordered), self.format)
        object.__setattr__(self, "base", base)
        if self.total_chunks > MAX_CHUNKS:
            raise IntegrityError(
                f"chunked manifest {self.name!r}: {self.total_chunks} chunks exceed the limit of "
                f"{MAX_CHUNKS}; use a larger chunk size"
            )
        paths = {f.path for f in ordered}
        for f in ordered:
            parts = f.path.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder in paths:
                    raise IntegrityError(
                        f"chunked manifest {self.name!r}: {folder!r} is listed both as a file "
                        f"and as the folder of {f.path!r}"
                    )

    def digest(self) -> str:
        """The base's identity: :meth:`BaseManifest.digest` of the same files."""
        return self.base.digest()

    @property
    def total_size(self) -> int:
        """Bytes in all files together."""
        return self.base.total_size

    @property
    def total_chunks(self) -> int:
        """Chunks in all files together."""
        return sum(f.num_chunks for f in self.files)

    def file(self, path: str) -> ChunkedFile:
        """The file listed under ``path``.

        Raises
        ------
        SpecError
            No such file in the manifest.
        """
        for f in self.files:
            if f.path == path:
                return f
        raise SpecError(f"base {self.name!r} has no file {path!r}")

    def chunks(self) -> Iterator[tuple[ChunkedFile, int]]:
        """Every ``(file, chunk index)`` in transfer order: files by path, chunks ascending."""
        for f in self.files:
            for index in range(f.num_chunks):
                yield f, index

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, with both format versions."""
        return {
            "chunked_format": CHUNKED_MANIFEST_FORMAT,
            "files": [f.to_dict() for f in self.files],
            "format": self.format,
            "name": self.name,
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, files sorted by path."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any) -> ChunkedManifest:
        """Rebuild a chunked manifest from :meth:`to_dict` output, refusing anything malformed."""
        if not isinstance(data, dict):
            raise IntegrityError(
                f"chunked manifest: expected a JSON object, got {type(data).__name__}"
            )
        fields = {"chunked_format", "files", "format", "name"}
        if set(data) != fields:
            raise IntegrityError(
                f"chunked manifest: expected fields {sorted(fields)}, got {sorted(data)}"
            )
        if data["chunked_format"] != CHUNKED_MANIFEST_FORMAT:
            raise IntegrityError(
                f"chunked manifest: format {data['chunked_format']!r} is not supported by this "
                f"lorafleet (expects {CHUNKED_MANIFEST_FORMAT}); upgrade lorafleet"
            )
        raw = data["files"]
        if not isinstance(raw, list):
            raise IntegrityError("chunked manifest: 'files' must be a list")
        keys = {"chunk_sha256", "chunk_size", "path", "sha256", "size"}
        files = []
        for entry in raw:
            if not isinstance(entry, dict) or set(entry) != keys:
                raise IntegrityError(
                    f"chunked manifest: each file needs exactly {sorted(keys)}, got {entry!r}"
                )
            files.append(
                ChunkedFile(
                    entry["path"],
                    entry["size"],
                    entry["sha256"],
                    entry["chunk_size"],
                    entry["chunk_sha256"],
                )
            )
        return cls(name=data["name"], files=tuple(files), format=data["format"])

    @classmethod
    def from_json(cls, text: str | bytes) -> ChunkedManifest:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"chunked manifest: not valid JSON ({exc})") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class ChunkRange:
    """Consecutive chunks of one file, as a client asks for them.

    Examples
    --------
    >>> ChunkRange("model.safetensors", first=3, count=2).indices()
    range(3, 5)
    """

    path: str = field(metadata={"help": "File path as listed in the manifest."})
    first: int = field(metadata={"help": "Index of the first chunk."})
    count: int = field(metadata={"help": "Number of chunks, at least 1."})

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise SpecError(f"chunk range: path must be a non-empty string, got {self.path!r}")
        if not _is_uint(self.first):
            raise SpecError(
                f"chunk range of {self.path!r}: first must be a non-negative integer, "
                f"got {self.first!r}"
            )
        if not _is_uint(self.count) or self.count < 1:
            raise SpecError(
                f"chunk range of {self.path!r}: count must be a positive integer, got {self.count!r}"
            )

    def indices(self) -> range:
        """The chunk indices, ascending."""
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class FileChunk:
    """One chunk on the wire: where it belongs, its bytes and the hash the manifest lists."""

    path: str = field(metadata={"help": "File path as listed in the manifest."})
    index: int = field(metadata={"help": "Chunk index within the file."})
    offset: int = field(metadata={"help": "Byte offset within the file."})
    data: bytes = field(repr=False, metadata={"help": "The chunk's bytes."})
    sha256: str = field(metadata={"help": "sha256 of the chunk as the manifest lists it."})

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise IntegrityError(f"chunk: path must be a non-empty string, got {self.path!r}")
        if not _is_uint(self.index) or not _is_uint(self.offset):
            raise IntegrityError(
                f"chunk of {self.path!r}: index and offset must be non-negative integers, "
                f"got {self.index!r} and {self.offset!r}"
            )
        if not isinstance(self.data, bytes):
            raise IntegrityError(f"chunk {self.index} of {self.path!r}: data must be bytes")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise IntegrityError(
                f"chunk {self.index} of {self.path!r}: sha256 must be 64 lowercase hex "
                f"characters, got {self.sha256!r}"
            )


class ChunkHasher:
    """Hash a file's bytes as they stream past: the full sha256 and each chunk's.

    Feed it the file's bytes in order, in pieces of any size, then call :meth:`finish`.
    One pass gives both the hash the base manifest needs and the chunk hashes.

    Examples
    --------
    >>> hasher = ChunkHasher(4096)
    >>> hasher.update(b"a" * 5000)
    >>> f = hasher.finish("w.bin")
    >>> f.size, f.num_chunks
    (5000, 2)
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not _is_uint(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise SpecError(
                f"chunk size must be an integer from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} "
                f"bytes, got {chunk_size!r}"
            )
        self.chunk_size = chunk_size
        self._full = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._in_chunk = 0
        self._size = 0
        self._chunks: list[str] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the file."""
        view = memoryview(data).cast("B")
        self._full.update(view)
        self._size += len(view)
        while len(view):
            take = min(len(view), self.chunk_size - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == self.chunk_size:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk = hashlib.sha256()
                self._in_chunk = 0

    def finish(self, path: str) -> ChunkedFile:
        """The file's entry, listed under the relative POSIX ``path``."""
        chunks = list(self._chunks)
        if self._in_chunk:
            chunks.append(self._chunk.hexdigest())
        return ChunkedFile(path, self._size, self._full.hexdigest(), self.chunk_size, tuple(chunks))


def chunk_file(path: Path, rel: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChunkedFile:
    """Hash the file at ``path`` into a :class:`ChunkedFile` listed under ``rel``.

    Raises
    ------
    LorafleetError
        The file cannot be read.
    """
    hasher = ChunkHasher(chunk_size)
    buf = bytearray(min(chunk_size, 1 << 20))
    view = memoryview(buf)
    try:
        with open(path, "rb") as fh:
            while n := fh.readinto(buf):
                hasher.update(view[:n])
    except OSError as exc:
        raise LorafleetError(f"cannot read {path}: {exc.strerror or exc}") from None
    return hasher.finish(rel)


def chunk_manifest(
    root: Path, manifest: BaseManifest, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> ChunkedManifest:
    """Add chunk hashes to ``manifest`` from the files under ``root``.

    Every file is read once; its full sha256 must still be the manifest's, so the chunk
    hashes describe exactly the bytes the digest names.

    Raises
    ------
    IntegrityError
        A file's size or sha256 no longer matches ``manifest``.

    Examples
    --------
    >>> import tempfile
    >>> from lorafleet.protocols.manifest import build_manifest
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = (root / "config.json").write_text("{}")
    >>> base = build_manifest(root, "demo")
    >>> chunk_manifest(root, base).digest() == base.digest()
    True
    """
    files = []
    for entry in manifest.files:
        chunked = chunk_file(root / entry.path, entry.path, chunk_size)
        if chunked.manifest_file() != entry:
            raise IntegrityError(
                f"{root / entry.path}: changed since its manifest was built (sha256 "
                f"{chunked.sha256}, manifest {entry.sha256}); rebuild the manifest"
            )
        files.append(chunked)
    return ChunkedManifest(manifest.name, tuple(files), manifest.format)
