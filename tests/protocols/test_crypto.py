"""Crypto recipes: round trips, tamper detection, KDF answers and the hazmat boundary."""

from __future__ import annotations

import ast
import dataclasses
import doctest
import hashlib
import hmac
import unicodedata
from pathlib import Path

import pytest

from lorafleet.protocols import crypto
from lorafleet.protocols.errors import DecryptionError, LorafleetError, SpecError

REPO = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("protocols", "client", "server", "sim", "bench", "deploy")
PASSPHRASE = "correct horse battery staple"
SALT = b"lorafleet-salt-1"
CHEAP_ARGON = crypto.Argon2idParams(salt=SALT, iterations=2, memory_kib=64, lanes=2)
CHEAP_SCRYPT = crypto.ScryptParams(salt=SALT, log2_n=10, r=8, p=1)


def _hkdf_sha256_reference(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 with the standard library, as a third party would write it."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()  # one block = 32 bytes


# --- the hazmat boundary -----------------------------------------------------------


def _hazmat_imports(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(n == "cryptography.hazmat" or n.startswith("cryptography.hazmat.") for n in names):
            lines.append(node.lineno)
    return lines


def test_hazmat_is_imported_only_by_the_recipes_module() -> None:
    # Prepare
    sources = [p for pkg in PROJECT_PACKAGES for p in (REPO / pkg).rglob("*.py")]
    assert REPO / "protocols" / "crypto.py" in sources  # the scan sees the project

    # Execute
    offenders = {
        str(p.relative_to(REPO)): lines
        for p in sources
        if (lines := _hazmat_imports(p.read_text(encoding="utf-8")))
    }

    # Assert
    assert offenders == {"protocols/crypto.py": offenders["protocols/crypto.py"]}


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("from cryptography.hazmat.primitives import hashes", True),
        ("import cryptography.hazmat.primitives.ciphers", True),
        ("from cryptography import hazmat", True),
        ("def f():\n    from cryptography.hazmat.primitives.kdf.hkdf import HKDF", True),
        ("from cryptography.exceptions import InvalidTag", False),
        ("from cryptography import fernet", False),
    ],
)
def test_the_hazmat_scan_catches_every_import_form(source: str, flagged: bool) -> None:
    assert bool(_hazmat_imports(source)) is flagged


# --- seal / open -------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", bytes(range(256)) * 40])
def test_seal_round_trips_and_adds_nonce_and_tag(plaintext: bytes) -> None:
    # Prepare
    key = crypto.random_key()

    # Execute
    sealed = crypto.seal(key, plaintext, b"context")

    # Assert
    assert len(sealed) == len(plaintext) + crypto.SEAL_OVERHEAD == len(plaintext) + 28
    assert crypto.open_sealed(key, sealed, b"context") == plaintext


def test_seal_draws_a_fresh_nonce_every_time() -> None:
    key = crypto.random_key()

    nonces = {crypto.seal(key, b"same", b"")[: crypto.NONCE_BYTES] for _ in range(200)}

    assert len(nonces) == 200


@pytest.mark.parametrize("position", [0, 5, 11, 12, 20, 31, 32, 43])
def test_open_refuses_any_flipped_byte(position: int) -> None:
    # Prepare
    key = crypto.random_key()
    sealed = bytearray(crypto.seal(key, b"sixteen byte msg", b"aad"))
    sealed[position] ^= 0x01

    # Execute / Assert
    with pytest.raises(DecryptionError, match="wrong key"):
        crypto.open_sealed(key, bytes(sealed), b"aad")


def test_open_refuses_another_key_other_aad_and_truncation() -> None:
    key = crypto.random_key()
    sealed = crypto.seal(key, b"payload", b"aad")

    with pytest.raises(DecryptionError):
        crypto.open_sealed(crypto.random_key(), sealed, b"aad")
    with pytest.raises(DecryptionError):
        crypto.open_sealed(key, sealed, b"aae")
    with pytest.raises(DecryptionError):
        crypto.open_sealed(key, sealed[:-1], b"aad")
    with pytest.raises(DecryptionError, match="truncated"):
        crypto.open_sealed(key, sealed[:27], b"aad")


