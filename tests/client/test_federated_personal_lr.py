"""The personal steps train at the instruction's personal learning rate, the prior's at lr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet.client import federated
from lorafleet.client.base import load_base
from lorafleet.client.data import encode_blocks
from lorafleet.client.federated import DeviceData, run_round
from lorafleet.client.profile import Profile
from lorafleet.client.train import (
    MIN_SIZED_STEPS,
    SIZED_STEPS_PER_BLOCK,
    TrainConfig,
    steps_for_data,
)
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.spec import AdapterSpec

NOTES = "\n\n".join(f"Note {i}: Maya climbs with Jonas and feeds the cat Pixel." for i in range(12))


def _round(tiny: Path, tmp_path: Path, **instruction: Any) -> Any:
    """One real device round on twelve short notes; returns the delta it uploads."""
    (tmp_path / "notes.txt").write_text(NOTES)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=load_base(tiny).sha256, rank=4)
    instr = RoundInstruction(spec=spec, prior_version="zero", seq_len=32, **instruction)
    delta, _ = run_round(
        instr,
        None,
        DeviceData.from_path(tmp_path / "notes.txt"),
        tmp_path / "profile",
        base_source=str(tiny),
        precision="fp32",
        device="cpu",
    )
    return delta


def _record_personal(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """The configs the personal steps' real trainer gets (it still runs)."""
    monkeypatch.setattr(federated, "_WORKERS", {})
    seen: list[TrainConfig] = []
    real_train = federated.train_adapter

    def train(model: Any, train: Any, held: Any, config: TrainConfig, **kw: Any) -> Any:
        seen.append(config)
        return real_train(model, train, held, config, **kw)

    monkeypatch.setattr(federated, "train_adapter", train)
    return seen


@pytest.mark.parametrize(("personal_lr", "expected"), [(0.0, 1e-3), (5e-3, 5e-3)])
def test_a_train_round_uses_lr_for_the_prior_and_personal_lr_for_the_personal_steps(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    personal_lr: float,
    expected: float,
) -> None:
    # Prepare: record the configs the real trainers get (they still run)
    personal = _record_personal(monkeypatch)
    prior: list[float] = []
    real_trainer = federated.LocalTrainer

    def trainer(model: Any, config: TrainConfig) -> Any:
        prior.append(config.lr)
        return real_trainer(model, config)

    monkeypatch.setattr(federated, "LocalTrainer", trainer)

    # Execute
    delta = _round(
        tiny_model_dir,
        tmp_path,
        round=1,
        personal_steps=2,
        prior_steps=2,
        lr=1e-3,
        personal_lr=personal_lr,
    )

    # Assert
    assert delta is not None
    assert prior == [1e-3] and [c.lr for c in personal] == [expected]


def test_the_final_personalization_sizes_its_budget_by_the_users_blocks(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    seen = _record_personal(monkeypatch)

    # Execute: a budget far above what twelve short notes are worth
    _round(tiny_model_dir, tmp_path, round=2, mode="personalize", personal_steps=200, prior_steps=0)

    # Assert: the budget shrank to the data, its evaluations with it
    (config,) = seen
    data = DeviceData.from_path(tmp_path / "notes.txt")
    blocks = len(encode_blocks(data.train, load_base(tiny_model_dir).tokenizer, seq_len=32))
    sized = config.sized(blocks)
    assert config.steps_per_block == SIZED_STEPS_PER_BLOCK
    assert MIN_SIZED_STEPS <= sized.steps < 200 and sized.eval_every < 200 // 8
    assert sized.steps == steps_for_data(blocks, 200, SIZED_STEPS_PER_BLOCK)
    (version,) = Profile.open(tmp_path / "profile").versions()
    assert version.metrics["steps"] <= sized.steps
