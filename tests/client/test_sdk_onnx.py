"""PersonalModel.generate on the ONNX Runtime backends: parity, versions, errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorafleet.client import onnx_export
from lorafleet.client.data import encode_blocks, to_examples
from lorafleet.client.onnx_export import ExportedBase
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.errors import LorafleetError, SpecError

NOTES = [
    "Maya climbs at the gym on Tuesdays and Thursdays with her friend Jonas.",
    "The cat Pixel sleeps on the radiator every afternoon.",
    "Tidewatch is a small app that shows the tide tables for the harbour.",
    "Lunch was lentil soup again, and the bread from the corner bakery.",
    "Remember to water the basil and call the bakery about Saturday.",
    "Jonas says the new route at the gym is a sandbagged five.",
    "Pixel knocked the basil off the windowsill again this morning.",
    "Tidewatch now shows the next low tide on the home screen.",
]
FAST = TrainConfig(steps=4, lr=0.05, eval_every=4, precision="fp32")
PROMPTS = ["Maya climbs", "The cat", "Remember"]


def open_pm(profile: Path, base: Path, cache: Path) -> PersonalModel:
    return PersonalModel.open(
        profile, base=base, rank=4, precision="fp32", device="cpu", seq_len=32, cache_dir=cache
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained_profile(
    tiny_model_dir: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A profile whose current version 1 has a trained (non-zero) B."""
    root = tmp_path_factory.mktemp("profile") / "p"
    open_pm(root, tiny_model_dir, cache).train(NOTES, FAST, progress=False)
    return root


@pytest.fixture(scope="module")
def pm(trained_profile: Path, tiny_model_dir: Path, cache: Path) -> PersonalModel:
    return open_pm(trained_profile, tiny_model_dir, cache)


@pytest.mark.parametrize(
    ("chat", "use_adapter", "max_new_tokens"),
    [
        (True, True, None),  # the defaults: chat template, 64 tokens, stop at EOS
        (False, True, 16),
        (False, False, 16),
    ],
)
def test_float32_onnx_replies_equal_the_torch_path(
    pm: PersonalModel, chat: bool, use_adapter: bool, max_new_tokens: int | None
) -> None:
    # Prepare
    kw: dict[str, Any] = {"chat": chat, "use_adapter": use_adapter}
    if max_new_tokens is not None:
        kw["max_new_tokens"] = max_new_tokens

    # Execute
    torch_replies = [pm.generate(p, **kw) for p in PROMPTS]
    onnx_replies = [pm.generate(p, backend="onnx", **kw) for p in PROMPTS]

    # Assert
    assert onnx_replies == torch_replies
    assert all(r for r in onnx_replies)


def test_int8_replies_start_like_float32_and_its_loss_is_close(pm: PersonalModel) -> None:
    # Prepare
    float32 = [pm.generate(p, chat=False, max_new_tokens=3, backend="onnx") for p in PROMPTS]

    # Execute
    int8 = [pm.generate(p, chat=False, max_new_tokens=3, backend="onnx-int8") for p in PROMPTS]
    exported = pm.prepare_backend("onnx-int8", progress=False)
    assert exported is not None
    lm = exported.load(provider="cpu")
    blocks = encode_blocks(to_examples(NOTES), pm.base.tokenizer, seq_len=32)
    ce, _ = lm.cross_entropy(
        blocks.input_ids.numpy(),
        blocks.labels.numpy(),
        blocks.attention_mask.numpy(),
        adapter=lm.adapter(pm.spec, pm.adapter_b()),
    )

    # Assert: the same first tokens, and the personal model's loss within the 3 % gate.
    assert int8 == float32
    assert exported.meta.quantization == "int8"
    assert ce == pytest.approx(pm.evaluate(NOTES).adapter_loss, rel=0.03)


