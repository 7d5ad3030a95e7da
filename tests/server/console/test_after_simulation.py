"""The console over the state a real (tiny) federation left behind."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from lorafleet.server.registry import Registry

from .conftest import csrf_of, login

REPO = Path(__file__).resolve().parents[3]


def sim_conftest() -> Any:
    """``tests/sim/conftest.py``: its run set-up (a fixture there) and run helpers."""
    spec = importlib.util.spec_from_file_location("_sim_conftest", REPO / "tests/sim/conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sim_setup_run() -> Any:
    """``tests/sim/conftest.py``'s run set-up (a fixture there, a function here)."""
    return sim_conftest()._setup_run


@pytest.mark.filterwarnings("ignore")
def test_the_user_pages_list_each_simulated_users_reported_versions_and_evaluations(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: one round of three simulated devices, each saving a personal version
    from fastapi.testclient import TestClient

    from lorafleet.server.console import AdminStore, ConsoleConfig, create_app

    from .conftest import ADMIN, CHEAP_KDF, PASSWORD

    sim = sim_conftest()
    users, config = sim._setup_run(tmp_path, tiny_model_dir, num_rounds=1, final_evaluation=False)
    sim.simulate_tiny(tmp_path, tiny_model_dir, users, config, engine="local")
    names = sorted(p.name for p in users.iterdir())
    AdminStore(config.data_dir).set_password(ADMIN, PASSWORD, params=CHEAP_KDF)
    app = create_app(ConsoleConfig(data_dir=config.data_dir))
    with TestClient(app, follow_redirects=False) as client:
        login(client)
        # Execute
        overview = client.get("/").text
        listing = client.get("/users").text
        pages = {name: client.get(f"/users/{name}") for name in names}

    # Assert: three users, each with its adapter, its v1 from round 1 and its evaluation
    assert '<span class="label">Users</span><span class="value">3</span>' in overview
    with Registry.open(config.registry) as reg:
        for name in names:
            assert f'<a href="/users/{name}">{name}</a>' in listing
            (version,) = reg.user_history(name).items
            (evaluation,) = reg.list_evaluations(version.id)
            page = pages[name]
            assert page.status_code == 200
            history = page.text.split('<table id="history">')[1].split("</table>")[0]
            assert "<td>default</td><td>v1</td>" in history
            assert "<td>zero</td>" in history and "<td>1</td>" in history
            assert version.provenance.content_hash[:12] in history
            shown = " ".join(f"{k} {v:.4g}" for k, v in evaluation.metrics.items())
            assert f"device r1: {shown}" in history and "val_loss" in shown


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_the_console_shows_a_finished_simulations_rounds_charts_and_priors(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a real two-round federation of three simulated devices
    from fastapi.testclient import TestClient

    from lorafleet.server.console import AdminStore, ConsoleConfig, create_app

    from .conftest import ADMIN, CHEAP_KDF, PASSWORD

    users, config = sim_setup_run()(tmp_path, tiny_model_dir)
    results = sim_conftest().simulate_tiny(tmp_path, tiny_model_dir, users, config)
    AdminStore(config.data_dir).set_password(ADMIN, PASSWORD, params=CHEAP_KDF)
    app = create_app(ConsoleConfig(data_dir=config.data_dir))

    with TestClient(app, follow_redirects=False) as client:
        token = login(client)

        # Execute
        overview = client.get("/").text
        priors = client.get("/priors").text
        rollback = client.post(
            "/actions/rollback",
            data={"csrf_token": token, "spec": config.spec.fingerprint(), "version": "1"},
        )
        audit = client.get("/audit").text

    # Assert: both rounds with their participants, the loss and bytes charts, the priors
    assert overview.count('<tr class="status-finished">') == 2
    assert overview.count('<polyline class="line series-') == 3
    assert overview.count('<rect class="bar series-') == 4
    assert "Final evaluation" in overview and results["prior_version"] in overview
    assert 'id="prior-v2"' in priors and 'id="prior-v1"' in priors
    assert rollback.status_code == 303
    assert "prior.rollback" in audit
    csrf_of(audit)
    with Registry.open(config.registry) as reg:
        active = reg.active_prior(config.spec)
    assert active is not None and active.version == 1
