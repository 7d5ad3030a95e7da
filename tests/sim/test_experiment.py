"""The experiment runner end to end on the tiny model: the table, the JSON, the plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lorafleet.client.base import load_base
from lorafleet.sim import experiment
from lorafleet.sim.baselines import Lab
from lorafleet.sim.cli import _experiment_config, _parser, main
from lorafleet.sim.experiment import METHODS, ExperimentConfig, run_experiment

pytestmark = pytest.mark.filterwarnings("ignore")


def _tiny(model: Path, tmp_path: Path, **options: Any) -> ExperimentConfig:
    """An in-process experiment on the tiny model, fast enough for the default run."""
    defaults: dict[str, Any] = {
        "fraction_train": 1.0,
        "lr": 0.05,
        "seq_len": 32,
        "precision": "fp32",
        "engine": "local",
    }
    return ExperimentConfig(output=tmp_path / "run", base=str(model), **{**defaults, **options})


def _smallest(model: Path, tmp_path: Path, **options: Any) -> ExperimentConfig:
    """Two users, one round of two steps, rank 2: for what is about the run's files."""
    defaults: dict[str, Any] = {
        "num_users": 2,
        "notes_per_user": 20,
        "num_rounds": 1,
        "prior_steps": 2,
        "local_steps": 2,
        "rank": 2,
        "cold_start_ks": (),
    }
    return _tiny(model, tmp_path, **{**defaults, **options})


