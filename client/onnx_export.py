"""Export the frozen base once to ONNX, quantized, with the personal adapter as an input.

The graph is written directly from the base's weights (no tracing): a Llama-family
decoder with a key/value cache, in which every adapted Linear computes
``y = W x + (x A^T)(s B^T)`` with ``A^T`` and ``s B^T`` as graph inputs (the contract is
in :mod:`lorafleet.client.onnx_runtime`). The export therefore depends only on the base
and the export options, never on a user: it is cached under
``cache_root()/onnx/<key>/``, where ``key`` hashes the base's manifest digest and the
options, and is written atomically (a reader sees a complete export or none).

Quantization is weight-only, with ONNX Runtime's ``MatMulNBits`` operator: the big base
matrices are stored as 8-bit (``int8``) or 4-bit (``int4``) integers in blocks of 32
input features, each block with its own scale and zero point, while activations and the
adapter path stay float32. Plain dynamic int8 (``MatMulInteger``: per-tensor int8
*activations*) raised the cross-entropy of SmolLM2-135M on the demo notes from 1.86 to
about 2.5; block-wise weight-only int8 keeps it within half a percent.

Every export measures a **quality gate**: the mean next-token cross-entropy of the
exported graph on the bundled demo notes, against the float32 PyTorch base on the same
tokens. The numbers are printed (logged) at export and kept in ``quality.json`` beside
the graph; an export more than ``max_ce_increase_pct`` worse than float32 raises
:class:`QualityGateError` unless the caller sets ``allow_quality_loss``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from lorafleet.client.base import LoadedBase, cache_root
from lorafleet.client.onnx_runtime import (
    DATA_FILE,
    EXPORT_FORMAT,
    META_FILE,
    MODEL_FILE,
    AdaptedModule,
    ExportMeta,
    OnnxLM,
)
from lorafleet.protocols.atomic import atomic_directory, remove_stale_temporaries
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError, StorageError
from lorafleet.protocols.spec import AdapterSpec

__all__ = [
    "QUALITY_FILE",
    "ExportedBase",
    "OnnxExportConfig",
    "QualityGateError",
    "QualityReport",
    "export_base",
    "find_export",
]

log = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "int4"]
QUALITY_FILE = "quality.json"
TOKENIZER_DIR = "tokenizer"
OPSET = 17
_BITS = {"int8": 8, "int4": 4}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEG = float(np.finfo(np.float32).min)  # additive mask value, as transformers uses
_GATE_SEQ_LEN = 128


class QualityGateError(LorafleetError):
    """A quantized export lost more quality than the gate allows."""


@dataclass(frozen=True)
class OnnxExportConfig:
    """How the base is exported; every field but the gate's is part of the cache key.

    Examples
    --------
    >>> OnnxExportConfig().quantization
    'int8'
    >>> OnnxExportConfig(quantization="int4", allow_quality_loss=True).block_size
    32
    """

    quantization: Quantization = field(
        default="int8",
        metadata={"help": "none (float32), int8 or int4 weight-only (MatMulNBits) base weights."},
    )
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={"help": "Linear layers that take the personal adapter (AdapterSpec's)."},
    )
    block_size: int = field(
        default=32,
        metadata={"help": "Input features per quantization block (16..256, power of 2)."},
    )
    accuracy_level: int = field(
        default=4,
        metadata={
            "help": "MatMulNBits compute type: 0 float32 (exact dequantization), 4 int8 "
            "activations (faster prefill on CPUs with int8 dot products, a little less exact)."
        },
    )
    keep_float: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Module names (e.g. lm_head, down_proj) left in float32."},
    )
    max_ce_increase_pct: float = field(
        default=3.0,
        metadata={"help": "Quality gate: allowed cross-entropy increase over float32, in %."},
    )
    allow_quality_loss: bool = field(
        default=False, metadata={"help": "Keep and use an export that fails the gate."}
    )

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "int8", "int4"):
            raise SpecError(
                f"onnx export: quantization must be none, int8 or int4, got {self.quantization!r}"
            )
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, tuple | list) or not targets:
            raise SpecError(
                f"onnx export: target_modules must be a non-empty list of names, got {targets!r}"
            )
        bad = [t for t in targets if t not in _LINEARS]
        if bad:
            raise SpecError(
                f"onnx export: target module(s) {bad} are not supported; choose from {list(_LINEARS)}"
            )
        object.__setattr__(self, "target_modules", tuple(sorted(set(targets))))
        size = self.block_size
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size not in (16, 32, 64, 128, 256)
        ):
            raise SpecError(f"onnx export: block_size must be 16, 32, 64, 128 or 256, got {size!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise SpecError(
                f"onnx export: accuracy_level must be 0..4 (0 float32, 4 int8), got {self.accuracy_level!r}"
            )
        keep = self.keep_float
        if isinstance(keep, str) or not isinstance(keep, tuple | list):
            raise SpecError(f"onnx export: keep_float must be a list of names, got {keep!r}")
        bad = [k for k in keep if k not in (*_LINEARS, "lm_head")]
        if bad:
            raise SpecError(
                f"onnx export: keep_float names {bad} are not layers; choose from {[*_LINEARS, 'lm_head']}"
            )
        object.__setattr__(self, "keep_float", tuple(sorted(set(keep))))
        pct = self.max_ce_increase_pct
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct < 1000:
            raise SpecError(f"onnx export: max_ce_increase_pct must be >= 0, got {pct!r}")

    def key_options(self) -> dict[str, Any]:
        """The options that change the graph (the gate's threshold does not)."""
        data = asdict(self)
        del data["max_ce_increase_pct"], data["allow_quality_loss"]
        data["target_modules"] = list(self.target_modules)
        data["keep_float"] = list(self.keep_float)
        if self.quantization == "none":  # irrelevant without quantization
            del data["block_size"], data["accuracy_level"], data["keep_float"]
        return data

    def export_key(self, base_sha256: str) -> str:
        """Content address of the export of base ``base_sha256`` with these options."""
        doc = {"format": EXPORT_FORMAT, "opset": OPSET, "base_sha256": base_sha256}
        doc.update(self.key_options())
        return hashlib.sha256(
            json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()


@dataclass(frozen=True)
class QualityReport:
    """The quality gate's measurement, kept as ``quality.json`` beside the export."""

    quantization: str
    reference_ce: float  # float32 PyTorch base
    export_ce: float  # this ONNX graph
    tokens: int
    text: str  # what was measured on

    @property
    def increase_pct(self) -> float:
        """Cross-entropy increase of the export over float32, in percent."""
        return (self.export_ce / self.reference_ce - 1.0) * 100.0

    def passed(self, max_increase_pct: float) -> bool:
        """Whether the export is within the gate."""
        return self.increase_pct <= max_increase_pct

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"quality gate ({self.quantization}): cross-entropy {self.export_ce:.4f} vs float32 "
            f"{self.reference_ce:.4f} ({self.increase_pct:+.2f}%) on {self.tokens} tokens of {self.text}"
        )

    def to_json(self) -> str:
        """Sorted, indented JSON, with the increase spelled out for readers."""
        data = asdict(self)
        data["increase_pct"] = self.increase_pct
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> QualityReport:
        """Read ``quality.json``; damage is an :class:`IntegrityError`."""
        path = Path(folder) / QUALITY_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                quantization=str(data["quantization"]),
                reference_ce=float(data["reference_ce"]),
                export_ce=float(data["export_ce"]),
                tokens=int(data["tokens"]),
                text=str(data["text"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{path} is missing or damaged ({exc})") from None


@dataclass(frozen=True)
class ExportedBase:
    """A cached ONNX export of a base: where it is and how good it is.

    Examples
    --------
    >>> exported = export_base(load_base(), OnnxExportConfig("int8"))  # doctest: +SKIP
    >>> exported.quality.increase_pct < 3.0  # doctest: +SKIP
    True
    >>> lm = exported.load()  # doctest: +SKIP
    """

    folder: Path
    base_sha256: str
    config: OnnxExportConfig
    quality: QualityReport
    meta: ExportMeta

    @property
    def model_path(self) -> Path:
        """The ``.onnx`` file (its weights lie beside it in ``model.onnx.data``)."""
        return self.folder / MODEL_FILE

    @property
    def tokenizer_dir(self) -> Path:
        """A copy of the base's tokenizer files, loadable without the base."""
        return self.folder / TOKENIZER_DIR

    def load(self, *, provider: str | None = None, threads: int | None = None) -> OnnxLM:
        """An :class:`~lorafleet.client.onnx_runtime.OnnxLM` session on this export."""
        return OnnxLM(self.folder, provider=provider, threads=threads)


# --------------------------------------------------------------------------- public API


def export_root(cache_dir: Path | None = None) -> Path:
    """Folder holding every cached export: ``cache_root()/onnx``."""
    return cache_root(cache_dir) / "onnx"


def find_export(
    base_sha256: str, config: OnnxExportConfig | None = None, *, cache_dir: Path | None = None
) -> ExportedBase | None:
    """The cached export of ``base_sha256`` with ``config``, or ``None`` if there is none.

    Loads nothing heavy (no torch, no base), so a runtime can open an export by the
    base's digest alone. The quality gate is checked as in :func:`export_base`.

    Raises
    ------
    QualityGateError
        The cached export fails the gate and ``config.allow_quality_loss`` is not set.
    """
    config = config or OnnxExportConfig()
    folder = export_root(cache_dir) / config.export_key(base_sha256)
    if not folder.is_dir():
        return None
    try:
        exported = _read_export(folder, base_sha256, config)
    except LorafleetError as exc:
        log.warning("cached export %s is unusable (%s); it will be rebuilt", folder, exc)
        return None
    _enforce_gate(exported.quality, config)
    return exported


def export_base(
    base: LoadedBase,
    config: OnnxExportConfig | None = None,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> ExportedBase:
    """Export ``base`` to ONNX once (cached), measure its quality gate, return it.

    Parameters
    ----------
    base
        The loaded base (float32; :func:`lorafleet.client.base.load_base`).
    config
        Quantization, adapted modules and gate; :class:`OnnxExportConfig` defaults
        (int8, ``q_proj``/``v_proj``, 3 %).
    cache_dir
        lorafleet's cache root (default :func:`lorafleet.client.base.cache_root`).
    progress
        Show a progress bar while measuring the gate.

    Returns
    -------
    ExportedBase
        The cached export; a second call with the same base and options returns it at
        once.

    Raises
    ------
    QualityGateError
        The export's cross-entropy is more than ``config.max_ce_increase_pct`` above
        float32's and ``config.allow_quality_loss`` is not set; nothing is cached then.
    LorafleetError
        The base is not a Llama-family model, or the cache cannot be written.

    Examples
    --------
    >>> from lorafleet.client.base import load_base
    >>> exported = export_base(load_base("default"))  # doctest: +SKIP
    >>> print(exported.quality.summary())  # doctest: +SKIP
    quality gate (int8): cross-entropy 1.8712 vs float32 1.8640 (+0.39%) on 5143 tokens ...
    """
    config = config or OnnxExportConfig()
    cached = find_export(base.sha256, config, cache_dir=cache_dir)
    if cached is not None:
        log.info("ONNX export of %s found in cache: %s", base.model_id, cached.folder)
        log.info("%s", cached.quality.summary())
        return cached
    root = export_root(cache_dir)
    folder = root / config.export_key(base.sha256)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
    except OSError as exc:
        raise StorageError(
            f"cannot write ONNX exports under {root}: {exc.strerror}; set LORAFLEET_CACHE to "
            "a writable folder"
        ) from None
    if folder.exists():  # damaged: find_export said it is unusable
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    log.info("exporting %s to ONNX (%s) in %s", base.model_id, config.quantization, folder)
    with atomic_directory(folder) as tmp:
        meta = _write_graph(base, config, tmp, key=folder.name)
        base.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        quality = _measure_quality(base, tmp, config, progress=progress)
        log.info("%s", quality.summary())
        (tmp / QUALITY_FILE).write_text(quality.to_json(), encoding="utf-8")
        _enforce_gate(quality, config)  # raising here discards the temporary folder
    log.info("exported %s in %.1f s", base.model_id, time.perf_counter() - started)
    return ExportedBase(folder, base.sha256, config, quality, meta)


def _enforce_gate(quality: QualityReport, config: OnnxExportConfig) -> None:
    if quality.passed(config.max_ce_increase_pct):
        return
    if config.allow_quality_loss:
        log.warning(
            "%s exceeds the %.1f%% gate; used anyway (allow_quality_loss)",
            quality.summary(),
            config.max_ce_increase_pct,
        )
        return
    raise QualityGateError(
        f"{quality.summary()} exceeds the {config.max_ce_increase_pct:g}% quality gate; use "
        "quantization int8 (or none), keep sensitive layers in float32 (keep_float), or "
        "accept the loss with allow_quality_loss"
    )


def _read_export(folder: Path, base_sha256: str, config: OnnxExportConfig) -> ExportedBase:
    meta = ExportMeta.read(folder)
    if meta.base_sha256 != base_sha256 or meta.export_key != folder.name:
        raise IntegrityError(f"{folder}: {META_FILE} does not match its cache key")
    for name in (MODEL_FILE, DATA_FILE):
        if not (folder / name).is_file():
            raise IntegrityError(f"{folder}: {name} is missing")
    return ExportedBase(folder, base_sha256, config, QualityReport.read(folder), meta)


# --------------------------------------------------------------------------- the gate


def _gate_blocks(tokenizer: Any) -> tuple[Any, str]:
    """The demo notes as 128-token blocks: what every export is measured on."""
    from lorafleet.client.data import demo_notes_path, encode_blocks, read_examples

    path = demo_notes_path()
    return encode_blocks(
        read_examples(path), tokenizer, seq_len=_GATE_SEQ_LEN
    ), f"demo notes ({path.name})"


def _measure_quality(
    base: LoadedBase, folder: Path, config: OnnxExportConfig, *, progress: bool
) -> QualityReport:
    """Cross-entropy of the float32 PyTorch base and of the new graph on the demo notes."""
    import torch
    from tqdm.auto import tqdm

    from lorafleet.client.evaluate import heldout_loss

    blocks, text = _gate_blocks(base.tokenizer)
    model = base.model
    if next(model.parameters()).dtype != torch.float32:
        raise LorafleetError(
            "export the base loaded in float32 (load_base(..., dtype=torch.float32))"
        )
    reference = heldout_loss(model, blocks, precision="fp32", device=torch.device("cpu"))
    lm = OnnxLM(folder, threads=torch.get_num_threads())
    with tqdm(
        total=len(blocks),
        desc=f"quality gate ({config.quantization})",
        unit="block",
        disable=not progress,
    ) as bar:
        ce, tokens = lm.cross_entropy(
            blocks.input_ids.numpy(),
            blocks.labels.numpy(),
            blocks.attention_mask.numpy(),
            progress=lambda done: bar.update(done - bar.n),
        )
    if config.quantization == "none" and abs(ce - reference) > 1e-3 * reference:
        raise IntegrityError(
            f"the float32 ONNX graph's cross-entropy {ce:.5f} differs from PyTorch's "
            f"{reference:.5f}; the export is wrong, please report"
        )
    return QualityReport(config.quantization, reference, ce, tokens, text)


# --------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class _Arch:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float


def _arch(config: Any) -> _Arch:
    """Read and check a Llama-family config; anything this graph does not model is refused."""
    kind = getattr(config, "model_type", None)
    if kind not in ("llama", "mistral"):
        raise LorafleetError(
            f"ONNX export supports Llama-family bases (llama, mistral), not {kind!r}; use the "
            "PyTorch path for this base"
        )
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("bias in attention or MLP")
    if getattr(config, "sliding_window", None):
        problems.append("sliding-window attention")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    )
    if rope_type != "default":
        problems.append(f"rope_type={rope_type}")
    if problems:
        raise LorafleetError(f"ONNX export does not support this base's {', '.join(problems)}")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if theta is None:
        theta = getattr(config, "rope_theta", 10000.0)
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    return _Arch(
        num_layers=int(config.num_hidden_layers),
        hidden=hidden,
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        vocab=int(config.vocab_size),
        eps=float(config.rms_norm_eps),
        rope_theta=float(cast(float, theta)),
    )


class _Graph:
    """A tiny ONNX graph builder: unique names, initializers, nodes."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0
        self._consts: dict[tuple[str, bytes], str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def init(self, name: str, value: npt.NDArray[Any]) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (f"{arr.dtype}{arr.shape}", arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs: Any) -> str:
        """Append one node; return the name of its (single) output."""
        return self.ops(op_type, *inputs, n_out=1, domain=domain, **attrs)[0]

    def ops(
        self, op_type: str, *inputs: str, n_out: int, domain: str = "", **attrs: Any
    ) -> list[str]:
        """Append one node with ``n_out`` outputs; return their names."""
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            self.helper.make_node(
                op_type, list(inputs), outs, name=self.name(op_type), domain=domain, **attrs
            )
        )
        return outs

    def rename_output(self, produced: str, name: str) -> str:
        """Give the last node's output a public name (graph outputs)."""
        node = self.nodes[-1]
        node.output[list(node.output).index(produced)] = name
        return name


def _quantize(
    weight_t: npt.NDArray[np.float32], bits: int, block_size: int
) -> tuple[Any, Any, Any]:
    """Block-wise asymmetric quantization of a (K, N) weight, MatMulNBits layout."""
    # onnxruntime ships no type information; imported by name so mypy sees Any. Importing
    # it calls logging.basicConfig(level=INFO), which would turn on every library's INFO
    # logs in the host app; the root logger is put back as it was.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        nbits = importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    quantizer = nbits.DefaultWeightOnlyQuantizer(
        nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits)
    )
    packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(weight_t))
    return packed, scales, zero_points


