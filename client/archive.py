"""The adapter archive: one version of a profile as the plaintext of a backup envelope.

Format 2 (written since issue 15) carries B only; format 3 carries B and a personal A
(trained on the device, which no seed rebuilds), both packed the same way, for the
versions that have one. In format 2 A is rebuilt bit for bit from the
cohort seed (:func:`lorafleet.protocols.seeds.derive_a`), so storing it was a waste of
60% of every backup; B is packed by the same code the federated rounds use
(:func:`lorafleet.protocols.encoding.encode_tensors`), int8 by default, which
``bench/backup_size.py`` measured at 0.11x format 1's bytes and a held-out loss change
of -2.4e-05 nats on SmolLM2-135M (none measurable; fp16 is 0.205x). Restore rebuilds the stock PEFT folder (same files; A bit-identical;
B as packed), so ``PeftModel.from_pretrained`` loads it as before.

Format 1 (every file of the version folder, byte for byte) is still read, so archives
made before issue 15 keep restoring, and still written where formats 2 and 3 cannot
rebuild a folder exactly (a peft that writes another layout, a non-float32 adapter).
Format 3 is separate from 2 so that a lorafleet too old to know a personal A says
"upgrade" instead of restoring a B that was trained for another A.

Everything read is checked before it is returned: sizes, sha256s, names and shapes
against the spec, so nothing a hostile coordinator serves reaches the disk unchecked.
The layouts are in ``docs/backup.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lorafleet.client.adapter import (
    PROVENANCE_FILE,
    WEIGHTS_FILE,
    ATensors,
    BTensors,
    b_content_hash,
    read_adapter,
    read_b,
    read_provenance,
)
from lorafleet.client.profile import PROFILE_FILE, Profile
from lorafleet.protocols.encoding import (
    Packing,
    decode_tensors,
    encode_tensors,
    max_abs_error_bound,
    packing_of,
)
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.seeds import derive_a
from lorafleet.protocols.spec import AdapterSpec

__all__ = [
    "ARCHIVE_MAGIC",
    "ARCHIVE_VERSION",
    "ARCHIVE_VERSION_PERSONAL_A",
    "BACKUP_PACKING",
    "AdapterArchive",
    "pack_version",
    "pack_version_v1",
    "same_adapter_files",
    "unpack_archive",
]

logger = logging.getLogger(__name__)

ARCHIVE_MAGIC = b"LFBK"
"""First bytes of an adapter archive (the plaintext inside a backup envelope)."""
ARCHIVE_VERSION = 2
"""The format :func:`pack_version` writes for a seeded A; :func:`unpack_archive` reads 1-3."""
ARCHIVE_VERSION_PERSONAL_A = 3
"""The format :func:`pack_version` writes for a version with a personal A."""
BACKUP_PACKING: Packing = "int8"
"""How B (and a personal A) is packed in formats 2 and 3 by default (docs/benchmarks.md)."""

_HEAD = struct.Struct("<4sBI")  # magic, archive format, JSON length
_PEFT_PREFIX = "base_model.model."
_PEFT_METADATA = {"format": "pt"}  # what peft's save_pretrained puts in __metadata__
# A module path as peft and the base name it: dotted identifiers, nothing else.
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")
_MAX_FEATURES = 1 << 20  # a Linear wider than this is not an adapter target
_MAX_WEIGHTS_BYTES = 1 << 30  # the rebuilt weights file; blobs are capped at 512 MiB


@dataclass(frozen=True)
class AdapterArchive:
    """One adapter version of a profile, as carried inside a backup envelope."""

    version: int
    profile_json: bytes
    """The profile's ``profile.json`` (spec and base source), byte for byte."""
    files: Mapping[str, bytes]
    """The version folder's files by relative POSIX path, as they are to be written."""
    format: int = ARCHIVE_VERSION
    """The archive format it was read from (1: whole folder; 2: B only; 3: B and A)."""
    packing: Packing = "fp32"
    """How B (and in format 3 A) was packed; ``fp32`` (exact) for format 1."""

    @property
    def spec(self) -> AdapterSpec:
        """The adapter spec recorded in ``profile.json``."""
        return _spec_of(self.profile_json)


# --- writing ------------------------------------------------------------------------------


