"""Crypto recipes: the only module in lorafleet that touches ``cryptography.hazmat``.

Every other module seals, opens, derives, wraps and unwraps through the handful of
typed functions here, so the choice of primitives, their parameters and their failure
modes live in one page that can be reviewed on its own (the same split as
``cryptography``'s recipes and hazmat layers). Keys cross this boundary as plain
``bytes``; no hazmat object ever leaves the module.

Primitives, all from the ``cryptography`` package:

- **AES-256-GCM** for everything that is encrypted (blobs and wrapped keys), with a
  96-bit random nonce prepended to the ciphertext: ``nonce (12) || ciphertext || tag
  (16)``. A wrong key, a flipped bit or different associated data fails the tag check
  and raises :class:`~lorafleet.protocols.errors.DecryptionError`, never garbage.
- **HKDF-SHA256** to derive one key from another (a per-blob data key from the master
  key, a key-encryption key from an X25519 shared secret, a MAC key from the master
  keys).
- **HMAC-SHA256** to bind what is stored in the clear next to wrapped keys (a key
  file's list of recovery keys) to the keys themselves: :func:`mac_tag`.
- **Argon2id** (RFC 9106) to turn a passphrase into a key where the OpenSSL build has it
  (OpenSSL >= 3.2, cryptography >= 44), else **scrypt**; the choice and its parameters
  travel with the key file, so a file written with either opens anywhere that has it.
- **X25519** for recovery keys: a key is wrapped for a recipient's public key with an
  ephemeral key pair, HKDF and AES-256-GCM (an ECIES construction).
- **Ed25519** (RFC 8032) for device signatures: a device enrolled for backup signs each
  request with its private key; the coordinator verifies with the registered public key.

Nonces. Every key this project encrypts under is either fresh (one data key per blob,
one ephemeral key per recovery wrap) or used a handful of times (a passphrase key wraps
one key per master-key generation). Random 96-bit nonces collide with probability about
``n**2 / 2**97`` after ``n`` encryptions under one key: even the 2**32 limit NIST sets
for random GCM nonces is out of reach here, so random nonces are safe and need no
counter state that a restored backup or a second device could roll back.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from lorafleet.protocols.errors import DecryptionError, LorafleetError, SpecError

KEY_BYTES = 32
"""Length of every symmetric key: AES-256, HKDF-SHA256 output, X25519 keys."""
NONCE_BYTES = 12
"""AES-GCM nonce length (96 bits, the size GCM is specified for)."""
TAG_BYTES = 16
"""AES-GCM authentication tag length (128 bits, never truncated)."""
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES
"""Bytes :func:`seal` adds to a plaintext."""
WRAPPED_KEY_BYTES = KEY_BYTES + SEAL_OVERHEAD
"""Length of :func:`wrap_key` output: nonce, encrypted key, tag (60 bytes)."""
RECIPIENT_WRAPPED_KEY_BYTES = KEY_BYTES + WRAPPED_KEY_BYTES
"""Length of :func:`wrap_for_recipient` output: ephemeral public key, then a wrap (92)."""
SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature."""
MAX_PLAINTEXT_BYTES = 2**31 - 1 - TAG_BYTES
"""Largest plaintext :func:`seal` takes: ciphertext plus tag must fit OpenSSL's 2**31 - 1."""

_RECOVERY_INFO = b"lorafleet/v1/recovery-kek"
_SALT_MIN, _SALT_MAX = 16, 64
_MAX_KDF_MEMORY_BYTES = 4 * 2**30  # a crafted key file must not make a device allocate more
# OpenSSL's multi-lane Argon2id (cryptography 50 / OpenSSL 4.0 here) deadlocks when two
# derivations with lanes > 1 run at once in one process. Single-lane derivations do not
# share that state and run in parallel; multi-lane ones (hashes and key files made with
# the old default of 4 lanes) take this lock, one at a time.
_MULTI_LANE_ARGON2 = threading.Lock()


# --- symmetric recipes -----------------------------------------------------------