@pytest.mark.parametrize("bad_key", [b"", bytes(16), bytes(33), bytearray(32), "0" * 32])
def test_keys_of_the_wrong_size_or_type_are_refused_without_echoing_them(bad_key: object) -> None:
    with pytest.raises(SpecError, match="key must be") as info:
        crypto.seal(bad_key, b"x", b"")  # type: ignore[arg-type]
    assert "0000" not in str(info.value)


# --- derive ------------------------------------------------------------------------


def test_derive_key_is_standard_hkdf_sha256() -> None:
    # Prepare
    master = bytes(range(32))

    # Execute
    derived = crypto.derive_key(master, info=b"lorafleet/test", salt=b"salt")

    # Assert
    assert derived == _hkdf_sha256_reference(master, b"salt", b"lorafleet/test")


def test_derive_key_separates_salts_and_infos() -> None:
    master = crypto.random_key()

    keys = {
        crypto.derive_key(master, info=info, salt=salt)
        for info in (b"a", b"b")
        for salt in (b"1", b"2")
    }

    assert len(keys) == 4
    assert crypto.derive_key(master, info=b"a", salt=b"1") in keys  # deterministic


# --- wrap / unwrap -----------------------------------------------------------------


def test_wrap_round_trips_in_60_bytes_and_binds_its_aad() -> None:
    kek, key = crypto.random_key(), crypto.random_key()

    wrapped = crypto.wrap_key(kek, key, b"slot 1")

    assert len(wrapped) == crypto.WRAPPED_KEY_BYTES == 60
    assert crypto.unwrap_key(kek, wrapped, b"slot 1") == key
    with pytest.raises(DecryptionError):
        crypto.unwrap_key(kek, wrapped, b"slot 2")
    with pytest.raises(DecryptionError):
        crypto.unwrap_key(crypto.random_key(), wrapped, b"slot 1")
    with pytest.raises(DecryptionError, match="expected 60"):
        crypto.unwrap_key(kek, wrapped[:-1], b"slot 1")


def test_recovery_wrap_opens_only_with_the_matching_private_key() -> None:
    # Prepare
    pair, other = crypto.recovery_keypair(), crypto.recovery_keypair()
    key = crypto.random_key()

    # Execute
    wrapped = crypto.wrap_for_recipient(pair.public_key, key, b"aad")

    # Assert
    assert len(wrapped) == crypto.RECIPIENT_WRAPPED_KEY_BYTES == 92
    assert crypto.unwrap_with_private(pair.private_key, wrapped, b"aad") == key
    assert crypto.recovery_public_key(pair.private_key) == pair.public_key
    with pytest.raises(DecryptionError):
        crypto.unwrap_with_private(other.private_key, wrapped, b"aad")
    with pytest.raises(DecryptionError):
        crypto.unwrap_with_private(pair.private_key, wrapped, b"other aad")
    tampered = bytes([wrapped[0] ^ 1]) + wrapped[1:]  # another ephemeral key
    with pytest.raises(DecryptionError):
        crypto.unwrap_with_private(pair.private_key, tampered, b"aad")


def test_each_recovery_wrap_uses_a_fresh_ephemeral_key() -> None:
    pair, key = crypto.recovery_keypair(), crypto.random_key()

    first = crypto.wrap_for_recipient(pair.public_key, key, b"")
    second = crypto.wrap_for_recipient(pair.public_key, key, b"")

    assert first[:32] != second[:32]


def test_a_low_order_recovery_public_key_is_refused() -> None:
    with pytest.raises(SpecError, match="not a usable X25519 key"):
        crypto.wrap_for_recipient(bytes(32), crypto.random_key(), b"")


def test_recovery_keypair_repr_hides_the_private_key() -> None:
    pair = crypto.recovery_keypair()

    text = repr(pair)

    assert pair.private_key.hex() not in text and repr(pair.private_key) not in text
    assert "private_key" not in text


