"""`lorafleet-sim prepare`: the first of the two commands of `flwr run .` on one machine."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lorafleet.sim.cli import SIM_USERS_DIR, main

REPO = Path(__file__).resolve().parents[2]


def test_prepare_writes_users_where_the_default_run_config_looks_and_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    run_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]

    # Execute
    code = main(["prepare", "--users", "3", "--notes", "10"])
    again = main(["prepare", "--users", "3", "--notes", "10"])  # same seed: same users
    out = capsys.readouterr().out

    # Assert
    assert code == again == 0
    assert run_config["sim-users-dir"] == SIM_USERS_DIR
    users = sorted((tmp_path / SIM_USERS_DIR).iterdir())
    assert len(users) == 3
    assert all((u / "train.txt").is_file() and (u / "heldout.txt").is_file() for u in users)
    assert 'flwr run . --federation-config "num-supernodes=3" --stream' in out
    assert " -c " not in out  # the defaults find them: no override


def test_prepare_elsewhere_names_the_absolute_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(["prepare", "--users", "2", "--notes", "10", "--out", str(tmp_path / "u")])

    # Assert
    assert code == 0
    assert f"-c \"sim-users-dir='{tmp_path / 'u'}'\"" in capsys.readouterr().out


def test_prepare_refuses_to_mix_two_generations_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = str(tmp_path / "u")
    assert main(["prepare", "--users", "2", "--notes", "10", "--out", out]) == 0
    capsys.readouterr()

    # Execute
    code = main(["prepare", "--users", "2", "--notes", "10", "--seed", "1", "--out", out])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