def random_key() -> bytes:
    """A fresh 256-bit key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _check_key(key: bytes, what: str = "key") -> None:
    # The length is safe to report; the bytes never are.
    if not isinstance(key, bytes):
        raise SpecError(f"{what} must be bytes, got {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise SpecError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")


def derive_key(master: bytes, *, info: bytes, salt: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869): a 32-byte key bound to ``info`` and ``salt``.

    Parameters
    ----------
    master
        The input key material, 32 uniformly random bytes (a master key).
    info
        What the derived key is for (a domain string); different ``info`` gives
        independent keys from the same master.
    salt
        A non-secret value that makes each derived key distinct (a blob id).

    Examples
    --------
    >>> master = bytes(32)
    >>> derive_key(master, info=b"x", salt=b"1") != derive_key(master, info=b"x", salt=b"2")
    True
    """
    _check_key(master, "master key")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info)
    return hkdf.derive(master)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encrypt: ``nonce (12) || ciphertext || tag (16)``.

    The nonce is 96 random bits, drawn here for every call (see the module docstring for
    why random nonces are safe under the keys this project uses). ``aad`` is
    authenticated but not encrypted: :func:`open_sealed` fails unless it is given the
    same bytes.

    Examples
    --------
    >>> key = random_key()
    >>> open_sealed(key, seal(key, b"hello", b"ctx"), b"ctx")
    b'hello'
    """
    _check_key(key)
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise SpecError(
            f"plaintext is {len(plaintext)} bytes, more than the {MAX_PLAINTEXT_BYTES} "
            "AES-GCM takes in one piece; split it"
        )
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; raises :class:`DecryptionError` unless all is intact.

    A wrong key, a changed byte anywhere in ``sealed``, a truncation or different
    ``aad`` all fail the same authentication check; nothing is returned in that case.
    """
    _check_key(key)
    if len(sealed) < SEAL_OVERHEAD:
        raise DecryptionError(
            f"sealed data is {len(sealed)} bytes, shorter than the {SEAL_OVERHEAD}-byte "
            "nonce and tag: it was truncated"
        )
    if len(sealed) - NONCE_BYTES > MAX_PLAINTEXT_BYTES + TAG_BYTES:
        raise DecryptionError(f"sealed data is {len(sealed)} bytes, more than AES-GCM allows")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionError(
            "decryption failed: wrong key, or the data or its associated context changed"
        ) from None


def wrap_key(kek: bytes, key: bytes, aad: bytes) -> bytes:
    """Encrypt a 32-byte ``key`` under a key-encryption key: 60 bytes out.

    This is :func:`seal` restricted to keys, not AES-KW (RFC 3394/5649). AES-GCM takes
    associated data, so a wrapped key is bound to what it is for (its key file and
    generation) and cannot be moved to another slot unnoticed, which AES-KW cannot
    express; it also keeps one primitive (and one line of third-party code) for
    everything. The cost, a random nonce per wrap, is harmless: a KEK wraps a handful
    of keys in its life.
    """
    _check_key(kek, "key-encryption key")
    _check_key(key)
    return seal(kek, key, aad)


def unwrap_key(kek: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`wrap_key`; :class:`DecryptionError` on a wrong KEK or tampering."""
    if len(wrapped) != WRAPPED_KEY_BYTES:
        raise DecryptionError(
            f"wrapped key is {len(wrapped)} bytes, expected {WRAPPED_KEY_BYTES}: it is damaged"
        )
    return open_sealed(kek, wrapped, aad)


MAC_TAG_BYTES = 32
"""Length of a :func:`mac_tag` (HMAC-SHA256, never truncated)."""


def _mac_key(keys: Sequence[bytes], info: bytes, salt: bytes) -> bytes:
    if not keys:
        raise SpecError("a MAC tag needs at least one key")
    for key in keys:
        _check_key(key)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info)
    return hkdf.derive(b"".join(keys))


def mac_tag(keys: Sequence[bytes], message: bytes, *, info: bytes, salt: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` under a key derived from every one of ``keys``.

    The MAC key is ``HKDF-SHA256(ikm = keys[0] || keys[1] || ..., salt, info)``, so
    only a holder of all the keys (in this order) can make or check a tag, and a
    change to any key, to ``message`` or to the order of the keys gives another tag.

    Parameters
    ----------
    keys
        32-byte keys (a key file's master keys, oldest generation first).
    message
        The canonical bytes to authenticate.
    info, salt
        What the tag is for, and a non-secret value that separates one use from another.

    Examples
    --------
    >>> keys = [bytes(32), bytes(range(32))]
    >>> tag = mac_tag(keys, b"list", info=b"x", salt=b"s")
    >>> len(tag), mac_tag_ok(keys, b"list", tag, info=b"x", salt=b"s")
    (32, True)
    >>> mac_tag_ok(keys, b"list!", tag, info=b"x", salt=b"s")
    False
    """
    if not isinstance(message, bytes):
        raise SpecError(f"message must be bytes, got {type(message).__name__}")
    return hmac.new(_mac_key(keys, info, salt), message, hashlib.sha256).digest()


def mac_tag_ok(
    keys: Sequence[bytes], message: bytes, tag: bytes, *, info: bytes, salt: bytes
) -> bool:
    """Whether ``tag`` is :func:`mac_tag` of ``message`` (constant-time compare)."""
    if not isinstance(tag, bytes) or len(tag) != MAC_TAG_BYTES:
        return False
    return hmac.compare_digest(mac_tag(keys, message, info=info, salt=salt), tag)


# --- passphrase KDF ----------------------------------------------------------------


def _check_int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"KDF parameter {name} must be an integer in {low}..{high}, got {value!r}")
    return value