# --- passphrase KDF ----------------------------------------------------------------


def test_scrypt_matches_the_standard_library() -> None:
    key = crypto.derive_from_passphrase(PASSPHRASE, CHEAP_SCRYPT)

    assert key == hashlib.scrypt(PASSPHRASE.encode(), salt=SALT, n=1024, r=8, p=1, dklen=32)


@pytest.mark.skipif(not crypto.argon2id_available(), reason="OpenSSL without Argon2id")
def test_argon2id_gives_its_known_answer() -> None:
    # A regression guard: if this value changes, every existing key file stops opening.
    key = crypto.derive_from_passphrase(PASSPHRASE, CHEAP_ARGON)

    assert key.hex() == "fc9593f46bfac63fe0467ea25f7a534c0f0d8ce9c5c6d46eac087586a51b50d1"


@pytest.mark.parametrize("params", [CHEAP_SCRYPT, CHEAP_ARGON], ids=["scrypt", "argon2id"])
def test_passphrase_is_nfc_normalized_and_salted(params: crypto.KdfParams) -> None:
    if isinstance(params, crypto.Argon2idParams) and not crypto.argon2id_available():
        pytest.skip("OpenSSL without Argon2id")
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert unicodedata.normalize("NFC", decomposed) == composed

    same = crypto.derive_from_passphrase(composed, params) == crypto.derive_from_passphrase(
        decomposed, params
    )
    other_salt = dataclasses.replace(params, salt=b"another-salt-16b")

    assert same
    assert crypto.derive_from_passphrase(composed, params) != crypto.derive_from_passphrase(
        composed, other_salt
    )
    assert crypto.derive_from_passphrase("x", params) != crypto.derive_from_passphrase("y", params)


def test_default_parameters_are_production_strength_with_fresh_salts() -> None:
    first, second = crypto.kdf_params_default(), crypto.kdf_params_default()

    assert first.salt != second.salt and len(first.salt) == 16
    if crypto.argon2id_available():
        assert isinstance(first, crypto.Argon2idParams)
        assert (first.iterations, first.memory_kib, first.lanes) == (3, 65536, 1)
    else:
        assert isinstance(first, crypto.ScryptParams)
        assert (first.log2_n, first.r, first.p) == (17, 8, 1)


_CONCURRENT_DERIVATIONS = """
import threading
from lorafleet.protocols import crypto

salt = b"lorafleet-salt-1"
params = [
    crypto.Argon2idParams(salt=salt, iterations=1, memory_kib=1024, lanes=lanes)
    for lanes in (4, 4, 2, 1, 1)
] + [crypto.ScryptParams(salt=salt, log2_n=10)]
expected = {i: crypto.derive_from_passphrase(f"pw{i}", p) for i, p in enumerate(params)}
got, errors = [], []

def run(i: int) -> None:
    try:
        for _ in range(5):
            got.append(crypto.derive_from_passphrase(f"pw{i}", params[i]) == expected[i])
    except Exception as exc:  # reported below, not swallowed
        errors.append(repr(exc))

threads = [threading.Thread(target=run, args=(i % len(params),)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(got), all(got), errors)
"""


@pytest.mark.skipif(not crypto.argon2id_available(), reason="this OpenSSL lacks Argon2id")
def test_concurrent_derivations_all_finish_with_old_and_new_parameters() -> None:
    # Prepare: 8 threads at once, multi-lane Argon2id (older files), single-lane, scrypt.
    # A child process, so a deadlock fails the test by its timeout instead of hanging it.
    import subprocess
    import sys

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_DERIVATIONS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["40", "True", "[]"]


def test_without_argon2id_the_default_falls_back_to_scrypt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(crypto, "argon2id_available", lambda: False)

    params = crypto.kdf_params_default()

    assert isinstance(params, crypto.ScryptParams)
    with pytest.raises(LorafleetError, match="upgrade cryptography"):
        crypto.derive_from_passphrase(PASSPHRASE, CHEAP_ARGON)


