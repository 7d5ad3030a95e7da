"""Adapter tensor encoding: round trips, sizes, canonical hashes and hostile bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lorafleet.protocols.encoding import (
    FORMAT_VERSION,
    Packing,
    content_hash,
    decode_tensors,
    encode_tensors,
    max_abs_error_bound,
    packing_of,
)
from lorafleet.protocols.errors import IntegrityError, SpecError

PACKINGS: tuple[Packing, ...] = ("fp32", "fp16", "int8")
FP16_MAX = 65504.0


def _b_set(seed: int = 0) -> dict[str, np.ndarray]:
    """A realistic B set: 30 layers of SmolLM2-135M, q_proj (576, 8) and v_proj (192, 8)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(30):
        for module, width in (("q_proj", 576), ("v_proj", 192)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_B.weight"
            out[name] = (rng.standard_normal((width, 8)) * 1e-3).astype(np.float32)
    return out


def _craft(header: dict[str, Any], data: bytes) -> bytes:
    """Safetensors bytes from a hand-written header, to build files encode_tensors never would."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _meta(packing: str = "fp32", version: str = "1", **extra: str) -> dict[str, str]:
    return {"lorafleet.format": version, "lorafleet.packing": packing, **extra}


def _assert_within_bound(original: np.ndarray, decoded: np.ndarray, packing: Packing) -> None:
    err = np.abs(decoded.astype(np.float64) - original.astype(np.float64))
    # the global bound holds for every packing and shape
    assert float(np.max(err, initial=0.0)) <= max_abs_error_bound(original, packing)
    if packing == "int8" and original.ndim >= 2:
        for j in range(original.shape[-1]):  # and the int8 bound holds column by column
            bound = max_abs_error_bound(original[..., j : j + 1], "int8")
            worst = float(np.max(err[..., j], initial=0.0))
            assert worst <= bound, (j, original[..., j], decoded[..., j])


# --- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(576, 8), (3, 4, 2), (5,), (), (0, 8), (8, 0), (0,)])
def test_round_trip_keeps_names_shapes_and_values_within_the_bound(
    packing: Packing, dtype: type, shape: tuple[int, ...]
) -> None:
    # Prepare
    rng = np.random.default_rng(1)
    tensors = {
        "layers.0.q_proj.lora_B": (rng.standard_normal(shape) * 0.02).astype(dtype),
        "layers.0.v_proj.lora_B": np.full(shape, -1.5, dtype=dtype),
    }

    # Execute
    decoded, metadata = decode_tensors(encode_tensors(tensors, packing=packing))

    # Assert
    assert sorted(decoded) == sorted(tensors)
    assert metadata == {}
    for name, original in tensors.items():
        assert decoded[name].dtype == np.float32
        assert decoded[name].shape == original.shape
        _assert_within_bound(original, decoded[name], packing)


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)


@given(hnp.arrays(np.float32, shapes, elements=finite_f32))
def test_fp32_round_trip_is_bit_exact(x: np.ndarray) -> None:
    # Execute
    decoded, _ = decode_tensors(encode_tensors({"b": x}, packing="fp32"))

    # Assert: the very same bits, -0.0 and subnormals included
    assert decoded["b"].shape == x.shape
    assert decoded["b"].tobytes() == x.astype("<f4").tobytes()


@given(
    hnp.arrays(
        np.float32, shapes, elements=st.floats(-FP16_MAX, FP16_MAX, width=32, allow_nan=False)
    )
)
def test_fp16_round_trip_is_one_rounding_to_float16(x: np.ndarray) -> None:
    # Execute
    decoded, _ = decode_tensors(encode_tensors({"b": x}, packing="fp16"))

    # Assert
    assert np.array_equal(decoded["b"], x.astype(np.float16).astype(np.float32))
    _assert_within_bound(x, decoded["b"], "fp16")


@given(
    st.one_of(
        hnp.arrays(np.float32, shapes, elements=st.floats(-(2.0**127), 2.0**127, width=32)),
        hnp.arrays(np.float64, shapes, elements=st.floats(-(2.0**127), 2.0**127)),
        hnp.arrays(
            np.float16, shapes, elements=st.floats(width=16, allow_infinity=False, allow_nan=False)
        ),
    )
)
def test_int8_round_trip_stays_within_the_per_column_bound(x: np.ndarray) -> None:
    # Execute
    decoded, _ = decode_tensors(encode_tensors({"b": x}, packing="int8"))

    # Assert
    assert decoded["b"].shape == x.shape
    _assert_within_bound(x, decoded["b"], "int8")


def test_int8_stores_per_column_codes_rounded_half_to_even_and_float32_scales() -> None:
    # Prepare: column 0's scale is exactly 1, so its codes are the values rounded;
    # column 1 is all zeros; column 2's scale is exactly 2
    x = np.array(
        [[127.0, 0.0, 254.0], [0.5, 0.0, 1.0], [1.5, 0.0, 3.0], [2.5, 0.0, 5.0], [-2.5, 0.0, -5.0]],
        dtype=np.float32,
    )

    # Execute
    raw = safetensors.numpy.load(encode_tensors({"b": x}, packing="int8"))

    # Assert
    assert raw["b"].dtype == np.int8
    assert raw["b"].tolist() == [[127, 0, 127], [0, 0, 0], [2, 0, 2], [2, 0, 2], [-2, 0, -2]]
    assert raw["b.__scale__"].dtype == np.float32
    assert raw["b.__scale__"].tolist() == [1.0, 0.0, 2.0]


@given(hnp.arrays(np.float32, (4, 8), elements=st.floats(-1e6, 1e6, width=32)))
def test_int8_scale_is_the_smallest_float32_that_covers_the_column(x: np.ndarray) -> None:
    # Execute
    raw = safetensors.numpy.load(encode_tensors({"b": x}, packing="int8"))

    # Assert: the documented layout, which other decoders may rely on
    scale = raw["b.__scale__"].astype(np.float64)
    m = np.max(np.abs(x.astype(np.float64)), axis=0)  # (8,): one per column
    below = np.nextafter(raw["b.__scale__"], np.float32(0)).astype(np.float64)
    assert np.all(scale * 127 >= m)
    assert np.all((below * 127 < m) | (m == 0))
    assert np.all(scale[m == 0] == 0)
    assert raw["b"].min() >= -127


@pytest.mark.parametrize(
    ("shape", "scale_shape"),
    [
        ((576, 8), (8,)),
        ((6, 3), (3,)),
        ((2, 3, 4), (4,)),
        ((0, 8), (8,)),
        ((8, 0), (0,)),
        ((5,), (1,)),
        ((), (1,)),
    ],
)
def test_int8_has_one_scale_per_column_and_one_for_vectors(
    shape: tuple[int, ...], scale_shape: tuple[int, ...]
) -> None:
    # Prepare
    x = np.ones(shape, dtype=np.float32)

    # Execute
    raw = safetensors.numpy.load(encode_tensors({"b": x}, packing="int8"))

    # Assert
    assert raw["b.__scale__"].shape == scale_shape


def test_int8_keeps_a_column_of_small_values_next_to_a_column_of_large_ones() -> None:
    # Prepare: per-column scales are the point; one scale for the tensor would zero column 1
    x = np.array([[1000.0, 1e-4], [-1000.0, -3e-4]], dtype=np.float32)

    # Execute
    decoded, _ = decode_tensors(encode_tensors({"b": x}, packing="int8"))

    # Assert
    np.testing.assert_allclose(decoded["b"][:, 1], x[:, 1], rtol=0.01)


def test_metadata_round_trips_and_reserved_keys_are_not_returned() -> None:
    # Prepare
    meta = {"round": "7", "client": "ü-42", "empty": ""}

    # Execute
    _, decoded_meta = decode_tensors(encode_tensors(_b_set(), metadata=meta))

    # Assert
    assert decoded_meta == meta


def test_decoded_arrays_are_fresh_writable_float32() -> None:
    # Prepare
    data = encode_tensors({"b": np.ones((3, 2), dtype=np.float32)})

    # Execute
    decoded, _ = decode_tensors(data)
    decoded["b"][0, 0] = 5.0

    # Assert
    assert decoded["b"].flags.c_contiguous and decoded["b"].flags.writeable
    assert decode_tensors(data)[0]["b"][0, 0] == 1.0


@pytest.mark.parametrize("packing", PACKINGS)
def test_packing_of_reads_the_packing_back(packing: Packing) -> None:
    assert packing_of(encode_tensors(_b_set(), packing=packing)) == packing


# --- layout and sizes -------------------------------------------------------------


def test_fp16_and_int8_shrink_a_realistic_b_set() -> None:
    # Prepare
    tensors = _b_set()
    n_values = sum(t.size for t in tensors.values())
    n_columns = sum(t.shape[-1] for t in tensors.values())

    # Execute
    size = {p: len(encode_tensors(tensors, packing=p)) for p in PACKINGS}

    # Assert: fp16 is half. int8 is a quarter plus one float32 scale per column (8 per
    # B at rank 8), so about 0.25 of fp32; per-row scales would have made it 0.375.
    assert size["fp32"] >= 4 * n_values
    assert size["fp16"] / size["fp32"] < 0.55
    assert size["int8"] / size["fp32"] < 0.30
    assert size["int8"] - size["fp32"] // 40 < n_values + 4 * n_columns  # header < 2.5 % of fp32


def test_encoding_is_deterministic_whatever_the_order_and_memory_layout() -> None:
    # Prepare: same values, reversed order, Fortran order, big-endian, float32 -> same bytes
    tensors = _b_set()
    meta = {"b": "2", "a": "1"}
    shuffled = {
        name: np.asfortranarray(t).astype(">f4") for name, t in reversed(list(tensors.items()))
    }

    # Execute / Assert
    for packing in PACKINGS:
        first = encode_tensors(tensors, packing=packing, metadata=meta)
        again = encode_tensors(shuffled, packing=packing, metadata=dict(reversed(meta.items())))
        assert first == again


def test_non_contiguous_input_is_encoded_by_value() -> None:
    # Prepare: a strided view, which a naive pointer copy would garble
    base = np.arange(48, dtype=np.float32).reshape(6, 8)
    view = base[::2, 1::3]

    # Execute
    decoded, _ = decode_tensors(encode_tensors({"b": view}))

    # Assert
    assert np.array_equal(decoded["b"], view)


@pytest.mark.parametrize("packing", PACKINGS)
def test_stock_safetensors_reads_what_encode_writes(packing: Packing, tmp_path: Any) -> None:
    # Prepare
    tensors = {
        "a": np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4),
        "b": np.ones(3, np.float32),
    }
    data = encode_tensors(tensors, packing=packing, metadata={"round": "3"})
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(data)

    # Execute
    loaded = safetensors.numpy.load(data)
    with safetensors.safe_open(str(path), framework="np") as f:
        file_meta = f.metadata()

    # Assert
    assert file_meta == {"round": "3", "lorafleet.format": "1", "lorafleet.packing": packing}
    if packing == "int8":
        assert sorted(loaded) == ["a", "a.__scale__", "b", "b.__scale__"]
        for name, x in tensors.items():
            scale = loaded[name + ".__scale__"].astype(np.float64)  # (C,)
            cols = loaded[name].reshape(-1, len(scale)).astype(np.float64)  # (P, C)
            stock_decoded = cols * scale[None, :]
            np.testing.assert_array_equal(
                stock_decoded.reshape(x.shape).astype(np.float32), decode_tensors(data)[0][name]
            )
    else:
        for name in tensors:
            np.testing.assert_array_equal(
                loaded[name].astype(np.float32), decode_tensors(data)[0][name]
            )


def test_layout_matches_stock_safetensors_save_except_for_metadata_order() -> None:
    # Prepare
    tensors = _b_set()
    ours = encode_tensors(tensors, packing="fp16", metadata={"k": "v"})
    stock = safetensors.numpy.save(
        {n: t.astype(np.float16) for n, t in tensors.items()},
        metadata={"k": "v", "lorafleet.format": "1", "lorafleet.packing": "fp16"},
    )

    # Execute
    def split(data: bytes) -> tuple[dict[str, Any], bytes]:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + n]), data[8 + n :]

    # Assert
    assert len(ours) == len(stock)
    assert split(ours) == split(stock)


# --- content hash -----------------------------------------------------------------


def test_content_hash_test_vector() -> None:
    # Prepare: a change to the canonical form must be deliberate (and bump the domain tag)
    tensors = {
        "b": np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32),
        "a": np.array([0.25, -0.0, 3.0], dtype=np.float16),
    }

    # Execute / Assert
    assert content_hash(tensors) == (
        "2e30a31fb77aa9d1551c13b2cf74d47db379ecd63c55766ccfd821cb34260838"
    )
    assert content_hash(tensors, spec_fingerprint="ab" * 32) == (
        "eb8f96818484a19d86a00cdbfb78829d197dd37c6ecec2d94720329be27f99a7"
    )


def _reference_hash(tensors: dict[str, np.ndarray], fingerprint: str = "") -> str:
    """The canonical form as documented, written out independently."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return len(raw).to_bytes(4, "little") + raw

    h = hashlib.sha256(b"lorafleet/content/v1\x00" + text(fingerprint))
    h.update(len(tensors).to_bytes(8, "little"))
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.astype(t.dtype.newbyteorder("<")).tobytes()
        h.update(text(name) + text(t.dtype.name) + t.ndim.to_bytes(4, "little"))
        h.update(b"".join(d.to_bytes(8, "little") for d in t.shape))
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def test_content_hash_follows_the_documented_canonical_form() -> None:
    tensors = _b_set()
    tensors["x"] = np.arange(6, dtype=np.float64).reshape(3, 2, 1)
    tensors["y"] = np.array(1.5, dtype=np.float16)
    assert content_hash(tensors, spec_fingerprint="0f" * 32) == _reference_hash(tensors, "0f" * 32)


def test_content_hash_ignores_insertion_order_memory_layout_and_byte_order() -> None:
    # Prepare
    tensors = _b_set()
    other = {n: np.asfortranarray(t).astype(">f4") for n, t in reversed(list(tensors.items()))}

    # Execute / Assert
    assert content_hash(tensors) == content_hash(other)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_content_hash_changes_on_any_single_bit_flip(data: st.DataObject) -> None:
    # Prepare
    tensors = {
        "q": np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32),
        "v": np.zeros((2, 3), dtype=np.float32),
    }
    name = data.draw(st.sampled_from(sorted(tensors)))
    index = data.draw(st.integers(0, tensors[name].size - 1))
    bit = data.draw(st.integers(0, 31))
    flipped = dict(tensors)
    bits = tensors[name].copy().view(np.uint32).reshape(-1)
    bits[index] ^= np.uint32(1 << bit)
    flipped[name] = bits.view(np.float32).reshape(tensors[name].shape)

    # Execute / Assert
    assert content_hash(flipped) != content_hash(tensors)


