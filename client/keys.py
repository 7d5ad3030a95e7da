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

The list of recovery keys is in the clear, so the file also carries a ``recovery_tag``:
an HMAC over that list keyed from the master keys. It is checked right after every
unlock and before anything is wrapped for a listed key, so whoever holds a copy of the
file (the backup server) cannot add a recovery key of its own and be handed the next
generation by :meth:`KeyStore.rotate` (:class:`KeyFileTamperedError`). A key file
fetched from elsewhere (:meth:`KeyStore.adopt`, :meth:`KeyStore.restore`) must also not
be older than the newest generation this device has seen (:class:`SeenGenerations`,
:class:`KeyFileRollbackError`).

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
from lorafleet.protocols.atomic import atomic_write_bytes, writing
from lorafleet.protocols.errors import (
    DecryptionError,
    KeyFileRollbackError,
    KeyFileTamperedError,
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
RECOVERY_TAG_INFO = b"lorafleet/keyfile/v1/recovery-tag"
"""HKDF ``info`` of the key that MACs a key file's recovery list (``recovery_tag``)."""
_MAX_FILE_BYTES = MAX_KEYFILE_BYTES
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


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
    tag: bytes | None = None
    """``recovery_tag``: binds ``recovery`` to the master keys; None in older files."""

    def key_ids(self) -> list[int]:
        ids = set(self.wraps)
        for wraps in self.recovery.values():
            ids |= set(wraps)
        return sorted(ids)

    @property
    def generation(self) -> int:
        """The newest master key generation the file holds."""
        return max(self.key_ids())

    def recovery_message(self) -> bytes:
        """The canonical bytes ``recovery_tag`` authenticates (docs/envelope.md).

        Everything that decides who besides the passphrase can unwrap a master key: the
        store id, every generation, and each recovery public key with its wrapped
        copies, in sorted order with fixed-size fields and u32 LE counts.
        """
        ids = self.key_ids()
        out = [RECOVERY_TAG_INFO + b"\x00", self.store_id, _u32(len(ids))]
        out += [_u32(key_id) for key_id in ids]
        out.append(_u32(len(self.recovery)))
        for public, wraps in sorted(self.recovery.items()):
            out += [public, _u32(len(wraps))]
            for key_id, wrapped in sorted(wraps.items()):
                out += [_u32(key_id), wrapped]
        return b"".join(out)

    def seal_recovery(self, keys: Mapping[int, bytes]) -> None:
        """Set ``tag`` for the current recovery list; ``keys`` are all master keys."""
        self.tag = crypto.mac_tag(
            [keys[k] for k in sorted(keys)],
            self.recovery_message(),
            info=RECOVERY_TAG_INFO,
            salt=self.store_id,
        )

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
        if self.tag is not None:
            obj["recovery_tag"] = self.tag.hex()
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


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
    _members(
        obj,
        "key file",
        {"format", "format_version", "store_id", "recovery"},
        {"passphrase", "recovery_tag"},
    )
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
    tag: bytes | None = None
    if "recovery_tag" in obj:
        tag_hex = obj["recovery_tag"]
        if not isinstance(tag_hex, str) or not _HEX64.match(tag_hex):
            raise ValueError("recovery_tag must be 64 lowercase hex characters")
        tag = bytes.fromhex(tag_hex)
    return _KeyFile(bytes.fromhex(store_id), kdf, wraps, recovery, tag)


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
    with writing(path):
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


def _check_recovery(source: str, keyfile: _KeyFile, keys: Mapping[int, bytes]) -> bool:
    """Whether ``recovery_tag`` vouches for the recovery list; raise if the list changed.

    ``keys`` are every master key, just unwrapped (by passphrase or recovery key). A
    file without the tag (written before it existed) gives False and the caller applies
    the migration rule of docs/envelope.md; a tag that does not match, or generations
    that differ from the ones the keys open, raise :class:`KeyFileTamperedError`.
    """
    if sorted(keys) != keyfile.key_ids():
        raise KeyFileTamperedError(
            f"{source} lists master key generations {keyfile.key_ids()} but only "
            f"{sorted(keys)} open with your key: generations were added to its recovery "
            "part by someone without your keys; refusing it. Use the key file of a device "
            "you trust, or KeyStore.restore with a recovery bundle you kept"
        )
    if keyfile.tag is None:
        return False
    ordered = [keys[k] for k in sorted(keys)]
    message = keyfile.recovery_message()
    if not crypto.mac_tag_ok(
        ordered, message, keyfile.tag, info=RECOVERY_TAG_INFO, salt=keyfile.store_id
    ):
        raise KeyFileTamperedError(
            f"{source}: its recovery keys (who else can unwrap your master keys) were changed "
            "since your keys last wrote it, e.g. a key added by whoever holds a copy (the "
            "backup server?); refusing it. Use the key file of a device you trust, or "
            "KeyStore.restore with a recovery bundle you kept"
        )
    return True


def _publics(recovery: Iterable[bytes]) -> str:
    return ", ".join(p.hex()[:16] + "..." for p in sorted(recovery)) or "none"


def _vouch_local(path: Path, keyfile: _KeyFile, keys: Mapping[int, bytes]) -> None:
    """Check a device's own key file; an untagged (older) one is accepted with a warning.

    The file is this device's own, written by an older lorafleet; its next change
    (rotate, change_passphrase, add or remove a recovery key) adds the tag over the
    recovery keys it lists now, so the warning names them for the user to check.
    """
    if not _check_recovery(f"key file {path}", keyfile, keys) and keyfile.recovery:
        logger.warning(
            "key file %s has no recovery_tag (written by an older lorafleet); its next "
            "change binds the recovery keys it lists: %s. Remove any that is not yours "
            "with KeyStore.remove_recovery_key",
            path,
            _publics(keyfile.recovery),
        )


def _check_generation(source: str, keyfile: _KeyFile, seen: SeenGenerations | None) -> None:
    floor = seen.floor(keyfile.store_id) if seen is not None else 0
    if keyfile.generation < floor:
        raise KeyFileRollbackError(
            f"{source} holds master key generations up to {keyfile.generation}, but this "
            f"device has seen generation {floor} of these keys: it is an older copy "
            "offered as the newest (a rollback); refusing it. Copy the newest key file "
            "from a device that has it, or restore with your recovery key"
        )


def _wrap_all(kek: bytes, store_id: bytes, keys: Mapping[int, bytes]) -> dict[int, bytes]:
    return {k: crypto.wrap_key(kek, key, _aad(store_id, k)) for k, key in keys.items()}


def _wrap_all_for(public: bytes, store_id: bytes, keys: Mapping[int, bytes]) -> dict[int, bytes]:
    return {k: crypto.wrap_for_recipient(public, key, _aad(store_id, k)) for k, key in keys.items()}


def _fresh_salt(params: crypto.KdfParams) -> crypto.KdfParams:
    return dataclasses.replace(params, salt=secrets.token_bytes(16))


# --- rollback protection ---------------------------------------------------------------


SEEN_FORMAT = "lorafleet-seen-generations"
"""Value of the ``format`` member of a :class:`SeenGenerations` file."""


class SeenGenerations:
    """The newest master key generation this device has seen, per key set (store id).

    A small JSON file, mode 0600, by default beside the key file (``keys.json.seen``):
    ``{"format": "lorafleet-seen-generations", "stores": {"<store id hex>": n}}``. A key
    file fetched from elsewhere (:meth:`KeyStore.adopt`, :meth:`KeyStore.restore`) whose
    newest generation is below the recorded one is refused as a rollback. Numbers only
    grow; nothing secret is in the file.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> seen = SeenGenerations.beside(Path(folder.name) / "keys.json")
    >>> seen.note(bytes(16), 3); seen.note(bytes(16), 2); seen.floor(bytes(16))
    3
    >>> folder.cleanup()
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @classmethod
    def beside(cls, key_file: Path | str) -> SeenGenerations:
        """The record kept next to ``key_file`` (``<name>.seen``)."""
        key_file = Path(key_file)
        return cls(key_file.with_name(key_file.name + ".seen"))

    def _load(self) -> dict[str, int]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise KeyStoreError(
                f"{self.path} is unreadable ({exc}); delete it (this device then forgets "
                "which key file generations it has seen)"
            ) from None
        stores = doc.get("stores") if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != SEEN_FORMAT
            or not isinstance(stores, dict)
            or not all(
                isinstance(k, str) and _HEX32.match(k) and type(v) is int and v >= 0
                for k, v in stores.items()
            )
        ):
            raise KeyStoreError(
                f"{self.path} is damaged; delete it (this device then forgets which key "
                "file generations it has seen)"
            )
        return dict(stores)

    def floor(self, store_id: bytes) -> int:
        """The newest generation of key set ``store_id`` seen here (0: none)."""
        return self._load().get(store_id.hex(), 0)

    def note(self, store_id: bytes, generation: int) -> None:
        """Remember ``generation`` of ``store_id`` unless a newer one is remembered."""
        stores = self._load()
        if stores.get(store_id.hex(), 0) >= generation:
            return
        stores[store_id.hex()] = generation
        doc = {"format": SEEN_FORMAT, "stores": stores}
        atomic_write_bytes(
            self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=0o600
        )

    def note_file(self, key_file: Path | str) -> None:
        """Remember the newest generation of this device's own key file."""
        keyfile = _read(Path(key_file))
        self.note(keyfile.store_id, keyfile.generation)


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
            keyfile.seal_recovery(keys)
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
        keyfile = _read(path)
        _, keys = _unlock_passphrase(path, keyfile, passphrase)
        _vouch_local(path, keyfile, keys)
        return UnlockedKeys(keys)

    @staticmethod
    def unlock_with_recovery(path: Path | str, private_key: bytes) -> UnlockedKeys:
        """All master keys wrapped for ``private_key``'s public half.

        ``path`` may be a key file or a recovery bundle saved to disk.
        """
        path = Path(path)
        keyfile = _read(path)
        keys = _unlock_recovery(f"key file {path}", keyfile, private_key)
        _vouch_local(path, keyfile, keys)
        return UnlockedKeys(keys)

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
            _vouch_local(path, keyfile, keys)
            assert keyfile.kdf is not None
            params = kdf if kdf is not None else _fresh_salt(keyfile.kdf)
            kek = crypto.derive_from_passphrase(new_passphrase, params)
            keyfile.kdf = params
            keyfile.wraps = _wrap_all(kek, keyfile.store_id, keys)
            keyfile.seal_recovery(keys)
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
            kek, keys = _unlock_passphrase(path, keyfile, passphrase)
            # Before anything is wrapped for the listed recovery keys: were they changed?
            _vouch_local(path, keyfile, keys)
            new_id = keyfile.generation + 1
            if new_id > MAX_KEY_ID:
                raise KeyStoreError(f"key file {path} has used every key id; create a new one")
            new = {new_id: crypto.random_key()}
            keyfile.wraps.update(_wrap_all(kek, keyfile.store_id, new))
            for public, wraps in keyfile.recovery.items():
                wraps.update(_wrap_all_for(public, keyfile.store_id, new))
            keyfile.seal_recovery({**keys, **new})
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
            _vouch_local(path, keyfile, keys)
            keyfile.recovery[public] = _wrap_all_for(public, keyfile.store_id, keys)
            keyfile.seal_recovery(keys)
            _write(path, keyfile)
        logger.info("added recovery key %s... to key file %s", public.hex()[:16], path)

    @staticmethod
    def remove_recovery_key(path: Path | str, passphrase: str, public_key: bytes) -> None:
        """Stop wrapping keys for ``public_key`` (copies already made elsewhere remain)."""
        path = Path(path)
        (public,) = _check_public_keys([public_key])
        with _locked(path):
            keyfile = _read(path)
            _, keys = _unlock_passphrase(path, keyfile, passphrase)
            if public not in keyfile.recovery:
                raise KeyStoreError(
                    f"recovery key {public.hex()[:16]}... is not registered in {path}"
                )
            _vouch_local(path, keyfile, keys)
            del keyfile.recovery[public]
            keyfile.seal_recovery(keys)
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
        seen: SeenGenerations | None = None,
    ) -> UnlockedKeys:
        """Rebuild a key file at ``path`` from a recovery bundle and a recovery key.

        The new file holds every generation the bundle held, wrapped under the new
        ``passphrase``, and keeps the registered recovery keys once the bundle's
        ``recovery_tag`` proves they are the ones your keys registered. ``path`` must
        not exist.

        Parameters
        ----------
        path
            Where the new key file goes.
        bundle
            A recovery bundle or a whole key file (e.g. fetched from the backup server).
        private_key
            A registered recovery private key (32 bytes, X25519).
        passphrase
            The new key file's passphrase.
        kdf
            Its KDF and cost (default: production strength, fresh salt).
        seen
            This device's record of generations seen; a bundle older than it is refused.

        Raises
        ------
        KeyFileTamperedError
            The bundle's recovery keys were changed (a key added by whoever held it).
        KeyFileRollbackError
            The bundle is older than a key file this device has seen.

        Notes
        -----
        A bundle written before ``recovery_tag`` existed cannot prove who added its
        other recovery keys, so only the key given here is kept (a warning names the
        ones dropped; add them again with :meth:`add_recovery_key` if they are yours).
        """
        path = Path(path)
        _check_passphrase(passphrase)
        if not isinstance(bundle, bytes):
            raise SpecError(f"bundle must be bytes, got {type(bundle).__name__}")
        source = _parse_or_explain(bundle, "recovery bundle")
        keys = _unlock_recovery("the recovery bundle", source, private_key)
        recovery = source.recovery
        if not _check_recovery("the recovery bundle", source, keys):
            public = crypto.recovery_public_key(private_key)
            if len(recovery) > 1:
                logger.warning(
                    "the recovery bundle has no recovery_tag (written by an older lorafleet), "
                    "so its other recovery keys cannot be told from ones someone added; "
                    "keeping only the key you restored with, dropping: %s. Add them again "
                    "with KeyStore.add_recovery_key if they are yours",
                    _publics(p for p in recovery if p != public),
                )
            recovery = {public: recovery[public]}
        _check_generation("the recovery bundle", source, seen)
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
                recovery=recovery,
            )
            keyfile.seal_recovery(keys)
            _write(path, keyfile)
        if seen is not None:
            seen.note(keyfile.store_id, keyfile.generation)
        logger.info("restored key file %s with %d master key generations", path, len(keys))
        return UnlockedKeys(keys)

    @staticmethod
    def adopt(
        path: Path | str,
        data: bytes,
        passphrase: str,
        *,
        seen: SeenGenerations | None = None,
    ) -> UnlockedKeys:
        """Install a key file that came from elsewhere (the backup server) at ``path``.

        It is unlocked with ``passphrase`` and its recovery keys are checked against its
        ``recovery_tag`` before it is written, so a server that added its own recovery
        key (to be handed every later generation by :meth:`rotate`) is caught here.

        Parameters
        ----------
        path
            Where the key file goes; must not exist.
        data
            The key file's bytes.
        passphrase
            Its passphrase.
        seen
            This device's record of generations seen; an older key file is refused.

        Raises
        ------
        WrongPassphraseError
            The passphrase does not unlock it.
        KeyFileTamperedError
            Its recovery keys were changed since the user's keys last wrote it.
        KeyFileRollbackError
            It is older than a key file this device has seen.

        Notes
        -----
        A key file written before ``recovery_tag`` existed cannot prove its recovery
        keys are the user's, so they are dropped (with a warning naming them) and the
        file is written with a tag over the empty list: the passphrase still opens
        it; add recovery keys again with :meth:`add_recovery_key`.
        """
        path = Path(path)
        if not isinstance(data, bytes):
            raise SpecError(f"data must be bytes, got {type(data).__name__}")
        source = f"the key file offered for {path}"
        keyfile = _parse_or_explain(data, source)
        _, keys = _unlock_passphrase(path, keyfile, passphrase)
        tagged = _check_recovery(source, keyfile, keys)
        _check_generation(source, keyfile, seen)
        if not tagged:
            if keyfile.recovery:
                logger.warning(
                    "%s has no recovery_tag (written by an older lorafleet), so its recovery "
                    "keys cannot be told from ones someone added; dropping them: %s. Add "
                    "yours again with KeyStore.add_recovery_key",
                    source,
                    _publics(keyfile.recovery),
                )
            keyfile.recovery = {}
            keyfile.seal_recovery(keys)
            data = keyfile.to_bytes()
        with _locked(path):
            if path.exists():
                raise KeyStoreError(f"{path} already exists; move it away first")
            atomic_write_bytes(path, data, mode=0o600)
        if seen is not None:
            seen.note(keyfile.store_id, keyfile.generation)
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
