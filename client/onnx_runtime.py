"""Run an exported base in ONNX Runtime, with any user's personal adapter as an input.

:func:`lorafleet.client.onnx_export.export_base` writes the frozen base once as an ONNX
graph whose adapted Linear layers compute ``y = W x + (x A^T)(s B^T)``, with ``A^T`` and
``s B^T`` (``s = alpha / rank``) as *graph inputs*: one cached graph serves every user of
every cohort, and switching users is switching a few small input tensors, never a
re-export. This module loads such a graph (:class:`OnnxLM`), picks the execution
provider (:func:`select_providers`), binds a personal adapter (:meth:`OnnxLM.adapter`),
and runs greedy generation with a key/value cache and cross-entropy evaluation.

It imports neither torch nor transformers (only NumPy and ONNX Runtime), so an app or a
server that only serves adapters carries no PyTorch at all.

The graph's contract (``EXPORT_FORMAT`` 1):

==========================  ================================  =========================
input                       shape                             meaning
==========================  ================================  =========================
``input_ids``               (batch, seq) int64                new tokens
``attention_mask``          (batch, past + seq) int64         0 on left padding
``position_ids``            (batch, seq) int64                rotary positions
``logits_positions``        (n,) int64                        which of the seq positions
                                                              get logits
``past_key.{i}``            (batch, kv_heads, past, head_dim)  cache of layer i (past may
``past_value.{i}``                                            be 0)
``adapter_a.{module}``      (in_features, rank) float32       ``A^T`` of one module
``adapter_b.{module}``      (rank, out_features) float32      ``(alpha / rank) B^T``
==========================  ================================  =========================

Outputs: ``logits`` (batch, n, vocab) and ``present_key.{i}``/``present_value.{i}``
(batch, kv_heads, past + seq, head_dim).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.seeds import derive_a
from lorafleet.protocols.spec import AdapterSpec

__all__ = [
    "EXPORT_FORMAT",
    "META_FILE",
    "MODEL_FILE",
    "AdaptedModule",
    "ExportMeta",
    "OnnxAdapter",
    "OnnxLM",
    "ort_version",
    "select_providers",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
"""Version of the graph contract above; a cached export of another format is rebuilt."""
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "export.json"
IGNORE_INDEX = -100

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
# Registry of execution-provider choices: name -> ONNX Runtime providers, in priority order.
_PROVIDER_CHOICES: dict[str, tuple[str, ...]] = {
    "cpu": (_CPU,),
    "cuda": (_CUDA, _CPU),
}
PROVIDER_ENV = "LORAFLEET_ORT_PROVIDER"
"""Environment variable that overrides the automatic choice (``cpu`` or ``cuda``)."""


def _ort() -> Any:
    """Import ONNX Runtime, or say how to install it."""
    try:  # onnxruntime ships no type information; imported by name so mypy sees Any
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise LorafleetError(
            "the ONNX Runtime path needs the onnxruntime package; install it: pip install "
            "onnxruntime (or onnxruntime-gpu for CUDA)"
        ) from None


def ort_version() -> str:
    """The installed ONNX Runtime's version (what measured speeds depend on)."""
    return str(_ort().__version__)


def select_providers(override: str | None = None) -> list[str]:
    """ONNX Runtime execution providers to use, chosen once and logged.

    Parameters
    ----------
    override
        ``"cpu"`` or ``"cuda"`` to force one; ``None`` or ``"auto"`` reads
        ``$LORAFLEET_ORT_PROVIDER`` and otherwise picks CUDA when this ONNX Runtime build
        has the CUDA execution provider, else the CPU.

    Returns
    -------
    list[str]
        Provider names for ``onnxruntime.InferenceSession``, best first; the CPU is
        always last, as the fallback for any operator the GPU provider lacks.

    Raises
    ------
    SpecError
        The override names no known provider.
    LorafleetError
        CUDA was asked for but this ONNX Runtime has no CUDA execution provider.

    Examples
    --------
    >>> select_providers("cpu")
    ['CPUExecutionProvider']
    """
    available = set(_ort().get_available_providers())
    how = "override"
    choice = (override or "auto").strip().lower()
    if choice == "auto" and os.environ.get(PROVIDER_ENV):
        choice, how = os.environ[PROVIDER_ENV].strip().lower(), f"${PROVIDER_ENV}"
    if choice == "auto":
        choice, how = ("cuda" if _CUDA in available else "cpu"), "auto"
    if choice not in _PROVIDER_CHOICES:
        raise SpecError(
            f"unknown ONNX Runtime provider {choice!r}; use auto, {', '.join(_PROVIDER_CHOICES)}"
        )
    providers = list(_PROVIDER_CHOICES[choice])
    missing = [p for p in providers if p not in available]
    if missing:
        raise LorafleetError(
            f"execution provider {choice!r} asked for, but this onnxruntime lacks {missing[0]} "
            f"(it has {sorted(available)}); install onnxruntime-gpu for CUDA, or use cpu"
        )
    log.info("ONNX Runtime execution providers: %s (%s)", providers, how)
    return providers


