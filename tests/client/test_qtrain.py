from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorafleet.client.adapter import get_b, materialize, set_b
from lorafleet.client.base import load_base
from lorafleet.client.data import Example, TokenBlocks, encode_blocks
from lorafleet.client.int8mm import Int8Weight, quantize_weight
from lorafleet.client.qtrain import (
    DEFAULT_INT8_MODULES,
    QuantConfig,
    linear_cross_entropy,
    prepare_quantized_model,
    quantize_rows,
)
from lorafleet.client.train import LocalTrainer, TrainConfig, train_adapter
from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.spec import AdapterSpec

NOTES = [
    "Maya climbs at the gym on Tuesdays and Thursdays with her friend Jonas.",
    "The cat Pixel sleeps on the radiator every afternoon.",
    "Tidewatch is a small app that shows the tide tables for the harbour.",
    "Lunch was lentil soup again, and the bread from the corner bakery.",
] * 6


def setup(
    tiny_model_dir: Path, *, dtype: torch.dtype = torch.float32, random_b: bool = False
) -> tuple[Any, TokenBlocks]:
    base = load_base(tiny_model_dir, dtype=dtype)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=base.sha256, rank=4, alpha=8)
    model = materialize(base.model, spec, base_sha256=base.sha256)
    if random_b:  # B = 0 would make every B gradient skip the adapter's own path
        rng = np.random.default_rng(0)
        set_b(
            model,
            {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in get_b(model).items()},
        )
    # seq_len 32 leaves the last block padded, so the attention mask matters
    blocks = encode_blocks([Example(text=t) for t in NOTES], base.tokenizer, seq_len=32)
    return model, blocks


