from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafleet.client import train as train_module
from lorafleet.client.adapter import get_b, materialize, set_b
from lorafleet.client.base import load_base
from lorafleet.client.data import Example, TokenBlocks, encode_blocks
from lorafleet.client.train import (
    MIN_SIZED_STEPS,
    TrainConfig,
    TrainResult,
    steps_for_data,
    train_adapter,
)
from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.spec import AdapterSpec

NOTES = [
    "Maya climbs at the gym on Tuesdays and Thursdays with her friend Jonas.",
    "The cat Pixel sleeps on the radiator every afternoon.",
    "Tidewatch is a small app that shows the tide tables for the harbour.",
    "Lunch was lentil soup again, and the bread from the corner bakery.",
] * 6


def setup(tiny_model_dir: Path) -> tuple[torch.nn.Module, TokenBlocks, TokenBlocks]:
    base = load_base(tiny_model_dir)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=base.sha256, rank=4, alpha=8)
    model = materialize(base.model, spec, base_sha256=base.sha256)
    blocks = encode_blocks([Example(text=t) for t in NOTES], base.tokenizer, seq_len=32)
    return model, blocks, blocks


def test_training_lowers_heldout_loss_and_changes_only_b(tiny_model_dir: Path) -> None:
    # Prepare
    model, train, held = setup(tiny_model_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # Execute
    result = train_adapter(
        model, train, held, TrainConfig(steps=30, lr=0.05, eval_every=10, precision="fp32")
    )
    # Assert
    assert result.heldout_loss_after < result.heldout_loss_before - 0.3
    assert result.tokens > 0 and result.tokens_per_second > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(np.abs(b).sum() > 0 for b in get_b(model).values())


def test_a_start_loss_the_caller_measured_replaces_the_first_evaluation(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: count the real evaluations; a run that measures its start itself
    calls: list[int] = []
    real = train_module.heldout_loss

    def counted(*args: object, **kwargs: object) -> float:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "heldout_loss", counted)
    model, train, held = setup(tiny_model_dir)
    config = TrainConfig(steps=6, lr=0.05, eval_every=2, precision="fp32", seed=4)
    start = get_b(model)
    measured = train_adapter(model, train, held, config)
    evaluations = len(calls)
    after = get_b(model)
    set_b(model, start)

    # Execute: the same run, given the start's loss
    given = train_adapter(
        model, train, held, config, heldout_loss_before=measured.heldout_loss_before
    )

    # Assert: one evaluation fewer, the same run and result
    assert len(calls) - evaluations == evaluations - 1
    assert given.heldout_loss_before == measured.heldout_loss_before
    assert given.heldout_loss_after == measured.heldout_loss_after
    assert all(np.array_equal(get_b(model)[k], after[k]) for k in after)


def test_bf16_autocast_trains_too(tiny_model_dir: Path) -> None:
    model, train, held = setup(tiny_model_dir)
    result = train_adapter(
        model, train, held, TrainConfig(steps=15, lr=2e-2, precision="bf16-mixed")
    )
    assert result.heldout_loss_after < result.heldout_loss_before


def test_proximal_term_keeps_b_near_the_prior(tiny_model_dir: Path) -> None:
    # Prepare: a prior B, and two runs from zero that differ only in mu
    model, _, _ = setup(tiny_model_dir)
    rng = np.random.default_rng(0)
    prior = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in get_b(model).items()}

    def distance(mu: float) -> float:
        m, tr, he = setup(tiny_model_dir)
        cfg = TrainConfig(steps=12, lr=2e-2, prox_mu=mu, precision="fp32", patience=0)
        train_adapter(m, tr, he, cfg, prior_b=prior)
        return sum(float(((get_b(m)[k] - prior[k]) ** 2).sum()) for k in prior)

    # Execute / Assert
    assert distance(50.0) < distance(0.0)


