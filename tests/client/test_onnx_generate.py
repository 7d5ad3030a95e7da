"""ONNX Runtime generation: the personal adapter as an input, greedy parity with PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from lorafleet.client.adapter import BTensors, get_b, materialize
from lorafleet.client.base import LoadedBase, load_base
from lorafleet.client.data import TokenBlocks, demo_notes_path, encode_blocks, read_examples
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.onnx_export import ExportedBase, OnnxExportConfig, export_base
from lorafleet.client.onnx_runtime import PROVIDER_ENV, OnnxLM, select_providers
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.spec import AdapterSpec

NEW_TOKENS = 24
PROMPTS = [
    "Maya climbs at the gym on Tuesdays",
    "Remember to water the basil",
    "The cat Pixel",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path, cache: Path) -> LoadedBase:
    return load_base(str(tiny_model_dir), cache_dir=cache)


@pytest.fixture(scope="module")
def exports(tiny_base: LoadedBase, cache: Path) -> dict[str, ExportedBase]:
    return {
        q: export_base(tiny_base, OnnxExportConfig(q), cache_dir=cache, progress=False)  # type: ignore[arg-type]
        for q in ("none", "int8")
    }


@pytest.fixture(scope="module")
def spec(tiny_base: LoadedBase) -> AdapterSpec:
    return AdapterSpec(
        base_model_id=tiny_base.model_id, base_sha256=tiny_base.sha256, rank=4, cohort_seed=7
    )


def personal_b(spec: AdapterSpec, tiny_model_dir: Path, seed: int) -> BTensors:
    """A non-zero B of a realistic size, as training would leave it."""
    base = load_base(str(tiny_model_dir))
    model = materialize(base.model, spec, base_sha256=base.sha256)
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.5, v.shape).astype(np.float32) for k, v in get_b(model).items()}


@pytest.fixture(scope="module")
def b_user1(spec: AdapterSpec, tiny_model_dir: Path) -> BTensors:
    return personal_b(spec, tiny_model_dir, seed=1)


@pytest.fixture(scope="module")
def b_user2(spec: AdapterSpec, tiny_model_dir: Path) -> BTensors:
    return personal_b(spec, tiny_model_dir, seed=2)


def prompt_ids(base: LoadedBase) -> list[list[int]]:
    return [list(base.tokenizer(p)["input_ids"]) for p in PROMPTS]


def peft_greedy(
    tiny_model_dir: Path, spec: AdapterSpec, b: BTensors, prompts: list[list[int]]
) -> list[list[int]]:
    """The PyTorch reference: lorafleet's peft adapter and transformers' greedy generate."""
    base = load_base(str(tiny_model_dir))
    model = materialize(base.model, spec, base_sha256=base.sha256, b=b)
    model.eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            seq = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=base.tokenizer.pad_token_id,
            )
        out.append(seq[0, len(ids) :].tolist())
    return out


def test_float32_greedy_tokens_equal_the_peft_path(
    tiny_base: LoadedBase,
    tiny_model_dir: Path,
    exports: dict[str, ExportedBase],
    spec: AdapterSpec,
    b_user1: BTensors,
) -> None:
    # Prepare
    prompts = prompt_ids(tiny_base)
    expected = peft_greedy(tiny_model_dir, spec, b_user1, prompts)
    lm = exports["none"].load()

    # Execute
    got = [lm.generate([p], lm.adapter(spec, b_user1), NEW_TOKENS)[0] for p in prompts]
    bare = [lm.generate([p], None, NEW_TOKENS)[0] for p in prompts]

    # Assert: identical ids, and the adapter really changed them.
    assert got == expected
    assert bare != got


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(
    tiny_base: LoadedBase, exports: dict[str, ExportedBase], spec: AdapterSpec, b_user1: BTensors
) -> None:
    # Prepare
    lm = exports["none"].load()
    adapter = lm.adapter(spec, b_user1)
    prompts = prompt_ids(tiny_base)
    assert len({len(p) for p in prompts}) > 1  # the premise: padding is needed

    # Execute
    batched = lm.generate(prompts, adapter, NEW_TOKENS)
    single = [lm.generate([p], adapter, NEW_TOKENS)[0] for p in prompts]

    # Assert
    assert batched == single


def test_one_session_switches_users_without_state(
    tiny_base: LoadedBase,
    exports: dict[str, ExportedBase],
    spec: AdapterSpec,
    b_user1: BTensors,
    b_user2: BTensors,
) -> None:
    # Prepare
    lm = exports["none"].load()
    prompts = prompt_ids(tiny_base)
    user1, user2 = lm.adapter(spec, b_user1), lm.adapter(spec, b_user2)

    # Execute
    first = lm.generate(prompts, user1, NEW_TOKENS)
    other = lm.generate(prompts, user2, NEW_TOKENS)
    again = lm.generate(prompts, user1, NEW_TOKENS)

    # Assert
    assert first == again
    assert first != other


def test_stop_at_eos_false_always_gives_max_new_tokens(
    tiny_base: LoadedBase, exports: dict[str, ExportedBase]
) -> None:
    lm = exports["int8"].load()

    out = lm.generate(prompt_ids(tiny_base), None, 9, stop_at_eos=False)

    assert [len(r) for r in out] == [9, 9, 9]


def ce_setup(
    tiny_base: LoadedBase, tiny_model_dir: Path, spec: AdapterSpec, b: BTensors
) -> tuple[torch.nn.Module, TokenBlocks, tuple[npt.NDArray[np.int64], ...]]:
    """The PyTorch reference model with ``b``, demo-note blocks, and them as arrays."""
    blocks = encode_blocks(read_examples(demo_notes_path())[:20], tiny_base.tokenizer, seq_len=64)
    base = load_base(str(tiny_model_dir))
    model = materialize(base.model, spec, base_sha256=base.sha256, b=b)
    arrays = (blocks.input_ids.numpy(), blocks.labels.numpy(), blocks.attention_mask.numpy())
    return model, blocks, arrays


def test_cross_entropy_with_adapter_equals_pytorch_and_int8_is_close(
    tiny_base: LoadedBase,
    tiny_model_dir: Path,
    exports: dict[str, ExportedBase],
    spec: AdapterSpec,
    b_user1: BTensors,
) -> None:
    # Prepare
    model, blocks, arrays = ce_setup(tiny_base, tiny_model_dir, spec, b_user1)
    expected = heldout_loss(model, blocks, precision="fp32", device="cpu")

    # Execute
    results = {}
    for q, exported in exports.items():
        lm = exported.load()
        results[q], _ = lm.cross_entropy(*arrays, adapter=lm.adapter(spec, b_user1))

    # Assert
    assert results["none"] == pytest.approx(expected, rel=1e-5)
    assert results["int8"] == pytest.approx(expected, rel=0.03)


def test_a_personal_a_is_bound_as_given_and_scores_as_pytorch_does(
    tiny_base: LoadedBase,
    tiny_model_dir: Path,
    exports: dict[str, ExportedBase],
    spec: AdapterSpec,
    b_user1: BTensors,
) -> None:
    # Prepare: the same B on a trained (random) A, in PyTorch and in the float32 graph
    from lorafleet.client.adapter import get_a, set_a

    model, blocks, arrays = ce_setup(tiny_base, tiny_model_dir, spec, b_user1)
    rng = np.random.default_rng(9)
    a = {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in get_a(model).items()}
    set_a(model, spec, a)
    expected = heldout_loss(model, blocks, precision="fp32", device="cpu")
    lm = exports["none"].load()

    # Execute
    personal, _ = lm.cross_entropy(*arrays, adapter=lm.adapter(spec, b_user1, a))
    seeded, _ = lm.cross_entropy(*arrays, adapter=lm.adapter(spec, b_user1))

    # Assert: the given A is the one used, not the seed's
    assert personal == pytest.approx(expected, rel=1e-5)
    assert abs(seeded - personal) > 1e-3
    bad = dict(a)
    first = sorted(bad)[0]
    bad[first] = bad[first][:, :3]
    with pytest.raises(IntegrityError, match="A for"):
        lm.adapter(spec, b_user1, bad)


def bad_b(b: BTensors, kind: str) -> dict[str, npt.NDArray[np.float32]]:
    out = dict(b)
    first = sorted(out)[0]
    if kind == "missing":
        del out[first]
    elif kind == "extra":
        out["model.layers.9.self_attn.q_proj"] = out[first]
    elif kind == "shape":
        out[first] = out[first][:, :2]
    else:
        out[first] = np.full_like(out[first], np.nan)
    return out


@pytest.mark.parametrize(
    ("kind", "match"),
    [("missing", "missing"), ("extra", "unexpected"), ("shape", "shape"), ("nan", "NaN")],
)
def test_b_that_does_not_fit_is_refused(
    exports: dict[str, ExportedBase], spec: AdapterSpec, b_user1: BTensors, kind: str, match: str
) -> None:
    lm = exports["none"].load()

    with pytest.raises(IntegrityError, match=match):
        lm.adapter(spec, bad_b(b_user1, kind))


def test_adapter_for_another_base_or_other_modules_is_refused(
    exports: dict[str, ExportedBase], spec: AdapterSpec, b_user1: BTensors
) -> None:
    # Prepare
    lm = exports["none"].load()
    other_base = AdapterSpec(base_model_id="x", base_sha256="1" * 64, rank=4)
    other_targets = AdapterSpec(
        base_model_id=spec.base_model_id,
        base_sha256=spec.base_sha256,
        rank=4,
        target_modules=("q_proj", "k_proj"),
    )

    # Execute / Assert
    with pytest.raises(IntegrityError, match=r"export the base"):
        lm.adapter(other_base, b_user1)
    with pytest.raises(SpecError, match="exported for"):
        lm.adapter(other_targets, b_user1)


def test_generate_rejects_empty_prompts_and_bad_lengths(exports: dict[str, ExportedBase]) -> None:
    lm = exports["none"].load()

    with pytest.raises(SpecError, match="prompt"):
        lm.generate([[]], None, 4)
    with pytest.raises(SpecError, match="max_new_tokens"):
        lm.generate([[5, 6]], None, 0)
    with pytest.raises(SpecError, match="token-id lists"):
        lm.generate([5, 6], None, 4)  # type: ignore[list-item]


def test_not_an_export_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LorafleetError, match="not an exported base"):
        OnnxLM(tmp_path)


# ------------------------------------------------------------------ execution providers


def test_cpu_is_chosen_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lorafleet.client.onnx_runtime")

    providers = select_providers("cpu")

    assert providers == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in caplog.text and "override" in caplog.text


def test_auto_picks_cuda_only_when_onnxruntime_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.delenv(PROVIDER_ENV, raising=False)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert select_providers(None) == ["CPUExecutionProvider"]
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert select_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv(PROVIDER_ENV, "cpu")
    assert select_providers(None) == ["CPUExecutionProvider"]


def test_cuda_without_the_cuda_provider_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])

    with pytest.raises(LorafleetError, match="onnxruntime-gpu"):
        select_providers("cuda")
    with pytest.raises(SpecError, match="unknown"):
        select_providers("tpu")


@pytest.mark.gpu
def test_cuda_generation_equals_cpu(
    tiny_base: LoadedBase, exports: dict[str, ExportedBase], spec: AdapterSpec, b_user1: BTensors
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)")
    prompts = prompt_ids(tiny_base)
    cpu = exports["none"].load(provider="cpu")
    gpu = exports["none"].load(provider="cuda")

    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert gpu.generate(prompts, gpu.adapter(spec, b_user1), 12) == cpu.generate(
        prompts, cpu.adapter(spec, b_user1), 12
    )