@pytest.mark.parametrize(
    "change",
    ["rename", "dtype", "reshape", "drop", "fingerprint"],
)
def test_content_hash_changes_on_metadata_of_the_tensors(change: str) -> None:
    # Prepare
    tensors = {"q": np.arange(6, dtype=np.float32).reshape(2, 3), "v": np.ones(2, np.float32)}
    fingerprint = "0" * 64
    changed = dict(tensors)
    other_fingerprint = fingerprint
    if change == "rename":
        changed["q2"] = changed.pop("q")
    elif change == "dtype":  # same values, wider dtype
        changed["q"] = tensors["q"].astype(np.float64)
    elif change == "reshape":  # same bytes, other shape
        changed["q"] = tensors["q"].reshape(3, 2)
    elif change == "drop":
        del changed["v"]
    else:
        other_fingerprint = "1" + "0" * 63

    # Execute / Assert
    assert content_hash(changed, spec_fingerprint=other_fingerprint) != content_hash(
        tensors, spec_fingerprint=fingerprint
    )


def test_content_hash_is_unambiguous_across_name_and_shape_boundaries() -> None:
    # Prepare: concatenating name bytes or moving data between tensors must not collide
    one = {"ab": np.ones(2, np.float32), "c": np.ones(1, np.float32)}
    two = {"a": np.ones(2, np.float32), "bc": np.ones(1, np.float32)}
    three = {"ab": np.ones(1, np.float32), "c": np.ones(2, np.float32)}

    # Execute / Assert
    assert len({content_hash(one), content_hash(two), content_hash(three)}) == 3