class _Writer:
    """Emits the decoder graph for one base and one export config."""

    def __init__(
        self,
        arch: _Arch,
        config: OnnxExportConfig,
        weights: Callable[[str], npt.NDArray[np.float32]],
        *,
        tied: bool,
    ) -> None:
        self.arch, self.config, self.weight, self.tied = arch, config, weights, tied
        self.g = _Graph()

    def linear(self, x: str, name: str, module: str, adapter: AdaptedModule | None) -> str:
        """``x @ W^T`` (float or MatMulNBits), plus ``(x @ A^T) @ (s B^T)`` if adapted."""
        g, cfg = self.g, self.config
        w = self.weight(name)  # (out, in) float32
        short = module
        if cfg.quantization != "none" and short not in cfg.keep_float:
            y = self._nbits(x, w, name)
        else:
            y = g.op("MatMul", x, g.init(name, w.T))
        if adapter is None:
            return y
        low = g.op("MatMul", x, adapter.a_input)  # (B, T, r)
        return g.op("Add", y, g.op("MatMul", low, adapter.b_input))  # (B, T, out)

    def _nbits(self, x: str, w: npt.NDArray[np.float32], name: str) -> str:
        g, cfg = self.g, self.config
        bits = _BITS[cfg.quantization]
        n, k = w.shape
        packed, scales, zeros = _quantize(w.T, bits, cfg.block_size)
        inputs = [x, g.init(f"{name}.q{bits}", packed), g.init(f"{name}.scales", scales)]
        inputs.append(g.init(f"{name}.zero_points", zeros))
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": cfg.block_size}
        if cfg.accuracy_level:
            attrs["accuracy_level"] = cfg.accuracy_level
        return g.op("MatMulNBits", *inputs, domain="com.microsoft", **attrs)

    def rms_norm(self, x: str, name: str) -> str:
        g = self.g
        var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        denom = g.op("Sqrt", g.op("Add", var, g.const(self.arch.eps, np.float32)))
        return g.op("Mul", g.op("Div", x, denom), g.init(name, self.weight(name)))

    def rotate(self, x: str, cos: str, sin: str) -> str:
        """``x * cos + rotate_half(x) * sin`` on (B, h, T, D)."""
        g = self.g
        half = self.arch.head_dim // 2
        x1, x2 = g.ops("Split", x, g.const([half, half]), n_out=2, axis=-1)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def build(self, adapted: dict[str, AdaptedModule], meta_name: str) -> Any:
        from onnx import TensorProto, helper

        a, g = self.arch, self.g
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("logits_positions", TensorProto.INT64, ["n_logits"]),
        ]
        outputs = [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", "n_logits", a.vocab]
            )
        ]
        for i in range(a.num_layers):
            for kind in ("key", "value"):
                inputs.append(
                    helper.make_tensor_value_info(
                        f"past_{kind}.{i}",
                        TensorProto.FLOAT,
                        ["batch", a.kv_heads, "past", a.head_dim],
                    )
                )
                outputs.append(
                    helper.make_tensor_value_info(
                        f"present_{kind}.{i}",
                        TensorProto.FLOAT,
                        ["batch", a.kv_heads, "total", a.head_dim],
                    )
                )
        for m in adapted.values():
            inputs.append(
                helper.make_tensor_value_info(m.a_input, TensorProto.FLOAT, [m.in_features, "rank"])
            )
            inputs.append(
                helper.make_tensor_value_info(
                    m.b_input, TensorProto.FLOAT, ["rank", m.out_features]
                )
            )

        # Shared by every layer: rotary cos/sin (B, 1, T, D) and the additive mask (B, 1, 1, T, S).
        inv_freq = 1.0 / (
            a.rope_theta
            ** (np.arange(0, a.head_dim, 2, dtype=np.int64).astype(np.float32) / a.head_dim)
        )
        pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([-1]))
        freqs = g.op("Mul", pos, g.const(inv_freq.astype(np.float32), np.float32))  # (B, T, D/2)
        emb = g.op("Concat", freqs, freqs, axis=-1)  # (B, T, D)
        cos = g.op("Unsqueeze", g.op("Cos", emb), g.const([1]))
        sin = g.op("Unsqueeze", g.op("Sin", emb), g.const([1]))
        total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0)  # S
        seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(1), axis=0)  # T
        past = g.op("Sub", total, seq)
        keys = g.op("Range", g.const(0), total, g.const(1))  # (S,)
        queries = g.op("Range", past, total, g.const(1))  # (T,)
        causal = g.op(
            "LessOrEqual",
            g.op("Unsqueeze", keys, g.const([0])),
            g.op("Unsqueeze", queries, g.const([1])),
        )  # (T, S)
        padding = g.op(
            "Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1])
        )  # (B, 1, S)
        allowed = g.op("And", causal, padding)  # (B, T, S)
        bias = g.op("Where", allowed, g.const(0.0, np.float32), g.const(_NEG, np.float32))
        bias = g.op("Unsqueeze", bias, g.const([1, 2]))  # (B, 1, 1, T, S)
        scale = g.const(a.head_dim**-0.5, np.float32)
        rep = a.heads // a.kv_heads

        h = g.op("Gather", self._embedding(), "input_ids", axis=0)  # (B, T, H)
        for i in range(a.num_layers):
            pre = f"model.layers.{i}"

            def lin(x: str, kind: str, sub: str, i: int = i, pre: str = pre) -> str:
                path = f"{pre}.{sub}.{kind}"
                return self.linear(x, f"{path}.weight", kind, adapted.get(path))

            x = self.rms_norm(h, f"{pre}.input_layernorm.weight")
            q = lin(x, "q_proj", "self_attn")
            k = lin(x, "k_proj", "self_attn")
            v = lin(x, "v_proj", "self_attn")
            q = g.op(
                "Transpose",
                g.op("Reshape", q, g.const([0, 0, a.heads, a.head_dim])),
                perm=[0, 2, 1, 3],
            )
            k = g.op(
                "Transpose",
                g.op("Reshape", k, g.const([0, 0, a.kv_heads, a.head_dim])),
                perm=[0, 2, 1, 3],
            )
            v = g.op(
                "Transpose",
                g.op("Reshape", v, g.const([0, 0, a.kv_heads, a.head_dim])),
                perm=[0, 2, 1, 3],
            )
            q = self.rotate(q, cos, sin)  # (B, h, T, D)
            k = self.rotate(k, cos, sin)  # (B, kv, T, D)
            k_all = g.op("Concat", f"past_key.{i}", k, axis=2)
            g.rename_output(k_all, f"present_key.{i}")
            v_all = g.op("Concat", f"past_value.{i}", v, axis=2)
            g.rename_output(v_all, f"present_value.{i}")
            k_all, v_all = f"present_key.{i}", f"present_value.{i}"
            # Grouped-query attention without repeating K/V: (B, kv, rep, T, D).
            q5 = g.op("Reshape", q, g.const([0, a.kv_heads, rep, -1, a.head_dim]))
            k5 = g.op(
                "Transpose", g.op("Unsqueeze", k_all, g.const([2])), perm=[0, 1, 2, 4, 3]
            )  # (B, kv, 1, D, S)
            scores = g.op(
                "Add", g.op("Mul", g.op("MatMul", q5, k5), scale), bias
            )  # (B, kv, rep, T, S)
            probs = g.op("Softmax", scores, axis=-1)
            o = g.op("MatMul", probs, g.op("Unsqueeze", v_all, g.const([2])))  # (B, kv, rep, T, D)
            o = g.op("Reshape", o, g.const([0, a.heads, -1, a.head_dim]))  # (B, h, T, D)
            o = g.op(
                "Reshape",
                g.op("Transpose", o, perm=[0, 2, 1, 3]),
                g.const([0, 0, a.heads * a.head_dim]),
            )
            h = g.op("Add", h, lin(o, "o_proj", "self_attn"))
            x = self.rms_norm(h, f"{pre}.post_attention_layernorm.weight")
            gate = lin(x, "gate_proj", "mlp")
            act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), lin(x, "up_proj", "mlp"))
            h = g.op("Add", h, lin(act, "down_proj", "mlp"))

        last = g.op("Gather", h, "logits_positions", axis=1)  # (B, n, H)
        x = self.rms_norm(last, "model.norm.weight")
        logits = self._lm_head(x)
        g.rename_output(logits, "logits")
        graph = helper.make_graph(g.nodes, meta_name, inputs, outputs, initializer=g.initializers)
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
            producer_name="lorafleet",
        )

    def _embedding(self) -> str:
        return self.g.init("model.embed_tokens.weight", self.weight("model.embed_tokens.weight"))

    def _lm_head(self, x: str) -> str:
        g, cfg = self.g, self.config
        a = self.arch
        if cfg.quantization != "none" and "lm_head" not in cfg.keep_float:
            return self._nbits(x, self.weight("lm_head.weight"), "lm_head.weight")
        # (B, n, H) -> (B*n, H) @ E^T: Gemm reads the (tied) embedding as it is, no copy.
        flat = g.op("Reshape", x, g.const([-1, a.hidden]))
        name = (
            "model.embed_tokens.weight"
            if self.tied
            else g.init("lm_head.weight", self.weight("lm_head.weight"))
        )
        y = g.op("Gemm", flat, name, transB=1)
        shape = g.op(
            "Concat",
            g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2])),
            g.const([a.vocab]),
            axis=0,
        )
        return g.op("Reshape", y, shape)