def test_best_b_is_kept_when_training_diverges(tiny_model_dir: Path) -> None:
    model, train, held = setup(tiny_model_dir)
    result = train_adapter(
        model,
        train,
        held,
        TrainConfig(steps=20, lr=5.0, eval_every=2, patience=2, precision="fp32"),
    )
    assert result.heldout_loss_after <= result.heldout_loss_before
    assert result.heldout_loss_after == min(loss for _, loss in result.heldout_curve)


def test_plateau_decay_goes_back_to_the_best_b_and_on_at_a_lower_rate(
    tiny_model_dir: Path,
) -> None:
    # Prepare: a rate that overshoots within the first evaluations
    def run(decay: float) -> tuple[TrainResult, list[float]]:
        model, train, held = setup(tiny_model_dir)
        cfg = TrainConfig(
            steps=24, lr=1.0, eval_every=2, patience=4, plateau_decay=decay, precision="fp32"
        )
        result = train_adapter(model, train, held, cfg)
        return result, [loss for _, loss in result.heldout_curve]

    # Execute
    fixed, fixed_curve = run(0.0)
    decayed, decayed_curve = run(0.25)

    # Assert: the fixed rate stops at its best early point; the decayed run went back to
    # it, dropped the rate and found better B there
    assert fixed.lr_drops == 0 and decayed.lr_drops >= 1
    assert decayed.heldout_loss_after < fixed.heldout_loss_after
    assert decayed.heldout_loss_after == min(decayed_curve)
    assert fixed.heldout_loss_after == min(fixed_curve)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"prox_mu": -1.0}, "prox_mu"),
        ({"threads": 0}, "threads"),
        ({"plateau_decay": 1.0}, "plateau_decay"),
        ({"plateau_decay": -0.5}, "plateau_decay"),
        ({"steps_per_block": -1.0}, "steps_per_block"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
    ],
)
def test_bad_train_config_is_refused(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_prox_without_prior_is_refused(tiny_model_dir: Path) -> None:
    model, train, held = setup(tiny_model_dir)
    with pytest.raises(SpecError, match="prior_b"):
        train_adapter(model, train, held, TrainConfig(steps=2, prox_mu=1.0))


@pytest.mark.parametrize(
    ("blocks", "per_block", "expected"),
    [
        (5, 1.5, MIN_SIZED_STEPS),  # a small user: the floor, room for a few evaluations
        (12, 1.5, 18),  # 1.5 per block, rounded up
        (40, 1.5, 30),  # a large user: the budget is the ceiling
        (5, 0.0, 30),  # 0: the fixed budget
    ],
)
def test_steps_follow_the_data_between_the_floor_and_the_budget(
    blocks: int, per_block: float, expected: int
) -> None:
    assert steps_for_data(blocks, 30, per_block) == expected


def test_a_sized_config_evaluates_as_densely_for_fewer_steps() -> None:
    # Prepare: the personalize round's shape (30 steps, evaluated every 3)
    config = TrainConfig(steps=30, eval_every=3, warmup_steps=2, steps_per_block=1.5)

    # Execute
    small, large = config.sized(4), config.sized(100)

    # Assert: the small user's budget shrinks with its cadence; the large keeps the config
    assert (small.steps, small.eval_every, small.warmup_steps) == (8, 1, 2)
    assert large is config and small.sized(4) == small
    assert replace(config, eval_every=0).sized(4).eval_every == 0
    assert TrainConfig(steps=30).sized(4).steps == 30  # 0 steps per block: a fixed budget


def test_train_adapter_sizes_the_budget_by_the_blocks(tiny_model_dir: Path) -> None:
    # Prepare: six blocks, a budget of 40 at one step per block
    model, train, held = setup(tiny_model_dir)
    config = TrainConfig(steps=40, eval_every=5, patience=0, steps_per_block=1.0)

    # Execute
    result = train_adapter(model, train, held, config)

    # Assert: it trained as many steps as the data is worth, not the budget
    assert result.steps == steps_for_data(len(train), 40, 1.0) < 40
