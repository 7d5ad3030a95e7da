"""A device scores the bare base on its held-out notes once, not in every round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet.client import federated
from lorafleet.client.base import load_base
from lorafleet.client.federated import DeviceData, run_round
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.spec import AdapterSpec


def _notes(folder: Path, pet: str) -> DeviceData:
    folder.mkdir()
    text = "\n\n".join(f"Note {i}: Maya climbs with Jonas and feeds {pet}." for i in range(12))
    (folder / "notes.txt").write_text(text)
    return DeviceData.from_path(folder / "notes.txt")


def test_the_base_loss_is_evaluated_once_per_held_out_text_and_reported_every_round(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a fresh process's workers, and a count of the real evaluations
    monkeypatch.setattr(federated, "_WORKERS", {})
    calls: list[int] = []
    real = federated.heldout_loss

    def counted(*args: Any, **kwargs: Any) -> float:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(federated, "heldout_loss", counted)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=load_base(tiny_model_dir).sha256, rank=4)
    instr = RoundInstruction(1, spec, "zero", mode="evaluate", seq_len=32)
    maya, other = _notes(tmp_path / "maya", "the cat Pixel"), _notes(tmp_path / "o", "a dog")

    def evaluate(data: DeviceData) -> tuple[float, int]:
        before = len(calls)
        _, metrics = run_round(
            instr,
            None,
            data,
            tmp_path / f"profile-{data.user_id}",
            base_source=str(tiny_model_dir),
            precision="fp32",
            device="cpu",
        )
        return metrics.base_loss, len(calls) - before

    # Execute: the same device twice, then another user's notes on the same worker
    first, second, third = evaluate(maya), evaluate(maya), evaluate(other)

    # Assert: base, prior and personal scored the first time; the base's loss read back
    # the second (the same figure); other notes are scored anew
    assert (first[1], second[1], third[1]) == (3, 2, 3)
    assert second[0] == first[0]
    assert third[0] != first[0]
