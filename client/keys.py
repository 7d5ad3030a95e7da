"""The device key store: the user's master keys, wrapped by a passphrase and recovery keys.

A user's adapters are sealed (:mod:`lorafleet.protocols.envelope`) under a random
256-bit master key that never leaves the device in the clear. It lives in a small JSON
key file, written atomically with mode 0600, in which every master key is encrypted
("wrapped"):

- under a key derived from the user's passphrase (Argon2id, or scrypt where the OpenSSL
  build lacks Argon2id; the KDF, its cost and salt are in the file), and
- optionally for one or more recovery public keys (X25519), whose private halves are kept
  elsewhere: on paper, in a password manager, with an administrator.

Master keys have generations (key ids 1, 2, ...). :meth:`KeyStore.rotate` adds a new
generation for new blobs and keeps the older ones, still wrapped, so every blob ever
sealed stays readable without re-uploading it. :meth:`KeyStore.change_passphrase`
re-wraps the same keys under a new passphrase (and a fresh salt).

If the device is lost, so is its key file. :meth:`KeyStore.recovery_bundle` gives the
key file without its passphrase part: every key in it is wrapped for recovery public
keys only, so it is safe to store next to the backups (even a weak passphrase cannot be
guessed from it), and :meth:`KeyStore.restore` rebuilds a key file from it on a new
device with a recovery private key. The file format is in ``docs/envelope.md``.

Passphrases and keys never appear in logs, exception messages or ``repr``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.protocols import crypto
from lorafleet.protocols.atomic import atomic_write_bytes
from lorafleet.protocols.errors import (
    DecryptionError,
    KeyStoreError,
    MissingKeyFileError,
    SpecError,
    WrongPassphraseError,
)
from lorafleet.protocols.keyfile import FORMAT as FORMAT
from lorafleet.protocols.keyfile import MAX_KEYFILE_BYTES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The key file layout this module writes and the only one it reads."""
WRAP_AAD_PREFIX = b"lorafleet/keyfile/v1\x00"
"""Associated data of a wrapped key: this, the 16-byte store id, the uint32 LE key id."""
MAX_KEY_ID = 2**32 - 1
_MAX_FILE_BYTES = MAX_KEYFILE_BYTES
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")


class UnlockedKeys(Mapping[int, bytes]):
    """A user's master keys by key id (generation); the highest id is the current one.

    Pass it to :func:`~lorafleet.protocols.envelope.open_blob`, which picks the
    generation a blob names, and seal new blobs with :attr:`current_key` and
    :attr:`current_key_id`. ``repr`` shows key ids only, never key bytes.

    Examples
    --------
    >>> keys = UnlockedKeys({1: bytes(32), 2: bytes(range(32))})
    >>> keys.current_key_id, sorted(keys)
    (2, [1, 2])
    >>> keys
    UnlockedKeys(key_ids=[1, 2], current_key_id=2)
    """

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        if not keys:
            raise KeyStoreError("no master keys to hold; unlock a key file first")
        for key_id, key in keys.items():
            if isinstance(key_id, bool) or not isinstance(key_id, int) or key_id < 1:
                raise SpecError(f"key ids must be positive integers, got {key_id!r}")
            if not isinstance(key, bytes) or len(key) != crypto.KEY_BYTES:
                raise SpecError(f"master key {key_id} must be {crypto.KEY_BYTES} bytes")
        self._keys = dict(sorted(keys.items()))

    def __getitem__(self, key_id: int) -> bytes:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"UnlockedKeys(key_ids={list(self._keys)}, current_key_id={self.current_key_id})"

    @property
    def current_key_id(self) -> int:
        """The newest generation, used to seal new blobs."""
        return max(self._keys)

    @property
    def current_key(self) -> bytes:
        """The newest master key (32 bytes)."""
        return self._keys[self.current_key_id]


