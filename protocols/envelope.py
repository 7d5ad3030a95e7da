"""Encrypted blobs: a versioned, documented envelope around AES-256-GCM.

A device seals each adapter snapshot before it leaves: the coordinator stores the bytes
and a few public header fields, and cannot read, swap, replay or roll back what it
stores. The byte-by-byte format, with a decryptor that needs only the ``cryptography``
package, is in ``docs/envelope.md``; this docstring is the summary.

Format, version 1 (integers little-endian)::

    offset  size  field
    0       4     magic            b"LFEN"
    4       1     format version   1
    5       4     key id           uint32, master-key generation (>= 1)
    9       16    blob id          random, also the HKDF salt of the data key
    25      8     body length      uint64, = 12 + len(plaintext) + 16
    33      12    nonce            random
    45      n     ciphertext       AES-256-GCM, n = len(plaintext)
    45+n    16    tag

- data key = HKDF-SHA256(master key, salt = blob id, info = ``DATA_KEY_INFO``), so each
  blob has its own key and a (random) nonce is never used twice under one key;
- associated data = bytes 0..33 of the header || the canonical encoding of the
  :class:`BlobContext` (user id, adapter id, version, base sha256): see
  :func:`encode_context`.

The context is not stored in the blob. The caller says which user, adapter, version
and base it expects, and the tag only checks if that is what was sealed: a blob moved to
another user, replayed as another version or paired with another base fails with
:class:`~lorafleet.protocols.errors.DecryptionError`. A malformed or truncated blob
fails earlier, in :func:`parse_header`, with
:class:`~lorafleet.protocols.errors.IntegrityError`.
"""

from __future__ import annotations

import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from lorafleet.protocols import crypto
from lorafleet.protocols.errors import DecryptionError, IntegrityError, SpecError

MAGIC = b"LFEN"
"""First four bytes of every envelope."""
FORMAT_VERSION = 1
"""The envelope layout this module writes and the only one it reads."""
DATA_KEY_INFO = b"lorafleet/envelope/v1/data-key"
"""HKDF ``info`` of the per-blob data key."""

_HEADER = struct.Struct("<4sBI16sQ")  # magic, format version, key id, blob id, body length
HEADER_BYTES = _HEADER.size
"""Length of the fixed header that is authenticated as associated data (33)."""
PREFIX_BYTES = HEADER_BYTES + crypto.NONCE_BYTES
"""Header plus nonce: what :func:`parse_header` needs at least (45)."""
OVERHEAD_BYTES = HEADER_BYTES + crypto.SEAL_OVERHEAD
"""Envelope size minus plaintext size (61)."""
MAX_PLAINTEXT_BYTES = crypto.MAX_PLAINTEXT_BYTES
"""Largest plaintext one envelope holds (just under 2 GiB)."""
MAX_KEY_ID = 2**32 - 1

_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_CONTEXT_FIELD = struct.Struct("<I")


