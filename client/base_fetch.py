"""Download a base model from the coordinator once, verified chunk by chunk, resumably.

A round names its base by manifest digest. :func:`fetch_base` asks the coordinator's
``BaseService`` for that base's chunked manifest, checks that the manifest's files give
exactly that digest, and downloads the chunks it does not have yet:

* every chunk's sha256 is checked on arrival; a chunk that does not match is refused
  with an :class:`~lorafleet.protocols.errors.IntegrityError` naming file and chunk, and
  its bytes are never written;
* each verified chunk is written to its place in the file and recorded, so an
  interrupted download (dropped connection, killed process) resumes where it stopped;
  recorded chunks are hashed again before they are trusted;
* at the end every file's full sha256 is checked against the manifest (the digest covers
  those, not the chunk hashes), and the finished folder is moved into place in one rename.

Cache layout under :func:`~lorafleet.client.base.cache_root`::

    downloads/<digest>/                 an unfinished download (its .partial state)
        manifest.json                   the chunked manifest being fetched
        chunks.jsonl                    one line per verified chunk
        tree/<name>/...                 the files, filled in as chunks arrive
    fetched/<digest>/                   a finished, verified base
        .lorafleet-fetched.json         its manifest, for the next call's check
        <name>/...                      the model files

The path :func:`fetch_base` returns is what :func:`~lorafleet.client.base.load_base`
takes: the model folder, or the ``.gguf`` file itself when the base is one GGUF file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from lorafleet.client.base import cache_root
from lorafleet.protocols.atomic import fsync_dir
from lorafleet.protocols.chunks import (
    FETCH_BATCH_BYTES,
    MAX_CHUNK_SIZE,
    ChunkedFile,
    ChunkedManifest,
    ChunkRange,
    check_digest,
)
from lorafleet.protocols.errors import IntegrityError, LorafleetError
from lorafleet.protocols.manifest import BaseManifest, build_manifest, verify_manifest
from lorafleet.protocols.serde import (
    chunk_from_proto,
    fetch_request_to_proto,
    manifest_from_proto,
    manifest_request_to_proto,
)
from lorafleet.protocols.transport import read_root_certificate
from lorafleet.protocols.v1 import base_pb2, base_pb2_grpc

__all__ = ["FETCHED_INFO_NAME", "fetch_base", "fetched_path"]

logger = logging.getLogger(__name__)

FETCHED_INFO_NAME = ".lorafleet-fetched.json"
"""In a fetched base's folder: the base manifest and where the model files lie."""
_INFO_FORMAT = 1
_MAX_MESSAGE = MAX_CHUNK_SIZE + (1 << 20)  # one chunk, or a manifest, per message
_MIN_RATE = 32 * 1024  # bytes/s below which a stream counts as stalled
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _folder_name(name: str) -> str:
    """A safe single path component for the model folder, from the manifest's label."""
    return _NAME_CHARS.sub("-", name).strip(".-")[:100] or "model"


def _model_path(folder: Path, base: BaseManifest) -> Path:
    """What load_base takes: the one .gguf file of a GGUF base, else the folder."""
    files = base.files
    if len(files) == 1 and "/" not in files[0].path and files[0].path.lower().endswith(".gguf"):
        return folder / files[0].path
    return folder


def fetched_path(digest: str, *, cache_dir: Path | None = None) -> Path | None:
    """The path :func:`fetch_base` would return for ``digest`` if it is cached and intact.

    Uses the stat cache written at download time, so an untouched base is not hashed
    again; ``None`` if the base is not cached or does not verify.
    """
    check_digest(digest)
    final = cache_root(cache_dir) / "fetched" / digest
    try:
        return _cached(final, digest)
    except LorafleetError as exc:
        logger.warning("cached base %s is not usable (%s); it will be fetched again", final, exc)
        return None