def test_the_next_onnx_reply_uses_the_version_in_use(
    trained_profile: Path, tiny_model_dir: Path, cache: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of the trained profile, with version 1 bound to the ONNX session.
    shutil.copytree(trained_profile, tmp_path / "p")
    pm = open_pm(tmp_path / "p", tiny_model_dir, cache)
    ask: dict[str, Any] = {"chat": False, "max_new_tokens": 12}
    v1 = pm.generate("Maya climbs", backend="onnx", **ask)

    # Execute / Assert: train saves version 2, and the ONNX reply follows it.
    pm.train(NOTES, TrainConfig(steps=3, lr=0.5, eval_every=3, precision="fp32"), progress=False)
    assert pm.version == 2
    v2 = pm.generate("Maya climbs", backend="onnx", **ask)
    assert v2 == pm.generate("Maya climbs", **ask)
    assert v2 != v1

    # Execute / Assert: rollback to version 1 brings its reply back.
    pm.rollback(1)
    assert pm.generate("Maya climbs", backend="onnx", **ask) == v1

    # Execute / Assert: B replaced in memory (zeros) answers like the bare base.
    pm.load_b({k: np.zeros_like(v) for k, v in pm.adapter_b().items()})
    assert pm.generate("Maya climbs", backend="onnx", **ask) == pm.generate(
        "Maya climbs", backend="onnx", use_adapter=False, **ask
    )


def test_the_session_loads_lazily_once_and_a_reopened_profile_reuses_the_export(
    trained_profile: Path,
    tiny_model_dir: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: make sure the float32 export is cached, then forbid exporting again.
    open_pm(trained_profile, tiny_model_dir, cache).prepare_backend("onnx", progress=False)
    loads: list[Path] = []
    real_load = ExportedBase.load

    def counting_load(self: ExportedBase, **kw: Any) -> Any:
        loads.append(self.folder)
        return real_load(self, **kw)

    def no_export(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the cached export should have been reused")

    monkeypatch.setattr(ExportedBase, "load", counting_load)
    monkeypatch.setattr(onnx_export, "export_base", no_export)
    pm = open_pm(trained_profile, tiny_model_dir, cache)

    # Execute
    before = pm.info()["onnx_session"]
    pm.generate("Maya climbs", chat=False, max_new_tokens=4, backend="onnx")
    pm.generate("The cat", chat=False, max_new_tokens=4, backend="onnx")
    info = pm.info()["onnx_session"]

    # Assert
    assert before is None
    assert len(loads) == 1
    assert info["backend"] == "onnx" and info["providers"][0] == "CPUExecutionProvider"


def test_prepare_backend_reports_the_quality_gate(pm: PersonalModel) -> None:
    exported = pm.prepare_backend("onnx-int8", provider="cpu", progress=False)

    assert pm.prepare_backend("torch") is None
    assert exported is not None
    assert exported.quality.passed(3.0) and exported.quality.quantization == "int8"
    assert pm.info()["onnx_session"]["backend"] == "onnx-int8"


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"backend": "onnx-int4"}, SpecError, "unknown generation backend 'onnx-int4'"),
        ({"provider": "cuda"}, SpecError, "applies to the ONNX backends"),
        ({"backend": "onnx", "temperature": 0.7}, SpecError, "torch backend only"),
        ({"backend": "onnx", "max_new_tokens": 0}, SpecError, "max_new_tokens"),
    ],
)
def test_bad_backend_arguments_are_one_clear_error(
    pm: PersonalModel, kw: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        pm.generate("Maya climbs", **kw)


def test_cuda_without_onnxruntime_gpu_fails_before_any_export(
    trained_profile: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an empty cache, so the export would be needed.
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    pm = open_pm(trained_profile, tiny_model_dir, tmp_path / "cache")

    # Execute / Assert
    with pytest.raises(LorafleetError, match="onnxruntime-gpu"):
        pm.generate("Maya climbs", backend="onnx-int8", provider="cuda")
    assert not (tmp_path / "cache" / "onnx").exists()


def test_an_int8_export_leaves_the_apps_logging_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an app that has not configured logging, and onnxruntime's quantizer not
    # imported yet (its import calls logging.basicConfig(level=INFO)).
    import logging
    import sys

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.delitem(
        sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", raising=False
    )
    weight = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)

    # Execute
    onnx_export._quantize(weight, 8, 32)

    # Assert
    assert root.handlers == [] and root.level == logging.WARNING


def test_onnx_auto_times_both_graphs_once_and_replies_like_the_one_it_chose(
    trained_profile: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a cache of its own, so the choice is measured here
    first = open_pm(trained_profile, tiny_model_dir, tmp_path / "cache")

    # Execute
    reply = first.generate("Maya climbs", max_new_tokens=6, backend="onnx-auto")
    choice = first.onnx_graph_choice()
    again = open_pm(trained_profile, tiny_model_dir, tmp_path / "cache").onnx_graph_choice()

    # Assert: both graphs timed, the rule applied, the reply is the chosen graph's, and a
    # new process reads the choice instead of timing again
    assert set(choice.tokens_per_s) == {"onnx", "onnx-int8"}
    assert all(v > 0 for v in choice.tokens_per_s.values())
    faster = choice.tokens_per_s["onnx-int8"] >= choice.tokens_per_s["onnx"]
    assert choice.backend == ("onnx-int8" if faster else "onnx")
    assert reply == first.generate("Maya climbs", max_new_tokens=6, backend=choice.backend)
    assert not choice.from_cache and again.from_cache
    assert (again.backend, again.reason) == (choice.backend, choice.reason)


def test_a_refused_int8_export_is_never_chosen() -> None:
    from lorafleet.client.onnx_choice import decide

    assert decide(10.0, None, int8_refused="gate failed")[0] == "onnx"
    assert decide(10.0, 9.0)[0] == "onnx"
    assert decide(10.0, 10.0)[0] == "onnx-int8"  # a tie keeps the smaller graph


def test_a_corrupt_cached_choice_is_measured_again(tmp_path: Path) -> None:
    from lorafleet.client.onnx_choice import choose_graph

    # Prepare
    key = {"version": 1, "cpu_model": "test"}
    calls: list[int] = []

    def measure() -> tuple[float, float | None, str]:
        calls.append(1)
        return 10.0, 20.0, ""

    first = choose_graph(key, measure, cache_dir=tmp_path)
    (cached,) = (tmp_path / "device").glob("onnx-choice-*.json")
    cached.write_text("{not json")

    # Execute
    second = choose_graph(key, measure, cache_dir=tmp_path)
    third = choose_graph(key, measure, cache_dir=tmp_path)
    other = choose_graph({**key, "cpu_model": "another"}, measure, cache_dir=tmp_path)

    # Assert: measured, re-measured after the corruption, then read; a new key measures
    assert len(calls) == 3
    assert first.backend == second.backend == third.backend == other.backend == "onnx-int8"
    assert third.from_cache and not other.from_cache