def reference_loss_and_grads(model: Any, blocks: TokenBlocks) -> tuple[float, list[torch.Tensor]]:
    """The stock Hugging Face/peft forward and backward in fp32."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(
        input_ids=blocks.input_ids, attention_mask=blocks.attention_mask, labels=blocks.labels
    )
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grads


def fast_loss_and_grads(
    model: Any, blocks: TokenBlocks, config: QuantConfig
) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    fast = prepare_quantized_model(model, config, params=params)
    loss = fast.loss(blocks.input_ids, blocks.attention_mask, blocks.labels)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(x @ y / (x.norm() * y.norm()))


def test_fp32_fast_forward_equals_the_stock_model(tiny_model_dir: Path) -> None:
    # Prepare: the fast forward with no quantization must be the same function as HF's
    model, blocks = setup(tiny_model_dir, random_b=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, blocks)

    # Execute
    loss, grads = fast_loss_and_grads(model, blocks, QuantConfig(weights="fp32", ce_chunk=7))

    # Assert
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("weights", "compute", "loss_rel", "min_cosine"),
    [
        ("bf16", "auto", 0.01, 0.995),
        ("int8", "auto", 0.02, 0.99),
        ("int8", "fp32", 0.02, 0.99),  # int8 matmuls, everything else fp32 (no native bf16)
    ],
)
def test_quantized_loss_and_gradients_stay_close_to_fp32(
    tiny_model_dir: Path, weights: str, compute: str, loss_rel: float, min_cosine: float
) -> None:
    # Prepare
    model, blocks = setup(tiny_model_dir, random_b=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, blocks)
    config = QuantConfig(weights=weights, compute=compute)  # type: ignore[arg-type]

    # Execute
    loss, grads = fast_loss_and_grads(model, blocks, config)

    # Assert
    assert loss == pytest.approx(ref_loss, rel=loss_rel)
    assert cosine(grads, ref_grads) > min_cosine
    assert all(g.dtype == torch.float32 for g in grads)  # B's master copy stays fp32


def test_compiled_layers_give_the_stock_models_loss_and_gradients(tiny_model_dir: Path) -> None:
    # Prepare: compiling must not change the function, only how it runs
    model, blocks = setup(tiny_model_dir, random_b=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, blocks)
    config = QuantConfig(weights="fp32", compile=True)

    # Execute: two steps, so the compiled graphs are also reused, not only built
    fast = prepare_quantized_model(model, config)
    first = fast_loss_and_grads(model, blocks, config)
    second = fast_loss_and_grads(model, blocks, config)

    # Assert
    assert fast.compiled
    for loss, grads in (first, second):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("compute", "kernel"),
    [("auto", "int_mm"), ("fp32", "fbgemm")],  # int8 (VNNI/AMX) and int8-fp32 (AVX2) as run
)
def test_compiled_int8_layers_stay_as_close_to_fp32_as_eager_int8(
    tiny_model_dir: Path, compute: str, kernel: str
) -> None:
    # Prepare: the int8 matmul (an autograd.Function around torch._int_mm or fbgemm)
    # must trace into the compiled layer without changing what it computes
    model, blocks = setup(tiny_model_dir, random_b=True)
    ref_loss, ref_grads = reference_loss_and_grads(model, blocks)
    eager = QuantConfig(weights="int8", compute=compute, int8_kernel=kernel)  # type: ignore[arg-type]
    eager_loss, eager_grads = fast_loss_and_grads(model, blocks, eager)
    config = dataclasses.replace(eager, compile=True)

    # Execute: two steps, so the compiled graphs are also reused
    fast = prepare_quantized_model(model, config)
    runs = [fast_loss_and_grads(model, blocks, config) for _ in range(2)]

    # Assert
    assert fast.compiled
    for loss, grads in runs:
        assert loss == pytest.approx(ref_loss, rel=0.02)
        assert loss == pytest.approx(eager_loss, rel=0.01)
        assert cosine(grads, ref_grads) > 0.99
        assert cosine(grads, eager_grads) > 0.99
        assert all(g.dtype == torch.float32 for g in grads)


def test_compiled_layers_are_cached_in_lorafleets_cache_folder(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no inductor cache chosen yet; lorafleet's cache is tmp_path
    import os

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path))
    model, _ = setup(tiny_model_dir)

    # Execute
    fast = prepare_quantized_model(model, QuantConfig(weights="fp32", compile=True))

    # Assert: not /tmp's default, which many systems empty at boot
    assert fast.compiled
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")


def test_compile_without_a_cxx_compiler_runs_eager_and_says_so(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a device with no C++ compiler (inductor's lookup finds none)
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no C++ compiler found in PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    model, blocks = setup(tiny_model_dir, random_b=True)
    ref_loss, _ = reference_loss_and_grads(model, blocks)

    # Execute
    with caplog.at_level(logging.WARNING, logger="lorafleet.client.qtrain"):
        fast = prepare_quantized_model(model, QuantConfig(weights="fp32", compile=True))
        loss = fast.loss(blocks.input_ids, blocks.attention_mask, blocks.labels)

    # Assert
    assert not fast.compiled
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert "no C++ compiler for torch.compile" in caplog.text
    assert "decoder layers run eager" in caplog.text


def test_int8_training_tracks_fp32_and_changes_only_b(tiny_model_dir: Path) -> None:
    # Prepare: the same run in fp32 (reference) and through the int8 path, on a bf16 base
    config = {"steps": 20, "lr": 0.05, "eval_every": 5, "patience": 0}
    ref_model, blocks = setup(tiny_model_dir)
    model, _ = setup(tiny_model_dir, dtype=torch.bfloat16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    # Execute
    ref = train_adapter(ref_model, blocks, blocks, TrainConfig(precision="fp32", **config))
    fast = train_adapter(model, blocks, blocks, TrainConfig(precision="int8", **config))

    # Assert: it learns, its curve stays near fp32's, the base never moves, B is fp32
    assert fast.heldout_loss_after < fast.heldout_loss_before - 0.3
    assert fast.heldout_loss_after == pytest.approx(ref.heldout_loss_after, rel=0.05)
    assert np.allclose(fast.train_losses, ref.train_losses, rtol=0.05)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    b = get_b(model)
    assert all(v.dtype == np.float32 and np.abs(v).sum() > 0 for v in b.values())


@pytest.mark.parametrize(
    ("precision", "rel"),
    [("fp32-lean", 1e-4), ("int8-fp32", 0.05)],
)
def test_fp32_family_lean_paths_train_like_peft_fp32(
    tiny_model_dir: Path, precision: str, rel: float
) -> None:
    # Prepare: what auto picks on a CPU without bf16; the base stays fp32
    config = {"steps": 12, "lr": 0.05, "eval_every": 4, "patience": 0}
    ref_model, blocks = setup(tiny_model_dir)
    model, _ = setup(tiny_model_dir)

    # Execute
    ref = train_adapter(ref_model, blocks, blocks, TrainConfig(precision="fp32", **config))
    trainer = LocalTrainer(model, TrainConfig(precision=precision, **config))  # type: ignore[arg-type]
    fast = train_adapter(model, blocks, blocks, TrainConfig(precision=precision, **config))  # type: ignore[arg-type]

    # Assert: the lean forward ran, in fp32 throughout, and tracked peft fp32 step by step
    assert trainer._fast is not None and trainer._fast.config.compute_dtype == torch.float32
    assert np.allclose(fast.train_losses, ref.train_losses, rtol=rel)
    assert fast.heldout_loss_after == pytest.approx(ref.heldout_loss_after, rel=rel)
    assert fast.heldout_loss_after < fast.heldout_loss_before - 0.3


def test_a_lean_precision_falls_back_to_the_models_own_forward_on_an_unsupported_base(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the same tiny Llama with a GELU MLP, which the lean forward does not model
    gelu_dir = tmp_path / "gelu"
    shutil.copytree(tiny_model_dir, gelu_dir)
    cfg = json.loads((gelu_dir / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (gelu_dir / "config.json").write_text(json.dumps(cfg))
    model, blocks = setup(gelu_dir)
    ref_model, _ = setup(gelu_dir)
    first = next(blocks.batches(4, shuffle=False))

    # Execute
    with caplog.at_level(logging.WARNING, logger="lorafleet.client.train"):
        trainer = LocalTrainer(model, TrainConfig(precision="fp32-lean", device="cpu"))
    loss, _ = trainer.step(first)
    ref_loss, _ = LocalTrainer(ref_model, TrainConfig(precision="fp32", device="cpu")).step(first)

    # Assert: no lean forward, one warning that says why and what runs instead, fp32 loss
    assert trainer._fast is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "SiLU MLP" in warning and "own forward in fp32" in warning
    assert loss == pytest.approx(ref_loss, rel=1e-6)


@pytest.mark.parametrize("precision", ["int8", "int8-fp32", "fp32-lean"])
def test_lean_trained_b_round_trips_exactly_into_an_fp32_peft_model(
    tiny_model_dir: Path, precision: str
) -> None:
    # Prepare
    dtype = torch.bfloat16 if precision == "int8" else torch.float32
    model, blocks = setup(tiny_model_dir, dtype=dtype)
    train_adapter(model, blocks, blocks, TrainConfig(steps=5, lr=0.05, precision=precision))  # type: ignore[arg-type]
    trained = get_b(model)
    fp32_model, _ = setup(tiny_model_dir)

    # Execute: a stock personal adapter, usable by any precision
    set_b(fp32_model, trained)

    # Assert
    again = get_b(fp32_model)
    assert all(np.array_equal(again[k], trained[k]) for k in trained)
    assert any(np.abs(v).sum() > 0 for v in trained.values())


def test_linear_cross_entropy_matches_torch_and_its_gradient() -> None:
    # Prepare
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, requires_grad=True)
    weight = torch.randn(13, 6)
    targets = torch.randint(0, 13, (11,))
    ref = F.cross_entropy(F.linear(hidden, weight), targets)
    (ref_grad,) = torch.autograd.grad(ref, hidden)

    # Execute
    loss = linear_cross_entropy(hidden, weight, targets, chunk=4)
    (grad,) = torch.autograd.grad(loss * 3.0, hidden)

    # Assert
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, 3.0 * ref_grad)


def test_linear_cross_entropy_without_autograd_gives_the_same_loss_and_no_graph() -> None:
    # Prepare: an evaluation's hidden states (no_grad), and a training one's for reference
    torch.manual_seed(1)
    hidden = torch.randn(9, 6)
    weight = torch.randn(13, 6)
    targets = torch.randint(0, 13, (9,))
    ref = F.cross_entropy(F.linear(hidden, weight), targets)

    # Execute
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, targets, chunk=4)
    trained = linear_cross_entropy(hidden.clone().requires_grad_(True), weight, targets, chunk=4)

    # Assert: the loss alone (nothing to differentiate), equal to torch's and to training's
    torch.testing.assert_close(evaluated, ref)
    torch.testing.assert_close(evaluated, trained.detach())
    assert not evaluated.requires_grad and trained.requires_grad


def test_bf16_linear_cross_entropy_stays_within_bf16_rounding_of_fp32() -> None:
    # Prepare: bf16 logits over a real-sized vocabulary, one target far below the top
    torch.manual_seed(0)
    hidden = torch.randn(40, 64).bfloat16()
    weight = (torch.randn(5000, 64) * 0.3).bfloat16()
    targets = torch.randint(0, 5000, (40,))
    weight[targets[0]] = -hidden[0].float().sign().bfloat16() * 40.0  # logit far below the rest
    h32 = hidden.float().requires_grad_()
    ref = F.cross_entropy(F.linear(h32, weight.float()), targets)
    (ref_grad,) = torch.autograd.grad(ref, h32)
    h16 = hidden.clone().requires_grad_()

    # Execute
    loss = linear_cross_entropy(h16, weight, targets, chunk=16)
    (grad,) = torch.autograd.grad(loss, h16)

    # Assert: finite, the loss within bf16 logits' rounding, the gradient's direction kept
    assert torch.isfinite(loss) and grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(ref)) / float(ref) < 0.01
    assert float((grad.float() - ref_grad).norm() / ref_grad.norm()) < 0.02


@pytest.mark.parametrize("kernel", ["int_mm", "fbgemm"])
def test_int8_lm_head_logits_keep_the_loss_and_gradient_close_to_fp32(kernel: str) -> None:
    # Prepare: fp32 hidden states (int8-fp32's compute) over a real-sized vocabulary
    torch.manual_seed(0)
    hidden = torch.randn(40, 64)
    weight = torch.randn(5000, 64) * 0.3
    targets = torch.randint(0, 5000, (40,))
    h_ref = hidden.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h_ref, weight), targets)
    (ref_grad,) = torch.autograd.grad(ref, h_ref)
    h_q = hidden.clone().requires_grad_()

    # Execute
    qweight = quantize_weight(weight, kernel)  # type: ignore[arg-type]
    loss = linear_cross_entropy(h_q, weight, targets, chunk=16, qweight=qweight)
    (grad,) = torch.autograd.grad(loss, h_q)

    # Assert: the int8 logits were used (not exact), and their rounding moves the loss
    # and the gradient by well under a percent (0.04% and 0.4% measured)
    error = float((grad - ref_grad).norm() / ref_grad.norm())
    assert abs(float(loss) - float(ref)) / float(ref) < 0.005
    assert 1e-4 < error < 0.01


def test_int8_fp32_quantizes_every_matmul_and_int8_leaves_down_proj_and_lm_head(
    tiny_model_dir: Path,
) -> None:
    # Prepare
    model, _ = setup(tiny_model_dir, random_b=True)

    # Execute
    fp32 = QuantConfig(weights="int8", compute="fp32")
    bf16 = QuantConfig(weights="int8")
    chosen = QuantConfig(weights="int8", compute="fp32", int8_modules=("down_proj",))

    # Assert: the defaults follow what the other matmul would cost; a choice is kept
    assert set(fp32.quantized_modules) == {*DEFAULT_INT8_MODULES, "down_proj", "lm_head"}
    assert bf16.quantized_modules == DEFAULT_INT8_MODULES
    assert chosen.quantized_modules == ("down_proj",)
    assert prepare_quantized_model(model, fp32).lm_head_q is not None
    assert prepare_quantized_model(model, bf16).lm_head_q is None
    assert isinstance(prepare_quantized_model(model, fp32).layers[0].down.weight, Int8Weight)
    assert not isinstance(prepare_quantized_model(model, bf16).layers[0].down.weight, Int8Weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_matches_llamas_and_leaves_its_input_alone(dtype: torch.dtype) -> None:
    # Prepare
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorafleet.client.qtrain import _rms_norm

    torch.manual_seed(0)
    ref_norm = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref_norm.weight.copy_(torch.rand(32))
    ref_norm.weight.requires_grad_(False)
    x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    grad_out = torch.randn(3, 5, 32, dtype=dtype)
    ref = ref_norm(x)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)

    # Execute
    out = _rms_norm(x, ref_norm.weight, 1e-5)
    (grad,) = torch.autograd.grad(out, x, grad_out)

    # Assert
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(
        grad,
        ref_grad,
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
        atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
    )
    assert torch.equal(x.detach(), before)


def test_row_quantization_round_trips_within_half_a_step() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 1.0, -300.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert torch.all((q.float() * scale - x).abs() <= scale / 2 + 1e-6)
    assert int(q.abs().max()) == 127


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "int4"}, "weights must be int8, bf16 or fp32"),
        ({"int8_modules": ("embed_tokens",)}, "are not Linear names"),
        ({"int8_modules": ("q_proj",)}, "share one matmul"),
        ({"ce_chunk": 0}, "ce_chunk must be an integer >= 1"),
        ({"compute": "fp16"}, "compute must be auto, bf16 or fp32"),
        ({"weights": "bf16", "compute": "fp32"}, "mixes two paths; use weights fp32"),
        ({"compile": "yes"}, "compile must be true or false"),
    ],
)
def test_bad_quant_config_names_the_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        QuantConfig(**kwargs)


def test_int8_needs_a_llama_family_model_with_an_adapter(tiny_model_dir: Path) -> None:
    # A bare base has nothing to train; a non-causal-LM module is not supported.
    with pytest.raises(SpecError, match="no adapter"):
        prepare_quantized_model(load_base(tiny_model_dir).model)
    with pytest.raises(SpecError, match="Llama-family"):
        prepare_quantized_model(torch.nn.Linear(4, 4))


def test_int8_refuses_trainable_parameters_besides_b(tiny_model_dir: Path) -> None:
    # Prepare: a caller that also unfroze the norms would silently not train them
    model, _ = setup(tiny_model_dir)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)

    # Execute / Assert
    with pytest.raises(SpecError, match="other parameters are trainable too"):
        LocalTrainer(model, TrainConfig(precision="int8", device="cpu"))


def test_fast_forward_is_built_once_per_model(tiny_model_dir: Path) -> None:
    # The federated client builds a trainer each round; the base is quantized once.
    model, _ = setup(tiny_model_dir)
    assert prepare_quantized_model(model) is prepare_quantized_model(model)
    assert prepare_quantized_model(model) is not prepare_quantized_model(
        model, QuantConfig(weights="bf16")
    )


def test_train_config_compile_reaches_the_lean_forward_and_is_refused_elsewhere(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    lean_model, blocks = setup(tiny_model_dir)
    stock_model, _ = setup(tiny_model_dir)

    # Execute
    lean = LocalTrainer(lean_model, TrainConfig(precision="fp32-lean", compile=True, threads=2))
    lean.step(blocks)
    with caplog.at_level(logging.WARNING, logger="lorafleet.client.train"):
        stock = LocalTrainer(stock_model, TrainConfig(precision="fp32", compile=True, threads=2))

    # Assert: the lean path compiles; the model's own forward says it does not
    assert lean._fast is not None and lean._fast.compiled
    assert stock._fast is None
    assert "only the lean CPU precisions compile; fp32 trains eager" in caplog.text
    with pytest.raises(SpecError, match="compile must be true or false"):
        TrainConfig(compile="yes")  # type: ignore[arg-type]


COMPILED_DEFAULT_BASE = """
import sys, torch
from lorafleet.client.adapter import materialize
from lorafleet.client.base import load_base
from lorafleet.client.data import demo_notes_path, encode_blocks, read_examples
from lorafleet.client.qtrain import QuantConfig, prepare_quantized_model
from lorafleet.protocols.spec import AdapterSpec

