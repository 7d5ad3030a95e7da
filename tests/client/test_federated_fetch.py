"""A device that lacks the round's base fetches it from the coordinator, verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.client import federated
from lorafleet.client.base import load_base
from lorafleet.client.federated import DeviceData, run_round
from lorafleet.protocols.errors import IntegrityError
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.base_service import serve_bases
from lorafleet.server.base_store import BaseStore
from lorafleet.server.cli import main as server_cli

NOTES = "\n\n".join(f"Note {i}: Maya climbs with Jonas and feeds the cat Pixel." for i in range(12))


def test_a_round_on_a_device_without_the_base_fetches_it_once(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: the operator publishes the base; the device has nothing cached
    assert (
        server_cli(["bases", "publish", str(tiny_model_dir), "--store", str(tmp_path / "store")])
        == 0
    )
    digest = load_base(tiny_model_dir).sha256
    assert f"base-sha256 = {digest}" in capsys.readouterr().out
    server, port = serve_bases(BaseStore(tmp_path / "store"), "127.0.0.1:0")
    monkeypatch.setattr(federated, "_WORKERS", {})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text(NOTES)
    spec = AdapterSpec(base_model_id="tiny", base_sha256=digest, rank=4)
    instr = RoundInstruction(
        round=1, spec=spec, prior_version="zero", personal_steps=1, prior_steps=1, seq_len=32
    )
    try:
        # Execute
        delta, metrics = run_round(
            instr,
            None,
            DeviceData.from_path(tmp_path / "data" / "notes.txt"),
            tmp_path / "profile",
            base_source="",
            precision="fp32",
            device="cpu",
            cache_dir=tmp_path / "cache",
            base_service=f"127.0.0.1:{port}",
        )
    finally:
        server.stop(None)
    # Assert: trained on the fetched base, which now sits in the device's cache
    assert delta is not None and metrics.num_examples > 0
    assert any((tmp_path / "cache" / "fetched").iterdir())


def test_a_round_for_another_base_is_refused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(federated, "_WORKERS", {})
    spec = AdapterSpec(base_model_id="tiny", base_sha256="cd" * 32, rank=4)
    instr = RoundInstruction(round=1, spec=spec, prior_version="zero", seq_len=32)
    (tmp_path / "notes.txt").write_text(NOTES)
    with pytest.raises(IntegrityError):
        run_round(
            instr,
            None,
            DeviceData.from_path(tmp_path / "notes.txt"),
            tmp_path / "p",
            base_source=str(tiny_model_dir),
            precision="fp32",
            device="cpu",
        )


def test_plain_grpc_off_loopback_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = server_cli(["bases", "serve", "--store", str(tmp_path), "--address", "0.0.0.0:9100"])
    assert code == 2 and "refusing plain gRPC" in capsys.readouterr().err