def _check_salt(salt: object) -> None:
    if not isinstance(salt, bytes) or not _SALT_MIN <= len(salt) <= _SALT_MAX:
        size = len(salt) if isinstance(salt, bytes) else type(salt).__name__
        raise SpecError(f"KDF salt must be {_SALT_MIN}..{_SALT_MAX} bytes, got {size}")


@dataclass(frozen=True)
class Argon2idParams:
    """Argon2id cost and salt (RFC 9106).

    The defaults are RFC 9106's second recommended option (t=3, 64 MiB) with one lane
    instead of four, about 0.2 s on a laptop core: slow enough that guessing passphrases
    from a stolen key file is expensive, fast enough to unlock once per session on a
    phone. One lane does the same memory-hard work (the cost is set by t and m; lanes
    only let it be split across threads: 0.23 s with one lane against 0.17 s with four
    on the machine this was tuned on) and, unlike several lanes, can run in several
    threads at once without deadlocking OpenSSL (see :func:`derive_from_passphrase`). Tests pass tiny costs; the
    stored parameters, not the defaults, decide how a file is opened, so key files and
    password hashes made with 4 lanes still open.
    """

    salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    iterations: int = 3
    memory_kib: int = 64 * 1024
    lanes: int = 1

    def __post_init__(self) -> None:
        _check_salt(self.salt)
        _check_int(self.iterations, "iterations", 1, 1000)
        _check_int(self.lanes, "lanes", 1, 255)
        _check_int(self.memory_kib, "memory_kib", 8 * self.lanes, _MAX_KDF_MEMORY_BYTES // 1024)

    @property
    def name(self) -> str:
        """``"argon2id"``."""
        return "argon2id"

    def to_json(self) -> dict[str, Any]:
        """The parameters as a JSON object (salt as hex)."""
        return {
            "name": self.name,
            "salt": self.salt.hex(),
            "iterations": self.iterations,
            "memory_kib": self.memory_kib,
            "lanes": self.lanes,
        }


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost and salt (RFC 7914), the fallback where Argon2id is missing.

    The defaults (N = 2**17, r = 8, p = 1; 128 MiB, about 0.5 s) are OWASP's
    recommendation for scrypt.
    """

    salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    log2_n: int = 17
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        _check_salt(self.salt)
        _check_int(self.log2_n, "log2_n", 1, 30)
        _check_int(self.r, "r", 1, 64)
        _check_int(self.p, "p", 1, 16)
        memory = 128 * self.r * 2**self.log2_n
        if memory > _MAX_KDF_MEMORY_BYTES:
            raise SpecError(
                f"scrypt parameters need {memory // 2**20} MiB, more than the "
                f"{_MAX_KDF_MEMORY_BYTES // 2**20} MiB allowed; lower log2_n or r"
            )

    @property
    def name(self) -> str:
        """``"scrypt"``."""
        return "scrypt"

    def to_json(self) -> dict[str, Any]:
        """The parameters as a JSON object (salt as hex)."""
        return {
            "name": self.name,
            "salt": self.salt.hex(),
            "log2_n": self.log2_n,
            "r": self.r,
            "p": self.p,
        }


KdfParams = Argon2idParams | ScryptParams
"""A passphrase KDF with its cost and salt, as stored in a key file."""


def kdf_params_from_json(obj: Mapping[str, Any]) -> KdfParams:
    """Parse :meth:`Argon2idParams.to_json` / :meth:`ScryptParams.to_json` output.

    Raises :class:`SpecError` naming the field for anything missing, extra or out of
    range, so a damaged or hostile key file cannot request absurd costs.
    """
    if not isinstance(obj, Mapping):
        raise SpecError(f"KDF parameters must be a JSON object, got {type(obj).__name__}")
    fields: dict[str, tuple[str, ...]] = {
        "argon2id": ("name", "salt", "iterations", "memory_kib", "lanes"),
        "scrypt": ("name", "salt", "log2_n", "r", "p"),
    }
    name = obj.get("name")
    if name not in fields:
        raise SpecError(f"KDF name must be 'argon2id' or 'scrypt', got {name!r}")
    if set(obj) != set(fields[name]):
        raise SpecError(
            f"{name} parameters must be exactly {sorted(fields[name])}, got {sorted(obj)}"
        )
    salt_hex = obj["salt"]
    try:
        salt = bytes.fromhex(salt_hex) if isinstance(salt_hex, str) else None
    except ValueError:
        salt = None
    if salt is None:
        raise SpecError("KDF salt must be a hex string")
    if name == "argon2id":
        return Argon2idParams(
            salt=salt,
            iterations=obj["iterations"],
            memory_kib=obj["memory_kib"],
            lanes=obj["lanes"],
        )
    return ScryptParams(salt=salt, log2_n=obj["log2_n"], r=obj["r"], p=obj["p"])


@functools.cache
def argon2id_available() -> bool:
    """Whether this ``cryptography`` and its OpenSSL can run Argon2id (OpenSSL >= 3.2)."""
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:  # cryptography < 44
        return False
    try:
        Argon2id(salt=bytes(16), length=KEY_BYTES, iterations=1, lanes=1, memory_cost=8).derive(
            b"probe"
        )
    except UnsupportedAlgorithm:
        return False
    return True


def kdf_params_default() -> KdfParams:
    """Production-strength parameters with a fresh salt: Argon2id if available, else scrypt."""
    return Argon2idParams() if argon2id_available() else ScryptParams()


def derive_from_passphrase(passphrase: str, params: KdfParams) -> bytes:
    """A 32-byte key from a passphrase, with the KDF and cost in ``params``.

    The passphrase is normalized to Unicode NFC and encoded as UTF-8 first, so the same
    passphrase typed on two keyboards (composed or decomposed accents) gives one key.

    Safe to call from many threads at once: single-lane Argon2id (the default) and
    scrypt run in parallel; Argon2id with more than one lane (files and hashes made by
    older versions) runs one derivation at a time in the process, because two at once
    deadlock inside OpenSSL.
    """
    if not isinstance(passphrase, str):
        raise SpecError(f"passphrase must be a string, got {type(passphrase).__name__}")
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    if isinstance(params, Argon2idParams):
        if not argon2id_available():
            raise LorafleetError(
                "this key file uses Argon2id, which this build of cryptography/OpenSSL "
                "lacks; upgrade cryptography (its wheels bundle OpenSSL >= 3.2)"
            )
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        kdf = Argon2id(
            salt=params.salt,
            length=KEY_BYTES,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
        )
        if params.lanes == 1:
            return kdf.derive(secret)
        with _MULTI_LANE_ARGON2:
            return kdf.derive(secret)
    if isinstance(params, ScryptParams):
        return Scrypt(
            salt=params.salt, length=KEY_BYTES, n=2**params.log2_n, r=params.r, p=params.p
        ).derive(secret)
    raise SpecError(f"unknown KDF parameters {type(params).__name__}")


# --- recovery keys (X25519) -----------------------------------------------------------


@dataclass(frozen=True)
class RecoveryKeyPair:
    """An X25519 key pair for recovery, both halves as 32 raw bytes.

    The public half is registered in a key file; the private half is kept offline (on
    paper, in a password manager, by an admin) and never shown by ``repr``.
    """

    private_key: bytes = field(repr=False)
    public_key: bytes


def recovery_keypair() -> RecoveryKeyPair:
    """A fresh X25519 recovery key pair."""
    private = X25519PrivateKey.generate()
    return RecoveryKeyPair(
        private_key=private.private_bytes_raw(),
        public_key=private.public_key().public_bytes_raw(),
    )


def recovery_public_key(private_key: bytes) -> bytes:
    """The public half of a 32-byte X25519 private key."""
    _check_key(private_key, "recovery private key")
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def _recipient_kek(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    # Both public keys go into the salt, binding the KEK to this exchange (as in ECIES).
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=ephemeral_public + recipient_public,
        info=_RECOVERY_INFO,
    )
    return hkdf.derive(shared)


def wrap_for_recipient(public_key: bytes, key: bytes, aad: bytes) -> bytes:
    """Wrap ``key`` so only the holder of ``public_key``'s private half can unwrap it.

    Output (92 bytes): ``ephemeral X25519 public key (32) || wrap_key(kek, key, aad)``
    where ``kek = HKDF-SHA256(X25519(ephemeral, recipient), salt = ephemeral public ||
    recipient public, info = "lorafleet/v1/recovery-kek")``. A fresh ephemeral key per
    wrap means every KEK is used once.
    """
    _check_key(public_key, "recovery public key")
    _check_key(key)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:  # a low-order point gives an all-zero secret, which OpenSSL refuses
        raise SpecError("recovery public key is not a usable X25519 key; check it") from None
    kek = _recipient_kek(shared, ephemeral_public, public_key)
    return ephemeral_public + wrap_key(kek, key, aad)


def unwrap_with_private(private_key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`wrap_for_recipient`; :class:`DecryptionError` if it does not open."""
    _check_key(private_key, "recovery private key")
    if len(wrapped) != RECIPIENT_WRAPPED_KEY_BYTES:
        raise DecryptionError(
            f"recovery-wrapped key is {len(wrapped)} bytes, expected "
            f"{RECIPIENT_WRAPPED_KEY_BYTES}: it is damaged"
        )
    private = X25519PrivateKey.from_private_bytes(private_key)
    ephemeral_public = wrapped[:KEY_BYTES]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError:
        raise DecryptionError("recovery-wrapped key is damaged (bad ephemeral key)") from None
    kek = _recipient_kek(shared, ephemeral_public, private.public_key().public_bytes_raw())
    return unwrap_key(kek, wrapped[KEY_BYTES:], aad)


# --- device signatures (Ed25519) ------------------------------------------------------


@dataclass(frozen=True)
class SigningKeyPair:
    """An Ed25519 key pair, both halves as 32 raw bytes; ``repr`` hides the private half.

    A device keeps the private half (mode 0600, beside its key file); the coordinator's
    registry holds the public half, registered at enrolment.
    """

    private_key: bytes = field(repr=False)
    public_key: bytes


def signing_keypair() -> SigningKeyPair:
    """A fresh Ed25519 key pair.

    Examples
    --------
    >>> pair = signing_keypair()
    >>> verify_signature(pair.public_key, b"msg", sign(pair.private_key, b"msg"))
    True
    """
    private = Ed25519PrivateKey.generate()
    return SigningKeyPair(
        private_key=private.private_bytes_raw(),
        public_key=private.public_key().public_bytes_raw(),
    )


def signing_public_key(private_key: bytes) -> bytes:
    """The public half of a 32-byte Ed25519 private key."""
    _check_key(private_key, "signing private key")
    return Ed25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def sign(private_key: bytes, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``message``; deterministic per key and message."""
    _check_key(private_key, "signing private key")
    if not isinstance(message, bytes):
        raise SpecError(f"message must be bytes, got {type(message).__name__}")
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(message)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``.

    Never raises for hostile input: a public key or signature of the wrong type or size,
    or bytes that are not a valid curve point, give ``False`` like a wrong signature.
    """
    if not (
        isinstance(public_key, bytes)
        and len(public_key) == KEY_BYTES
        and isinstance(signature, bytes)
        and len(signature) == SIGNATURE_BYTES
        and isinstance(message, bytes)
    ):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# ---------------------------------------------------------------- deployment credentials
@dataclass(frozen=True)
class TlsBundle:
    """PEM bytes of a private CA and one server certificate signed by it."""

    ca_cert: bytes
    ca_key: bytes
    server_cert: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return "TlsBundle(<ca cert>, <ca key hidden>, <server cert>, <server key hidden>)"


def tls_bundle(hosts: Sequence[str], *, days: int) -> TlsBundle:
    """A CA (P-384) and a server certificate for ``hosts`` (IP addresses or DNS names).

    For SuperLinks that operators run themselves; clients trust the CA, not a public one.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lorafleet deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    return TlsBundle(
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_key=pem_key(ca_key),
        server_cert=cert.public_bytes(serialization.Encoding.PEM),
        server_key=pem_key(key),
    )


def openssh_ecdsa_keypair() -> tuple[bytes, bytes]:
    """(private, public) OpenSSH ECDSA P-384 keys, the format SuperNode authentication reads."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public