def test_content_hash_of_decoded_tensors_agrees_across_encodings_of_exact_values() -> None:
    # Prepare: values exactly representable in float16 survive every packing's round trip
    x = {"b": np.array([[0.5, -0.25], [2.0, 0.0]], dtype=np.float32)}

    # Execute
    hashes = {
        content_hash(decode_tensors(encode_tensors(x, packing=p))[0]) for p in ("fp32", "fp16")
    }

    # Assert
    assert hashes == {content_hash(x)}


@pytest.mark.parametrize("fingerprint", ["abc", "A" * 64, "0" * 63, 5, None])
def test_content_hash_refuses_a_malformed_fingerprint(fingerprint: Any) -> None:
    with pytest.raises(SpecError, match="spec_fingerprint"):
        content_hash({"b": np.ones(2, np.float32)}, spec_fingerprint=fingerprint)


# --- refusals when encoding -------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "kwargs", "match"),
    [
        ({}, {}, "no tensors"),
        ({3: np.ones(2, np.float32)}, {}, "names must be non-empty strings"),
        ({"": np.ones(2, np.float32)}, {}, "names must be non-empty strings"),
        ({"b.__scale__": np.ones(2, np.float32)}, {}, "reserved"),
        ({"__metadata__": np.ones(2, np.float32)}, {}, "reserved"),
        ({"\ud800": np.ones(2, np.float32)}, {}, "not valid Unicode"),
        ({"b": [1.0, 2.0]}, {}, "must be a numpy array, got list"),
        ({"b": np.ones(2, np.int64)}, {}, "dtype int64"),
        ({"b": np.ones(2, bool)}, {}, "dtype bool"),
        ({"b": np.ones(2, np.complex64)}, {}, "dtype complex64"),
        ({"b": np.array([1.0, np.nan], np.float32)}, {}, "NaN or infinity"),
        ({"b": np.array([np.inf], np.float32)}, {"packing": "int8"}, "NaN or infinity"),
        ({"b": np.array([70000.0], np.float32)}, {"packing": "fp16"}, "beyond the float16 limit"),
        ({"b": np.array([1e39])}, {"packing": "fp32"}, "beyond the float32 limit"),
        ({"b": np.array([1e39])}, {"packing": "int8"}, "beyond the float32 limit"),
        ({"b": np.array([2e38], np.float32)}, {"packing": "int8"}, "beyond the int8 packing limit"),
        ({"b": np.ones(2, np.float32)}, {"packing": "int4"}, "packing must be one of"),
        ({"b": np.ones(2, np.float32)}, {"metadata": {"lorafleet.format": "2"}}, "reserved prefix"),
        ({"b": np.ones(2, np.float32)}, {"metadata": {"round": 3}}, "strings to strings"),
        ({"b": np.ones(2, np.float32)}, {"metadata": {"": "x"}}, "strings to strings"),
        ({"b": np.ones(2, np.float32)}, {"metadata": [("a", "b")]}, "must be a mapping"),
    ],
)
def test_encode_refuses_bad_input_with_one_clear_line(
    tensors: Any, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(SpecError, match=match) as info:
        encode_tensors(tensors, **kwargs)
    assert "\n" not in str(info.value)


def test_encode_refuses_a_non_mapping() -> None:
    with pytest.raises(SpecError, match="must be a mapping"):
        encode_tensors([("b", np.ones(2, np.float32))])  # type: ignore[arg-type]


def test_fp16_accepts_the_largest_float16() -> None:
    x = np.array([FP16_MAX, -FP16_MAX], dtype=np.float32)
    assert np.array_equal(decode_tensors(encode_tensors({"b": x}, packing="fp16"))[0]["b"], x)


@pytest.mark.parametrize(
    ("tensor", "packing", "expected"),
    [
        (np.array([[127.0, 1.0]], np.float32), "int8", 0.5),
        (np.array([3.0, -1.0], np.float32), "fp32", 0.0),
        (np.array([3.0, -1.0], np.float16), "fp16", 0.0),
        (np.array([2.0, -1.0], np.float32), "fp16", 2.0**-10),
        (np.zeros((0, 4), np.float32), "int8", 0.0),
    ],
)
def test_max_abs_error_bound_values(tensor: np.ndarray, packing: Packing, expected: float) -> None:
    assert max_abs_error_bound(tensor, packing) == pytest.approx(expected, rel=1e-4, abs=1e-30)


# --- refusals when decoding -------------------------------------------------------


def _good() -> bytes:
    return encode_tensors(
        {"q": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "v": np.ones(5, np.float32)},
        packing="int8",
        metadata={"round": "1"},
    )


def test_every_truncation_is_refused() -> None:
    # Prepare
    data = _good()

    # Execute / Assert
    for length in range(len(data)):
        with pytest.raises(IntegrityError):
            decode_tensors(data[:length])


F32 = "F32"
FOUR = np.ones(4, np.float32).tobytes()
DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def _one(dtype: str, shape: Any, offsets: Any, data: bytes, packing: str = "fp32") -> bytes:
    """A file with one tensor ``b`` described by hand."""
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    return _craft({"__metadata__": _meta(packing), "b": entry}, data)


def _int8(scale: bytes, codes: bytes, scale_dtype: str = "F32", codes_shape: Any = None) -> bytes:
    """An int8 file: tensor ``b`` (codes) and its scale tensor, described by hand."""
    n_scale = len(scale)
    header = {
        "__metadata__": _meta("int8"),
        "b.__scale__": {
            "dtype": scale_dtype,
            "shape": [n_scale // (2 if scale_dtype == "F16" else 4)],
            "data_offsets": [0, n_scale],
        },
        "b": {
            "dtype": "I8",
            "shape": codes_shape or [len(codes)],
            "data_offsets": [n_scale, n_scale + len(codes)],
        },
    }
    return _craft(header, scale + codes)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"\xff" * 8 + b"{}", "over the"),
        ((64).to_bytes(8, "little") + b"{}", "truncated"),
        ((8).to_bytes(8, "little") + b"\xff\xfe{}    ", "not UTF-8"),
        ((8).to_bytes(8, "little") + b"[]      ", "not a JSON object"),
        ((8).to_bytes(8, "little") + b'{"a":   ', "not valid JSON"),
        ((8).to_bytes(8, "little") + b'{"a":NaN', "non-JSON number NaN"),
        (len(DEEP).to_bytes(8, "little") + DEEP, "not valid JSON"),
        (safetensors.numpy.save({"b": np.ones(4, np.float32)}), "not written by encode_tensors"),
        (_craft({"__metadata__": {"x": "y"}}, b""), "no 'lorafleet.format'"),
        (_craft({"__metadata__": _meta(version="2")}, b""), "newer than this lorafleet"),
        (_craft({"__metadata__": _meta(version="0")}, b""), "unknown format version"),
        (_craft({"__metadata__": _meta(version="1" * 5000)}, b""), "unknown format version"),
        (_craft({"__metadata__": _meta(packing="int4")}, b""), "unknown packing"),
        (_craft({"__metadata__": _meta(**{"lorafleet.cipher": "x"})}, b""), "unknown reserved"),
        (_craft({"__metadata__": {"lorafleet.format": 1}}, b""), "strings to strings"),
        (_craft({"__metadata__": _meta()}, b""), "holds no tensors"),
        (_one("F64", [2], [0, 16], FOUR * 4), "dtype 'F64'"),
        (_one("F16", [2], [0, 4], FOUR[:4]), "packing 'fp32' stores float32"),
        (_one("F32", [2], [0, 4], FOUR[:4]), "needs 8 bytes"),
        (_one("F32", [1], [4, 8], FOUR[:8]), "starts at byte 4"),
        (_one("F32", [1], [0, 4], FOUR[:8]), "8 are present"),
        (_one("F32", [1.0], [0, 4], FOUR[:4]), "invalid shape"),
        (_one("F32", [-1], [0, 4], FOUR[:4]), "invalid shape"),
        (_one("F32", [True], [0, 4], FOUR[:4]), "invalid shape"),
        (_one("F32", [1] * 40, [0, 4], FOUR[:4]), "invalid shape"),
        (_one("F32", [0, 2**40, 2**40], [0, 0], b""), "implausibly large"),
        (_one("F32", [1], [4, 0], FOUR[:4]), "invalid data_offsets"),
        (_one("F32", [1], [0], FOUR[:4]), "invalid data_offsets"),
        (_craft({"__metadata__": _meta(), "b": [1]}, b""), "exactly dtype"),
        (_one("F32", [1], [0, 4], np.float32(np.nan).tobytes()), "NaN or infinity"),
        (_one("F16", [1], [0, 2], np.float16(np.inf).tobytes(), "fp16"), "NaN or infinity"),
        (_one("I8", [2], [0, 2], b"\x01\x01", "int8"), "no scale tensor"),
        (_int8(FOUR[:4], b"\x01" * 4, codes_shape=[2, 2]), r"expected float32 \[2\]"),
        (_int8(FOUR[:12], b"\x01" * 6, codes_shape=[3, 2]), r"\[3\], expected float32 \[2\]"),
        (_int8(np.float16(1).tobytes(), b"\x01\x01", scale_dtype="F16"), "expected float32"),
        (_int8(np.float32(-1).tobytes(), b"\x01\x01"), "negative, NaN or infinite"),
        (_int8(np.float32(np.nan).tobytes(), b"\x01\x01"), "negative, NaN or infinite"),
        (_int8(FOUR[:4], b"\x80\x01"), "-128"),
        (_int8(np.float32(3e38).tobytes(), b"\x7f\x01"), "overflow float32"),
    ],
)
def test_decode_refuses_malformed_bytes_with_one_clear_line(data: bytes, match: str) -> None:
    with pytest.raises(IntegrityError, match=match) as info:
        decode_tensors(data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (_meta(version="2"), "newer than this lorafleet"),
        (_meta(packing="int4"), "unknown packing"),
        ({"round": "1"}, "lorafleet.format"),
    ],
)
def test_packing_of_refuses_bad_headers(meta: dict[str, str], match: str) -> None:
    data = _craft(
        {"__metadata__": meta, "b": {"dtype": F32, "shape": [1], "data_offsets": [0, 4]}}, FOUR[:4]
    )
    with pytest.raises(IntegrityError, match=match):
        packing_of(data)


