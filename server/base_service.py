"""The gRPC ``BaseService``: serves a :class:`~lorafleet.server.base_store.BaseStore`.

Two calls (see ``protocols/v1/base.proto``): ``GetManifest`` returns a base's chunked
manifest, ``FetchChunks`` streams the chunks a client asks for, in its order. Requests
are validated whole before the first byte is sent, and every failure carries a status
code a client can act on:

===================  =================================================================
NOT_FOUND            no base with that manifest digest in the store
INVALID_ARGUMENT     malformed digest, unknown file, chunk range outside the file
RESOURCE_EXHAUSTED   one request asks for more than ``max_request_bytes``
DATA_LOSS            a stored object is damaged (the chunk is not sent)
===================  =================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc

from lorafleet.protocols.chunks import FETCH_BATCH_BYTES, MAX_CHUNK_SIZE, ChunkedFile, FileChunk
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.serde import (
    chunk_to_proto,
    fetch_request_from_proto,
    manifest_request_from_proto,
    manifest_to_proto,
)
from lorafleet.protocols.v1 import base_pb2, base_pb2_grpc
from lorafleet.server.base_store import BaseNotFoundError, BaseStore

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "BaseServicer", "ServerTLS", "serve_bases"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 * FETCH_BATCH_BYTES
"""256 MiB: the most one FetchChunks call may ask for (clients ask for 64 MiB at a time)."""
_MIN_REQUEST_BYTES = FETCH_BATCH_BYTES + MAX_CHUNK_SIZE  # a client batch always fits


@dataclass(frozen=True)
class ServerTLS:
    """PEM certificate chain and private key the server presents to clients.

    The key is left out of ``repr`` so it never reaches a log.

    Examples
    --------
    >>> tls = ServerTLS(b"-----BEGIN CERTIFICATE-----...", b"-----BEGIN PRIVATE KEY-----...")
    >>> "PRIVATE" in repr(tls)
    False
    """

    certificate_chain: bytes = field(metadata={"help": "PEM certificate chain, leaf first."})
    private_key: bytes = field(repr=False, metadata={"help": "PEM private key of the leaf."})

    def __post_init__(self) -> None:
        for label, value in (
            ("certificate chain", self.certificate_chain),
            ("key", self.private_key),
        ):
            if not isinstance(value, bytes) or b"-----BEGIN " not in value:
                raise SpecError(f"server TLS {label} must be PEM bytes ('-----BEGIN ...')")

    @classmethod
    def from_files(cls, certificate_chain: Path, private_key: Path) -> ServerTLS:
        """Read both from PEM files.

        Raises
        ------
        LorafleetError
            A file cannot be read.
        """
        try:
            return cls(Path(certificate_chain).read_bytes(), Path(private_key).read_bytes())
        except OSError as exc:
            raise LorafleetError(
                f"cannot read TLS file {exc.filename}: {exc.strerror}; pass the PEM certificate "
                "chain and private key"
            ) from None


class BaseServicer(base_pb2_grpc.BaseServiceServicer):
    """Answers ``GetManifest`` and ``FetchChunks`` from a base store.

    Parameters
    ----------
    store
        The published bases.
    max_request_bytes
        The most bytes one ``FetchChunks`` call may ask for; larger requests get
        RESOURCE_EXHAUSTED before anything is read. At least 80 MiB, so a client's
        batch of :data:`~lorafleet.protocols.chunks.FETCH_BATCH_BYTES` always fits.
    """

    def __init__(
        self, store: BaseStore, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    ) -> None:
        if (
            isinstance(max_request_bytes, bool)
            or not isinstance(max_request_bytes, int)
            or max_request_bytes < _MIN_REQUEST_BYTES
        ):
            raise SpecError(
                f"max_request_bytes must be an integer of at least {_MIN_REQUEST_BYTES} "
                f"(a client's batch plus one chunk), got {max_request_bytes!r}"
            )
        self.store = store
        self.max_request_bytes = max_request_bytes

    def GetManifest(
        self, request: base_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> base_pb2.Manifest:
        """The chunked manifest of the base named by ``request.digest``."""
        try:
            digest = manifest_request_from_proto(request)
            manifest = self.store.get_manifest(digest)
        except LorafleetError as exc:
            _abort(context, exc)
        logger.info("manifest of %s… sent to %s", digest[:12], context.peer())
        return manifest_to_proto(manifest)

    def FetchChunks(
        self, request: base_pb2.FetchChunksRequest, context: grpc.ServicerContext
    ) -> Iterator[base_pb2.Chunk]:
        """Stream the requested chunks in request order, after validating the whole request."""
        try:
            digest, plan = self._plan(request)
        except LorafleetError as exc:
            _abort(context, exc)
        logger.debug("sending %d chunks of %s… to %s", len(plan), digest[:12], context.peer())
        for f, index in plan:
            if not context.is_active():  # the client went away; stop reading
                return
            try:
                chunk = self.read_chunk(digest, f.path, index)
            except LorafleetError as exc:
                _abort(context, exc)
            yield chunk_to_proto(chunk)

    def read_chunk(self, digest: str, path: str, index: int) -> FileChunk:
        """Read one chunk from the store (a seam for tests and metrics)."""
        return self.store.read_chunk(digest, path, index)

    def _plan(
        self, request: base_pb2.FetchChunksRequest
    ) -> tuple[str, list[tuple[ChunkedFile, int]]]:
        """Check every range and the total size; list the chunks to send."""
        digest, ranges = fetch_request_from_proto(request)
        manifest = self.store.get_manifest(digest)
        if not ranges:
            raise SpecError("FetchChunks needs at least one chunk range")
        total = 0
        checked: list[tuple[ChunkedFile, range]] = []
        for r in ranges:
            f = manifest.file(r.path)
            if r.first + r.count > f.num_chunks:
                raise SpecError(
                    f"chunks {r.first}..{r.first + r.count - 1} of {r.path!r} are out of range; "
                    f"it has {f.num_chunks} chunks"
                )
            last_offset, last_length = f.chunk_span(r.first + r.count - 1)
            total += last_offset + last_length - r.first * f.chunk_size
            if total > self.max_request_bytes:
                raise _TooLarge(
                    f"request asks for more than {self.max_request_bytes} bytes; ask for fewer "
                    "chunks per call"
                )
            checked.append((f, r.indices()))
        return digest, [(f, i) for f, indices in checked for i in indices]


class _TooLarge(LorafleetError):
    """A request over the servicer's size limit."""


