"""The experiment runner end to end on the tiny model: the table, the JSON, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.sim.cli import _parser, main
from lorafleet.sim.experiment import ExperimentConfig, run_experiment

pytestmark = pytest.mark.filterwarnings("ignore")


def test_an_experiment_writes_the_results_table_and_plot(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    cfg = ExperimentConfig(
        output=tmp_path / "run",
        num_users=3,
        notes_per_user=30,
        num_rounds=2,
        fraction_train=1.0,
        personal_steps=3,
        prior_steps=3,
        lr=0.05,
        seq_len=32,
        rank=4,
        base=str(tiny_model_dir),
        precision="fp32",
        cold_start_ks=(2, 8),
        cold_start_steps=3,
    )
    # Execute
    result = run_experiment(cfg, progress=False)
    # Assert: one row per user with all four losses, rounds, bytes, cold start
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(record["users"]) == 3
    for user in record["users"]:
        assert set(user) >= {"id", "base_loss", "prior_loss", "local_loss", "personal_loss"}
        assert user["personal_loss"] < user["base_loss"]
        assert user["rounds_taken_part"] == 2
    assert len(record["rounds"]) == 2 and record["bytes_up_per_client"] > 0
    assert [row["k"] for row in record["cold_start"]] == [2.0, 8.0]
    assert result.means()["personal_loss"] < result.means()["base_loss"]
    assert "mean" in (tmp_path / "run" / "table.txt").read_text()
    assert (tmp_path / "run" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sim_cli_reports_a_bad_users_folder_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code = main(
        ["experiment", "--users-dir", str(tmp_path / "empty"), "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_the_sim_cli_refuses_client_dp_without_secure_aggregation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["demo", "--no-secure-aggregation", "--dp", "client", "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--secure-aggregation" in err[0]


@pytest.mark.parametrize("command", ["demo", "experiment"])
def test_the_simulator_sums_prior_deltas_with_secagg_unless_told_not_to(command: str) -> None:
    # Execute
    default = _parser().parse_args([command])
    plain = _parser().parse_args([command, "--no-secure-aggregation"])
    # Assert
    assert default.secure_aggregation is True and plain.secure_aggregation is False
