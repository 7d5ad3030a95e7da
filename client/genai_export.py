"""``export --format onnx-genai``: an ONNX Runtime GenAI model folder and its adapter.

ONNX Runtime GenAI (``onnxruntime-genai``) runs a folder holding ``genai_config.json``,
``model.onnx`` and the tokenizer; LoRA adapters are ``.onnx_adapter`` files whose tensors
it feeds, by name, into model inputs of the same names (``og.Adapters``). Its own model
builder writes the folder from a transformers base and a PEFT adapter, but bakes the
adapter into the graph as constants. So the folder is built that way from the base
lorafleet trained on and the exported PEFT adapter, and then every LoRA weight is taken
out: it becomes a model input whose default is zero (without an active adapter the
graph is the bare base, exactly), and its value goes into ``adapter.onnx_adapter``.
Other users' adapters for the same base load into the same folder.

The builder's attention kernel on the CPU needs a head size that is a multiple of 16
(the default base's is 64). The export is float32.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lorafleet.client.base import hf_folder
from lorafleet.client.export import CARD_FILE, ExportJob, check_new_folder, model_card, write_peft
from lorafleet.client.layout import PROVENANCE_FILE
from lorafleet.protocols.atomic import atomic_directory
from lorafleet.protocols.errors import LorafleetError

log = logging.getLogger(__name__)

__all__ = ["ADAPTER_FILE", "write_onnx_genai"]

ADAPTER_FILE = "adapter.onnx_adapter"
"""The personal adapter in ONNX Runtime's adapter format, beside the model."""
_MODEL = "model.onnx"
_DATA = "model.onnx.data"
_LORA_MARKERS = (".lora_A.", ".lora_B.")  # how the builder names the LoRA MatMul weights


def _builder_available() -> None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise LorafleetError(
            "--format onnx-genai needs ONNX Runtime GenAI; install it: pip install "
            "'lorafleet[genai]' (or pip install onnxruntime-genai)"
        )


def write_onnx_genai(job: ExportJob) -> Path:
    """Write an ONNX Runtime GenAI folder at ``job.out`` with the adapter as a file.

    Raises
    ------
    LorafleetError
        ``onnxruntime-genai`` is not installed, or its model builder cannot build this
        base (the message carries the builder's last line).
    """
    _builder_available()
    out = check_new_folder(job.out)
    base_folder, _ = hf_folder(job.source, cache_dir=job.cache_dir)
    with tempfile.TemporaryDirectory(prefix="lorafleet-genai-") as work:
        peft = write_peft(dataclasses.replace(job, out=Path(work) / "peft"))
        built = Path(work) / "model"
        _build(base_folder, peft, built, Path(work) / "cache", progress=job.progress)
        with atomic_directory(out) as tmp:
            _split_adapter(built, tmp)
            for path in sorted(built.iterdir()):
                if path.is_file() and path.name not in (_MODEL, _DATA):
                    shutil.copyfile(path, tmp / path.name)
            (tmp / PROVENANCE_FILE).write_text(job.provenance.to_json(), encoding="utf-8")
            (tmp / CARD_FILE).write_text(
                model_card(job.provenance, job.ref, kind="onnx-genai", folder_name=out.name),
                encoding="utf-8",
            )
    log.info(
        "exported adapter version %d for ONNX Runtime GenAI to %s", job.provenance.version, out
    )
    return out


def _build(base: Path, adapter: Path, out: Path, cache: Path, *, progress: bool) -> None:
    """Run ONNX Runtime GenAI's model builder (float32, CPU) in a child process.

    A child keeps the builder's prints, global settings and memory out of the caller's
    process; its output is shown only when it fails.
    """
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        *("-i", str(base), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache)),
        *("--extra_options", f"adapter_path={adapter}"),
    ]
    if progress:
        print("building the ONNX Runtime GenAI model (float32, CPU)...", file=sys.stderr)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        log.debug("onnxruntime-genai builder output:\n%s\n%s", proc.stdout, proc.stderr)
        raise LorafleetError(
            f"ONNX Runtime GenAI's model builder could not build this base: {last}"
        )


def _split_adapter(built: Path, tmp: Path) -> None:
    """Move the builder's LoRA constants out of the graph into ``ADAPTER_FILE``.

    Each becomes a graph input with a zero initializer of its shape as the default:
    ``og.Adapters`` overrides it with the adapter's value, and with no adapter active
    the LoRA branch adds zero, so the folder serves the bare base too.
    """
    import onnx
    from onnx import helper, numpy_helper

    ort = importlib.import_module("onnxruntime")  # no type information: imported by name

    model: Any = onnx.load(str(built / _MODEL), load_external_data=True)
    graph = model.graph
    adapter: dict[str, Any] = {}
    for init in list(graph.initializer):
        if any(marker in init.name for marker in _LORA_MARKERS):
            value = numpy_helper.to_array(init)  # (in, r) for A, (r, out) scaled B
            adapter[init.name] = np.ascontiguousarray(value)
            graph.initializer.remove(init)
            graph.initializer.append(numpy_helper.from_array(np.zeros_like(value), init.name))
            graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(value.shape))
            )
    if not adapter:
        raise LorafleetError(
            "ONNX Runtime GenAI's model builder wrote no LoRA weights for this adapter; "
            "its target modules may not be ones the builder supports"
        )
    onnx.save_model(model, str(tmp / _MODEL), save_as_external_data=True, location=_DATA)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in adapter.items()})
    fmt.export_adapter(str(tmp / ADAPTER_FILE))