def test_decode_refuses_duplicate_header_keys() -> None:
    # Prepare: the same tensor declared twice, the second entry silently winning elsewhere
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    meta = json.dumps(_meta())
    text = f'{{"__metadata__":{meta},"b":{entry},"b":{entry}}}'.encode()
    data = len(text).to_bytes(8, "little") + text + FOUR[:4]

    # Execute / Assert
    with pytest.raises(IntegrityError, match="repeats the key 'b'"):
        decode_tensors(data)


@pytest.mark.parametrize("position", ["length", "brace", "dtype"])
def test_decode_refuses_a_flipped_header_byte(position: str) -> None:
    # Prepare
    data = bytearray(_good())
    index = {"length": 0, "brace": 8, "dtype": data.index(b'"I8"') + 1}[position]
    data[index] ^= 0x01

    # Execute / Assert
    with pytest.raises(IntegrityError):
        decode_tensors(bytes(data))


@pytest.mark.parametrize("value", ["not bytes", None, 42])
def test_decode_refuses_non_bytes(value: Any) -> None:
    with pytest.raises(IntegrityError, match="expected bytes"):
        decode_tensors(value)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = _good()
    assert (
        decode_tensors(bytearray(data))[1] == decode_tensors(memoryview(data))[1] == {"round": "1"}
    )


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_integrity_error(data: bytes) -> None:
    with contextlib.suppress(IntegrityError):
        decode_tensors(data)