def test_an_experiment_scores_every_method_on_a_test_split_nothing_saw(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    cfg = _tiny(
        tiny_model_dir,
        tmp_path,
        num_users=3,
        notes_per_user=30,
        num_rounds=2,
        personal_steps=3,
        prior_steps=3,
        peft_lr=0.02,
        rank=4,
        cold_start_ks=(2, 8),
        cold_start_steps=3,
        seeds=(0, 1),
    )
    # Execute
    result = run_experiment(cfg, progress=False)
    # Assert: the split is recorded and disjoint; the devices never got a test note
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(record["split"]) == 3
    for uid, sides in record["split"].items():
        train, val, test = (set(sides[k]) for k in ("train", "val", "test"))
        assert train and val and test
        assert not (train & val or train & test or val & test)
        device = tmp_path / "run" / "seed-0" / "devices" / uid
        on_device = (device / "train.jsonl").read_text() + (device / "heldout.jsonl").read_text()
        assert len(on_device.splitlines()) == len(train) + len(val)
    # Every seed scored every method on test (packed and note by note) and validation
    assert [r["seed"] for r in record["runs"]] == [0, 1]
    for run in record["runs"]:
        for user in run["users"]:
            for metric in ("test", "test_notes", "val"):
                assert set(user[metric]) == set(METHODS)
            # two rounds with personal steps, then the final personalization
            assert user["personal_versions"] == 3
            # round 0's sketch (4 passes x 2 batches: the default gradient A), prior and
            # in-round personal steps in full, the final one early-stopped
            fixed = 4 * 2 + 2 * (cfg.personal_steps + cfg.prior_steps)
            assert fixed < user["steps"]["personal"] <= fixed + cfg.budget_personalize
            assert user["test"]["personal"] < user["test"]["base"]
        assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
        assert run["bytes_up_per_client"] > 0
        assert [row["k"] for row in run["cold_start"]] == [2.0, 8.0]
    # Each seed is its own cohort (its A, batch order): lorafleet's methods move too
    for method in ("prior", "personal", "local_b"):
        pairs = zip(record["runs"][0]["users"], record["runs"][1]["users"], strict=True)
        assert any(u0["test"][method] != u1["test"][method] for u0, u1 in pairs), method
    assert result.means()["prior"][1] > 0 and result.means()["personal"][1] > 0
    summary = record["summary"]["test"]
    assert summary["wins"]["users"] == 3 and 0 <= summary["wins"]["strict"] <= 3
    assert result.means()["personal"][0] < result.means()["base"][0]
    table = (tmp_path / "run" / "table.txt").read_text()
    assert "note by note" in table and "FedAvg+FT" in table and "± seeds" in table
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


def test_the_sim_cli_passes_the_cold_start_budget_and_refuses_a_negative_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(["experiment", "--cold-start-steps", "7"])
    assert _experiment_config(args).budget_cold_start == 7
    default = _experiment_config(_parser().parse_args(["experiment"]))
    # a newcomer spent no prior steps: the step bound leaves it the whole local budget
    assert default.budget_cold_start == default.budget_local
    code = main(["experiment", "--cold-start-steps", "-1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cold-start steps must be >= 0" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_step_bound_leaves_personalization_what_the_prior_did_not_spend() -> None:
    # Prepare: 3 rounds x 10 prior steps and round 0's 8-step sketch, against 30 + 30
    def config(*extra: str) -> ExperimentConfig:
        argv = ["experiment", "--rounds", "3", "--steps", "10", "--local-steps", "30"]
        return _experiment_config(_parser().parse_args([*argv, *extra]))

    bounded, unbounded = config(), config("--no-step-bound")
    seeded = config("--shared-a", "seeded")
    rounds = config("--personal-steps", "2")
    small = config("--personalize-steps", "12")

    # Assert: 60 - 30 - 8 = 22 for the final personalization, the whole 30 without the
    # bound; no sketch on the seeded A; the rounds' own personal steps count too; a
    # smaller personalize budget stands; the newcomers keep the local budget throughout
    assert bounded.step_bound and not unbounded.step_bound
    assert (bounded.budget_bound, bounded.sketch_steps) == (60, 8)
    assert (bounded.budget_personalize, unbounded.budget_personalize) == (22, 30)
    assert (seeded.sketch_steps, seeded.budget_personalize) == (0, 30)
    assert rounds.budget_personalize == 16
    assert small.budget_personalize == 12
    assert bounded.budget_cold_start == unbounded.budget_cold_start == 30
    # a budget the prior alone already spends still personalizes, one step, and says so
    tight = _experiment_config(
        _parser().parse_args(["experiment", "--rounds", "1", "--steps", "2", "--local-steps", "2"])
    )
    assert tight.budget_personalize == 1


def test_the_sim_cli_passes_the_server_learning_rate_to_the_coordinator_and_refuses_zero(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    base = load_base(tiny_model_dir)
    default = _experiment_config(_parser().parse_args(["experiment"]))
    faster = _experiment_config(_parser().parse_args(["experiment", "--server-lr", "1.5"]))
    adam = _experiment_config(
        _parser().parse_args(["experiment", "--aggregator", "fedadam", "--server-lr", "1e-3"])
    )

    # Execute
    coordinators = [
        experiment._coordinator_config(cfg, base, tmp_path, seed=0, num_users=2)
        for cfg in (default, faster, adam)
    ]

    # Assert: plain FedAvg unless asked; the coordinator steps by what was asked
    assert [c.server_lr for c in coordinators] == [1.0, 1.5, 1e-3]
    assert [c.aggregator for c in coordinators] == ["fedavg", "fedavg", "fedadam"]
    code = main(["experiment", "--server-lr", "0", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "server-lr must be > 0" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(experiment.SpecError, match="aggregator must be one of fedadam, fedavg"):
        experiment.ExperimentConfig(output=tmp_path / "out", aggregator="fedsgd")


def test_the_prior_rate_is_the_coordinators_alone_and_the_baselines_keep_lr(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    base = load_base(tiny_model_dir)
    args = ["experiment", "--lr", "2e-3", "--personal-lr", "0", "--personal-lr-shared-a", "0"]
    default = _experiment_config(_parser().parse_args(args))
    slower = _experiment_config(_parser().parse_args([*args, "--prior-lr", "5e-4"]))

    # Execute
    coordinators = [
        experiment._coordinator_config(cfg, base, tmp_path, seed=0, num_users=2)
        for cfg in (default, slower)
    ]

    # Assert: the prior steps at --prior-lr; the personal rates' "0: --lr" stays --lr's
    assert [c.lr for c in coordinators] == [2e-3, 5e-4]
    assert [c.personal_lr for c in coordinators] == [2e-3, 2e-3]
    assert [c.personal_lr_shared_a for c in coordinators] == [2e-3, 2e-3]
    # Only lorafleet's prior sees it, so baselines trained at another prior rate compare.
    assert "prior_lr" in experiment._RECIPE_ONLY and "lr" not in experiment._RECIPE_ONLY
    code = main(["experiment", "--prior-lr", "-1", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "prior-lr must be >= 0" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_sim_cli_passes_the_targets_to_the_cohort_spec_and_refuses_an_unknown_one(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    args = _parser().parse_args(["experiment", "--targets", "v_proj, o_proj,q_proj,"])
    base = load_base(tiny_model_dir)

    # Execute: the cohort's spec, and the lab every method of the run is scored in
    cfg = _experiment_config(args)
    spec = experiment._coordinator_config(cfg, base, tmp_path, seed=0, num_users=2).spec
    lab = Lab(base, spec, precision="fp32", device="cpu")

    # Assert: one canonical order; the baselines' model adapts the same modules
    assert cfg.targets == spec.target_modules == ("o_proj", "q_proj", "v_proj")
    assert {name.rsplit(".", 1)[-1] for name in lab.layers} == {"o_proj", "q_proj", "v_proj"}
    assert ExperimentConfig(output=tmp_path, targets=("v_proj", "q_proj")).targets == (
        "q_proj",
        "v_proj",
    )
    assert _experiment_config(_parser().parse_args(["experiment"])).targets == (
        "q_proj",
        "v_proj",
    )
    # a name no Linear of the base has is one line, before any training
    code = main(
        [
            "experiment",
            "--users",
            "2",
            "--base",
            str(tiny_model_dir),
            "--targets",
            "q_proj,qkv",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "['qkv'] match no Linear layer" in err[0], err


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


def test_every_sim_flag_with_a_default_shows_it_in_help() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("demo", "experiment"):
        command = sub.choices[name]  # type: ignore[attr-defined]
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if action.default in (None, False, "==SUPPRESS==") or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
        for shown in ("(default: 6)", "(default: 0.002)", "(default: ray)", "(default: auto)"):
            assert shown in text, (name, shown)
        assert "(default: None)" not in text


@pytest.mark.parametrize(("cold", "expect_out"), [((), 0), ((4,), 1)])
def test_a_user_sits_the_federation_out_only_when_a_cold_start_curve_is_asked_for(
    tmp_path: Path, cold: tuple[int, ...], expect_out: int
) -> None:
    # Prepare: three real-text users of different sizes, no newcomers folder
    from lorafleet.sim.experiment import _load_users

    for name, n in (("a", 20), ("b", 30), ("c", 40)):
        folder = tmp_path / "users" / name
        folder.mkdir(parents=True)
        lines = [json.dumps({"text": f"note {i} of {name}, with a few words."}) for i in range(n)]
        (folder / "notes.jsonl").write_text("\n".join(lines) + "\n")
    cfg = ExperimentConfig(
        output=tmp_path / "out", users_dir=tmp_path / "users", cold_start_ks=cold
    )
    # Execute
    users, newcomers = _load_users(cfg, tmp_path / "out")
    # Assert: the largest user is the newcomer only when the curve needs one
    assert len(newcomers) == expect_out and len(users) == 3 - expect_out
    if expect_out:
        assert newcomers[0].user_id == "c"


def test_seeds_already_in_the_folder_are_reused_and_others_rerun(
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: one seed, as a small machine runs them, one command at a time
    cfg = _smallest(tiny_model_dir, tmp_path, baselines=False, seeds=(1,))
    run_experiment(cfg, progress=False)
    results = tmp_path / "run" / "results.json"
    first = json.loads(results.read_text())["runs"][0]
    written: list[list[int]] = []
    real_write = experiment.atomic_write_text

    def watch(path: Path, text: str) -> None:
        if Path(path).name == "results.json":
            written.append([r["seed"] for r in json.loads(text)["runs"]])
        real_write(path, text)

    monkeypatch.setattr(experiment, "atomic_write_text", watch)
    # Execute: the same options with a second seed
    with caplog.at_level("INFO", logger="lorafleet.sim.experiment"):
        result = run_experiment(replace(cfg, seeds=(0, 1)), progress=False)
    # Assert: seed 1 came back from the file as it was, seed 0 ran, the summary has both
    record = json.loads(results.read_text())
    assert [r["seed"] for r in record["runs"]] == [0, 1]
    assert record["runs"][1] == first
    # and the wall time counts the reused seed's own, not only this command's
    assert (
        first["seconds"] > 0
        and record["seconds"] >= first["seconds"] + record["runs"][0]["seconds"]
    )
    assert "seed 1: reused" in caplog.text and "seed 0: reused" not in caplog.text
    assert (tmp_path / "run" / "seed-0" / "coordinator").is_dir()
    # and no write of results.json on the way dropped the finished seed 1
    assert written and all(1 in seeds for seeds in written)
    assert len(result.runs) == 2 and record["summary"]["test"]["std_over_seeds"]["personal"] >= 0
    # Other options: nothing is reused, and the log says why
    caplog.clear()
    with caplog.at_level("INFO", logger="lorafleet.sim.experiment"):
        run_experiment(replace(cfg, prior_steps=3), progress=False)
    assert "reused" not in caplog.text.replace("not reusing", "")
    assert "other prior_steps: not reusing" in caplog.text
    assert [r["seed"] for r in json.loads(results.read_text())["runs"]] == [1]


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"config": [], "split": {}}'])
def test_an_unreadable_results_file_is_not_reused_and_says_so(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    path = tmp_path / "results.json"
    path.write_text(text)

    # Execute
    with caplog.at_level("WARNING", logger="lorafleet.sim.experiment"):
        done = experiment._finished_seeds(path, {"rank": 8}, {})

    # Assert: a warning naming the file, never a traceback
    assert done == {}
    assert "not a readable results file" in caplog.text and str(path) in caplog.text


def test_a_gradient_shared_a_experiment_scores_the_prior_on_the_a_it_was_trained_on(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    cfg = _tiny(
        tiny_model_dir,
        tmp_path,
        num_users=3,
        notes_per_user=30,
        num_rounds=2,
        prior_steps=3,
        rank=4,
        cold_start_ks=(8,),
        cold_start_steps=3,
        baselines=False,
        shared_a="gradient",
    )
    # Execute
    result = run_experiment(cfg, progress=False)
    # Assert: round 0 built the A; the prior (B trained on it) beats the base on test,
    # which a B read on any other A would not; the newcomers start from it too
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["config"]["shared_a"] == "gradient"
    run = record["runs"][0]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    for user in run["users"]:
        assert user["test"]["prior"] < user["test"]["base"]
        # the sketch's 4 passes x 2 batches count as device steps, with the prior's 2 x 3
        assert user["steps"]["prior"] == 2 * 3 + 4 * 2
    means = result.means()
    assert means["personal"][0] < means["base"][0]
    assert [row["k"] for row in run["cold_start"]] == [8.0]
    # each row's means are its newcomers' figures, averaged
    row = run["cold_start"][0]
    assert len(row["per_newcomer"]) == row["newcomers"] >= 1
    for arm in ("from_prior", "from_zero", "prior_alone"):
        figures = [f[arm] for f in row["per_newcomer"].values()]
        assert row[arm] == pytest.approx(sum(figures) / len(figures))
    # The same run without the gradient A is a different experiment, not a read-back
    assert experiment.changed_options(
        record["config"], experiment.config_record(replace(cfg, shared_a="seeded")), ()
    ) == ["shared_a"]


def test_an_older_results_file_counts_options_added_since_at_the_values_it_ran_with(
    tmp_path: Path,
) -> None:
    # Prepare: records from before shared_a and personal_lr_shared_a existed
    now = experiment.config_record(experiment.ExperimentConfig(output=tmp_path, shared_a="seeded"))
    seeded_then = {
        k: v
        for k, v in now.items()
        if k not in ("shared_a", "personal_lr_shared_a", "targets", "server_lr")
    }
    gradient_now = {**now, "shared_a": "gradient"}
    gradient_then = {k: v for k, v in gradient_now.items() if k != "personal_lr_shared_a"}

    # Execute / Assert: a seeded run is the same run (the shared A's rate did nothing)
    assert experiment.changed_options(seeded_then, now, ()) == []
    # a gradient run personalized at personal_lr then, which is not today's default
    assert experiment.changed_options(gradient_then, gradient_now, ()) == ["personal_lr_shared_a"]
    same_rate = {**gradient_now, "personal_lr_shared_a": now["personal_lr"]}
    assert experiment.changed_options(gradient_then, same_rate, ()) == []
    # auto is compared as what it ran on: the gradient A, or the seeded A with dp
    auto_now = {**gradient_now, "shared_a": "auto"}
    assert experiment.changed_options(gradient_now, auto_now, ()) == []
    assert experiment.changed_options(now, auto_now, ()) == ["shared_a"]
    dp_auto = {**auto_now, "dp": "central"}
    assert experiment.changed_options({**now, "dp": "central"}, dp_auto, ()) == []
    # a file from before targets existed adapted q_proj and v_proj, not all Linears
    wider = {**now, "targets": ["o_proj", "q_proj", "v_proj"]}
    assert experiment.changed_options(seeded_then, wider, ()) == ["targets"]
    # and plain FedAvg, a server learning rate of 1
    stepped = {**now, "server_lr": 2.0}
    assert experiment.changed_options(seeded_then, stepped, ()) == ["server_lr"]
    # and FedAvg on the coordinator, from before the aggregator was an option
    no_aggregator = {k: v for k, v in now.items() if k != "aggregator"}
    assert experiment.changed_options(no_aggregator, now, ()) == []
    adam = {**now, "aggregator": "fedadam"}
    assert experiment.changed_options(no_aggregator, adam, ()) == ["aggregator"]


def test_the_cold_start_table_and_plot_average_the_seeds(tmp_path: Path) -> None:
    # Prepare: two seeds' curves; the older one has no prior-alone figure
    def run(seed: int, fp: float, fz: float, alone: float | None) -> experiment.SeedRun:
        row = {"k": 16.0, "from_prior": fp, "from_zero": fz, "newcomers": 2.0}
        if alone is not None:
            row["prior_alone"] = alone
        return experiment.SeedRun(seed, [], [], 0.0, cold_start=[row])

    result = experiment.ExperimentResult([run(0, 3.6, 3.9, 3.7), run(1, 3.8, 4.1, None)], {})

    # Execute
    means = experiment.cold_start_means(result)

    # Assert: one row per k, the seeds' means, the prior alone from the runs that have it
    assert means == [(16.0, pytest.approx(3.7), pytest.approx(4.0), pytest.approx(3.7))]


def _stepped(uid: str, personal: int, **baselines: int) -> experiment.UserResult:
    """A user whose losses do not matter here, with lorafleet's and the baselines' steps."""
    steps = {"base": 0, "prior": 38, "personal": personal, **baselines}
    losses = {m: 3.0 for m in steps}
    return experiment.UserResult(uid, losses, losses, losses, steps, dict(steps), 1)


def test_the_table_names_the_users_whose_steps_pass_local_only_plus_fedavg() -> None:
    # Prepare: two seeds with the baselines' steps; law runs past 30 + 30 on seed 1 only
    both = {"local_peft": 30, "local_b": 30, "fedavg": 30}
    runs = [
        experiment.SeedRun(0, [_stepped("food", 41, **both), _stepped("law", 60, **both)], [], 0),
        experiment.SeedRun(1, [_stepped("food", 42, **both), _stepped("law", 65, **both)], [], 0),
    ]
    result = experiment.ExperimentResult(runs, {})

    # Execute
    bound, over = result.steps_over_budget()
    table = experiment.format_table(result)
    summary = json.loads(result.to_json())["summary"]

    # Assert: the mean hides law's 65, the most and the bound's line do not
    assert result.steps_per_user()["personal"] == pytest.approx(52.0)
    assert result.steps_most_per_user()["personal"] == 65
    assert (bound, over) == (60, [("law", 1, 65)])
    assert "personal 52 (65)" in table
    assert "local-only plus FedAvg (60): over it for law 65 (seed 1)" in table
    assert summary["steps_budget"] == {
        "local_plus_fedavg": 60,
        "over": [{"user": "law", "seed": 1, "steps": 65}],
    }


def test_without_baselines_the_step_bound_comes_from_the_config() -> None:
    # Prepare: a --no-baselines run of 3 rounds x 10 steps with a local budget of 30
    config = {"num_rounds": 3, "prior_steps": 10, "local_steps": 30}
    runs = [experiment.SeedRun(0, [_stepped("food", 41), _stepped("law", 58)], [], 0)]
    result = experiment.ExperimentResult(runs, {}, config=config)

    # Execute
    bound, over = result.steps_over_budget()
    table = experiment.format_table(result)

    # Assert
    assert (bound, over) == (60, [])
    assert "local-only plus FedAvg (60): within it for every user" in table
    # the local budget defaults to the rounds times the steps, as the experiment's does
    bare = experiment.ExperimentResult(runs, {}, config={"num_rounds": 3, "prior_steps": 10})
    assert bare.steps_over_budget() == (60, [])


def test_the_step_bound_counts_fedavg_as_it_counts_the_prior_when_users_sit_rounds_out() -> None:
    # Prepare: half the users each round; food joined one FedAvg round of three, and its
    # prior steps are counted as if it joined all three, so FedAvg's must be too
    config = {"num_rounds": 3, "prior_steps": 6, "local_steps": 18}
    sampled = {"local_peft": 18, "local_b": 18, "fedavg": 6}
    runs = [experiment.SeedRun(0, [_stepped("food", 36, **sampled)], [], 0)]
    result = experiment.ExperimentResult(runs, {}, config=config)

    # Execute / Assert: 18 + 18, not 18 + the 6 FedAvg steps it happened to take
    assert result.steps_over_budget() == (36, [])


def test_baselines_read_from_a_finished_run_are_its_own_and_only_when_comparable(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a finished run with its baselines, as a recipe change starts from
    source = _smallest(tiny_model_dir, tmp_path, seeds=(0,))
    run_experiment(source, progress=False)
    ran = json.loads((tmp_path / "run" / "results.json").read_text())["runs"][0]["users"]
    recipe = replace(
        source,
        output=tmp_path / "recipe",
        prox_mu=0.5,
        prior_lr=1e-3,
        baselines_from=tmp_path / "run",
    )

    # Execute: changes only lorafleet's methods see (the proximal pull, the prior's rate)
    result = run_experiment(recipe, progress=False)

    # Assert: every baseline figure is the source's, and lorafleet's own were trained here
    got = json.loads((tmp_path / "recipe" / "results.json").read_text())
    assert got["config"]["baselines_from"] == str(tmp_path / "run")
    for mine, theirs in zip(got["runs"][0]["users"], ran, strict=True):
        for kind in ("test", "test_notes", "val", "steps", "tokens"):
            for method in experiment.BASELINE_METHODS:
                assert mine[kind][method] == theirs[kind][method], (kind, method)
        assert set(mine["test"]) == set(METHODS)
    assert result.wins()["users"] == 2
    assert "baselines read from" in (tmp_path / "recipe" / "table.txt").read_text()
    assert (tmp_path / "recipe" / "seed-0" / "coordinator").is_dir()

    # Execute: a run without baselines, then the same command borrowing them
    bare = replace(recipe, output=tmp_path / "later", baselines=False, baselines_from=None)
    run_experiment(bare, progress=False)
    trained = json.loads((tmp_path / "later" / "results.json").read_text())["runs"][0]
    with caplog.at_level("INFO", logger="lorafleet.sim.experiment"):
        completed = run_experiment(replace(recipe, output=tmp_path / "later"), progress=False)
    # Assert: the seed is reused as it ran, with the source's baselines added, nothing trained
    assert "seed 0: reused" in caplog.text and "seed 0: baselines read from" in caplog.text
    for mine, theirs, before in zip(completed.runs[0].users, ran, trained["users"], strict=True):
        assert mine.test["personal"] == before["test"]["personal"]
        assert mine.test["fedavg"] == theirs["test"]["fedavg"]
    assert completed.runs[0].seconds == trained["seconds"]
    assert "FedAvg+FT" in (tmp_path / "later" / "table.txt").read_text()

    # Execute / Assert: an option a baseline depends on is refused before any training
    with pytest.raises(experiment.SpecError, match=r"other lr; use the same options"):
        run_experiment(replace(recipe, output=tmp_path / "lr", lr=0.01), progress=False)
    assert not (tmp_path / "lr" / "seed-0").exists()
    # a seed the source never ran
    with pytest.raises(experiment.SpecError, match=r"has no seed 1 \(it has 0\)"):
        run_experiment(replace(recipe, output=tmp_path / "s1", seeds=(1,)), progress=False)
    # other splits (the same options on other notes)
    moved = tmp_path / "moved"
    moved.mkdir()
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    first = next(iter(record["split"]))
    record["split"][first]["test"] = record["split"][first]["test"][1:]
    (moved / "results.json").write_text(json.dumps(record))
    with pytest.raises(experiment.SpecError, match="other users or splits"):
        run_experiment(
            replace(recipe, output=tmp_path / "sp", baselines_from=moved), progress=False
        )
    # a source without baselines, and one that is not there: one line from the CLI
    run_experiment(replace(source, output=tmp_path / "bare", baselines=False), progress=False)
    with pytest.raises(experiment.SpecError, match="ran with --no-baselines"):
        run_experiment(
            replace(recipe, output=tmp_path / "nb", baselines_from=tmp_path / "bare"),
            progress=False,
        )
    code = main(
        ["experiment", "--output", str(tmp_path / "x"), "--baselines-from", str(tmp_path / "no")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no results.json there" in err
    with pytest.raises(experiment.SpecError, match="drop --no-baselines"):
        replace(recipe, baselines=False)