def _cached(final: Path, digest: str) -> Path | None:
    """Return the model path of a finished download, or None if there is none."""
    info_path = final / FETCHED_INFO_NAME
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or info.get("format") != _INFO_FORMAT:
            raise IntegrityError(f"{info_path}: unknown format")
        base = BaseManifest.from_dict(info["manifest"])
        folder_name = info["dir"]
    except (OSError, ValueError, KeyError) as exc:
        raise IntegrityError(f"{info_path} is unreadable ({exc})") from None
    if base.digest() != digest or folder_name != _folder_name(str(folder_name)):
        raise IntegrityError(f"{info_path} describes another base")
    folder = final / folder_name
    verify_manifest(folder, base, trust_stat_cache=True)
    return _model_path(folder, base)


def fetch_base(
    address: str,
    digest: str,
    *,
    cache_dir: Path | None = None,
    tls_root_cert: bytes | Path | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download the base with manifest digest ``digest`` from a coordinator, once.

    Parameters
    ----------
    address
        ``host:port`` of the coordinator's ``BaseService``.
    digest
        Manifest digest of the base (the round's or the adapter's ``base_sha256``).
    cache_dir
        Root of lorafleet's caches (default :func:`~lorafleet.client.base.cache_root`).
    tls_root_cert
        PEM certificate (bytes, or a path to a PEM file) that the server's certificate
        must chain to; ``None`` connects in plain text (loopback and private networks only).
    progress
        Show a progress bar over bytes.
    timeout
        Seconds to wait for the server to answer at all; streams get this plus time
        for their bytes at a minimum rate of 32 KiB/s.

    Returns
    -------
    Path
        The verified model folder, or the ``.gguf`` file of a single-GGUF base: pass it
        to ``load_base(path, expected_sha256=digest)``.

    Raises
    ------
    IntegrityError
        The server sent a manifest for another base, a chunk whose sha256 differs from
        its manifest's (the chunk is refused and not written), or files whose full
        sha256 differs; verified chunks are kept, so run again once the server is fixed.
    LorafleetError
        The server cannot be reached, does not hold the base, or the download was
        interrupted (run again to resume); or the cache cannot be written.

    Examples
    --------
    >>> from lorafleet.client.base import load_base
    >>> path = fetch_base("coordinator.example:7070", digest)  # doctest: +SKIP
    >>> base = load_base(path, expected_sha256=digest)  # doctest: +SKIP
    """
    check_digest(digest)
    if not isinstance(address, str) or not address.strip():
        raise LorafleetError(f"base server address must be 'host:port', got {address!r}")
    root = cache_root(cache_dir)
    final = root / "fetched" / digest
    cached = fetched_path(digest, cache_dir=cache_dir)
    if cached is not None:
        logger.debug("base %s… is cached at %s", digest[:12], cached)
        return cached
    downloads = root / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        (root / "fetched").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_error(exc, root) from None
    with _locked(downloads / f"{digest}.lock", digest):
        with contextlib.suppress(LorafleetError):  # already reported as damaged above
            cached = _cached(final, digest)  # another process may have finished meanwhile
        if cached is not None:
            return cached
        if final.exists():  # damaged: set it aside so the fresh copy can take its place
            _discard(final)
        credentials = _channel_credentials(tls_root_cert)
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
        ]
        channel = (
            grpc.insecure_channel(address, options=options)
            if credentials is None
            else grpc.secure_channel(address, credentials, options=options)
        )
        with channel:
            stub = base_pb2_grpc.BaseServiceStub(channel)
            manifest = _get_manifest(stub, address, digest, timeout)
            download = _Download(downloads / digest, manifest, address, stub, timeout)
            try:
                download.run(progress)
            except OSError as exc:
                raise _cache_error(exc, downloads / digest) from None
        return download.install(final)


# --- connecting ---------------------------------------------------------------------------


def _channel_credentials(root_cert: bytes | Path | None) -> grpc.ChannelCredentials | None:
    if root_cert is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=read_root_certificate(root_cert))


def _rpc_parts(exc: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    if isinstance(exc, grpc.Call):
        details = exc.details() or ""
        return exc.code(), details.strip().splitlines()[0][:300] if details.strip() else ""
    return None, str(exc)[:300]


def _get_manifest(
    stub: base_pb2_grpc.BaseServiceStub, address: str, digest: str, timeout: float
) -> ChunkedManifest:
    """Ask for the manifest; check it is the base asked for."""
    try:
        msg = stub.GetManifest(manifest_request_to_proto(digest), timeout=timeout)
    except grpc.RpcError as exc:
        code, details = _rpc_parts(exc)
        if code == grpc.StatusCode.NOT_FOUND:
            raise LorafleetError(
                f"the base server at {address} has no base with manifest sha256 {digest}; "
                "publish it there, or check the base hash the round names"
            ) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise LorafleetError(
                f"cannot reach the base server at {address} ({details or code}); check that "
                "the coordinator is running, the address is right and TLS settings match"
            ) from None
        name = code.name if code is not None else "error"
        raise LorafleetError(
            f"the base server at {address} refused the manifest request ({name}: {details})"
        ) from None
    try:
        manifest = manifest_from_proto(msg)
    except IntegrityError as exc:
        raise IntegrityError(f"the base server at {address} sent a bad manifest: {exc}") from None
    if manifest.digest() != digest:
        raise IntegrityError(
            f"the base server at {address} sent the manifest of base {manifest.digest()} when "
            f"{digest} was asked for; it is not serving the round's base"
        )
    return manifest


# --- the download ---------------------------------------------------------------------------


@dataclass
class _Download:
    """The resumable state of one base's download under ``work``."""

    work: Path
    manifest: ChunkedManifest
    address: str
    stub: base_pb2_grpc.BaseServiceStub
    timeout: float

    @property
    def folder(self) -> Path:
        return self.work / "tree" / _folder_name(self.manifest.name)

    @property
    def log_path(self) -> Path:
        return self.work / "chunks.jsonl"

    def run(self, progress: bool) -> None:
        """Fetch every missing chunk, then check every file's full sha256."""
        self._prepare()
        done = self._load_progress()
        missing = [(f, i) for f, i in self.manifest.chunks() if (f.path, i) not in done]
        have = sum(f.chunk_span(i)[1] for f, i in self.manifest.chunks() if (f.path, i) in done)
        total = self.manifest.total_chunks
        if done:
            logger.info(
                "resuming base %s… from %s: %d of %d chunks already verified",
                self.manifest.digest()[:12],
                self.work,
                len(done),
                total,
            )
        else:
            logger.info(
                "fetching base %s (%s…, %d bytes) from %s",
                self.manifest.name,
                self.manifest.digest()[:12],
                self.manifest.total_size,
                self.address,
            )
        start = time.perf_counter()
        fds: dict[str, int] = {}
        try:
            for f in self.manifest.files:
                fds[f.path] = os.open(self.folder / f.path, os.O_RDWR)
            with (
                open(self.log_path, "a", encoding="utf-8") as log,
                _progress_bar(self.manifest, have, progress) as bar,
            ):
                for batch in _batches(missing):
                    self._fetch_batch(batch, fds, log, bar, len(done), total)
                    done.update((f.path, i) for f, i in batch)
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        self._check_files()
        logger.info(
            "fetched base %s… (%d chunks) in %.1f s",
            self.manifest.digest()[:12],
            len(missing),
            time.perf_counter() - start,
        )

    def _prepare(self) -> None:
        """Start afresh unless the state on disk is for this very manifest; size the files."""
        state = self.work / "manifest.json"
        text = self.manifest.to_json()
        try:
            same = state.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            if self.work.exists():
                logger.info("discarding a partial download for another manifest in %s", self.work)
                shutil.rmtree(self.work)
            self.folder.mkdir(parents=True)
            state.write_text(text, encoding="utf-8")
        for f in self.manifest.files:
            path = self.folder / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:  # creates it; never truncates what is there
                if os.fstat(fh.fileno()).st_size != f.size:
                    fh.truncate(f.size)  # sparse where not yet written

    def _load_progress(self) -> set[tuple[str, int]]:
        """Chunks recorded as verified whose bytes on disk still hash right."""
        try:
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return set()
        done: set[tuple[str, int]] = set()
        by_path = {f.path: f for f in self.manifest.files}
        for line in lines:
            try:
                entry = json.loads(line)
                f = by_path[entry["path"]]
                index = entry["index"]
                offset, length = f.chunk_span(index)
            except (ValueError, KeyError, TypeError, LorafleetError):
                continue  # a torn last line of a killed process, or a stale entry
            with open(self.folder / f.path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
            try:
                f.verify_chunk(index, data)
            except IntegrityError:
                continue
            done.add((f.path, index))
        return done

    def _fetch_batch(
        self,
        batch: list[tuple[ChunkedFile, int]],
        fds: dict[str, int],
        log: IO[str],
        bar: Any,
        done_before: int,
        total: int,
    ) -> None:
        """Fetch, verify and write one batch of chunks, recording each as it lands."""
        ranges = _ranges(batch)
        size = sum(f.chunk_span(i)[1] for f, i in batch)
        deadline = self.timeout + size / _MIN_RATE
        call = self.stub.FetchChunks(
            fetch_request_to_proto(self.manifest.digest(), ranges), timeout=deadline
        )
        received = 0
        try:
            for msg in call:
                if received == len(batch):
                    raise IntegrityError(
                        f"the base server at {self.address} sent more chunks than were asked for"
                    )
                f, index = batch[received]
                chunk = self._verify(msg, f, index, done_before + received)
                os.pwrite(fds[f.path], chunk, f.chunk_span(index)[0])
                log.write(json.dumps({"index": index, "path": f.path}) + "\n")
                log.flush()  # recorded once the bytes are in the file
                received += 1
                bar.update(len(chunk))
        except grpc.RpcError as exc:
            code, details = _rpc_parts(exc)
            name = code.name if code is not None else "error"
            raise LorafleetError(
                f"download of base {self.manifest.digest()[:12]}… from {self.address} was "
                f"interrupted after {done_before + received} of {total} chunks ({name}: "
                f"{details}); run again to resume, the verified chunks are kept in {self.work}"
            ) from None
        finally:
            call.cancel()
        if received < len(batch):
            raise LorafleetError(
                f"the base server at {self.address} ended the download of base "
                f"{self.manifest.digest()[:12]}… after {done_before + received} of {total} "
                f"chunks; run again to resume, the verified chunks are kept in {self.work}"
            )

    def _verify(self, msg: base_pb2.Chunk, f: ChunkedFile, index: int, kept: int) -> bytes:
        """Check one received chunk against the manifest; return its bytes or raise."""
        fix = (
            f"the chunk was refused and not written; {kept} verified chunks are kept in "
            f"{self.work}, run again to retry"
        )
        try:
            chunk = chunk_from_proto(msg)
            if chunk.path != f.path or chunk.index != index:
                raise IntegrityError(
                    f"got chunk {chunk.index} of {chunk.path!r} where chunk {index} of "
                    f"{f.path!r} was asked for"
                )
            offset = f.chunk_span(index)[0]
            if chunk.offset != offset:
                raise IntegrityError(
                    f"chunk {index} of {f.path!r} claims offset {chunk.offset}, not {offset}"
                )
            f.verify_chunk(index, chunk.data)
            if chunk.sha256 != f.chunk_sha256[index]:
                raise IntegrityError(
                    f"chunk {index} of {f.path!r} is labelled sha256 {chunk.sha256}, the "
                    f"manifest says {f.chunk_sha256[index]}"
                )
        except IntegrityError as exc:
            raise IntegrityError(f"from the base server at {self.address}: {exc}; {fix}") from None
        return chunk.data

    def _check_files(self) -> None:
        """Hash every file in full; a file that differs loses its recorded chunks."""
        paths = [f.path for f in self.manifest.files]
        got = build_manifest(self.folder, self.manifest.name, paths, write_stat_cache=True)
        if got.digest() == self.manifest.digest():
            return
        expected = {f.path: f.sha256 for f in self.manifest.files}
        bad = [f.path for f in got.files if f.sha256 != expected[f.path]]
        keep = [
            line
            for line in self.log_path.read_text(encoding="utf-8").splitlines()
            if _log_path(line) not in bad
        ]
        self.log_path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
        raise IntegrityError(
            f"file {bad[0]!r} of base {self.manifest.digest()[:12]}… from {self.address} does "
            "not have the sha256 the manifest lists, although each chunk matched the "
            "server's chunk hashes; the server's chunk hashes are wrong. That file's "
            "chunks were discarded; run again once the server is fixed"
        )

    def install(self, final: Path) -> Path:
        """Move the verified tree into ``final`` in one rename; return the model path."""
        tree = self.work / "tree"
        info = {
            "dir": _folder_name(self.manifest.name),
            "format": _INFO_FORMAT,
            "manifest": self.manifest.base.to_dict(),
        }
        try:
            (tree / FETCHED_INFO_NAME).write_text(
                json.dumps(info, sort_keys=True, separators=(",", ":")), encoding="utf-8"
            )
            os.rename(tree, final)
            fsync_dir(final.parent)
        except OSError as exc:
            if not (exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir()):
                raise _cache_error(exc, final) from None
            logger.debug("another process installed %s first", final)
        shutil.rmtree(self.work, ignore_errors=True)
        path = _cached(final, self.manifest.digest())
        if path is None:  # pragma: no cover - the info file was written just above
            raise LorafleetError(f"{final} vanished right after it was installed; run again")
        return path


def _log_path(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    path = entry.get("path") if isinstance(entry, dict) else None
    return path if isinstance(path, str) else None


def _batches(
    chunks: list[tuple[ChunkedFile, int]],
) -> Iterator[list[tuple[ChunkedFile, int]]]:
    """Split the chunks into requests of at most FETCH_BATCH_BYTES (at least one chunk)."""
    batch: list[tuple[ChunkedFile, int]] = []
    size = 0
    for f, index in chunks:
        length = f.chunk_span(index)[1]
        if batch and size + length > FETCH_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append((f, index))
        size += length
    if batch:
        yield batch


def _ranges(batch: list[tuple[ChunkedFile, int]]) -> list[ChunkRange]:
    """Merge consecutive chunks of the same file into ranges, keeping the order."""
    ranges: list[ChunkRange] = []
    for f, index in batch:
        last = ranges[-1] if ranges else None
        if last is not None and last.path == f.path and last.first + last.count == index:
            ranges[-1] = ChunkRange(f.path, last.first, last.count + 1)
        else:
            ranges.append(ChunkRange(f.path, index, 1))
    return ranges


# --- small helpers --------------------------------------------------------------------------


@contextlib.contextmanager
def _progress_bar(manifest: ChunkedManifest, initial: int, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(
        total=manifest.total_size,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"base {manifest.name}",
        disable=not enabled,
        leave=False,
    )
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def _locked(path: Path, digest: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` so one process at a time downloads a base."""
    with open(path, "a+b") as fh:
        if sys.platform != "win32":
            import fcntl

            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process that is fetching base %s…", digest[:12])
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def _discard(folder: Path) -> None:
    """Move a damaged folder aside, then delete it."""
    trash = folder.with_name(f".trash-{folder.name[:16]}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _cache_error(exc: OSError, where: Path) -> LorafleetError:
    if exc.errno == errno.ENOSPC:
        return LorafleetError(
            f"disk full while writing {where}; free some space and run again (verified "
            "chunks are kept)"
        )
    return LorafleetError(
        f"cannot write the base cache {where}: {exc.strerror or exc}; set LORAFLEET_CACHE to "
        "a writable folder"
    )
