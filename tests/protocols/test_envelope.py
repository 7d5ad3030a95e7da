"""Envelope: layout, binding to user/adapter/version/base, hostile bytes, the docs' decryptor."""

from __future__ import annotations

import ast
import doctest
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.protocols import crypto
from lorafleet.protocols.envelope import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    OVERHEAD_BYTES,
    BlobContext,
    encode_context,
    new_blob_id,
    open_blob,
    parse_header,
    seal_blob,
)
from lorafleet.protocols.errors import DecryptionError, IntegrityError, SpecError

DOC = Path(__file__).resolve().parents[2] / "docs" / "envelope.md"
BASE = "ab" * 32
PLAINTEXT = b"safetensors bytes of the B matrices" * 3


def _context(**changes: Any) -> BlobContext:
    fields: dict[str, Any] = {
        "user_id": "user-7",
        "adapter_id": "notes",
        "version": 3,
        "base_sha256": BASE,
        "blob_id": "0123456789abcdef0123456789abcdef",
    }
    return BlobContext(**{**fields, **changes})


@pytest.fixture(scope="module")
def master() -> bytes:
    return crypto.random_key()


@pytest.fixture(scope="module")
def blob(master: bytes) -> bytes:
    return seal_blob(master, _context(), PLAINTEXT, key_id=1)


# --- round trip and layout ---------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", bytes(range(256)) * 64])
def test_round_trip_returns_the_plaintext(master: bytes, plaintext: bytes) -> None:
    ctx = _context()

    sealed = seal_blob(master, ctx, plaintext, key_id=1)

    assert len(sealed) == len(plaintext) + OVERHEAD_BYTES == len(plaintext) + 61
    assert open_blob(master, ctx, sealed) == plaintext


def test_header_layout_matches_the_documented_offsets(blob: bytes) -> None:
    # Execute
    header = parse_header(blob)

    # Assert: the byte positions docs/envelope.md promises
    assert blob[0:4] == MAGIC == b"LFEN"
    assert blob[4] == FORMAT_VERSION == 1
    assert int.from_bytes(blob[5:9], "little") == header.key_id == 1
    assert blob[9:25].hex() == header.blob_id == _context().blob_id
    assert int.from_bytes(blob[25:33], "little") == header.body_length == len(blob) - 33
    assert blob[33:45] == header.nonce
    assert header.plaintext_length == len(PLAINTEXT) and header.total_length == len(blob)
    assert HEADER_BYTES == 33


def test_sealing_twice_gives_different_nonces_and_ciphertexts(master: bytes) -> None:
    ctx = _context()

    first = seal_blob(master, ctx, PLAINTEXT, key_id=1)
    second = seal_blob(master, ctx, PLAINTEXT, key_id=1)

    assert first[33:45] != second[33:45]
    assert first[45:] != second[45:]


def test_the_context_encoding_is_unambiguous() -> None:
    # "ab" + "c" and "a" + "bc" must not collide, or a relabelled blob could open.
    assert encode_context(_context(user_id="ab", adapter_id="c")) != encode_context(
        _context(user_id="a", adapter_id="bc")
    )


# --- what the issue requires to fail -----------------------------------------------


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"user_id": "user-8"}, "swapped to another user"),
        ({"adapter_id": "mail"}, "another adapter"),
        ({"version": 4}, "older version replayed as newer"),
        ({"version": 2}, "rolled back"),
        ({"base_sha256": "cd" * 32}, "paired with another base"),
    ],
)
def test_a_blob_opened_for_another_context_fails(
    master: bytes, blob: bytes, change: dict[str, Any], why: str
) -> None:
    with pytest.raises(DecryptionError, match="sealed for another user, adapter, version"):
        open_blob(master, _context(**change), blob)


def test_a_blob_swapped_between_two_users_fails_with_either_key(master: bytes) -> None:
    # Prepare: two users, each with their own master key and a blob at the same version
    other_master = crypto.random_key()
    ctx_a, ctx_b = _context(user_id="alice"), _context(user_id="bob")
    blob_a = seal_blob(master, ctx_a, b"alice's adapter", key_id=1)

    # Execute / Assert: the server hands Alice's blob to Bob
    with pytest.raises(DecryptionError):
        open_blob(other_master, ctx_b, blob_a)
    with pytest.raises(DecryptionError):
        open_blob(master, ctx_b, blob_a)  # even if Bob somehow had Alice's key


def test_another_blob_than_expected_is_named(master: bytes, blob: bytes) -> None:
    with pytest.raises(DecryptionError, match="not the expected"):
        open_blob(master, _context(blob_id=new_blob_id()), blob)


def test_every_flipped_byte_is_refused(master: bytes) -> None:
    # Prepare
    ctx = _context()
    sealed = seal_blob(master, ctx, b"0123456789", key_id=1)

    # Execute / Assert: every byte, header included
    for position in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[position] ^= 0x80
        with pytest.raises(IntegrityError):
            open_blob(master, ctx, bytes(flipped))


def test_every_truncation_is_refused_as_truncated(master: bytes, blob: bytes) -> None:
    for length in range(len(blob)):
        with pytest.raises(IntegrityError, match="truncated"):
            open_blob(master, _context(), blob[:length])


def test_trailing_bytes_are_refused(master: bytes, blob: bytes) -> None:
    with pytest.raises(IntegrityError, match="1 bytes after"):
        open_blob(master, _context(), blob + b"\x00")