torch.set_num_threads(2)
base = load_base("default", dtype=torch.float32)
spec = AdapterSpec(base_model_id=base.model_id, base_sha256=base.sha256, rank=8, alpha=16)
model = materialize(base.model, spec, base_sha256=base.sha256)
blocks = encode_blocks(read_examples(demo_notes_path())[:40], base.tokenizer, seq_len=128)
batch = blocks.input_ids[:4], blocks.attention_mask[:4], blocks.labels[:4]
losses = []
for compile in (False, True, True, True):
    fast = prepare_quantized_model(model, QuantConfig(weights="fp32", compile=compile))
    loss = fast.loss(*batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    losses.append(float(loss))
print(" ".join(f"{x:.6f}" for x in losses))
"""


@pytest.mark.slow
def test_compiled_fp32_trains_the_default_base_without_corrupting_the_heap() -> None:
    # Prepare: inductor's 512-bit fp32 kernels aborted this step natively on an AVX-512
    # Xeon with torch 2.13.0 (heap corruption); qtrain compiles fp32 256 bits wide. A
    # child process, so an abort fails this test instead of killing the test run.
    import subprocess
    import sys

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", COMPILED_DEFAULT_BASE],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    # Assert: it lives, and the compiled steps give the eager loss
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager, *compiled = (float(x) for x in proc.stdout.split())
    assert compiled == pytest.approx([eager] * 3, rel=1e-4)
