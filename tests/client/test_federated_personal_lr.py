"""The personal steps train at the instruction's personal learning rate, the prior's at lr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet.client import federated
from lorafleet.client.base import load_base
from lorafleet.client.federated import DeviceData, run_round
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.spec import AdapterSpec

NOTES = "\n\n".join(f"Note {i}: Maya climbs with Jonas and feeds the cat Pixel." for i in range(12))


@pytest.mark.parametrize(("personal_lr", "expected"), [(0.0, 1e-3), (5e-3, 5e-3)])
def test_a_train_round_uses_lr_for_the_prior_and_personal_lr_for_the_personal_steps(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    personal_lr: float,
    expected: float,
) -> None:
    # Prepare: record the configs the real trainers get (they still run)
    monkeypatch.setattr(federated, "_WORKERS", {})
    seen: dict[str, list[float]] = {"prior": [], "personal": []}
    real_trainer, real_train = federated.LocalTrainer, federated.train_adapter

    def trainer(model: Any, config: TrainConfig) -> Any:
        seen["prior"].append(config.lr)
        return real_trainer(model, config)

    def train(model: Any, train: Any, held: Any, config: TrainConfig, **kw: Any) -> Any:
        seen["personal"].append(config.lr)
        return real_train(model, train, held, config, **kw)

    monkeypatch.setattr(federated, "LocalTrainer", trainer)
    monkeypatch.setattr(federated, "train_adapter", train)
    (tmp_path / "notes.txt").write_text(NOTES)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=load_base(tiny_model_dir).sha256, rank=4)
    instr = RoundInstruction(
        round=1,
        spec=spec,
        prior_version="zero",
        personal_steps=2,
        prior_steps=2,
        lr=1e-3,
        personal_lr=personal_lr,
        seq_len=32,
    )

    # Execute
    delta, _ = run_round(
        instr,
        None,
        DeviceData.from_path(tmp_path / "notes.txt"),
        tmp_path / "profile",
        base_source=str(tiny_model_dir),
        precision="fp32",
        device="cpu",
    )

    # Assert
    assert delta is not None
    assert seen == {"prior": [1e-3], "personal": [expected]}