_CODES: tuple[tuple[type[LorafleetError], grpc.StatusCode], ...] = (
    (BaseNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (_TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
)


def _abort(context: grpc.ServicerContext, exc: LorafleetError) -> NoReturn:
    """End the call with the status code that fits ``exc`` and its message."""
    code = next((c for kind, c in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
    if code in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL):
        logger.error("base service: %s", exc)
    else:
        logger.info("base service refused a request from %s: %s", context.peer(), exc)
    context.abort(code, str(exc))


def serve_bases(
    bases: BaseStore | BaseServicer,
    address: str = "127.0.0.1:0",
    *,
    tls: ServerTLS | None = None,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for the ``BaseService`` and return it with its port.

    Parameters
    ----------
    bases
        The store to serve, or a ready servicer (to set its limits).
    address
        ``host:port`` to listen on; port ``0`` picks a free one. Default loopback only.
    tls
        Certificate and key to serve over TLS; ``None`` serves plain text, which is only
        fit for loopback or a network that is private anyway.
    max_workers
        Concurrent calls served.

    Returns
    -------
    tuple[grpc.Server, int]
        The started server (stop it with ``server.stop(grace)``) and the bound port.

    Raises
    ------
    LorafleetError
        The address cannot be bound.

    Examples
    --------
    >>> server, port = serve_bases(BaseStore(Path("bases")))  # doctest: +SKIP
    >>> server.stop(None)  # doctest: +SKIP
    """
    servicer = bases if isinstance(bases, BaseServicer) else BaseServicer(bases)
    # No SO_REUSEPORT: a second server on a port in use must fail, not share its traffic.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=[("grpc.so_reuseport", 0)]
    )
    base_pb2_grpc.add_BaseServiceServicer_to_server(servicer, server)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls.private_key, tls.certificate_chain)])
            port = server.add_secure_port(address, creds)
    except RuntimeError:  # grpc's text only says "Failed to bind"
        port = 0
    if port == 0:
        raise LorafleetError(
            f"cannot listen on {address!r}: the port is in use, the host is not an address of "
            "this machine, or it is not host:port; pass a free host:port, or port 0"
        )
    server.start()
    logger.info(
        "base service listening on %s (port %d, %s)", address, port, "TLS" if tls else "plain text"
    )
    return server, port
