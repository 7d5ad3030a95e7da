"""Signed requests: how an enrolled device proves, per call, that it is itself.

A device enrolled for backup holds an Ed25519 key pair (the private half never leaves
it; the coordinator's registry holds the public half). Every backup call carries four
gRPC metadata entries:

==================  ================================================================
``lf-device-key``   the device's public key, 64 lowercase hex characters
``lf-timestamp``    when the request was signed, milliseconds since the Unix epoch
``lf-nonce``        16 random bytes, 32 lowercase hex characters, never reused
``lf-signature``    Ed25519 signature of :func:`signing_payload`, 128 hex characters
==================  ================================================================

The signed payload binds the gRPC method, the sha256 of the request message (its
deterministic protobuf serialization; for a client stream, of the first message), the
timestamp, the nonce and the public key, each in a fixed-length field, so no two
requests share a payload. The server accepts a timestamp within a window (five minutes
either side by default) and remembers nonces for longer than that window, so a captured
request can be neither replayed nor moved to another method or another message.

This module is shared by the device and the coordinator; it holds no policy (window,
cache, revocation), only the encoding.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from lorafleet.protocols import crypto
from lorafleet.protocols.errors import LorafleetError

__all__ = [
    "KEY_HEADER",
    "NONCE_BYTES",
    "NONCE_HEADER",
    "SIGNATURE_HEADER",
    "SIGNING_DOMAIN",
    "TIMESTAMP_HEADER",
    "RequestAuthError",
    "SignedRequest",
    "message_digest",
    "parse_metadata",
    "sign_request",
    "signing_payload",
]

KEY_HEADER = "lf-device-key"
TIMESTAMP_HEADER = "lf-timestamp"
NONCE_HEADER = "lf-nonce"
SIGNATURE_HEADER = "lf-signature"
SIGNING_DOMAIN = b"lorafleet/v1/signed-request\x00"
"""First bytes of every signed payload, so the key signs nothing else by accident."""
NONCE_BYTES = 16
_MAX_METHOD = 256
_HEX = re.compile(r"^[0-9a-f]*\Z")
_DIGITS = re.compile(r"^[0-9]{1,19}\Z")


class RequestAuthError(LorafleetError):
    """A request's signature metadata is missing or malformed (the server: UNAUTHENTICATED)."""


def message_digest(message: Message) -> bytes:
    """sha256 of a protobuf message's deterministic serialization (32 bytes)."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


def signing_payload(
    method: str, request_sha256: bytes, timestamp_ms: int, nonce: bytes, public_key: bytes
) -> bytes:
    """The bytes a device signs for one request.

    ``SIGNING_DOMAIN || u16 len(method) || method (UTF-8) || request sha256 (32) ||
    u64 timestamp_ms || nonce (16) || public key (32)``, integers little-endian.

    Examples
    --------
    >>> len(signing_payload("/m", bytes(32), 1, bytes(16), bytes(32)))
    120
    """
    encoded = method.encode("utf-8")
    if not 1 <= len(encoded) <= _MAX_METHOD:
        raise RequestAuthError(f"method name must be 1..{_MAX_METHOD} bytes, got {method!r:.80}")
    if len(request_sha256) != 32 or len(nonce) != NONCE_BYTES or len(public_key) != 32:
        raise RequestAuthError("request digest, nonce or public key has the wrong length")
    if not 0 <= timestamp_ms < 2**63:
        raise RequestAuthError(f"timestamp {timestamp_ms} is out of range")
    return b"".join(
        [
            SIGNING_DOMAIN,
            struct.pack("<H", len(encoded)),
            encoded,
            request_sha256,
            struct.pack("<Q", timestamp_ms),
            nonce,
            public_key,
        ]
    )


def sign_request(
    private_key: bytes,
    method: str,
    message: Message,
    *,
    public_key: bytes | None = None,
    timestamp_ms: int | None = None,
    nonce: bytes | None = None,
) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata that signs ``message`` for ``method`` with a device key.

    Parameters
    ----------
    private_key
        The device's 32-byte Ed25519 private key.
    method
        Full gRPC method name, e.g. ``"/lorafleet.v1.BackupService/ListBlobs"``.
    message
        The request (the first message of a client stream).
    public_key, timestamp_ms, nonce
        Computed when not given (now, a fresh random nonce); tests pin them.
    """
    public = public_key if public_key is not None else crypto.signing_public_key(private_key)
    ts = timestamp_ms if timestamp_ms is not None else time.time_ns() // 1_000_000
    once = nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES)
    payload = signing_payload(method, message_digest(message), ts, once, public)
    signature = crypto.sign(private_key, payload)
    return (
        (KEY_HEADER, public.hex()),
        (TIMESTAMP_HEADER, str(ts)),
        (NONCE_HEADER, once.hex()),
        (SIGNATURE_HEADER, signature.hex()),
    )


@dataclass(frozen=True)
class SignedRequest:
    """The signature metadata of one request, parsed but not yet verified."""

    public_key: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes = field(repr=False)

    def verify(self, method: str, message: Message) -> bool:
        """Whether the signature is the key's over ``method`` and ``message``."""
        try:
            payload = signing_payload(
                method, message_digest(message), self.timestamp_ms, self.nonce, self.public_key
            )
        except RequestAuthError:
            return False
        return crypto.verify_signature(self.public_key, payload, self.signature)


def _hex_field(values: dict[str, str], name: str, size: int) -> bytes:
    value = values.get(name)
    if value is None:
        raise RequestAuthError(f"request is not signed: metadata {name!r} is missing")
    if len(value) != 2 * size or not _HEX.match(value):
        raise RequestAuthError(f"metadata {name!r} must be {2 * size} lowercase hex characters")
    return bytes.fromhex(value)


def parse_metadata(metadata: Iterable[tuple[object, object]] | None) -> SignedRequest:
    """Read the four signature entries from gRPC invocation metadata.

    Raises :class:`RequestAuthError` (one line, nothing echoed at length) when an
    entry is missing, repeated or malformed; entries it does not know are ignored.
    """
    values: dict[str, str] = {}
    wanted = (KEY_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
    for item in metadata or ():
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if not isinstance(key, str) or key.lower() not in wanted:
            continue
        if not isinstance(value, str):
            raise RequestAuthError(f"metadata {key!r} must be text")
        if key.lower() in values:
            raise RequestAuthError(f"metadata {key!r} appears more than once")
        values[key.lower()] = value
    public_key = _hex_field(values, KEY_HEADER, 32)
    nonce = _hex_field(values, NONCE_HEADER, NONCE_BYTES)
    signature = _hex_field(values, SIGNATURE_HEADER, crypto.SIGNATURE_BYTES)
    ts = values.get(TIMESTAMP_HEADER)
    if ts is None:
        raise RequestAuthError(f"request is not signed: metadata {TIMESTAMP_HEADER!r} is missing")
    if not _DIGITS.match(ts) or int(ts) >= 2**63:
        raise RequestAuthError(f"metadata {TIMESTAMP_HEADER!r} must be milliseconds since 1970")
    return SignedRequest(public_key, int(ts), nonce, signature)
