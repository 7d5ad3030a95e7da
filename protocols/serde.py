"""Every conversion between lorafleet's dataclasses and the ``lorafleet.v1`` protobuf messages.

The generated classes stay at the edge: services and clients convert with the functions
here and work with validated, frozen dataclasses everywhere else. A ``*_from_proto``
function refuses a malformed message with one clear error: :class:`~lorafleet.protocols.
errors.IntegrityError` for data a peer sends (manifests, chunks) and
:class:`~lorafleet.protocols.errors.SpecError` for a malformed request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lorafleet.protocols.chunks import (
    ChunkedFile,
    ChunkedManifest,
    ChunkRange,
    FileChunk,
    check_digest,
)
from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.reports import AdapterReport
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.protocols.v1 import backup_pb2, base_pb2

MAX_REPORTS = 100
"""Most adapter reports one ``ReportVersions`` request may carry."""

__all__ = [
    "MAX_REPORTS",
    "chunk_from_proto",
    "chunk_to_proto",
    "fetch_request_from_proto",
    "fetch_request_to_proto",
    "manifest_from_proto",
    "manifest_request_from_proto",
    "manifest_request_to_proto",
    "manifest_to_proto",
    "report_request_from_proto",
    "report_request_to_proto",
]


def manifest_to_proto(manifest: ChunkedManifest) -> base_pb2.Manifest:
    """Encode a chunked manifest, with its digest.

    Examples
    --------
    >>> import hashlib
    >>> h = hashlib.sha256(b"{}").hexdigest()
    >>> m = ChunkedManifest("tiny", (ChunkedFile("config.json", 2, h, 4096, (h,)),))
    >>> manifest_from_proto(manifest_to_proto(m)) == m
    True
    """
    return base_pb2.Manifest(
        digest=manifest.digest(),
        name=manifest.name,
        format=manifest.format,
        files=[
            base_pb2.ManifestFile(
                path=f.path,
                size=f.size,
                sha256=f.sha256,
                chunk_size=f.chunk_size,
                chunk_sha256=list(f.chunk_sha256),
            )
            for f in manifest.files
        ],
    )


def manifest_from_proto(msg: base_pb2.Manifest) -> ChunkedManifest:
    """Decode and validate a chunked manifest; its stated digest must be its real one.

    Raises
    ------
    IntegrityError
        The manifest is malformed, or its ``digest`` field is not the digest of its files.
    """
    manifest = ChunkedManifest(
        name=msg.name,
        files=tuple(
            ChunkedFile(f.path, f.size, f.sha256, f.chunk_size, tuple(f.chunk_sha256))
            for f in msg.files
        ),
        format=msg.format,
    )
    if manifest.digest() != msg.digest:
        raise IntegrityError(
            f"manifest {manifest.name!r} states digest {msg.digest!r} but its files give "
            f"{manifest.digest()}"
        )
    return manifest


def manifest_request_to_proto(digest: str) -> base_pb2.GetManifestRequest:
    """Ask for the manifest of the base with manifest digest ``digest``."""
    return base_pb2.GetManifestRequest(digest=check_digest(digest))


def manifest_request_from_proto(msg: base_pb2.GetManifestRequest) -> str:
    """The digest asked for; raises :class:`SpecError` if it is not one."""
    return check_digest(msg.digest)


def fetch_request_to_proto(
    digest: str, ranges: tuple[ChunkRange, ...] | list[ChunkRange]
) -> base_pb2.FetchChunksRequest:
    """Ask for ``ranges`` of the base with manifest digest ``digest``.

    Examples
    --------
    >>> msg = fetch_request_to_proto("0" * 64, [ChunkRange("w.bin", 0, 3)])
    >>> fetch_request_from_proto(msg)[1]
    (ChunkRange(path='w.bin', first=0, count=3),)
    """
    return base_pb2.FetchChunksRequest(
        digest=check_digest(digest),
        ranges=[base_pb2.ChunkRange(path=r.path, first=r.first, count=r.count) for r in ranges],
    )


def fetch_request_from_proto(
    msg: base_pb2.FetchChunksRequest,
) -> tuple[str, tuple[ChunkRange, ...]]:
    """The digest and the ranges asked for; raises :class:`SpecError` if malformed."""
    digest = check_digest(msg.digest)
    return digest, tuple(ChunkRange(r.path, r.first, r.count) for r in msg.ranges)


def chunk_to_proto(chunk: FileChunk) -> base_pb2.Chunk:
    """Encode one chunk."""
    return base_pb2.Chunk(
        path=chunk.path,
        index=chunk.index,
        offset=chunk.offset,
        data=chunk.data,
        sha256=chunk.sha256,
    )


def chunk_from_proto(msg: base_pb2.Chunk) -> FileChunk:
    """Decode one chunk (not yet verified against a manifest; see ``ChunkedFile.verify_chunk``).

    Raises
    ------
    IntegrityError
        The message is malformed.
    """
    return FileChunk(
        path=msg.path, index=msg.index, offset=msg.offset, data=msg.data, sha256=msg.sha256
    )


# --- adapter reports (BackupService.ReportVersions) -------------------------------------


def _report_value(value: int | float | str) -> backup_pb2.ReportValue:
    if isinstance(value, bool):  # never in a report; refused rather than sent as 0/1
        raise SpecError(f"adapter report: a field is a bool ({value!r})")
    if isinstance(value, int):
        return backup_pb2.ReportValue(int_value=value)
    if isinstance(value, float):
        return backup_pb2.ReportValue(float_value=value)
    return backup_pb2.ReportValue(text_value=value)


def report_request_to_proto(
    spec: AdapterSpec, reports: Sequence[AdapterReport]
) -> backup_pb2.ReportVersionsRequest:
    """A ``ReportVersions`` request: the adapter spec and each report's flat fields.

    The fields are :meth:`AdapterReport.to_config`, the names and values a Flower round
    reply carries, so both channels share one format and one parser.
    """
    if not 1 <= len(reports) <= MAX_REPORTS:
        raise SpecError(f"report 1..{MAX_REPORTS} adapter reports at a time, got {len(reports)}")
    return backup_pb2.ReportVersionsRequest(
        spec_json=json.dumps(spec.to_dict(), sort_keys=True),
        reports=[
            backup_pb2.AdapterReportFields(
                fields={k: _report_value(v) for k, v in r.to_config().items()}
            )
            for r in reports
        ],
    )


def report_request_from_proto(
    msg: backup_pb2.ReportVersionsRequest,
) -> tuple[AdapterSpec, list[AdapterReport]]:
    """The spec and the reports of a ``ReportVersions`` request; SpecError if malformed."""
    if not 1 <= len(msg.reports) <= MAX_REPORTS:
        raise SpecError(f"ReportVersions carries 1..{MAX_REPORTS} reports, got {len(msg.reports)}")
    try:
        spec = AdapterSpec.from_dict(json.loads(msg.spec_json))
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise SpecError(f"spec_json is not an adapter spec ({str(exc)[:200]})") from None
    reports = []
    for item in msg.reports:
        config: dict[str, int | float | str] = {}
        for name, value in item.fields.items():
            kind = value.WhichOneof("value")
            if kind is None:
                raise SpecError(f"adapter report: field {name[:40]!r} has no value")
            config[name] = getattr(value, kind)
        reports.append(AdapterReport.from_config(config))
    return spec, reports
