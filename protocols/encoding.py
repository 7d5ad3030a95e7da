"""Adapter tensors to bytes and back: safetensors with a small, versioned layout.

Only B matrices travel (A is rebuilt from the cohort seed, see
:mod:`lorafleet.protocols.seeds`). Devices and the coordinator both import this module,
so it needs numpy only, never torch, and it never unpickles anything: what it reads is
plain numbers described by a JSON header, checked in full before any value is used.

Format, version 1
-----------------
The bytes are a standard safetensors file, so stock ``safetensors.numpy.load`` reads
them (for ``int8`` it sees the raw codes and scales, not the dequantized values):

- bytes ``0..8``: ``N``, the header length, unsigned 64-bit little-endian;
- bytes ``8..8+N``: a UTF-8 JSON object without whitespace, padded with spaces so that
  ``N`` is a multiple of 8. Its first key is ``"__metadata__"`` (an object of string
  values, keys sorted); then one key per tensor, in data order, each
  ``{"dtype": "F32" | "F16" | "I8", "shape": [...], "data_offsets": [begin, end]}``;
- bytes ``8+N..``: the tensors' data, little-endian, C order, back to back without gaps,
  in safetensors' order (4-byte dtypes first, then 2, then 1; by name within a dtype);
  ``data_offsets`` count from the start of this region.

This module writes the header itself rather than through ``safetensors.numpy.save``,
which emits ``__metadata__`` in a per-process random order: here equal tensors, packing
and metadata give equal bytes, whatever the mapping's order. The reader is as strict as
safetensors' (offsets must tile the data exactly) and refuses duplicate JSON keys.

Metadata keys (all values are strings):

- ``lorafleet.format``: the version of this layout, ``"1"``. A reader refuses a version
  it does not know, so an old lorafleet never misreads bytes from a newer one.
- ``lorafleet.packing``: how values are stored: ``"fp32"``, ``"fp16"`` or ``"int8"``.
- every other key is the caller's and comes back from :func:`decode_tensors` unchanged.
  Keys starting with ``lorafleet.`` are reserved; an unknown reserved key is refused.

Tensors, per packing:

- ``fp32``: tensor ``name``, dtype ``F32``, the caller's shape. float16 and float32
  inputs round-trip bit-exactly; float64 inputs are rounded to the nearest float32.
- ``fp16``: tensor ``name``, dtype ``F16``, rounded to nearest even; a value that would
  round beyond the float16 range (65504) is refused rather than stored as infinity.
- ``int8``: symmetric quantization with one scale per column, a column being a slice
  along the last axis: a tensor of shape ``(..., C)`` is viewed as ``(P, C)`` with
  ``P = prod(shape[:-1])``, and column ``j`` is ``x[..., j]``. B has shape
  ``(out_features, rank)``, so that is one scale per rank index. Tensor ``name`` (dtype
  ``I8``, the caller's shape) holds codes ``q`` in ``[-127, 127]``; tensor
  ``name + ".__scale__"`` (dtype ``F32``) holds the scales, shape ``(shape[-1],)`` for a
  tensor of 2 or more dimensions and ``(1,)`` (one scale for the whole tensor) for 0-D
  and 1-D tensors. A column's scale is ``max|column| / 127`` rounded up to the next
  float32 (so ``|x| / scale <= 127`` and no value is clipped), or ``0`` for a column
  that is all zeros or empty; ``q = round_half_even(x / scale)``; the decoded value is
  ``q * scale`` rounded to float32. Each decoded value is within
  :func:`max_abs_error_bound` of the original, about ``max|column| / 254``. Values above
  ``2**127`` in magnitude are refused (``127 * scale`` must stay a finite float32).
  Size: the codes take a quarter of the fp32 bytes, and the scales add ``4 * C`` bytes
  per tensor (32 bytes for a rank-8 B), so int8 is about 0.25 of fp32. Columns rather
  than rows because a row of B holds only ``rank`` values: a scale per row would add
  4 bytes to every 8 codes at rank 8 (0.375 of fp32). The trade-off: one large value
  coarsens its whole column (that rank index across all output features), not just its
  row, while rank directions of very different magnitude still keep separate scales.

All values must be finite, and stay finite once packed. Names are non-empty strings, not
``"__metadata__"``, and never end in ``".__scale__"`` (whatever the packing, so that
changing packing never breaks a name). An empty mapping is refused: an adapter update
without tensors is a caller bug (a name filter that matched nothing), not a message worth
sending; which names a cohort expects is for the caller to check against its spec.

:func:`content_hash` does not depend on this layout: it hashes names, dtypes, shapes and
values in a canonical form of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, cast

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError

__all__ = [
    "FORMAT_VERSION",
    "Packing",
    "content_hash",
    "decode_tensors",
    "encode_tensors",
    "max_abs_error_bound",
    "packing_of",
]

logger = logging.getLogger(__name__)

Packing = Literal["fp32", "fp16", "int8"]
"""How tensor values are stored: float32, float16, or int8 codes with per-column scales."""

FORMAT_VERSION = 1
"""Version of the layout described in this module's docstring."""

