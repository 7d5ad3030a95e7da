"""The real-text benchmark: fortune files in, one user folder per topic out, and the harness on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.protocols.errors import DataError
from lorafleet.sim.cli import main as sim_main
from lorafleet.sim.realtext import (
    DEFAULT_TOPICS,
    build_benchmark,
    main,
    read_fortune_file,
)


def _fortunes(folder: Path, topics: list[str], entries: int = 50) -> Path:
    """Fortune files in the package's format: entries separated by '%' lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for topic in topics:
        body = "\n%\n".join(
            f"On {topic}, thought number {i}:\n\tsomething worth saying.\n    -- Someone"
            for i in range(entries)
        )
        (folder / topic).write_text(body + "\n%\n" + "too short\n%\n" + "x" * 500 + "\n")
    return folder


def test_a_fortune_file_splits_on_percent_lines_and_drops_short_long_and_repeated(
    tmp_path: Path,
) -> None:
    # Prepare
    path = tmp_path / "food"
    path.write_text("First quip about food.\n%\nFirst quip about food.\n%\nok\n%\n" + "y" * 401)
    # Execute
    entries = read_fortune_file(path)
    # Assert
    assert entries == ["First quip about food."]


def test_the_benchmark_gives_each_topic_a_user_with_its_size_and_is_seeded(
    tmp_path: Path,
) -> None:
    # Prepare
    topics = ["science", "politics", "work"]
    source = _fortunes(tmp_path / "src", topics)

    # Execute: two users and one newcomer, twice with one seed and once with another
    def build(name: str, seed: int = 0) -> Path:
        return build_benchmark(
            tmp_path / name,
            topics=topics,
            num_users=2,
            num_newcomers=1,
            sizes=(20, 45),
            source=source,
            newcomer_size=30,
            seed=seed,
        )

    users, again, other = build("a"), build("b"), build("c", seed=1)
    # Assert
    notes = {p.name: (p / "notes.jsonl").read_text() for p in sorted(users.iterdir())}
    assert sorted(notes) == ["politics", "science"]
    assert len(notes["science"].splitlines()) == 20
    assert len(notes["politics"].splitlines()) == 45  # all 50 fit; 45 asked
    assert all("On science" in json.loads(line)["text"] for line in notes["science"].splitlines())
    newcomer = tmp_path / "a" / "newcomers" / "work" / "notes.jsonl"
    assert len(newcomer.read_text().splitlines()) == 30
    assert (again / "science" / "notes.jsonl").read_text() == notes["science"]
    assert (other / "science" / "notes.jsonl").read_text() != notes["science"]


def test_the_cli_names_an_unknown_topic_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(tmp_path / "out"), "--topics", "science,cooking"])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: unknown topic 'cooking'") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_too_many_users_for_the_topics_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: two topics cannot make three users
    code = main(
        [str(tmp_path / "out"), "--topics", "science,work", "--users", "3", "--newcomers", "0"]
    )
    # Assert
    assert code == 2
    assert "num_users must be in 1..2" in capsys.readouterr().err


def _real_benchmark(out: Path, *, num_users: int, num_newcomers: int) -> Path:
    """``build_benchmark`` on the real fortune files; the test skips where they are out of reach.

    They come from Debian's ``fortunes`` package, installed or fetched with ``apt-get
    download``; a machine with neither has no real text to run on.
    """
    try:
        return build_benchmark(out, num_users=num_users, num_newcomers=num_newcomers)
    except DataError as exc:
        pytest.skip(f"the fortune files are out of reach here: {exc}")


@pytest.mark.slow
def test_the_real_fortune_files_hold_every_default_topic(tmp_path: Path) -> None:
    # Execute: the default benchmark and the held-out set from the real files (installed,
    # or downloaded once with apt-get into lorafleet's cache); skipped where neither works
    users = _real_benchmark(tmp_path / "main", num_users=8, num_newcomers=2)
    held = build_benchmark(
        tmp_path / "held", topics=DEFAULT_TOPICS[10:], num_users=6, num_newcomers=8
    )
    # Assert: every user has real notes, 20 or more; every newcomer its full 160 (k = 64
    # leaves validation and test notes beside the training ones)
    for folder in [*users.iterdir(), *held.iterdir()]:
        assert len((folder / "notes.jsonl").read_text().splitlines()) >= 20
    newcomers = [
        *(tmp_path / "main" / "newcomers").iterdir(),
        *(tmp_path / "held" / "newcomers").iterdir(),
    ]
    assert len(newcomers) == 10
    for folder in newcomers:
        assert len((folder / "notes.jsonl").read_text().splitlines()) == 160


@pytest.mark.slow
def test_the_harness_runs_on_the_real_text_benchmark_with_every_baseline(tmp_path: Path) -> None:
    # Prepare: three topics and one newcomer from the real fortune files (installed, or
    # downloaded once with apt-get into lorafleet's cache); skipped only where neither works
    users = _real_benchmark(tmp_path / "bench", num_users=3, num_newcomers=1)
    out = tmp_path / "run"

    # Execute: the experiment on the default base, as small as it goes
    code = sim_main(
        [
            "experiment",
            "--users-dir",
            str(users),
            "--newcomers-dir",
            str(tmp_path / "bench" / "newcomers"),
            "--cold-start",
            "4,8",
            "--output",
            str(out),
            "--rounds",
            "1",
            "--steps",
            "2",
            "--local-steps",
            "2",
            "--fraction",
            "1.0",
            "--engine",
            "local",
            "--seeds",
            "0",
            "--max-train-notes",
            "8",
        ]
    )

    # Assert: every method scored on every user's test notes, which no split shares
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    topics = sorted(p.name for p in users.iterdir())
    assert sorted(results["split"]) == topics
    for split in results["split"].values():
        assert split["test"] and split["val"] and split["train"]
        assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    (run,) = results["runs"]
    methods = {"base", "local_peft", "local_b", "fedavg", "fedavg_ft", "prior", "personal"}
    assert sorted(u["id"] for u in run["users"]) == topics
    for user in run["users"]:
        for scoring in ("test", "test_notes"):
            assert set(user[scoring]) == methods
            assert all(0 < loss < 20 for loss in user[scoring].values())
    assert [row["k"] for row in run["cold_start"]] == [4, 8]
    assert all(row["newcomers"] == 1 and row["from_prior"] > 0 for row in run["cold_start"])
    table = (out / "table.txt").read_text()
    assert "test loss, packed chunks" in table and "test loss, note by note" in table