def test_a_wrong_key_fails(blob: bytes) -> None:
    with pytest.raises(DecryptionError, match="with another key"):
        open_blob(crypto.random_key(), _context(), blob)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\x03\x04" + bytes(60), "not a lorafleet envelope"),
        (b"", "truncated"),
        (MAGIC + b"\x02" + bytes(60), "newer than this lorafleet reads"),
        (MAGIC + b"\x00" + bytes(60), "invalid"),
        (MAGIC + b"\x01" + bytes(4) + bytes(60), "key id 0"),
        (MAGIC + b"\x01" + struct.pack("<I16sQ", 1, bytes(16), 27) + bytes(12), "shorter"),
    ],
)
def test_malformed_headers_give_one_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message) as info:
        parse_header(data)
    assert "\n" not in str(info.value)


# --- key generations ---------------------------------------------------------------


def test_a_keyring_picks_the_generation_the_header_names() -> None:
    # Prepare: a blob sealed before a rotation, one after
    keyring = {1: crypto.random_key(), 2: crypto.random_key()}
    old = seal_blob(keyring[1], _context(version=1), b"old", key_id=1)
    new = seal_blob(keyring[2], _context(version=2), b"new", key_id=2)

    # Execute / Assert
    assert open_blob(keyring, _context(version=1), old) == b"old"
    assert open_blob(keyring, _context(version=2), new) == b"new"
    with pytest.raises(DecryptionError, match=r"generation 2, which .* \(generations \[1\]\)"):
        open_blob({1: keyring[1]}, _context(version=2), new)


def test_the_key_id_is_authenticated() -> None:
    # Relabelling a blob's generation (to make a device try another key) fails.
    keyring = {1: crypto.random_key(), 2: crypto.random_key()}
    sealed = bytearray(seal_blob(keyring[1], _context(), b"x", key_id=1))
    sealed[5:9] = (2).to_bytes(4, "little")

    with pytest.raises(DecryptionError):
        open_blob(keyring, _context(), bytes(sealed))


# --- argument checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"adapter_id": 7}, "adapter_id"),
        ({"user_id": "\ud800"}, "user_id"),
        ({"version": -1}, "version"),
        ({"version": True}, "version"),
        ({"version": 2**63}, "version"),
        ({"base_sha256": "AB" * 32}, "base_sha256"),
        ({"base_sha256": "ab"}, "base_sha256"),
        ({"blob_id": "xyz"}, "blob_id"),
    ],
)
def test_bad_contexts_are_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        _context(**change)


@pytest.mark.parametrize("key_id", [0, -1, 2**32, True])
def test_bad_key_ids_are_refused(master: bytes, key_id: int) -> None:
    with pytest.raises(SpecError, match="key_id"):
        seal_blob(master, _context(), b"x", key_id=key_id)


def test_errors_never_contain_the_key(master: bytes, blob: bytes) -> None:
    messages = []
    for ctx, data in [(_context(user_id="x"), blob), (_context(), blob[:-3])]:
        with pytest.raises(IntegrityError) as info:
            open_blob(master, ctx, data)
        messages.append(str(info.value))

    assert all(master.hex() not in m and repr(master) not in m for m in messages)


# --- fuzzing the parser -------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_raise_only_documented_errors(data: bytes) -> None:
    key = bytes(32)
    for candidate in (data, MAGIC + data, MAGIC + b"\x01" + data):
        with pytest.raises(IntegrityError):
            open_blob(key, _context(), candidate)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    position=st.integers(min_value=0),
    replacement=st.binary(max_size=16),
    delete=st.integers(min_value=0, max_value=16),
)
def test_fuzz_mutated_envelopes_never_open_and_never_crash(
    position: int, replacement: bytes, delete: int
) -> None:
    # Prepare: splice a valid envelope
    key = bytes(range(32))
    ctx = _context()
    sealed = seal_blob(key, ctx, b"hello, adapter", key_id=1)
    at = position % (len(sealed) + 1)
    mutated = sealed[:at] + replacement + sealed[at + delete :]

    # Execute / Assert: either the bytes are unchanged, or a documented error
    if mutated == sealed:
        assert open_blob(key, ctx, mutated) == b"hello, adapter"
    else:
        with pytest.raises(IntegrityError):
            open_blob(key, ctx, mutated)


# --- the decryptor in docs/envelope.md -------------------------------------------


def doc_example() -> dict[str, Any]:
    """Run the docs' third-party decryptor and return its functions."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (code,) = [b for b in blocks if b.startswith("# decrypt_without_lorafleet.py")]
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            for module in modules:
                assert module is not None and not module.startswith("lorafleet"), module
                assert module.split(".")[0] in {"cryptography", "json", "struct", "unicodedata"}
    namespace: dict[str, Any] = {"__name__": "decrypt_without_lorafleet"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_the_documented_decryptor_opens_a_lorafleet_blob(master: bytes) -> None:
    # Prepare
    decrypt_blob = doc_example()["decrypt_blob"]
    ctx = _context(user_id="zoë", version=12)
    sealed = seal_blob(master, ctx, PLAINTEXT, key_id=7)
    expected = {"user_id": "zoë", "adapter_id": "notes", "version": 12, "base_sha256": BASE}

    # Execute
    plaintext = decrypt_blob({7: master}, sealed, **expected)

    # Assert: and it refuses another version, as lorafleet does
    assert plaintext == PLAINTEXT
    with pytest.raises(InvalidTag):
        decrypt_blob({7: master}, sealed, **{**expected, "version": 13})


def test_the_docstring_examples_run() -> None:
    from lorafleet.protocols import envelope

    assert doctest.testmod(envelope).failed == 0