@dataclass(frozen=True)
class KeyFileInfo:
    """What a key file says about itself without a passphrase (nothing secret)."""

    path: Path
    kdf: str | None
    """``"argon2id"`` or ``"scrypt"``; ``None`` for a recovery bundle."""
    key_ids: tuple[int, ...]
    recovery_public_keys: tuple[str, ...]
    """Registered recovery public keys, hex."""

    @property
    def current_key_id(self) -> int:
        """The generation new blobs are sealed with."""
        return max(self.key_ids)


# --- the file format ------------------------------------------------------------------


@dataclass
class _KeyFile:
    """A parsed key file (or recovery bundle, where ``kdf`` is ``None``)."""

    store_id: bytes
    kdf: crypto.KdfParams | None
    wraps: dict[int, bytes]
    recovery: dict[bytes, dict[int, bytes]]

    def key_ids(self) -> list[int]:
        ids = set(self.wraps)
        for wraps in self.recovery.values():
            ids |= set(wraps)
        return sorted(ids)

    def to_bytes(self, *, bundle: bool = False) -> bytes:
        obj: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "store_id": self.store_id.hex(),
            "recovery": [
                {"public_key": public.hex(), "keys": _wraps_to_json(wraps)}
                for public, wraps in sorted(self.recovery.items())
            ],
        }
        if not bundle:
            assert self.kdf is not None
            obj["passphrase"] = {"kdf": self.kdf.to_json(), "keys": _wraps_to_json(self.wraps)}
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _wraps_to_json(wraps: Mapping[int, bytes]) -> list[dict[str, Any]]:
    return [
        {"key_id": key_id, "wrapped": wrapped.hex()} for key_id, wrapped in sorted(wraps.items())
    ]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _members(
    obj: Any, where: str, required: set[str], optional: set[str] | None = None
) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a JSON object")
    missing, extra = required - set(obj), set(obj) - required - (optional or set())
    if missing or extra:
        raise ValueError(f"{where}: missing {sorted(missing)}, unexpected {sorted(extra)}")
    return obj


def _parse_wraps(obj: Any, where: str, size: int) -> dict[int, bytes]:
    if not isinstance(obj, list) or not obj:
        raise ValueError(f"{where} must be a non-empty list")
    wraps: dict[int, bytes] = {}
    for entry in obj:
        _members(entry, where, {"key_id", "wrapped"})
        key_id, wrapped = entry["key_id"], entry["wrapped"]
        if isinstance(key_id, bool) or not isinstance(key_id, int) or not 1 <= key_id <= MAX_KEY_ID:
            raise ValueError(f"{where}: key_id {key_id!r} is not in 1..{MAX_KEY_ID}")
        if key_id in wraps:
            raise ValueError(f"{where}: key_id {key_id} appears twice")
        if not isinstance(wrapped, str) or len(wrapped) != 2 * size:
            raise ValueError(f"{where}: wrapped key {key_id} must be {2 * size} hex characters")
        wraps[key_id] = bytes.fromhex(wrapped)
    return wraps


def _parse(data: bytes) -> _KeyFile:
    """Strictly parse key file bytes; ValueError/SpecError say what is wrong."""
    obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"its format member is not {FORMAT!r}")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise KeyStoreError(
                f"key file format version {version} is newer than this lorafleet reads "
                f"({FORMAT_VERSION}); upgrade lorafleet"
            )
        raise ValueError(f"format_version {version!r} is invalid")
    _members(obj, "key file", {"format", "format_version", "store_id", "recovery"}, {"passphrase"})
    store_id = obj["store_id"]
    if not isinstance(store_id, str) or not _HEX32.match(store_id):
        raise ValueError("store_id must be 32 lowercase hex characters")
    kdf: crypto.KdfParams | None = None
    wraps: dict[int, bytes] = {}
    if "passphrase" in obj:
        section = _members(obj["passphrase"], "passphrase", {"kdf", "keys"})
        kdf = crypto.kdf_params_from_json(section["kdf"])
        wraps = _parse_wraps(section["keys"], "passphrase keys", crypto.WRAPPED_KEY_BYTES)
    if not isinstance(obj["recovery"], list):
        raise ValueError("recovery must be a list")
    recovery: dict[bytes, dict[int, bytes]] = {}
    for entry in obj["recovery"]:
        _members(entry, "recovery entry", {"public_key", "keys"})
        public = entry["public_key"]
        if not isinstance(public, str) or len(public) != 2 * crypto.KEY_BYTES:
            raise ValueError("recovery public_key must be 64 hex characters")
        public_bytes = bytes.fromhex(public)
        if public_bytes in recovery:
            raise ValueError("a recovery public key appears twice")
        recovery[public_bytes] = _parse_wraps(
            entry["keys"], "recovery keys", crypto.RECIPIENT_WRAPPED_KEY_BYTES
        )
    if kdf is None and not recovery:
        raise ValueError("it holds no wrapped keys at all")
    return _KeyFile(bytes.fromhex(store_id), kdf, wraps, recovery)


