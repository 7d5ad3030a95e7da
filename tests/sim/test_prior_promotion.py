"""Devices score every new prior version; it becomes active only if it is not worse."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorafleet.server.coordinator import CoordinatorState
from lorafleet.server.registry import Registry

from .conftest import simulate_tiny

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[2]


def console_helpers() -> Any:
    """``tests/server/console/conftest.py`` (login and the test admin), loaded by path."""
    path = REPO / "tests/server/console/conftest.py"
    spec = importlib.util.spec_from_file_location("_console_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def scores(metrics: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(mean prior loss, mean prior/base loss) over the devices of one round's replies."""
    rows = list(metrics.values())
    prior = np.array([r["prior_loss"] for r in rows])
    base = np.array([r["base_loss"] for r in rows])
    return float(prior.mean()), float((prior / base).mean())


def test_every_prior_version_is_scored_by_devices_and_judged_with_its_reason(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: three rounds of three devices, each sampled every round
    from fastapi.testclient import TestClient

    from lorafleet.server.console import AdminStore, ConsoleConfig, create_app

    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=3, final_evaluation=False)
    # Execute
    results = simulate_tiny(tmp_path, tiny_model_dir, users, config, engine="local")
    # Assert: each candidate was scored by the devices that next received it: the round
    # after it (their prior losses, as they reported them) or the final scoring step
    rounds, final = results["rounds"], results["final_candidate"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and final is not None
    with Registry.open(config.registry) as reg:
        priors = sorted(reg.list_prior_versions(config.spec).items, key=lambda p: p.version)
        decisions = reg.list_prior_decisions(config.spec)
        active = reg.active_prior(config.spec)
        # A held candidate takes the round that scored it with it: that round makes none.
        assert [p.ref for p in priors] == [r["prior_version"] for r in rounds if r["prior_version"]]
        assert [d.ref for d in decisions] == [p.ref for p in priors]
        scorers = {
            r["prior_version"]: nxt for r, nxt in zip(rounds, [*rounds[1:], final], strict=True)
        }
        promoted = None
        for prior, decision in zip(priors, decisions, strict=True):
            (evaluation,) = reg.list_prior_evaluations(prior.ref)
            scorer = scorers[prior.ref]
            val_mean, rel_mean = scores(scorer["metrics"])
            assert (evaluation.source, evaluation.devices) == ("devices", 3)
            assert evaluation.round == scorer["round"] == decision.round
            assert evaluation.metrics["val_loss_mean"] == pytest.approx(val_mean)
            assert evaluation.metrics["rel_loss_mean"] == pytest.approx(rel_mean)
            assert evaluation.metrics["val_loss_std"] > 0  # three users, three losses
            # The rule, on those numbers: against the version active when it was judged
            assert decision.decided_by == "policy" and decision.tolerance == 0.01
            assert decision.against == promoted
            assert decision.candidate_score == pytest.approx(rel_mean)
            if promoted is None:
                assert decision.active_score == 1.0  # the zero prior is the base
            better = decision.candidate_score <= decision.active_score * 1.01
            assert decision.decision == ("promoted" if better else "held")
            assert decision.reason.startswith(decision.decision)
            assert scorer["decision"] == decision.decision
            if better:
                promoted = prior.ref
        assert (active.ref if active is not None else None) == promoted
        assert any(d.decision == "promoted" for d in decisions)  # the tiny model does learn

    # ... and the console says why, on the priors page and in the rounds table
    console = console_helpers()
    AdminStore(config.data_dir).set_password(
        console.ADMIN, console.PASSWORD, params=console.CHEAP_KDF
    )
    with TestClient(
        create_app(ConsoleConfig(data_dir=config.data_dir)), follow_redirects=False
    ) as client:
        console.login(client)
        page = client.get("/priors").text
        overview = client.get("/").text
    for decision in decisions:
        row = page.split(f'id="prior-v{decision.ref.rsplit("/v", 1)[1]}"')[1].split("</tr>")[0]
        assert f'<span class="badge decision-{decision.decision}">' in row
        assert decision.reason.replace("'", "&#39;") in row
        assert f"{decision.ref} {decision.decision}" in overview


def test_a_worse_prior_is_held_and_training_goes_on_from_the_active_one(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: one real round (its candidate judged by the final scoring step), then a
    # candidate such as a diverged round could leave: random B far from anything learned
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=1, final_evaluation=False)
    simulate_tiny(tmp_path, tiny_model_dir, users, config, engine="local")
    coord = CoordinatorState.open(config)
    try:
        active_before = coord.registry.active_prior(config.spec)
        newest = coord.registry.list_prior_versions(config.spec, limit=1).items[0]
        rng = np.random.default_rng(0)
        shapes = {k: v.shape for k, v in coord.load_prior(newest).items()}
        bad = {k: rng.normal(0.0, 0.5, s).astype(np.float32) for k, s in shapes.items()}
        candidate = coord.save_prior(2, bad, round=1, metrics={})
        assert coord.registry.pending_prior(config.spec) == candidate
    finally:
        coord.close()

    # Execute: round 2 trains from the candidate, and its devices score it
    more = dataclasses.replace(config, num_rounds=2)
    results = simulate_tiny(tmp_path, tiny_model_dir, users, more, engine="local")

    # Assert: held on the devices' real losses, the reason recorded, the active one kept
    (round2,) = results["rounds"]
    assert round2["decision"] == "held" and round2["failure"] is None
    assert round2["prior_version"] is None  # its update was built on the held candidate
    val_mean, rel_mean = scores(round2["metrics"])
    with Registry.open(config.registry) as reg:
        (evaluation,) = reg.list_prior_evaluations(candidate.ref)
        assert evaluation.devices == 3
        assert evaluation.metrics["val_loss_mean"] == pytest.approx(val_mean)
        (decision,) = reg.list_prior_decisions(config.spec)[-1:]
        assert decision.ref == candidate.ref and decision.decision == "held"
        assert decision.candidate_score == pytest.approx(rel_mean)
        assert decision.candidate_score > decision.active_score * 1.01
        assert decision.against == (active_before.ref if active_before else None)
        assert "held" in decision.reason and "tolerance" in decision.reason
        assert "stays active" in decision.reason
        assert reg.active_prior(config.spec) == active_before
        assert [p.version for p in reg.list_prior_versions(config.spec).items] == [2, 1]
        (r2,) = [r for r in reg.list_rounds(config.spec).items if r.number == 2]
        assert r2.status == "finished" and r2.prior_ref is None
        assert reg.pending_prior(config.spec) is None
    assert results["prior_version"] == (active_before.ref if active_before else "zero")
    assert results["final_candidate"] is None  # nothing left to judge