def new_blob_id() -> str:
    """A fresh random blob id: 32 lowercase hex characters (128 bits)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class BlobContext:
    """What a blob is, as the caller expects it: bound into the tag, never stored.

    Sealing and opening must be given equal contexts. The server (or a thief) that hands
    a device the blob of another user, an older version under a newer version number, or
    an adapter for another base model cannot make it open.

    Examples
    --------
    >>> ctx = BlobContext("user-7", "notes", 3, "ab" * 32, new_blob_id())
    >>> ctx.version
    3
    """

    user_id: str
    adapter_id: str
    version: int
    base_sha256: str
    blob_id: str

    def __post_init__(self) -> None:
        for name in ("user_id", "adapter_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise SpecError(f"blob context: {name} must be a non-empty string, got {value!r}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise SpecError(
                    f"blob context: {name} {value!r} is not valid Unicode text"
                ) from None
        if (
            isinstance(self.version, bool)
            or not isinstance(self.version, int)
            or not 0 <= self.version < 2**63
        ):
            raise SpecError(
                f"blob context: version must be an integer in 0..2**63-1, got {self.version!r}"
            )
        if not isinstance(self.base_sha256, str) or not _HEX64.match(self.base_sha256):
            raise SpecError(
                "blob context: base_sha256 must be 64 lowercase hex characters, "
                f"got {self.base_sha256!r}"
            )
        if not isinstance(self.blob_id, str) or not _HEX32.match(self.blob_id):
            raise SpecError(
                "blob context: blob_id must be 32 lowercase hex characters "
                f"(see new_blob_id()), got {self.blob_id!r}"
            )


def encode_context(context: BlobContext) -> bytes:
    """Canonical bytes of a context's user, adapter, version and base, for the tag.

    ``u32 len || user id (UTF-8) || u32 len || adapter id (UTF-8) || u64 version ||
    base sha256 (32 raw bytes)``, integers little-endian. Length prefixes make the
    encoding unambiguous: no two contexts share one. The blob id is bound separately,
    through the header and the data key.
    """
    user = context.user_id.encode("utf-8")
    adapter = context.adapter_id.encode("utf-8")
    return b"".join(
        [
            _CONTEXT_FIELD.pack(len(user)),
            user,
            _CONTEXT_FIELD.pack(len(adapter)),
            adapter,
            context.version.to_bytes(8, "little"),
            bytes.fromhex(context.base_sha256),
        ]
    )


@dataclass(frozen=True)
class EnvelopeHeader:
    """The public, unauthenticated fields at the front of a blob.

    A store can index blobs by them without any key. They are only trustworthy once
    :func:`open_blob` has checked the tag (the header is part of the associated data).
    """

    format_version: int
    key_id: int
    blob_id: str
    nonce: bytes
    body_length: int

    @property
    def plaintext_length(self) -> int:
        """Length of the sealed plaintext."""
        return self.body_length - crypto.SEAL_OVERHEAD

    @property
    def total_length(self) -> int:
        """Length of the whole blob."""
        return HEADER_BYTES + self.body_length


def parse_header(blob: bytes | bytearray | memoryview) -> EnvelopeHeader:
    """Read and check an envelope's header without any key.

    Raises :class:`IntegrityError` with one line saying what is wrong: not an envelope,
    a format newer than this lorafleet, a damaged field, truncated, or trailing bytes.
    """
    data = bytes(blob)
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise IntegrityError(
            f"not a lorafleet envelope: it starts with {data[:4]!r}, expected {MAGIC!r}"
        )
    if len(data) < PREFIX_BYTES:
        raise IntegrityError(
            f"envelope is truncated: {len(data)} bytes, shorter than its "
            f"{PREFIX_BYTES}-byte header; fetch it again"
        )
    _, version, key_id, blob_id, body_length = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        if version > FORMAT_VERSION:
            raise IntegrityError(
                f"envelope format version {version} is newer than this lorafleet reads "
                f"({FORMAT_VERSION}); upgrade lorafleet"
            )
        raise IntegrityError(f"envelope format version {version} is invalid: the blob is damaged")
    if key_id == 0:
        raise IntegrityError("envelope key id 0 is invalid (generations start at 1): damaged")
    if body_length < crypto.SEAL_OVERHEAD:
        raise IntegrityError(
            f"envelope body length {body_length} is shorter than the nonce and tag: damaged"
        )
    total = HEADER_BYTES + body_length
    if len(data) < total:
        raise IntegrityError(
            f"envelope is truncated: {len(data)} bytes of the {total} its header announces; "
            "fetch it again"
        )
    if len(data) > total:
        raise IntegrityError(
            f"envelope has {len(data) - total} bytes after the {total} its header announces: "
            "damaged or two blobs joined"
        )
    return EnvelopeHeader(
        format_version=version,
        key_id=key_id,
        blob_id=blob_id.hex(),
        nonce=data[HEADER_BYTES:PREFIX_BYTES],
        body_length=body_length,
    )


def _data_key(master_key: bytes, blob_id: str) -> bytes:
    return crypto.derive_key(master_key, info=DATA_KEY_INFO, salt=bytes.fromhex(blob_id))


def seal_blob(master_key: bytes, context: BlobContext, plaintext: bytes, *, key_id: int) -> bytes:
    """Encrypt ``plaintext`` for exactly ``context``; returns the whole envelope.

    Parameters
    ----------
    master_key
        The user's current 32-byte master key (``UnlockedKeys.current_key``).
    context
        Who and what the blob is; :func:`open_blob` must be given an equal one.
    plaintext
        The bytes to protect (for example :func:`~lorafleet.protocols.encode_tensors`
        output).
    key_id
        Generation of ``master_key`` (``UnlockedKeys.current_key_id``), stored in the
        header so that after a rotation the right older key is picked.

    Examples
    --------
    >>> key = crypto.random_key()
    >>> ctx = BlobContext("u", "a", 1, "0" * 64, new_blob_id())
    >>> open_blob(key, ctx, seal_blob(key, ctx, b"B matrices", key_id=1))
    b'B matrices'
    """
    if not isinstance(context, BlobContext):
        raise SpecError(f"context must be a BlobContext, got {type(context).__name__}")
    if isinstance(key_id, bool) or not isinstance(key_id, int) or not 1 <= key_id <= MAX_KEY_ID:
        raise SpecError(f"key_id must be an integer in 1..{MAX_KEY_ID}, got {key_id!r}")
    if not isinstance(plaintext, bytes):
        raise SpecError(f"plaintext must be bytes, got {type(plaintext).__name__}")
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise SpecError(
            f"plaintext is {len(plaintext)} bytes, more than one envelope holds "
            f"({MAX_PLAINTEXT_BYTES}); split it"
        )
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        key_id,
        bytes.fromhex(context.blob_id),
        len(plaintext) + crypto.SEAL_OVERHEAD,
    )
    body = crypto.seal(
        _data_key(master_key, context.blob_id), plaintext, header + encode_context(context)
    )
    return header + body


def open_blob(
    keys: bytes | Mapping[int, bytes],
    context: BlobContext,
    blob: bytes | bytearray | memoryview,
) -> bytes:
    """Decrypt an envelope sealed for ``context``; anything else raises, nothing is returned.

    Parameters
    ----------
    keys
        One 32-byte master key, or a mapping from key id (generation) to master key such
        as ``UnlockedKeys``; the header's key id picks the key from a mapping.
    context
        The user, adapter, version, base and blob id the caller expects.
    blob
        The envelope bytes.

    Raises
    ------
    IntegrityError
        The bytes are not a well-formed envelope (see :func:`parse_header`).
    DecryptionError
        Another blob id than expected, a key generation the keys lack, or the tag does
        not check: wrong key, bytes altered, or sealed for another context.
    """
    if not isinstance(context, BlobContext):
        raise SpecError(f"context must be a BlobContext, got {type(context).__name__}")
    data = bytes(blob)
    header = parse_header(data)
    if header.blob_id != context.blob_id:
        raise DecryptionError(
            f"envelope holds blob {header.blob_id}, not the expected {context.blob_id}: "
            "the store returned another blob"
        )
    if isinstance(keys, bytes):
        master_key = keys
    elif not isinstance(keys, Mapping):
        raise SpecError(
            f"keys must be a master key (bytes) or a mapping of key id to master key, "
            f"got {type(keys).__name__}"
        )
    else:
        found = keys.get(header.key_id)
        if found is None:
            raise DecryptionError(
                f"blob {header.blob_id} was sealed with master key generation "
                f"{header.key_id}, which the given keys (generations {sorted(keys)}) lack; "
                "unlock the key file that sealed it, or restore it with a recovery key"
            )
        master_key = found
    aad = data[:HEADER_BYTES] + encode_context(context)
    try:
        return crypto.open_sealed(_data_key(master_key, header.blob_id), data[HEADER_BYTES:], aad)
    except DecryptionError:
        raise DecryptionError(
            f"blob {header.blob_id} does not open as user {context.user_id!r}, adapter "
            f"{context.adapter_id!r}, version {context.version}, base "
            f"{context.base_sha256[:12]}: it was sealed for another user, adapter, version "
            "or base, with another key, or altered since"
        ) from None