def _parse_or_explain(data: bytes, source: str) -> _KeyFile:
    try:
        return _parse(data)
    except KeyStoreError:
        raise
    except (ValueError, SpecError, RecursionError) as exc:  # incl. Unicode and JSON errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KeyStoreError(
            f"{source} is damaged ({reason}); restore it from a backup copy or rebuild it "
            "with KeyStore.restore and your recovery key"
        ) from None


def _missing(path: Path) -> MissingKeyFileError:
    return MissingKeyFileError(
        f"no key file at {path}: if you moved it, pass its new path; if this device lost it, "
        "rebuild it with KeyStore.restore(path, recovery_bundle, recovery_private_key, "
        "new_passphrase); only KeyStore.create a new one if you accept that blobs sealed "
        "with the lost keys stay unreadable"
    )


def _read(path: Path) -> _KeyFile:
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise KeyStoreError(f"{path} is a directory, not a key file; pass the file's path")
            data = fh.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise _missing(path) from None
    except IsADirectoryError:
        raise KeyStoreError(
            f"{path} is a directory, not a key file; pass the file's path"
        ) from None
    except OSError as exc:
        raise KeyStoreError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        logger.warning(
            "key file %s is readable by other users (mode %o); run: chmod 600 %s",
            path,
            stat.S_IMODE(mode),
            path,
        )
    if len(data) > _MAX_FILE_BYTES:
        raise KeyStoreError(f"{path} is larger than any key file; pass the right path")
    return _parse_or_explain(data, f"key file {path}")


