"""The one exception family users see.

Every mistake a user can make (a bad path, a wrong passphrase, an adapter for another
base) raises a :class:`LorafleetError` whose message names the bad value and the fix. The
CLI prints that message alone, without a traceback, and exits non-zero; anything else
that escapes is a bug in lorafleet.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """A problem the user can fix; the message says how."""


class SpecError(LorafleetError, ValueError):
    """An adapter spec or config value is out of range or inconsistent."""


class IntegrityError(LorafleetError):
    """Bytes on disk or on the wire do not match the hash or format they claim."""


class DataError(LorafleetError):
    """The user's training or evaluation data cannot be used as given."""


class StorageError(LorafleetError):
    """A file or folder cannot be written: read-only, disk full, or a file in the way.

    The message names the path and what to do; nothing was half-written.
    """


class DecryptionError(IntegrityError):
    """Ciphertext does not open: wrong key, or bytes or context altered since sealing."""


class KeyStoreError(LorafleetError):
    """The device key file is missing, damaged or cannot be used as asked."""


class WrongPassphraseError(KeyStoreError):
    """The passphrase does not unlock the key file."""


class MissingKeyFileError(KeyStoreError):
    """No key file where one was expected; the message says how to restore it."""


class KeyFileTamperedError(KeyStoreError, IntegrityError):
    """A key file's recovery keys (who else can unwrap the master keys) were changed."""


class KeyFileRollbackError(KeyStoreError, IntegrityError):
    """A key file older than one this device has already seen was offered as the newest."""