# --------------------------------------------------------------------------- export metadata


@dataclass(frozen=True)
class AdaptedModule:
    """One Linear layer of the base that takes a personal adapter as graph inputs."""

    path: str  # module path in the base, the key of its B (model.layers.0.self_attn.q_proj)
    in_features: int
    out_features: int

    @property
    def a_input(self) -> str:
        """Name of the graph input carrying ``A^T`` (in_features, rank)."""
        return f"adapter_a.{self.path}"

    @property
    def b_input(self) -> str:
        """Name of the graph input carrying ``(alpha / rank) B^T`` (rank, out_features)."""
        return f"adapter_b.{self.path}"


@dataclass(frozen=True)
class ExportMeta:
    """What a runtime must know about an exported graph; stored as ``export.json``.

    Examples
    --------
    >>> meta = ExportMeta.read(Path("~/.cache/lorafleet/onnx/<key>"))  # doctest: +SKIP
    >>> meta.num_layers, meta.quantization  # doctest: +SKIP
    (30, 'int8')
    """

    base_sha256: str
    base_model_id: str
    quantization: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    adapted: tuple[AdaptedModule, ...]
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    export_key: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    format: int = EXPORT_FORMAT

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        data = {
            "format": self.format,
            "base_sha256": self.base_sha256,
            "base_model_id": self.base_model_id,
            "quantization": self.quantization,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "adapted": [[m.path, m.in_features, m.out_features] for m in self.adapted],
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "export_key": self.export_key,
            "options": self.options,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> ExportMeta:
        """Read ``export.json`` from an export folder, with one clear error if unusable."""
        path = Path(folder) / META_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != EXPORT_FORMAT:
                raise IntegrityError(
                    f"{path}: export format {data.get('format')!r}, this lorafleet reads "
                    f"{EXPORT_FORMAT}; export the base again (lorafleet export)"
                )
            return cls(
                base_sha256=str(data["base_sha256"]),
                base_model_id=str(data["base_model_id"]),
                quantization=str(data["quantization"]),
                num_layers=int(data["num_layers"]),
                num_kv_heads=int(data["num_kv_heads"]),
                head_dim=int(data["head_dim"]),
                vocab_size=int(data["vocab_size"]),
                adapted=tuple(AdaptedModule(str(p), int(i), int(o)) for p, i, o in data["adapted"]),
                eos_token_ids=tuple(int(t) for t in data["eos_token_ids"]),
                pad_token_id=int(data["pad_token_id"]),
                export_key=str(data.get("export_key", "")),
                options=dict(data.get("options", {})),
            )
        except FileNotFoundError:
            raise LorafleetError(
                f"{folder} is not an exported base (no {META_FILE}); export one with "
                "lorafleet export or lorafleet.client.onnx_export.export_base"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{path} is damaged ({exc}); export the base again") from None

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Last path component of each adapted module, deduplicated and sorted."""
        return tuple(sorted({m.path.rsplit(".", 1)[-1] for m in self.adapted}))


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True, eq=False)
class OnnxAdapter:
    """A personal adapter bound to one :class:`OnnxLM`: its inputs, ready on the device.

    Build it with :meth:`OnnxLM.adapter` (once per user, not per call): that derives the
    frozen A matrices from the spec's seed and scales B, so generation feeds prepared
    tensors only.
    """

    rank: int
    fingerprint: str  # spec fingerprint, or "" for the zero adapter (bare base)
    arrays: Mapping[str, FloatArray]  # kept alive: OrtValues on the CPU share their memory
    values: Mapping[str, Any]  # input name -> onnxruntime.OrtValue


# --------------------------------------------------------------------------- the model


def _as_ids(value: Any, name: str) -> IntArray:
    arr = np.asarray(value)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise SpecError(
            f"{name} must be a non-empty (batch, seq) array of token ids, got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise SpecError(f"{name} must hold integer token ids, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


class OnnxLM:
    """An exported base in an ONNX Runtime session: logits, cross-entropy, greedy generation.

    Parameters
    ----------
    folder
        An export folder (:attr:`ExportedBase.folder
        <lorafleet.client.onnx_export.ExportedBase.folder>`).
    provider
        ``"auto"``/``None``, ``"cpu"`` or ``"cuda"``; see :func:`select_providers`.
    threads
        CPU threads for ONNX Runtime's operators; ``None`` lets it decide.

    Examples
    --------
    >>> lm = OnnxLM(exported.folder)  # doctest: +SKIP
    >>> adapter = lm.adapter(spec, b)  # doctest: +SKIP
    >>> lm.generate([[1, 2, 3]], adapter, max_new_tokens=8)  # doctest: +SKIP
    [[42, 17, 99, 5, 5, 61, 2]]
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        provider: str | None = None,
        threads: int | None = None,
    ) -> None:
        ort = _ort()
        self.folder = Path(folder)
        self.meta = ExportMeta.read(self.folder)
        model_path = self.folder / MODEL_FILE
        if not model_path.is_file():
            raise LorafleetError(f"{self.folder} has no {MODEL_FILE}; export the base again")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise SpecError(f"threads must be a positive integer, got {threads!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT warns about harmless things
        started = time.perf_counter()
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=select_providers(provider)
            )
        except Exception as exc:  # ORT raises its own untyped errors for a damaged file
            raise IntegrityError(
                f"ONNX Runtime cannot load {model_path} ({str(exc).splitlines()[0][:200]}); "
                "export the base again"
            ) from None
        self.providers: list[str] = list(self.session.get_providers())
        self._device = "cuda" if self.providers[0] == _CUDA else "cpu"
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        missing = [m.a_input for m in self.meta.adapted if m.a_input not in self._input_names]
        if missing:
            raise IntegrityError(f"{model_path} does not match its {META_FILE}; export again")
        self._zero = self._bind({}, rank=1, fingerprint="")
        log.info(
            "loaded ONNX base %s (%s, %d adapted modules) on %s in %.1f s",
            self.meta.base_model_id,
            self.meta.quantization,
            len(self.meta.adapted),
            self.providers[0],
            time.perf_counter() - started,
        )

    # ------------------------------------------------------------------ adapters

    def adapter(
        self,
        spec: AdapterSpec,
        b: Mapping[str, npt.NDArray[np.floating[Any]]],
        a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
    ) -> OnnxAdapter:
        """Bind a personal adapter: A (``a``, or the spec's seeded A), ``(alpha/rank) B``.

        Parameters
        ----------
        spec
            The adapter's spec; it must be for this base and target exactly the modules
            the graph was exported with.
        b
            B matrices keyed by module path, shape ``(out_features, rank)``, as
            :func:`lorafleet.client.adapter.get_b` or ``read_adapter`` return them.
        a
            A personal A, keyed alike, shape ``(rank, in_features)``; None for the A
            every device rebuilds from the spec's seed.

        Raises
        ------
        IntegrityError
            The spec is for another base, or ``b`` is missing, has extra or mis-shaped
            tensors, or holds NaN/Inf.
        SpecError
            The spec adapts modules the graph was not exported for.
        """
        meta = self.meta
        if spec.base_sha256 != meta.base_sha256:
            raise IntegrityError(
                f"adapter spec is for base {spec.base_sha256[:12]}…, but this export is of "
                f"{meta.base_sha256[:12]}…; export the base the adapter was made for"
            )
        if tuple(sorted(spec.target_modules)) != meta.target_modules:
            raise SpecError(
                f"adapter targets {list(spec.target_modules)} but the base was exported for "
                f"{list(meta.target_modules)}; export it with target_modules={list(spec.target_modules)}"
            )
        paths = {m.path for m in meta.adapted}
        for kind, given in (("B", b), ("A", a)):
            if given is None:
                continue
            missing, extra = sorted(paths - set(given)), sorted(set(given) - paths)
            if missing or extra:
                raise IntegrityError(
                    f"{kind} tensors do not fit this export: missing {missing[:3]}, unexpected "
                    f"{extra[:3]}; was the adapter made with another spec?"
                )
        arrays: dict[str, FloatArray] = {}
        for m in meta.adapted:
            value = np.asarray(b[m.path], dtype=np.float32)
            if value.shape != (m.out_features, spec.rank):
                raise IntegrityError(
                    f"B for {m.path} has shape {value.shape}, expected {(m.out_features, spec.rank)}"
                )
            if not np.isfinite(value).all():
                raise IntegrityError(f"B for {m.path} contains NaN or Inf")
            if a is None:
                a_mat = derive_a(spec, m.path, m.in_features)  # (r, in)
            else:
                a_mat = np.asarray(a[m.path], dtype=np.float32)
                if a_mat.shape != (spec.rank, m.in_features):
                    raise IntegrityError(
                        f"A for {m.path} has shape {a_mat.shape}, expected "
                        f"{(spec.rank, m.in_features)}"
                    )
                if not np.isfinite(a_mat).all():
                    raise IntegrityError(f"A for {m.path} contains NaN or Inf")
            arrays[m.a_input] = np.ascontiguousarray(a_mat.T)  # (in, r)
            arrays[m.b_input] = np.ascontiguousarray(value.T * np.float32(spec.scaling))  # (r, out)
        return self._bind(arrays, rank=spec.rank, fingerprint=spec.fingerprint())

    def zero_adapter(self) -> OnnxAdapter:
        """The adapter that changes nothing: the bare base."""
        return self._zero

    def _bind(
        self, arrays: Mapping[str, FloatArray], *, rank: int, fingerprint: str
    ) -> OnnxAdapter:
        ort = _ort()
        full = dict(arrays)
        for m in self.meta.adapted:
            full.setdefault(m.a_input, np.zeros((m.in_features, rank), np.float32))
            full.setdefault(m.b_input, np.zeros((rank, m.out_features), np.float32))
        values = {k: ort.OrtValue.ortvalue_from_numpy(v, self._device, 0) for k, v in full.items()}
        return OnnxAdapter(rank=rank, fingerprint=fingerprint, arrays=full, values=values)

    # ------------------------------------------------------------------ running

    def _empty_cache(self, batch: int) -> dict[str, Any]:
        ort = _ort()
        shape = (batch, self.meta.num_kv_heads, 0, self.meta.head_dim)
        empty = np.zeros(shape, dtype=np.float32)
        cache = {}
        for i in range(self.meta.num_layers):
            for kind in ("key", "value"):
                cache[f"past_{kind}.{i}"] = ort.OrtValue.ortvalue_from_numpy(empty, self._device, 0)
        return cache

    def _run(
        self,
        input_ids: IntArray,
        attention_mask: IntArray,
        position_ids: IntArray,
        logits_positions: IntArray,
        cache: Mapping[str, Any],
        adapter: OnnxAdapter,
    ) -> tuple[FloatArray, dict[str, Any]]:
        """One forward pass; returns host logits and the new cache as device values."""
        ort = _ort()
        feeds: dict[str, Any] = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(input_ids),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(attention_mask),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(position_ids),
            "logits_positions": ort.OrtValue.ortvalue_from_numpy(logits_positions),
            **cache,
            **adapter.values,
        }
        outs = self.session.run_with_ort_values(self._outputs, feeds)
        by_name = dict(zip(self._outputs, outs, strict=True))
        logits = by_name.pop("logits").numpy()
        present = {name.replace("present_", "past_", 1): value for name, value in by_name.items()}
        return logits, present

    def _check_adapter(self, adapter: OnnxAdapter | None) -> OnnxAdapter:
        if adapter is None:
            return self._zero
        if not isinstance(adapter, OnnxAdapter) or set(adapter.values) != set(self._zero.values):
            raise SpecError("adapter must come from this model's OnnxLM.adapter(spec, b)")
        return adapter

    def logits(
        self,
        input_ids: Any,
        attention_mask: Any | None = None,
        adapter: OnnxAdapter | None = None,
    ) -> FloatArray:
        """Logits at every position, ``(batch, seq, vocab)``; no cache."""
        ids = _as_ids(input_ids, "input_ids")
        mask = (
            np.ones_like(ids)
            if attention_mask is None
            else _as_ids(attention_mask, "attention_mask")
        )
        if mask.shape != ids.shape:
            raise SpecError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        positions = _positions(mask)
        out, _ = self._run(
            ids,
            mask,
            positions,
            np.arange(ids.shape[1], dtype=np.int64),
            self._empty_cache(ids.shape[0]),
            self._check_adapter(adapter),
        )
        return out

    def cross_entropy(
        self,
        input_ids: Any,
        labels: Any,
        attention_mask: Any | None = None,
        adapter: OnnxAdapter | None = None,
        *,
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[float, int]:
        """Mean next-token cross-entropy over labelled tokens, and how many there were.

        Same definition as :func:`lorafleet.client.evaluate.heldout_loss`: labels are
        shifted by one, ``-100`` carries no loss, and batches are weighted by their token
        counts. Inputs are ``(N, T)`` arrays (``TokenBlocks`` tensors work as they are).
        ``progress`` is called with the number of rows done after each batch.
        """
        ids = _as_ids(input_ids, "input_ids")
        lab = _as_ids(labels, "labels")
        mask = (
            np.ones_like(ids)
            if attention_mask is None
            else _as_ids(attention_mask, "attention_mask")
        )
        if lab.shape != ids.shape or mask.shape != ids.shape:
            raise SpecError(
                f"input_ids {ids.shape}, labels {lab.shape} and attention_mask {mask.shape} differ"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SpecError(f"batch_size must be a positive integer, got {batch_size!r}")
        bound = self._check_adapter(adapter)
        total, count = 0.0, 0
        for start in range(0, ids.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            target = lab[sl, 1:]  # (b, T-1)
            keep = target != IGNORE_INDEX
            n = int(keep.sum())
            if n:
                logits = self.logits(ids[sl], mask[sl], bound)[:, :-1].astype(np.float64)
                top = logits.max(axis=-1, keepdims=True)
                logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]  # (b, T-1)
                picked = np.take_along_axis(logits, np.where(keep, target, 0)[..., None], -1)[
                    ..., 0
                ]
                total += float(((logz - picked) * keep).sum())
                count += n
            if progress is not None:
                progress(min(start + batch_size, ids.shape[0]))
        if count == 0:
            raise SpecError("cross_entropy: no labelled tokens (every label is -100)")
        return total / count, count

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]] | IntArray,
        adapter: OnnxAdapter | None = None,
        max_new_tokens: int = 64,
        *,
        stop_at_eos: bool = True,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt, with a key/value cache.

        Prompts of different lengths are left-padded, as Hugging Face ``generate`` does
        for decoder-only models. A row stops after it emits an end-of-sequence token
        (which is included); the others go on.

        Parameters
        ----------
        prompt_ids
            Token ids, one sequence per row (a list of lists, or a ``(batch, T)`` array).
        adapter
            From :meth:`adapter`; ``None`` runs the bare base.
        max_new_tokens
            At most this many tokens per row.
        stop_at_eos
            ``False`` always generates ``max_new_tokens`` (for benchmarks).

        Returns
        -------
        list[list[int]]
            The new tokens of each row.
        """
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 1
        ):
            raise SpecError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(prompt_ids, np.ndarray):
            prompt_ids = np.atleast_2d(prompt_ids).tolist()
        try:
            rows = [[int(t) for t in p] for p in prompt_ids]
        except TypeError:
            raise SpecError(
                "generate: prompt_ids must be a list of token-id lists (one per prompt)"
            ) from None
        if not rows or any(not r for r in rows):
            raise SpecError("generate: every prompt needs at least one token")
        bound = self._check_adapter(adapter)
        width = max(len(r) for r in rows)
        pad = self.meta.pad_token_id
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        eos = np.array(self.meta.eos_token_ids or (-1,), dtype=np.int64)
        done = np.zeros(len(rows), dtype=bool)
        new: list[list[int]] = [[] for _ in rows]
        cache = self._empty_cache(len(rows))
        step_ids, positions = ids, _positions(mask)
        last = np.array([width - 1], dtype=np.int64)
        for _ in range(max_new_tokens):
            logits, cache = self._run(step_ids, mask, positions, last, cache, bound)
            token = logits[:, -1, :].argmax(axis=-1).astype(np.int64)  # (batch,)
            token = np.where(done, pad, token)
            for row in np.flatnonzero(~done):
                new[row].append(int(token[row]))
            if stop_at_eos:
                done |= np.isin(token, eos)
                if done.all():
                    break
            mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
            positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)  # (batch, 1)
            step_ids = token[:, None]
            last = np.array([0], dtype=np.int64)
        return new


def _positions(mask: IntArray) -> IntArray:
    """Rotary positions of a left-padded batch: 0 at each row's first real token."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def perplexity(loss: float) -> float:
    """exp(loss), guarded against overflow."""
    return math.exp(min(loss, 80.0))