def _write(path: Path, keyfile: _KeyFile) -> None:
    atomic_write_bytes(path, keyfile.to_bytes(), mode=0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of one key file across processes.

    Without it, two processes rotating at once could each write a new generation and
    the last write would drop the other's, making blobs sealed with it unreadable.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a single writer is assumed
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _aad(store_id: bytes, key_id: int) -> bytes:
    return WRAP_AAD_PREFIX + store_id + key_id.to_bytes(4, "little")


def _check_passphrase(passphrase: object, what: str = "passphrase") -> str:
    if not isinstance(passphrase, str) or not passphrase:
        raise SpecError(f"{what} must be a non-empty string")
    return passphrase


def _check_public_keys(public_keys: Iterable[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for public in public_keys:
        if not isinstance(public, bytes) or len(public) != crypto.KEY_BYTES:
            raise SpecError(
                f"recovery public keys must be {crypto.KEY_BYTES} raw bytes "
                "(RecoveryKeyPair.public_key)"
            )
        if public not in out:
            out.append(public)
    return out


def _unlock_passphrase(
    path: Path, keyfile: _KeyFile, passphrase: str
) -> tuple[bytes, dict[int, bytes]]:
    """The passphrase KEK and every master key it wraps."""
    _check_passphrase(passphrase)
    if keyfile.kdf is None:
        raise KeyStoreError(
            f"{path} is a recovery bundle, not a key file: it opens only with a recovery "
            "key; rebuild a key file from it with KeyStore.restore"
        )
    kek = crypto.derive_from_passphrase(passphrase, keyfile.kdf)
    current = max(keyfile.wraps)
    keys: dict[int, bytes] = {}
    for key_id in sorted(keyfile.wraps, key=lambda k: k != current):  # current one first
        try:
            keys[key_id] = crypto.unwrap_key(
                kek, keyfile.wraps[key_id], _aad(keyfile.store_id, key_id)
            )
        except DecryptionError:
            if key_id == current:
                raise WrongPassphraseError(
                    f"wrong passphrase for key file {path}; try again, or regain access "
                    "with KeyStore.unlock_with_recovery and your recovery key"
                ) from None
            raise KeyStoreError(
                f"key file {path}: master key generation {key_id} does not open although "
                "the passphrase is right, so the file was altered; restore it from a backup "
                "copy or with KeyStore.restore and your recovery key"
            ) from None
    return kek, keys


def _unlock_recovery(source: str, keyfile: _KeyFile, private_key: bytes) -> dict[int, bytes]:
    public = crypto.recovery_public_key(private_key)
    wraps = keyfile.recovery.get(public)
    if wraps is None:
        known = ", ".join(p.hex()[:16] for p in sorted(keyfile.recovery)) or "none"
        raise KeyStoreError(
            f"this recovery key (public {public.hex()[:16]}...) is not registered in {source} "
            f"(registered: {known}); use the private key that belongs to one of them"
        )
    keys: dict[int, bytes] = {}
    for key_id, wrapped in sorted(wraps.items()):
        try:
            keys[key_id] = crypto.unwrap_with_private(
                private_key, wrapped, _aad(keyfile.store_id, key_id)
            )
        except DecryptionError:
            raise KeyStoreError(
                f"{source}: the recovery copy of master key generation {key_id} does not "
                "open with this registered recovery key, so it was altered; use another copy"
            ) from None
    return keys


def _wrap_all(kek: bytes, store_id: bytes, keys: Mapping[int, bytes]) -> dict[int, bytes]:
    return {k: crypto.wrap_key(kek, key, _aad(store_id, k)) for k, key in keys.items()}


def _wrap_all_for(public: bytes, store_id: bytes, keys: Mapping[int, bytes]) -> dict[int, bytes]:
    return {k: crypto.wrap_for_recipient(public, key, _aad(store_id, k)) for k, key in keys.items()}


def _fresh_salt(params: crypto.KdfParams) -> crypto.KdfParams:
    return dataclasses.replace(params, salt=secrets.token_bytes(16))


# --- the public face -----------------------------------------------------------------


class KeyStore:
    """Operations on a device key file; each takes the file's path.

    Every change is computed in memory and written atomically (temporary file, fsync,
    rename, mode 0600): a wrong passphrase, a crash or a full disk leaves the old file
    exactly as it was. Writers of one file are serialized with an advisory lock (a
    ``<name>.lock`` sibling) on POSIX.

    Examples
    --------
    >>> import tempfile
    >>> from lorafleet.protocols.crypto import Argon2idParams
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = Path(folder.name) / "keys.json"
    >>> cheap = Argon2idParams(iterations=1, memory_kib=64, lanes=1)  # tests only
    >>> keys = KeyStore.create(path, "correct horse", kdf=cheap)
    >>> KeyStore.rotate(path, "correct horse")
    2
    >>> sorted(KeyStore.unlock(path, "correct horse")) == [1, 2]
    True
    >>> folder.cleanup()
    """

    @staticmethod
    def create(
        path: Path | str,
        passphrase: str,
        *,
        recovery_public_keys: Iterable[bytes] = (),
        kdf: crypto.KdfParams | None = None,
    ) -> UnlockedKeys:
        """Create a key file with one fresh master key (generation 1) and return it.

        Parameters
        ----------
        path
            Where the key file goes; must not exist yet (it may hold the only copy of
            someone's keys, so it is never overwritten).
        passphrase
            Non-empty; normalized to Unicode NFC before the KDF.
        recovery_public_keys
            Raw 32-byte X25519 public keys (``RecoveryKeyPair.public_key``) that can
            also unlock the keys.
        kdf
            KDF and cost; by default production-strength Argon2id (or scrypt) with a
            fresh salt, see :func:`~lorafleet.protocols.crypto.kdf_params_default`.
        """
        path = Path(path)
        _check_passphrase(passphrase)
        publics = _check_public_keys(recovery_public_keys)
        params = kdf if kdf is not None else crypto.kdf_params_default()
        with _locked(path):
            if path.exists():
                raise KeyStoreError(
                    f"{path} already exists and may hold the only copy of your keys; unlock "
                    "it, or move it away first"
                )
            store_id = secrets.token_bytes(16)
            keys = {1: crypto.random_key()}
            kek = crypto.derive_from_passphrase(passphrase, params)
            keyfile = _KeyFile(
                store_id=store_id,
                kdf=params,
                wraps=_wrap_all(kek, store_id, keys),
                recovery={p: _wrap_all_for(p, store_id, keys) for p in publics},
            )
            _write(path, keyfile)
        logger.info("created key file %s (%s, %d recovery keys)", path, params.name, len(publics))
        return UnlockedKeys(keys)

    @staticmethod
    def unlock(path: Path | str, passphrase: str) -> UnlockedKeys:
        """All master keys in the key file, opened with the passphrase.

        Raises :class:`~lorafleet.protocols.errors.WrongPassphraseError` for a wrong
        passphrase and :class:`~lorafleet.protocols.errors.MissingKeyFileError` when
        there is no file at ``path``.
        """
        path = Path(path)
        _, keys = _unlock_passphrase(path, _read(path), passphrase)
        return UnlockedKeys(keys)

    @staticmethod
    def unlock_with_recovery(path: Path | str, private_key: bytes) -> UnlockedKeys:
        """All master keys wrapped for ``private_key``'s public half.

        ``path`` may be a key file or a recovery bundle saved to disk.
        """
        path = Path(path)
        keyfile = _read(path)
        return UnlockedKeys(_unlock_recovery(f"key file {path}", keyfile, private_key))

    @staticmethod
    def change_passphrase(
        path: Path | str,
        old_passphrase: str,
        new_passphrase: str,
        *,
        kdf: crypto.KdfParams | None = None,
    ) -> None:
        """Re-wrap every master key under a new passphrase, with a fresh salt.

        The KDF and cost stay as they were unless ``kdf`` is given. Blobs are not
        touched: the master keys themselves do not change.
        """
        path = Path(path)
        _check_passphrase(new_passphrase, "new passphrase")
        with _locked(path):
            keyfile = _read(path)
            _, keys = _unlock_passphrase(path, keyfile, old_passphrase)
            assert keyfile.kdf is not None
            params = kdf if kdf is not None else _fresh_salt(keyfile.kdf)
            kek = crypto.derive_from_passphrase(new_passphrase, params)
            keyfile.kdf = params
            keyfile.wraps = _wrap_all(kek, keyfile.store_id, keys)
            _write(path, keyfile)
        logger.info("changed the passphrase of key file %s", path)

    @staticmethod
    def rotate(path: Path | str, passphrase: str) -> int:
        """Add a new master key generation for new blobs; returns its key id.

        Older generations stay in the file (wrapped as before, and for every recovery
        key), so blobs sealed with them still open without being re-uploaded.
        """
        path = Path(path)
        with _locked(path):
            keyfile = _read(path)
            kek, _ = _unlock_passphrase(path, keyfile, passphrase)
            new_id = max(keyfile.key_ids()) + 1
            if new_id > MAX_KEY_ID:
                raise KeyStoreError(f"key file {path} has used every key id; create a new one")
            new = {new_id: crypto.random_key()}
            keyfile.wraps.update(_wrap_all(kek, keyfile.store_id, new))
            for public, wraps in keyfile.recovery.items():
                wraps.update(_wrap_all_for(public, keyfile.store_id, new))
            _write(path, keyfile)
        logger.info("rotated key file %s to master key generation %d", path, new_id)
        return new_id

    @staticmethod
    def add_recovery_key(path: Path | str, passphrase: str, public_key: bytes) -> None:
        """Let ``public_key``'s private half unlock every current and older generation.

        Adding a key that is already registered re-wraps its copies, which is harmless.
        """
        path = Path(path)
        (public,) = _check_public_keys([public_key])
        with _locked(path):
            keyfile = _read(path)
            _, keys = _unlock_passphrase(path, keyfile, passphrase)
            keyfile.recovery[public] = _wrap_all_for(public, keyfile.store_id, keys)
            _write(path, keyfile)
        logger.info("added recovery key %s... to key file %s", public.hex()[:16], path)

    @staticmethod
    def remove_recovery_key(path: Path | str, passphrase: str, public_key: bytes) -> None:
        """Stop wrapping keys for ``public_key`` (copies already made elsewhere remain)."""
        path = Path(path)
        (public,) = _check_public_keys([public_key])
        with _locked(path):
            keyfile = _read(path)
            _unlock_passphrase(path, keyfile, passphrase)
            if public not in keyfile.recovery:
                raise KeyStoreError(
                    f"recovery key {public.hex()[:16]}... is not registered in {path}"
                )
            del keyfile.recovery[public]
            _write(path, keyfile)
        logger.info("removed recovery key %s... from key file %s", public.hex()[:16], path)

    @staticmethod
    def recovery_bundle(path: Path | str) -> bytes:
        """The key file without its passphrase part: safe to store with the backups.

        Every key in it is wrapped for the registered recovery public keys only, so
        holding it reveals nothing without a recovery private key (not even a chance to
        guess the passphrase). Take a new bundle after :meth:`rotate` or
        :meth:`add_recovery_key`.
        """
        path = Path(path)
        keyfile = _read(path)
        if not keyfile.recovery:
            raise KeyStoreError(
                f"key file {path} has no recovery keys, so a bundle could never be opened; "
                "add one with KeyStore.add_recovery_key first"
            )
        return keyfile.to_bytes(bundle=True)

    @staticmethod
    def restore(
        path: Path | str,
        bundle: bytes,
        private_key: bytes,
        passphrase: str,
        *,
        kdf: crypto.KdfParams | None = None,
    ) -> UnlockedKeys:
        """Rebuild a key file at ``path`` from a recovery bundle and a recovery key.

        The new file holds every generation the bundle held, wrapped under the new
        ``passphrase``, and keeps all registered recovery keys. ``path`` must not exist.
        """
        path = Path(path)
        _check_passphrase(passphrase)
        if not isinstance(bundle, bytes):
            raise SpecError(f"bundle must be bytes, got {type(bundle).__name__}")
        source = _parse_or_explain(bundle, "recovery bundle")
        keys = _unlock_recovery("the recovery bundle", source, private_key)
        params = kdf if kdf is not None else crypto.kdf_params_default()
        with _locked(path):
            if path.exists():
                raise KeyStoreError(
                    f"{path} already exists; restore to another path, or move it away first"
                )
            kek = crypto.derive_from_passphrase(passphrase, params)
            keyfile = _KeyFile(
                store_id=source.store_id,
                kdf=params,
                wraps=_wrap_all(kek, source.store_id, keys),
                recovery=source.recovery,
            )
            _write(path, keyfile)
        logger.info("restored key file %s with %d master key generations", path, len(keys))
        return UnlockedKeys(keys)

    @staticmethod
    def info(path: Path | str) -> KeyFileInfo:
        """KDF, key ids and recovery keys of a key file; needs no passphrase."""
        path = Path(path)
        keyfile = _read(path)
        return KeyFileInfo(
            path=path,
            kdf=keyfile.kdf.name if keyfile.kdf is not None else None,
            key_ids=tuple(keyfile.key_ids()),
            recovery_public_keys=tuple(p.hex() for p in sorted(keyfile.recovery)),
        )