_PACKINGS: tuple[Packing, ...] = ("fp32", "fp16", "int8")
_RESERVED_PREFIX = "lorafleet."
_KEY_FORMAT = "lorafleet.format"
_KEY_PACKING = "lorafleet.packing"
_SCALE_SUFFIX = ".__scale__"
_HEADER_METADATA = "__metadata__"
_HASH_DOMAIN = b"lorafleet/content/v1\x00"
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}\Z")

# safetensors' own reader refuses headers above 100 MB; ours are a few kB.
_MAX_HEADER_BYTES = 100_000_000
_MAX_NDIM = 32  # numpy 1.x's limit; B matrices have 2
_MAX_ELEMENTS = 2**40  # bounds the product of a shape's non-zero dims, so numpy never overflows

# dtype name in the safetensors header -> numpy dtype (always little-endian)
_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
}
_DTYPE_NAMES = {dtype.str: name for name, dtype in _ST_DTYPES.items()}  # "<f4" -> "F32"
_VALUE_DTYPE: dict[Packing, str] = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
_INT8_MAX_ABS = 2.0**127  # so that 127 * scale, rounded up, stays below the float32 maximum
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def encode_tensors(
    tensors: Mapping[str, npt.NDArray[np.floating[Any]]],
    *,
    packing: Packing = "fp32",
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Pack adapter tensors into safetensors bytes with lorafleet's metadata.

    Parameters
    ----------
    tensors
        Name to float16, float32 or float64 array; any memory layout or byte order.
    packing
        ``"fp32"`` (exact), ``"fp16"`` (half the bytes) or ``"int8"`` (a quarter of the
        bytes plus one float32 scale per column, i.e. per index of the last axis); see
        the module docstring.
    metadata
        The caller's string-to-string metadata, returned by :func:`decode_tensors`. Keys
        starting with ``lorafleet.`` are reserved.

    Returns
    -------
    bytes
        A safetensors file; equal inputs give equal bytes whatever the mapping's order.

    Raises
    ------
    SpecError
        The mapping is empty, a name or metadata entry is invalid, a tensor is not a
        float array, holds NaN or infinity, or does not fit the packing's range.

    Examples
    --------
    >>> b = {"layers.0.q_proj.lora_B": np.full((4, 2), 0.5, dtype=np.float32)}
    >>> tensors, meta = decode_tensors(encode_tensors(b, packing="fp16", metadata={"round": "3"}))
    >>> tensors["layers.0.q_proj.lora_B"][0], meta
    (array([0.5, 0.5], dtype=float32), {'round': '3'})
    """
    if packing not in _PACKINGS:
        raise SpecError(
            f"encode_tensors: packing must be one of {list(_PACKINGS)}, got {packing!r}"
        )
    arrays = _checked_tensors(tensors, "encode_tensors", require_finite=True)
    header_meta = _checked_metadata(metadata)
    header_meta[_KEY_FORMAT] = str(FORMAT_VERSION)
    header_meta[_KEY_PACKING] = packing

    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, array in arrays.items():
        if packing == "fp16":
            out[name] = _cast_checked(array, np.dtype("<f2"), name, "use packing 'fp32' or 'int8'")
            continue
        as_f32 = _cast_checked(array, np.dtype("<f4"), name, "adapters must fit in float32")
        if packing == "fp32":
            out[name] = as_f32
        else:
            big = float(np.max(np.abs(as_f32), initial=0.0))
            if big > _INT8_MAX_ABS:
                raise SpecError(
                    f"encode_tensors: tensor {name!r} has |value| up to {big:.6g}, beyond the "
                    f"int8 packing limit 2**127 (its scales must fit float32); use packing 'fp32'"
                )
            codes, scales = _quantize_int8(array)
            out[name] = codes
            out[name + _SCALE_SUFFIX] = scales
    data = _write_safetensors(out, header_meta)
    logger.debug("encoded %d tensor(s) as %s: %d bytes", len(arrays), packing, len(data))
    return data


def decode_tensors(data: bytes) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, str]]:
    """Unpack bytes written by :func:`encode_tensors`, checking everything first.

    Parameters
    ----------
    data
        The bytes as received; they may be corrupt, truncated or hostile.

    Returns
    -------
    tuple of (dict, dict)
        The tensors by name (sorted), as fresh float32 arrays (int8 dequantized), and the
        caller's metadata (without the reserved ``lorafleet.`` keys).

    Raises
    ------
    IntegrityError
        The bytes are not a well-formed version-1 lorafleet safetensors file: truncated,
        corrupt, from a newer lorafleet, an unknown packing, a missing or mis-shaped
        scale, or non-finite values. No other exception escapes, whatever the bytes.

    Examples
    --------
    >>> data = encode_tensors({"b": np.zeros((2, 2), dtype=np.float32)}, packing="int8")
    >>> decode_tensors(data)[0]["b"].dtype
    dtype('float32')
    """
    try:
        buf = _as_bytes(data)
        header = _read_header(buf)
        return _read_tensors(buf, header), header.user_metadata
    except LorafleetError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as exc:
        # Every check above is explicit; this net keeps the promise if one was missed.
        logger.debug("decode_tensors: unexpected %s", type(exc).__name__, exc_info=True)
        _corrupt(f"cannot be decoded ({type(exc).__name__}: {exc})")


def packing_of(data: bytes) -> Packing:
    """Return the packing recorded in encoded bytes, after checking their header.

    Parameters
    ----------
    data
        Bytes from :func:`encode_tensors`. Only the header is checked, not the values.

    Returns
    -------
    Packing
        ``"fp32"``, ``"fp16"`` or ``"int8"``.

    Raises
    ------
    IntegrityError
        The header is not that of a well-formed version-1 lorafleet file.

    Examples
    --------
    >>> packing_of(encode_tensors({"b": np.zeros((2, 2), dtype=np.float32)}, packing="fp16"))
    'fp16'
    """
    try:
        return _read_header(_as_bytes(data)).packing
    except LorafleetError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as exc:
        _corrupt(f"cannot be decoded ({type(exc).__name__}: {exc})")


def content_hash(
    tensors: Mapping[str, npt.NDArray[np.floating[Any]]], *, spec_fingerprint: str = ""
) -> str:
    r"""Canonical sha256 of an adapter version's tensors, the same on every platform.

    The hash covers values, not bytes on the wire: it is independent of the mapping's
    order, of packing and of the safetensors layout. Hash what you hold: int8 and fp16
    packing are lossy, so the registry and devices should hash the *decoded* tensors.

    The hashed stream is, with ``u32``/``u64`` little-endian lengths and counts:
    ``b"lorafleet/content/v1\x00"``; ``u32`` length + ASCII of ``spec_fingerprint``;
    ``u64`` number of tensors; then for each tensor in order of its UTF-8 encoded name:
    ``u32`` length + UTF-8 name, ``u32`` length + ASCII dtype name (``float16``,
    ``float32`` or ``float64``), ``u32`` number of dimensions, ``u64`` per dimension,
    ``u64`` byte count + the values little-endian in C order. Length prefixes make the
    stream unambiguous, so no two different inputs share it.

    Parameters
    ----------
    tensors
        Name to float16, float32 or float64 array (byte order and layout do not matter;
        the dtype does).
    spec_fingerprint
        :meth:`AdapterSpec.fingerprint` of the adapter's spec, binding the hash to it,
        or ``""``.

    Returns
    -------
    str
        64 lowercase hex characters.

    Raises
    ------
    SpecError
        The mapping is empty, a name is invalid, a tensor is not a float array, or the
        fingerprint is neither ``""`` nor 64 lowercase hex characters.

    Examples
    --------
    >>> b = {"b": np.zeros((2, 2), dtype=np.float32)}
    >>> len(content_hash(b)), content_hash(b) == content_hash(dict(b))
    (64, True)
    """
    if not isinstance(spec_fingerprint, str) or not (
        spec_fingerprint == "" or _FINGERPRINT.match(spec_fingerprint)
    ):
        raise SpecError(
            "content_hash: spec_fingerprint must be '' or AdapterSpec.fingerprint() "
            f"(64 lowercase hex characters), got {spec_fingerprint!r}"
        )
    arrays = _checked_tensors(tensors, "content_hash", require_finite=False)
    h = hashlib.sha256()
    h.update(_HASH_DOMAIN)
    _update_str(h, spec_fingerprint)
    h.update(len(arrays).to_bytes(8, "little"))
    for name in sorted(arrays, key=lambda n: n.encode("utf-8")):
        array = arrays[name]
        _update_str(h, name)
        _update_str(h, array.dtype.name)
        h.update(array.ndim.to_bytes(4, "little"))
        for dim in array.shape:
            h.update(dim.to_bytes(8, "little"))
        raw = array.tobytes(order="C")  # already little-endian and contiguous
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def max_abs_error_bound(tensor: npt.NDArray[np.floating[Any]], packing: Packing) -> float:
    """Largest ``|decoded - original|`` that packing ``tensor`` can cause, per element.

    With ``m = max|tensor|``: ``fp32`` gives 0 for float16/float32 input and
    ``m * 2**-24 + 2**-150`` for float64 input (one rounding to float32); ``fp16`` gives
    ``m * 2**-11 + 2**-25`` (one rounding to float16, the constant covering subnormals);
    ``int8`` gives ``m * (1/254 + 2**-23) + 2**-148``: half a quantization step
    ``m / 254``, plus the float32 rounding of scale and result. The int8 bound holds per
    column (slice along the last axis), so ``max_abs_error_bound(t[..., j : j + 1],
    "int8")`` bounds the error of column ``j``; for 0-D and 1-D tensors, which share one
    scale, only the whole-tensor bound applies.

    Parameters
    ----------
    tensor
        The original float array, as given to :func:`encode_tensors`.
    packing
        The packing it is (or would be) encoded with.

    Returns
    -------
    float
        The bound; comparisons should be done in float64.

    Raises
    ------
    SpecError
        ``tensor`` is not a finite float array or ``packing`` is unknown.

    Examples
    --------
    >>> max_abs_error_bound(np.array([[127.0, 1.0]], dtype=np.float32), "int8") > 0.5
    True
    """
    if packing not in _PACKINGS:
        raise SpecError(
            f"max_abs_error_bound: packing must be one of {list(_PACKINGS)}, got {packing!r}"
        )
    array = _checked_array(tensor, "max_abs_error_bound", "tensor", require_finite=True)
    m = float(np.max(np.abs(array.astype(np.float64)))) if array.size else 0.0
    if packing == "fp32":
        return 0.0 if array.dtype.itemsize <= 4 else m * 2.0**-24 + 2.0**-150
    if packing == "fp16":
        return 0.0 if array.dtype.itemsize <= 2 else m * 2.0**-11 + 2.0**-25
    return m * (1.0 / 254.0 + 2.0**-23) + 2.0**-148


# --- encoding helpers ---------------------------------------------------------------


def _checked_tensors(
    tensors: Mapping[str, Any], where: str, *, require_finite: bool
) -> dict[str, np.ndarray[Any, Any]]:
    """Validate the caller's mapping; return its arrays, contiguous and little-endian."""
    if not isinstance(tensors, Mapping):
        raise SpecError(
            f"{where}: tensors must be a mapping of name to numpy array, "
            f"got {type(tensors).__name__}"
        )
    if not tensors:
        raise SpecError(
            f"{where}: no tensors given; an adapter needs at least one B matrix "
            "(check the filter that selected them)"
        )
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for name, value in tensors.items():
        _check_name(name, where)
        arrays[name] = _checked_array(value, where, repr(name), require_finite=require_finite)
    return arrays


def _check_name(name: object, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}: tensor names must be non-empty strings, got {name!r}")
    if name == _HEADER_METADATA or name.endswith(_SCALE_SUFFIX):
        raise SpecError(
            f"{where}: tensor name {name!r} is reserved (the name {_HEADER_METADATA!r} and "
            f"the suffix {_SCALE_SUFFIX!r}); rename the tensor"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(
            f"{where}: tensor name {name!r} is not valid Unicode (lone surrogate); rename it"
        ) from None


def _checked_array(
    value: object, where: str, label: str, *, require_finite: bool
) -> np.ndarray[Any, Any]:
    if isinstance(value, np.generic):  # a numpy scalar, e.g. from x.sum()
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise SpecError(
            f"{where}: tensor {label} must be a numpy array, got {type(value).__name__} "
            "(for a torch tensor use t.detach().cpu().float().numpy())"
        )
    if value.dtype.newbyteorder("=") not in _FLOAT_DTYPES:
        raise SpecError(
            f"{where}: tensor {label} has dtype {value.dtype}; "
            "only float16, float32 and float64 adapters can be encoded, convert it to float32"
        )
    if value.ndim > _MAX_NDIM:
        raise SpecError(f"{where}: tensor {label} has {value.ndim} dimensions, at most {_MAX_NDIM}")
    array = np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C")  # keeps 0-D
    if require_finite and not bool(np.isfinite(array).all()):
        raise SpecError(
            f"{where}: tensor {label} holds NaN or infinity; training diverged "
            "(lower the learning rate) or the tensor is uninitialised"
        )
    return array


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise SpecError(
            "encode_tensors: metadata must be a mapping of str to str, "
            f"got {type(metadata).__name__}"
        )
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise SpecError(
                "encode_tensors: metadata must map non-empty strings to strings, "
                f"got {key!r}: {value!r}"
            )
        if key.startswith(_RESERVED_PREFIX):
            raise SpecError(
                f"encode_tensors: metadata key {key!r} uses the reserved prefix "
                f"{_RESERVED_PREFIX!r}; choose another key"
            )
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(
                f"encode_tensors: metadata entry {key!r} is not valid Unicode (lone surrogate)"
            ) from None
        out[key] = value
    return out


def _cast_checked(
    array: np.ndarray[Any, Any], dtype: np.dtype[Any], name: str, fix: str
) -> np.ndarray[Any, Any]:
    """``array`` as ``dtype``, refusing values that would round to infinity."""
    with np.errstate(over="ignore"):
        out = array.astype(dtype)
    if not bool(np.isfinite(out).all()):
        big = float(np.max(np.abs(array.astype(np.float64))))
        limit = float(np.finfo(dtype).max)
        raise SpecError(
            f"encode_tensors: tensor {name!r} has |value| up to {big:.6g}, beyond the "
            f"{dtype.name} limit {limit:.6g}; {fix}"
        )
    return np.asarray(out, order="C")


def _quantize_int8(
    array: np.ndarray[Any, Any],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Codes (same shape) and per-column float32 scales, as in the module docstring."""
    x = array.astype(np.float64)
    cols = x.reshape(_columns_shape(x.shape))  # (P, C)
    m = np.max(np.abs(cols), axis=0, initial=0.0)  # (C,); 0 for an empty column
    exact = m / 127.0
    scale = exact.astype(np.float32)  # (C,)
    low = scale.astype(np.float64) < exact
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))  # round up: |x| / scale <= 127
    s = scale.astype(np.float64)[None, :]  # (1, C)
    ratio = np.divide(cols, s, out=np.zeros_like(cols), where=s > 0)  # (P, C)
    codes = np.clip(np.rint(ratio), -127, 127).astype(np.int8).reshape(array.shape)
    return np.asarray(codes, order="C"), np.asarray(scale, dtype="<f4", order="C")


def _write_safetensors(tensors: dict[str, np.ndarray[Any, Any]], metadata: dict[str, str]) -> bytes:
    """Serialize like ``safetensors.numpy.save``, but with a deterministic header.

    safetensors writes ``__metadata__`` in the order of a Rust ``HashMap``, which changes
    from one process to the next; equal inputs must give equal bytes here (content
    addressing, signatures over bytes), so the header is written with sorted metadata.
    Tensor order and alignment are safetensors' own: larger dtypes first, then by name.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, Any] = {_HEADER_METADATA: dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in order:
        array = tensors[name]
        raw = array.tobytes(order="C")  # little-endian: see _checked_array and the casts
        header[name] = {
            "dtype": _DTYPE_NAMES[array.dtype.str],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def _columns_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(P, C)``: columns are slices along the last axis; 0-D and 1-D tensors are one column.

    ``P`` is the product of all but the last dimension, so a zero-size leading dimension
    gives ``P = 0`` (empty columns, scale 0) while ``C`` still counts the scales.
    """
    if len(shape) >= 2:
        return math.prod(shape[:-1]), shape[-1]
    return math.prod(shape), 1


def _update_str(h: Any, text: str) -> None:
    raw = text.encode("utf-8")
    h.update(len(raw).to_bytes(4, "little"))
    h.update(raw)


# --- decoding helpers ---------------------------------------------------------------


def _corrupt(reason: str) -> NoReturn:
    raise IntegrityError(f"adapter bytes: {reason}; ask the sender to encode them again")


@dataclass(frozen=True)
class _Entry:
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    packing: Packing
    entries: dict[str, _Entry]
    user_metadata: dict[str, str]
    data_start: int


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    _corrupt(f"expected bytes, got {type(data).__name__}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            _corrupt(f"header repeats the key {key!r}")
        out[key] = value
    return out


def _no_constants(token: str) -> NoReturn:
    _corrupt(f"header holds the non-JSON number {token}")


def _read_header(buf: bytes) -> _Header:
    """Parse and check the header as strictly as safetensors does, and lorafleet's keys."""
    if len(buf) < 8:
        _corrupt(f"only {len(buf)} byte(s), too short for a safetensors header (truncated?)")
    n = int.from_bytes(buf[:8], "little")
    if n > _MAX_HEADER_BYTES:
        _corrupt(f"header length {n} is over the {_MAX_HEADER_BYTES}-byte limit (corrupt?)")
    if n > len(buf) - 8:
        _corrupt(f"header claims {n} bytes but only {len(buf) - 8} follow (truncated?)")
    try:
        text = buf[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError:
        _corrupt("header is not UTF-8 (corrupt, or not a safetensors file)")
    if not text.startswith("{"):
        _corrupt("header is not a JSON object (corrupt, or not a safetensors file)")
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        _corrupt(f"header is not valid JSON ({type(exc).__name__})")
    if not isinstance(raw, dict):
        _corrupt("header is not a JSON object")
    header = cast(dict[str, Any], raw)

    meta = header.pop(_HEADER_METADATA, None)
    if meta is None:
        _corrupt("no lorafleet metadata; these bytes were not written by encode_tensors")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _corrupt("__metadata__ must map strings to strings")
    packing = _check_reserved(cast(dict[str, str], meta))
    user = {k: v for k, v in meta.items() if not k.startswith(_RESERVED_PREFIX)}

    entries = {name: _entry(name, value) for name, value in header.items()}
    _check_offsets(entries, len(buf) - 8 - n)
    _check_layout(entries, packing)
    return _Header(packing=packing, entries=entries, user_metadata=user, data_start=8 + n)


def _check_reserved(meta: dict[str, str]) -> Packing:
    unknown = sorted(
        k for k in meta if k.startswith(_RESERVED_PREFIX) and k not in (_KEY_FORMAT, _KEY_PACKING)
    )
    if unknown:
        _corrupt(f"unknown reserved metadata key(s) {unknown}; upgrade lorafleet to read them")
    version = meta.get(_KEY_FORMAT)
    if version is None:
        _corrupt(f"metadata has no {_KEY_FORMAT!r}; these bytes were not written by encode_tensors")
    if version != str(FORMAT_VERSION):
        if (
            0 < len(version) <= 9
            and version.isascii()
            and version.isdigit()
            and int(version) > FORMAT_VERSION
        ):
            raise IntegrityError(
                f"adapter bytes: format version {version} is newer than this lorafleet "
                f"reads ({FORMAT_VERSION}); upgrade lorafleet"
            )
        _corrupt(f"unknown format version {version!r} (this lorafleet reads {FORMAT_VERSION})")
    packing = meta.get(_KEY_PACKING)
    if packing not in _PACKINGS:
        _corrupt(f"unknown packing {packing!r} (expected one of {list(_PACKINGS)})")
    return packing


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, value: object) -> _Entry:
    if not name:
        _corrupt("a tensor has an empty name")
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        _corrupt(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        _corrupt(f"tensor {name!r} has dtype {dtype!r}, expected one of {sorted(_ST_DTYPES)}")
    shape = value["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(_is_int(d) and 0 <= d <= _MAX_ELEMENTS for d in shape)
    ):
        _corrupt(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
    offsets = value["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        _corrupt(f"tensor {name!r} has invalid data_offsets {str(offsets)[:80]}")
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        _corrupt(f"tensor {name!r} has an implausibly large shape {shape}")
    entry = _Entry(_ST_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    if math.prod(entry.shape) * entry.dtype.itemsize != entry.end - entry.begin:
        _corrupt(
            f"tensor {name!r}: shape {list(entry.shape)} of {dtype} needs "
            f"{math.prod(entry.shape) * entry.dtype.itemsize} bytes, offsets span "
            f"{entry.end - entry.begin}"
        )
    return entry


def _check_offsets(entries: dict[str, _Entry], data_len: int) -> None:
    """Tensors must tile the data region exactly: no gap, no overlap, nothing after."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            _corrupt(f"tensor {name!r} starts at byte {entry.begin}, expected {position}")
        position = entry.end
    if position != data_len:
        _corrupt(f"tensors cover {position} data bytes but {data_len} are present (truncated?)")


def _check_layout(entries: dict[str, _Entry], packing: Packing) -> None:
    """Require the names, dtypes and scale shapes ``packing`` implies, and nothing else."""
    if not entries:
        _corrupt("holds no tensors")
    want = _ST_DTYPES[_VALUE_DTYPE[packing]]
    scale_names = {n for n in entries if n.endswith(_SCALE_SUFFIX)}
    for name, entry in entries.items():
        if name in scale_names:
            continue
        if entry.dtype != want:
            _corrupt(
                f"tensor {name!r} is {entry.dtype.name} but packing {packing!r} stores {want.name}"
            )
        if packing == "int8":
            scale = entries.get(name + _SCALE_SUFFIX)
            if scale is None:
                _corrupt(f"int8 tensor {name!r} has no scale tensor {name + _SCALE_SUFFIX!r}")
            expected = entry.shape[-1:] if len(entry.shape) >= 2 else (1,)
            if scale.dtype != np.dtype("<f4") or scale.shape != expected:
                _corrupt(
                    f"scale of {name!r} is {scale.dtype.name} {list(scale.shape)}, "
                    f"expected float32 {list(expected)}"
                )
    for name in scale_names:
        if packing != "int8" or name[: -len(_SCALE_SUFFIX)] not in entries:
            _corrupt(f"tensor {name!r} is a scale without an int8 tensor it belongs to")


def _read_tensors(buf: bytes, header: _Header) -> dict[str, npt.NDArray[np.float32]]:
    def raw(name: str) -> np.ndarray[Any, Any]:
        entry = header.entries[name]
        count = math.prod(entry.shape)
        if count == 0:
            return np.zeros(entry.shape, dtype=entry.dtype)
        flat = np.frombuffer(
            buf, dtype=entry.dtype, count=count, offset=header.data_start + entry.begin
        )
        return flat.reshape(entry.shape)

    out: dict[str, npt.NDArray[np.float32]] = {}
    for name in sorted(header.entries):
        if name.endswith(_SCALE_SUFFIX):
            continue
        values = raw(name)
        if header.packing != "int8":
            if not bool(np.isfinite(values).all()):
                _corrupt(f"tensor {name!r} holds NaN or infinity")
            out[name] = values.astype(np.float32)  # a fresh, writable, aligned copy
            continue
        scale = raw(name + _SCALE_SUFFIX).astype(np.float64)
        if not bool(np.isfinite(scale).all()) or bool((scale < 0).any()):
            _corrupt(f"scale of {name!r} holds a negative, NaN or infinite value")
        if bool((values == -128).any()):
            _corrupt(f"int8 tensor {name!r} holds the code -128, outside [-127, 127]")
        cols = values.reshape(_columns_shape(values.shape)).astype(np.float64)  # (P, C)
        decoded = (cols * scale[None, :]).reshape(values.shape)  # exact in float64
        with np.errstate(over="ignore"):
            out[name] = decoded.astype(np.float32)
        if not bool(np.isfinite(out[name]).all()):
            _corrupt(f"scale of {name!r} is too large: values overflow float32")
    return out