@settings(max_examples=300)
@given(st.data())
def test_mutated_valid_bytes_decode_or_raise_integrity_error(data: st.DataObject) -> None:
    # Prepare: flip, overwrite, insert or delete bytes of a valid encoding
    buf = bytearray(_good())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(i, data.draw(st.integers(0, 255)))
        elif len(buf) > 1:
            del buf[i]

    # Execute / Assert: a valid result (IntegrityError is the only other outcome)
    try:
        tensors, meta = decode_tensors(bytes(buf))
    except IntegrityError:
        return
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**70), 2**70),
            st.floats(),
            st.text(max_size=4),
            st.lists(st.one_of(st.integers(-5, 2**64), st.floats(), st.booleans()), max_size=5),
        ),
    ),
    st.sampled_from(PACKINGS),
    st.binary(max_size=64),
)
def test_hostile_headers_decode_or_raise_integrity_error(
    entry: dict[str, Any], packing: str, payload: bytes
) -> None:
    data = _craft({"__metadata__": _meta(packing), "b": entry}, payload)  # NaN becomes `NaN`
    with contextlib.suppress(IntegrityError):
        decode_tensors(data)


def test_format_version_constant_matches_what_is_written() -> None:
    data = encode_tensors({"b": np.ones(1, np.float32)})
    n = int.from_bytes(data[:8], "little")
    assert json.loads(data[8 : 8 + n])["__metadata__"]["lorafleet.format"] == str(FORMAT_VERSION)
