"""Adapters out (#16 items 1-3): every export is loaded by the real other tool."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafleet.client.adapter import adapter_disabled
from lorafleet.client.data import Example, demo_notes_path, encode_blocks, to_examples
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.export import BaseRef, base_ref
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.manifest import DEFAULT_BASE_SHA256


@pytest.fixture(scope="module")
def notes() -> list[Example]:
    """A dozen of the bundled demo notes: a real user's kind of text, small enough."""
    return to_examples(demo_notes_path())[:12]


FAST = TrainConfig(steps=6, lr=0.05, eval_every=3, precision="fp32")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def open_pm(profile: Path, base: Path | str) -> PersonalModel:
    return PersonalModel.open(
        profile, base=base, rank=4, precision="fp32", device="cpu", seq_len=32
    )


@pytest.fixture(scope="module")
def hub_cache(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache holding the tiny model as ``lorafleet-test/tiny``."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--lorafleet-test--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture(scope="module")
def trained(
    hub_cache: Path, notes: list[Example], tmp_path_factory: pytest.TempPathFactory
) -> PersonalModel:
    """A profile on the hub-cache snapshot of the tiny base, trained one version."""
    snapshot = hub_cache / "models--lorafleet-test--tiny" / "snapshots" / COMMIT
    pm = open_pm(tmp_path_factory.mktemp("profile") / "p", snapshot)
    pm.train(notes, FAST, progress=False)
    return pm


def _stock_peft(base_folder: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        # peft warns (UserWarning) about config keys it does not know: there must be none.
        warnings.simplefilter("error", UserWarning)
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter)


def test_save_pretrained_names_the_base_portably_and_stock_peft_gets_lorafleets_loss(
    trained: PersonalModel, notes: list[Example], tmp_path: Path
) -> None:
    # Execute
    out = trained.save_pretrained(tmp_path / "adapter")
    stock = _stock_peft(Path(trained.base.source), out)
    blocks = encode_blocks(notes, trained.base.tokenizer, seq_len=32)
    # Assert
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lorafleet-test/tiny"
    assert config["revision"] == COMMIT
    assert "lorafleet_base_sha256" not in config  # peft would warn on every load
    sidecar = json.loads((out / "lorafleet_adapter.json").read_text())
    assert sidecar["spec"]["base_sha256"] == trained.spec.base_sha256
    card = (out / "README.md").read_text()
    assert trained.provenance is not None
    metrics = trained.provenance.metrics
    for needle in (
        "base_model: lorafleet-test/tiny",
        f"revision: {COMMIT}",
        trained.spec.base_sha256,
        "rank 4",
        "cohort seed 0",
        f"from {int(metrics['train_examples'])} notes ({int(metrics['heldout_examples'])} more",
        "held-out loss",
        "lorafleet version",
    ):
        assert needle in card, needle
    assert heldout_loss(stock, blocks) == pytest.approx(
        trained.evaluate(notes).adapter_loss, abs=1e-6
    )


def test_auto_peft_loads_the_export_from_an_offline_hub_cache(
    trained: PersonalModel, hub_cache: Path, tmp_path: Path
) -> None:
    # Prepare: the adapter's own logits, from lorafleet's model
    out = trained.save_pretrained(tmp_path / "adapter")
    ids = trained.base.tokenizer("Maya climbs at the gym", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = trained.model(ids).logits[0, -1].double().sum().item()
    script = textwrap.dedent(
        f"""
        import torch
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r})
        with torch.no_grad():
            print(model(torch.tensor({ids.tolist()!r})).logits[0, -1].double().sum().item())
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    # Execute: a fresh process that knows the base only by the hub id in the folder
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-4)


def test_from_pretrained_imports_the_export_into_a_new_profile(
    trained: PersonalModel, tmp_path: Path
) -> None:
    # Prepare
    out = trained.save_pretrained(tmp_path / "adapter")
    # Execute
    imported = PersonalModel.from_pretrained(
        out, profile=tmp_path / "new", base=trained.base.source, precision="fp32", device="cpu"
    )
    again = PersonalModel.from_pretrained(
        out, profile=tmp_path / "new", precision="fp32", device="cpu"
    )
    # Assert: same adapter, same spec, one version however often it is imported
    assert imported.spec == trained.spec and imported.version == 1 and again.version == 1
    mine, theirs = trained.adapter_b(), again.adapter_b()
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert again.provenance is not None and trained.provenance is not None
    assert again.provenance.content_hash == trained.provenance.content_hash


def test_from_pretrained_refuses_what_it_cannot_trust(
    trained: PersonalModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file, save_file

    out = trained.save_pretrained(tmp_path / "adapter")
    # A PEFT adapter made elsewhere: no lorafleet spec, A trained, nothing to rebuild.
    foreign = tmp_path / "foreign"
    shutil.copytree(out, foreign)
    (foreign / "lorafleet_adapter.json").unlink()
    with pytest.raises(LorafleetError, match="not a lorafleet adapter folder"):
        PersonalModel.from_pretrained(foreign, profile=tmp_path / "a", base=tiny_model_dir)
    # A changed B no longer hashes to its recorded content hash.
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    tensors = load_file(str(tampered / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(tampered / "adapter_model.safetensors"))
    with pytest.raises(IntegrityError, match="content hash"):
        PersonalModel.from_pretrained(tampered, profile=tmp_path / "b", base=tiny_model_dir)
    # A profile of another spec keeps its own adapter.
    other = PersonalModel.open(tmp_path / "c", base=tiny_model_dir, rank=2, device="cpu")
    with pytest.raises(LorafleetError, match="another adapter spec"):
        PersonalModel.from_pretrained(out, profile=other.profile, base=tiny_model_dir)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_refuses_user_mistakes_before_writing(
    trained: PersonalModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(LorafleetError, match="already exists"):
        trained.save_pretrained(tmp_path / "taken")
    with pytest.raises(SpecError, match="unknown export format 'ggml'"):
        trained.export(tmp_path / "x", "ggml")  # type: ignore[arg-type]
    for fmt in ("gguf-lora", "gguf"):  # the tiny base is a transformers folder
        with pytest.raises(LorafleetError, match=f"--format {fmt} needs a GGUF base"):
            trained.export(tmp_path / "x", fmt)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="not a hub id"):
        trained.save_pretrained(tmp_path / "x", base_id="no slash")
    fresh = open_pm(tmp_path / "fresh", tiny_model_dir)
    with pytest.raises(LorafleetError, match="no saved adapter version yet"):
        fresh.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("sha256", "source", "base_id", "expected"),
    [
        (
            DEFAULT_BASE_SHA256,
            "default",
            None,
            ("HuggingFaceTB/SmolLM2-135M-Instruct", None, True, "Q4_1"),
        ),
        ("0" * 64, "default", "org/name@v1.0", ("org/name", "v1.0", True, None)),
    ],
)
def test_base_ref_names_bases_by_their_hub_ids(
    sha256: str, source: str, base_id: str | None, expected: tuple[object, ...]
) -> None:
    ref = base_ref(sha256, "SmolLM2-135M-Instruct", source, base_id=base_id)
    assert (ref.name_or_path, ref.revision, ref.portable, ref.dequantized_from) == expected


def test_a_plain_folder_base_has_only_a_local_name(tiny_model_dir: Path) -> None:
    ref = base_ref("1" * 64, "model", str(tiny_model_dir))
    assert ref == BaseRef("model", None, "1" * 64, portable=False)


def test_merged_export_gives_the_adapters_logits_in_plain_transformers(
    trained: PersonalModel, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Execute
    out = trained.export(tmp_path / "merged", "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Pixel knocked the basil off the windowsill", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = merged(ids).logits  # (1, T, V)
        want = trained.model(ids).logits
        with adapter_disabled(trained.model):
            bare = trained.model(ids).logits
    # Assert: no LoRA layers left, the adapter's logits, and the adapter moved them at all
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - bare).abs().max() > 1e-3
    assert "base_model_relation: merge" in (out / "README.md").read_text()


def test_a_personal_a_goes_with_every_export_and_import(
    hub_cache: Path, notes: list[Example], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    # Prepare: a version trained with a personal A
    snapshot = hub_cache / "models--lorafleet-test--tiny" / "snapshots" / COMMIT
    pm = open_pm(tmp_path / "p", snapshot)
    pm.train(notes, dataclasses.replace(FAST, a_lr=1e-2), progress=False)
    a = pm.adapter_a()
    assert a is not None and pm.provenance is not None and pm.provenance.personal_a
    blocks = encode_blocks(notes, pm.base.tokenizer, seq_len=32)
    ids = blocks.input_ids[:1]

    # Execute
    peft_out = pm.save_pretrained(tmp_path / "adapter")
    merged_out = pm.export(tmp_path / "merged", "merged")
    imported = PersonalModel.from_pretrained(
        peft_out, profile=tmp_path / "new", base=pm.base.source, precision="fp32", device="cpu"
    )

    # Assert: stock peft, the merged model and the imported profile all hold that A
    stock = _stock_peft(snapshot, peft_out)
    assert heldout_loss(stock, blocks) == pytest.approx(pm.evaluate(notes).adapter_loss, abs=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(merged_out)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, pm.model(ids).logits, atol=1e-5)
    got = imported.adapter_a()
    assert got is not None and all(np.array_equal(got[k], a[k]) for k in a)
    assert imported.provenance is not None
    assert imported.provenance.content_hash == pm.provenance.content_hash


# ----------------------------------------------------------------------------- the CLI
def test_cli_export_formats_match_the_sdks() -> None:
    from lorafleet.client.cli import _EXPORT_FORMATS
    from lorafleet.client.export import EXPORT_FORMATS

    assert tuple(_EXPORT_FORMATS) == EXPORT_FORMATS


def test_lorafleet_export_writes_peft_and_merged_folders(
    trained: PersonalModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafleet.client.cli import main

    profile = ["--profile", str(trained.profile)]
    # Execute
    rc_peft = main(["export", "--format", "peft", *profile, "--out", str(tmp_path / "a")])
    rc_merged = main(["export", "--format", "merged", *profile, "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    # Assert: the same folders the SDK writes
    assert (rc_peft, rc_merged) == (0, 0)
    assert "exported adapter version 1 as peft" in out and "as merged" in out
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (
        "lorafleet-test/tiny",
        COMMIT,
    )
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--format", "peft", "--out", "{tmp}/x"], "needs --profile"),
        (["--format", "peft", "--profile", "{profile}"], "needs --profile"),
        (["--format", "merged", "--profile", "{profile}", "--out", "{tmp}"], "already exists"),
        (["--format", "peft", "--profile", "{tmp}/none", "--out", "{tmp}/x"], "not a lorafleet"),
        (
            [
                "--format",
                "peft",
                "--profile",
                "{profile}",
                "--out",
                "{tmp}/x",
                "--adapter-version",
                "7",
            ],
            "has versions [1]",
        ),
        (
            ["--format", "peft", "--profile", "{profile}", "--out", "{tmp}/x", "--base-id", "x"],
            "not a hub id",
        ),
        (
            ["--format", "gguf-lora", "--profile", "{profile}", "--out", "{tmp}/x"],
            "needs a GGUF base",
        ),
        (
            ["--profile", "{profile}"],
            "--profile applies to the adapter formats (peft, merged, onnx-genai",
        ),
    ],
)
def test_lorafleet_export_mistakes_are_one_error_line(
    trained: PersonalModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    fragment: str,
) -> None:
    from lorafleet.client.cli import main

    argv = [a.format(tmp=tmp_path, profile=trained.profile) for a in extra]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "x").exists()


def test_export_base_writes_a_folder_transformers_loads(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from lorafleet.client.cli import main

    # Execute
    assert main(["export-base", str(tmp_path / "base"), "--base", str(tiny_model_dir)]) == 0
    again = main(["export-base", str(tmp_path / "base"), "--base", str(tiny_model_dir)])
    # Assert: the same weights, no lorafleet-internal files, a card; never overwritten
    names = {p.name for p in (tmp_path / "base").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith("lorafleet-") for n in names)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    mine = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert again == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_bases_export_and_exported_base_reproduce_lorafleets_loss(
    notes: list[Example], tmp_path: Path
) -> None:
    from lorafleet.client.cli import main

    # Prepare: a short training run on the real default base (SmolLM2-135M, Q4_1 GGUF)
    pm = PersonalModel.open(tmp_path / "p", precision="fp32", device="cpu", seq_len=64)
    pm.train(notes, TrainConfig(steps=2, eval_every=2, precision="fp32"), progress=False)
    # Execute
    assert (
        main(
            [
                "export",
                "--format",
                "peft",
                "--profile",
                str(pm.profile),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert main(["export-base", str(tmp_path / "base")]) == 0
    stock = _stock_peft(tmp_path / "base", tmp_path / "a")
    # Assert: named by the hub model it was quantized from; the card says what differs;
    # stock peft on the exported base gives lorafleet's own loss.
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "de-quantized Q4_1" in (tmp_path / "a" / "README.md").read_text()
    assert "Q4_1" in (tmp_path / "base" / "README.md").read_text()
    blocks = encode_blocks(notes, pm.base.tokenizer, seq_len=64)
    assert heldout_loss(stock, blocks) == pytest.approx(pm.evaluate(notes).adapter_loss, abs=1e-5)
    # ONNX Runtime GenAI with the exported adapter: lorafleet's greedy text, 32 tokens.
    pytest.importorskip("onnxruntime_genai")
    out = pm.export(tmp_path / "genai", "onnx-genai", progress=False)
    prompt = "Crux Yard tonight with"
    new = _og_greedy(out, pm.base.tokenizer(prompt)["input_ids"], 32, adapter=True)
    text = str(pm.base.tokenizer.decode(new, skip_special_tokens=True)).strip()
    assert text == pm.generate(prompt, chat=False, max_new_tokens=32)


# ------------------------------------------------------------------- ONNX Runtime GenAI
@pytest.fixture(scope="module")
def genai_trained(
    tiny_model_dir: Path, notes: list[Example], tmp_path_factory: pytest.TempPathFactory
) -> PersonalModel:
    """A profile on a tiny Llama whose head size (16) ORT GenAI's CPU attention accepts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("genai-base") / "model"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    pm = open_pm(tmp_path_factory.mktemp("genai-profile") / "p", folder)
    pm.train(notes, FAST, progress=False)
    return pm


def _og_greedy(folder: Path, ids: list[int], new_tokens: int, adapter: bool) -> list[int]:
    """Greedy tokens from ONNX Runtime GenAI on an exported folder, with or without its adapter."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    adapters.load(str(folder / "adapter.onnx_adapter"), "personal")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter:
        generator.set_active_adapter(adapters, "personal")
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]]


def test_onnx_genai_export_generates_lorafleets_tokens_with_og_adapters(
    genai_trained: PersonalModel, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime_genai")
    pm = genai_trained
    prompt = "Crux Yard tonight with"
    ids = pm.base.tokenizer(prompt)["input_ids"]
    # Execute
    out = pm.export(tmp_path / "genai", "onnx-genai", progress=False)

    def greedy(adapter: bool) -> str:
        new = _og_greedy(out, ids, 8, adapter)
        return str(pm.base.tokenizer.decode(new, skip_special_tokens=True)).strip()

    # Assert: the adapter's text with the adapter, the bare base's without it
    assert (out / "genai_config.json").is_file()
    mine = pm.generate(prompt, chat=False, max_new_tokens=8)
    assert greedy(True) == mine
    assert greedy(False) == pm.generate(prompt, chat=False, max_new_tokens=8, use_adapter=False)
    assert greedy(False) != mine
    assert "onnxruntime-genai" in (out / "README.md").read_text()
