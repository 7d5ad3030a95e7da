"""The outside of a device key file: what a party without its keys can check.

The key file (``docs/envelope.md``; read and written by
:mod:`lorafleet.client.keys`) travels to the coordinator for a passphrase restore. The
coordinator holds no key, so all it can check is the shape: a UTF-8 JSON object of at
most :data:`MAX_KEYFILE_BYTES` bytes that says it is a lorafleet key file. That is
enough to refuse junk uploads (a few MiB of noise stored as somebody's key file).
"""

from __future__ import annotations

import json
import re

from lorafleet.protocols.errors import IntegrityError

__all__ = ["FORMAT", "MAX_KEYFILE_BYTES", "check_keyfile_shape"]

FORMAT = "lorafleet-keyfile"
"""Value of a key file's ``format`` member."""
MAX_KEYFILE_BYTES = 1 << 20
"""Largest key file anyone reads or stores (1 MiB: thousands of generations)."""
_HEX32 = re.compile(r"[0-9a-f]{32}")


def check_keyfile_shape(data: bytes) -> int:
    """The format version of ``data`` if it looks like a key file; raise otherwise.

    Checks the size, that it is a UTF-8 JSON object, its ``format`` member, an integer
    ``format_version``, a 32-hex ``store_id`` and a ``recovery`` list. Nothing here
    needs or reveals a key; the device checks the rest when it unlocks the file.

    Raises
    ------
    IntegrityError
        ``data`` is too large or not a key file; the message says which check failed.

    Examples
    --------
    >>> check_keyfile_shape(
    ...     b'{"format": "lorafleet-keyfile", "format_version": 1, '
    ...     b'"store_id": "00112233445566778899aabbccddeeff", "recovery": []}'
    ... )
    1
    """
    if len(data) > MAX_KEYFILE_BYTES:
        raise IntegrityError(
            f"a key file is at most {MAX_KEYFILE_BYTES} bytes; this one is {len(data)}"
        )
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise IntegrityError("not a key file: it is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise IntegrityError(f"not a key file: its format member is not {FORMAT!r}")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IntegrityError("not a key file: format_version is not a positive integer")
    store_id = obj.get("store_id")
    if not isinstance(store_id, str) or not _HEX32.fullmatch(store_id):
        raise IntegrityError("not a key file: store_id is not 32 lowercase hex characters")
    if not isinstance(obj.get("recovery"), list):
        raise IntegrityError("not a key file: it has no recovery list")
    return version