@pytest.mark.parametrize("params", [CHEAP_SCRYPT, CHEAP_ARGON, crypto.ScryptParams()])
def test_kdf_params_round_trip_through_json(params: crypto.KdfParams) -> None:
    assert crypto.kdf_params_from_json(params.to_json()) == params


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"name": "pbkdf2", "salt": "00" * 16}, "argon2id' or 'scrypt"),
        ({**CHEAP_SCRYPT.to_json(), "extra": 1}, "exactly"),
        ({**CHEAP_SCRYPT.to_json(), "salt": "zz" * 16}, "hex"),
        ({**CHEAP_SCRYPT.to_json(), "salt": "00" * 4}, "salt must be 16..64 bytes"),
        ({**CHEAP_SCRYPT.to_json(), "log2_n": 40}, "log2_n"),
        ({**CHEAP_SCRYPT.to_json(), "log2_n": 22, "r": 64}, "MiB"),
        ({**CHEAP_ARGON.to_json(), "memory_kib": 2**30}, "memory_kib"),
        ({**CHEAP_ARGON.to_json(), "iterations": 0}, "iterations"),
        ({**CHEAP_ARGON.to_json(), "lanes": True}, "lanes"),
    ],
)
def test_hostile_kdf_parameters_are_refused(obj: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        crypto.kdf_params_from_json(obj)


def test_the_docstring_examples_run() -> None:
    assert doctest.testmod(crypto).failed == 0


# --- device signatures (Ed25519) -----------------------------------------------------

# RFC 8032, section 7.1, TEST 1 (empty message) and TEST 2 (one byte).
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
RFC8032_SECRET_2 = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
RFC8032_SIG_2 = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


def test_ed25519_gives_the_rfc8032_known_answers() -> None:
    # Execute
    public = crypto.signing_public_key(RFC8032_SECRET)
    signature = crypto.sign(RFC8032_SECRET, b"")
    signature_2 = crypto.sign(RFC8032_SECRET_2, b"\x72")

    # Assert
    assert public == RFC8032_PUBLIC
    assert signature == RFC8032_SIG
    assert signature_2 == RFC8032_SIG_2
    assert crypto.verify_signature(RFC8032_PUBLIC, b"", RFC8032_SIG)


def test_a_signature_verifies_only_for_its_key_and_message() -> None:
    # Prepare
    pair, other = crypto.signing_keypair(), crypto.signing_keypair()
    signature = crypto.sign(pair.private_key, b"request")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]

    # Execute / Assert
    assert len(signature) == crypto.SIGNATURE_BYTES
    assert crypto.verify_signature(pair.public_key, b"request", signature)
    assert not crypto.verify_signature(pair.public_key, b"requesT", signature)
    assert not crypto.verify_signature(other.public_key, b"request", signature)
    assert not crypto.verify_signature(pair.public_key, b"request", flipped)


@pytest.mark.parametrize(
    ("public", "message", "signature"),
    [
        (b"", b"m", bytes(64)),
        (bytes(31), b"m", bytes(64)),
        (bytes(32), b"m", bytes(63)),
        (b"\xff" * 32, b"m", bytes(64)),  # not a point on the curve
        ("00" * 32, b"m", bytes(64)),
        (bytes(32), "m", bytes(64)),
        (bytes(32), b"m", None),
    ],
)
def test_hostile_verification_input_is_false_not_an_exception(
    public: object, message: object, signature: object
) -> None:
    # Execute / Assert
    assert crypto.verify_signature(public, message, signature) is False  # type: ignore[arg-type]


def test_signing_keypair_repr_hides_the_private_key() -> None:
    # Prepare
    pair = crypto.signing_keypair()

    # Execute / Assert
    assert pair.private_key.hex() not in repr(pair)
    assert repr(pair.private_key) not in repr(pair)
    assert crypto.signing_public_key(pair.private_key) == pair.public_key