def _version_folder(profile_root: Path | str, version: int) -> tuple[Path, Path]:
    root = Path(profile_root)
    folder = Profile.open(root).version_dir(version)
    if not folder.is_dir():
        known = [p.version for p in Profile.open(root).versions()]
        raise LorafleetError(f"no adapter version {version} in {root}; saved versions: {known}")
    return root, folder


def _entry(blob: bytes) -> dict[str, Any]:
    """A section's header entry: what the reader checks it against."""
    return {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def _listing(folder: Path, skip: str | None = None) -> tuple[list[dict[str, Any]], list[bytes]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files = [p for p in files if p.relative_to(folder).as_posix() != skip]
    blobs = [p.read_bytes() for p in files]
    listing = [
        {"path": p.relative_to(folder).as_posix(), **_entry(b)}
        for p, b in zip(files, blobs, strict=True)
    ]
    return listing, blobs


def _archive(fmt: int, head: Mapping[str, Any], parts: list[bytes]) -> bytes:
    raw = json.dumps(head, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return b"".join([_HEAD.pack(ARCHIVE_MAGIC, fmt, len(raw)), raw, *parts])


def pack_version_v1(profile_root: Path | str, version: int) -> bytes:
    """Format 1: the whole version folder byte for byte (A and B in fp32).

    ``LFBK || u8 1 || u32 len(J) || J || profile.json || file bytes...``, where ``J`` is
    UTF-8 JSON ``{"version", "profile_json_size", "files": [{"path", "size",
    "sha256"}...]}`` and the files follow in the listed (sorted) order. Kept as the
    fallback of :func:`pack_version` and so tests can make the archives old devices
    uploaded.
    """
    root, folder = _version_folder(profile_root, version)
    read_b(folder, read_provenance(folder))  # never back up a damaged version
    profile_json = (root / PROFILE_FILE).read_bytes()
    listing, blobs = _listing(folder)
    head = {"version": version, "profile_json_size": len(profile_json), "files": listing}
    return _archive(1, head, [profile_json, *blobs])


def pack_version(
    profile_root: Path | str, version: int, *, packing: Packing = BACKUP_PACKING
) -> bytes:
    """The archive of one saved version of a profile: B only (format 2), or B and A (3).

    ``LFBK || u8 2 || u32 len(J) || J || profile.json || file bytes... || B``, where the
    files are every file of the folder but ``adapter_model.safetensors`` and ``B`` is
    :func:`~lorafleet.protocols.encoding.encode_tensors` of the B matrices (keyed by
    module path) in ``packing``. ``J`` adds ``"weights": {"fan_in": [...], "size",
    "sha256"}``: each module's input width in sorted module order, which A's shape needs.
    A version with a personal A is written as format 3: ``... || B || A``, A packed the
    same way, with ``"a": {"size", "sha256"}`` added to ``J``'s ``weights``.

    Before it returns it rebuilds the weights file from the exact B and the seed's A
    (or the exact personal A) and compares it with the file on disk; where that does not
    give the same bytes (another peft layout, a non-float32 adapter) it logs why and
    writes format 1, so a restore never lays a folder out otherwise than it was saved.
    """
    root, folder = _version_folder(profile_root, version)
    provenance = read_provenance(folder)
    b, a = read_adapter(folder, provenance)  # never back up a damaged version
    weights = (folder / WEIGHTS_FILE).read_bytes()
    fan_in = _fan_in(weights)
    names = sorted(b)
    if (
        sorted(fan_in) != names
        or (a is not None and sorted(a) != names)
        or _rebuild(provenance.spec, b, fan_in, a) != weights
    ):
        logger.warning(
            "version %d in %s cannot be rebuilt from its seed byte for byte; backing up "
            "the whole folder (archive format 1)",
            version,
            root,
        )
        return pack_version_v1(root, version)
    profile_json = (root / PROFILE_FILE).read_bytes()
    listing, blobs = _listing(folder, skip=WEIGHTS_FILE)
    payload = encode_tensors(b, packing=packing)
    weights_head: dict[str, Any] = {"fan_in": [fan_in[n] for n in names], **_entry(payload)}
    parts = [profile_json, *blobs, payload]
    fmt = ARCHIVE_VERSION
    if a is not None:  # no seed rebuilds a trained A: it travels, packed like B
        # transposed, (in, rank), so int8 keeps one scale per rank index, as for B
        a_payload = encode_tensors({k: v.T for k, v in a.items()}, packing=packing)
        weights_head["a"] = _entry(a_payload)
        parts.append(a_payload)
        fmt = ARCHIVE_VERSION_PERSONAL_A
    head = {
        "version": version,
        "profile_json_size": len(profile_json),
        "files": listing,
        "weights": weights_head,
    }
    return _archive(fmt, head, parts)


def _fan_in(weights: bytes) -> dict[str, int]:
    """Input width of each module, from the A shapes in a (verified) weights file."""
    from safetensors.numpy import load

    return {
        key[len(_PEFT_PREFIX) : -len(".lora_A.weight")]: int(value.shape[1])
        for key, value in load(weights).items()
        if key.endswith(".lora_A.weight")
    }


def _rebuild(
    spec: AdapterSpec,
    b: Mapping[str, npt.NDArray[np.float32]],
    fan_in: Mapping[str, int],
    a: Mapping[str, npt.NDArray[np.float32]] | None = None,
) -> bytes:
    """The PEFT weights file: A from the seed (or the personal A), B as given, as peft saves it."""
    from safetensors.numpy import save

    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for module, value in b.items():
        prefix = f"{_PEFT_PREFIX}{module}.lora_"
        tensors[prefix + "A.weight"] = (  # (r, in)
            derive_a(spec, module, fan_in[module])
            if a is None
            else np.ascontiguousarray(a[module], dtype="<f4")
        )
        tensors[prefix + "B.weight"] = np.ascontiguousarray(value, dtype="<f4")  # (out, r)
    return bytes(save(tensors, metadata=dict(_PEFT_METADATA)))


# --- reading ------------------------------------------------------------------------------


def _spec_of(profile_json: bytes) -> AdapterSpec:
    try:
        return AdapterSpec.from_dict(json.loads(profile_json)["spec"])
    except (ValueError, KeyError, TypeError, SpecError) as exc:
        raise IntegrityError(f"the backup's profile.json is unreadable ({exc})") from None


def _safe_path(path: object) -> str:
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or "\\" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise IntegrityError(f"the backup names an unsafe file path {path!r:.80}")
    return path


class _Reader:
    """Walks an archive's byte sections in order, checking each size and sha256."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, size: object, what: str) -> bytes:
        """The next ``size`` bytes; the header's ``size`` must be a count that fits."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise IntegrityError(f"the backup archive's entry for {what} is damaged")
        blob = self.data[self.pos : self.pos + size]
        self.pos += size
        if len(blob) != size:
            raise IntegrityError(f"the backup archive is truncated in {what}")
        return blob

    def take_hashed(self, size: object, sha256: object, what: str) -> bytes:
        """The next ``size`` bytes, which must hash to ``sha256`` (absent: a mismatch)."""
        blob = self.take(size, what)
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise IntegrityError(f"{what} in the backup archive does not match its sha256")
        return blob


def unpack_archive(data: bytes) -> AdapterArchive:
    """Parse an archive of format 1, 2 or 3, checking everything before returning it.

    Every format must hold the weights (or B) and a provenance naming this version and
    the profile's spec. For formats 2 and 3 the weights file is rebuilt here, in memory:
    every B name must be a module path the spec targets, every shape ``(out, rank)``,
    every input width sane; format 3's A must name the same modules with shapes
    ``(rank, in)``, and only a provenance that says ``personal_a`` may come with one.
    Weights that do not hash to the provenance's content hash (lossy packing) get a
    provenance that records the hash of what they hold, every other field unchanged.

    Raises
    ------
    IntegrityError
        Anything is truncated, damaged, unsafe or does not fit the spec; one line.
    """
    if len(data) < _HEAD.size:
        raise IntegrityError("the backup archive is truncated")
    magic, fmt, head_len = _HEAD.unpack_from(data)
    if magic != ARCHIVE_MAGIC:
        raise IntegrityError("the backup is not a lorafleet adapter archive")
    if fmt not in (1, 2, 3):
        raise IntegrityError(
            f"adapter archive format {fmt} is not supported by this lorafleet; upgrade it"
        )
    try:
        head = json.loads(data[_HEAD.size : _HEAD.size + head_len].decode("utf-8"))
        version, profile_size, listing = head["version"], head["profile_json_size"], head["files"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise TypeError("version must be an integer >= 1")
        if not isinstance(listing, list):
            raise TypeError("files must be a list")
        weights = a_entry = None
        if fmt >= 2:
            weights = head["weights"]
            if not isinstance(weights, dict):
                raise TypeError("weights must be an object")
            if fmt == 3:
                a_entry = weights["a"]
                if not isinstance(a_entry, dict):
                    raise TypeError("weights.a must be an object")
            elif "a" in weights:
                raise TypeError("format 2 carries no A")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the backup archive's header is damaged ({exc})") from None
    reader = _Reader(data, _HEAD.size + head_len)
    profile_json = reader.take(profile_size, "profile.json")
    files: dict[str, bytes] = {}
    for entry in listing:
        if not isinstance(entry, dict):
            raise IntegrityError("the backup archive's file list is damaged")
        path = _safe_path(entry.get("path"))
        if path in files or (fmt >= 2 and path == WEIGHTS_FILE):
            raise IntegrityError(f"the backup archive lists {path} twice")
        files[path] = reader.take_hashed(entry.get("size"), entry.get("sha256"), path)
    payload = a_payload = None
    if weights is not None:
        payload = reader.take_hashed(weights.get("size"), weights.get("sha256"), "the B matrices")
    if a_entry is not None:
        a_payload = reader.take_hashed(a_entry.get("size"), a_entry.get("sha256"), "the A matrices")
    if reader.pos != len(data):
        raise IntegrityError("the backup archive's length does not match its header")
    provenance = _checked_provenance(version, profile_json, files)
    packing: Packing = "fp32"
    if payload is not None and weights is not None:  # formats 2, 3: rebuild the weights
        packing = packing_of(payload)
        if a_payload is not None and packing_of(a_payload) != packing:
            raise IntegrityError("the backup archive packs A and B differently: refusing it")
        files.update(_restored_weights(provenance, payload, weights, a_payload))
    elif WEIGHTS_FILE not in files:
        raise IntegrityError(f"the backup archive has no {WEIGHTS_FILE}")
    return AdapterArchive(version, profile_json, files, format=fmt, packing=packing)


def _checked_provenance(
    version: int, profile_json: bytes, files: Mapping[str, bytes]
) -> AdapterProvenance:
    """The archive's provenance, which must name its version and its profile's spec."""
    spec = _spec_of(profile_json)
    if PROVENANCE_FILE not in files:
        raise IntegrityError(f"the backup archive has no {PROVENANCE_FILE}")
    try:
        provenance = AdapterProvenance.from_json(files[PROVENANCE_FILE].decode("utf-8"))
    except (UnicodeDecodeError, SpecError) as exc:
        raise IntegrityError(f"the backup's {PROVENANCE_FILE} is unreadable ({exc})") from None
    if provenance.version != version or provenance.spec != spec:
        raise IntegrityError(
            f"the backed-up adapter says it is version {provenance.version} of another spec, "
            f"not version {version}: refusing it"
        )
    return provenance


def _restored_weights(
    provenance: AdapterProvenance,
    payload: bytes,
    weights: Mapping[str, Any],
    a_payload: bytes | None = None,
) -> dict[str, bytes]:
    """The weights file and provenance of a format-2 or -3 archive, checked against its spec."""
    if provenance.personal_a and a_payload is None:  # format 2 rebuilds A from the seed
        raise IntegrityError(
            "the backup says its adapter has a personal A but carries B only: refusing it"
        )
    if a_payload is not None and not provenance.personal_a:
        raise IntegrityError(
            "the backup carries an A but its adapter says A comes from the seed: refusing it"
        )
    spec = provenance.spec
    b, _ = decode_tensors(payload)  # IntegrityError on anything malformed or non-finite
    fan_in = _checked_shapes(spec, b, weights.get("fan_in"))
    a = None if a_payload is None else _checked_a(spec, a_payload, fan_in)
    out = {WEIGHTS_FILE: _rebuild(spec, b, fan_in, a)}
    restored = b_content_hash(spec, b, a)
    if restored != provenance.content_hash:
        provenance = dataclasses.replace(provenance, content_hash=restored)
        out[PROVENANCE_FILE] = provenance.to_json().encode("utf-8")
    return out


def _checked_a(spec: AdapterSpec, a_payload: bytes, fan_in: Mapping[str, int]) -> ATensors:
    """Format 3's personal A: the same modules as B, each of shape ``(rank, in)``."""
    packed, _ = decode_tensors(a_payload)  # IntegrityError on anything malformed or non-finite
    if sorted(packed) != sorted(fan_in):
        raise IntegrityError("the backup's A matrices do not name the same modules as its B")
    for name, value in packed.items():  # packed transposed: (in, rank)
        if value.shape != (fan_in[name], spec.rank):
            raise IntegrityError(
                f"A for {name} is packed with shape {tuple(value.shape)}, not "
                f"({fan_in[name]}, {spec.rank})"
            )
    return {k: np.ascontiguousarray(v.T) for k, v in packed.items()}


def _checked_shapes(spec: AdapterSpec, b: BTensors, fan_in: object) -> dict[str, int]:
    """Module input widths by name, once every B name and shape fits ``spec``."""
    names = sorted(b)
    if (
        not isinstance(fan_in, list)
        or len(fan_in) != len(names)
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in fan_in)
    ):
        raise IntegrityError("the backup archive's module widths do not match its B matrices")
    total = 0
    for name, width in zip(names, fan_in, strict=True):
        shape = b[name].shape
        if not _MODULE_PATH.match(name) or not any(
            name == t or name.endswith("." + t) for t in spec.target_modules
        ):
            raise IntegrityError(
                f"the backup holds B for {name!r:.80}, which the spec's targets "
                f"{list(spec.target_modules)} do not name: refusing it"
            )
        if len(shape) != 2 or shape[1] != spec.rank or not 1 <= shape[0] <= _MAX_FEATURES:
            raise IntegrityError(
                f"B for {name} has shape {tuple(shape)}, not (out_features, {spec.rank})"
            )
        if not 1 <= width <= _MAX_FEATURES:
            raise IntegrityError(f"the backup gives {name} an input width of {width}")
        total += 4 * spec.rank * (shape[0] + width)
    if total > _MAX_WEIGHTS_BYTES:
        raise IntegrityError(f"the backup's adapter would take {total} bytes: refusing it")
    return dict(zip(names, fan_in, strict=True))


# --- comparing ----------------------------------------------------------------------------


def same_adapter_files(
    mine: Mapping[str, bytes],
    theirs: Mapping[str, bytes],
    *,
    packings: tuple[Packing, Packing] = ("fp32", "fp32"),
) -> bool:
    """Whether two version folders hold the same adapter, up to B's packing.

    A restored version holds B as packed, and packing that again need not give the same
    bytes (int8 scales may move by one float32 step), so "the same version" means: the
    same files; every file but the weights and the provenance byte for byte; the
    provenance equal but for its content hash; each B, and a personal A, within what the
    two packings can change (:func:`~lorafleet.protocols.encoding.max_abs_error_bound`;
    a seeded A is rebuilt exactly, so that bound is its own, and it must be equal).
    Both mappings must be checked folders (a profile's, or :func:`unpack_archive`'s).
    """
    if set(mine) != set(theirs):
        return False
    if any(mine[k] != theirs[k] for k in mine if k not in (WEIGHTS_FILE, PROVENANCE_FILE)):
        return False
    try:
        a, b = (
            dataclasses.replace(
                AdapterProvenance.from_json(f[PROVENANCE_FILE].decode("utf-8")), content_hash=""
            )
            for f in (mine, theirs)
        )
    except (KeyError, UnicodeDecodeError, SpecError):
        return False
    if a != b or WEIGHTS_FILE not in mine:
        return False
    return _close_weights(mine[WEIGHTS_FILE], theirs[WEIGHTS_FILE], packings, a.personal_a)


def _close_weights(
    mine: bytes, theirs: bytes, packings: tuple[Packing, Packing], personal_a: bool
) -> bool:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        x, y = load(mine), load(theirs)
    except (SafetensorError, ValueError):
        return False
    if set(x) != set(y):
        return False
    for key, value in x.items():
        other = y[key]
        if value.shape != other.shape:
            return False
        packed = (".lora_A.weight", ".lora_B.weight") if personal_a else (".lora_B.weight",)
        if not key.endswith(packed):
            if not np.array_equal(value, other):
                return False
            continue
        tol = sum(max_abs_error_bound(t, p) for t, p in zip((value, other), packings, strict=True))
        if float(np.max(np.abs(value.astype(np.float64) - other), initial=0.0)) > tol:
            return False
    return True