def _write_graph(base: LoadedBase, config: OnnxExportConfig, out: Path, *, key: str) -> ExportMeta:
    """Build the graph from the base's weights and save it (weights in one external file)."""
    import onnx
    import torch

    from lorafleet.client.adapter import lora_targets

    model = base.model
    arch = _arch(model.config)
    state = {k: v for k, v in model.state_dict().items()}
    emb, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    if emb is None or head is None:
        raise LorafleetError(
            f"{base.model_id}: not a Llama causal LM (no embed_tokens/lm_head weights)"
        )

    def weight(name: str) -> npt.NDArray[np.float32]:
        if name not in state:
            raise LorafleetError(f"{base.model_id}: weight {name} missing; not a Llama causal LM")
        value: npt.NDArray[np.float32] = state[name].detach().to(torch.float32).cpu().numpy()
        return value

    spec = AdapterSpec(
        base_model_id=base.model_id, base_sha256=base.sha256, target_modules=config.target_modules
    )
    adapted = {}
    for path, fan_in in lora_targets(model, spec):
        adapted[path] = AdaptedModule(path, fan_in, int(model.get_submodule(path).out_features))

    tied = bool(emb.data_ptr() == head.data_ptr() or torch.equal(emb, head))
    writer = _Writer(arch, config, weight, tied=tied)
    log.info(
        "writing the ONNX graph: %d layers, %s weights, adapter inputs on %d modules",
        arch.num_layers,
        config.quantization,
        len(adapted),
    )
    proto = writer.build(adapted, f"lorafleet-{base.model_id}")
    onnx.save_model(
        proto,
        str(out / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    eos_ids = tuple(
        int(e) for e in (eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
    )
    pad = base.tokenizer.pad_token_id
    meta = ExportMeta(
        base_sha256=base.sha256,
        base_model_id=base.model_id,
        quantization=config.quantization,
        num_layers=arch.num_layers,
        num_kv_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab,
        adapted=tuple(adapted.values()),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)),
        export_key=key,
        options=config.key_options(),
    )
    (out / META_FILE).write_text(meta.to_json(), encoding="utf-8")
    return meta
