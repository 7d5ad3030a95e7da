"""``lorafleet-sim ... --console``: the admin console over the simulation's coordinator state."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from lorafleet.server.registry import Registry
from lorafleet.sim.cli import start_console


def test_the_console_starts_over_a_fresh_run_folder_and_asks_for_an_admin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a run folder the coordinator has not created yet
    data_dir = tmp_path / "run" / "coordinator"

    # Execute
    server = start_console(data_dir, 0)
    try:
        login = httpx.get(f"{server.url}/", follow_redirects=False, timeout=10)
        setup = httpx.get(f"{server.url}/setup", timeout=10)
    finally:
        server.stop()

    # Assert: loopback only, pages behind a login, the one-time token printed once
    printed = capsys.readouterr().out
    assert server.url.startswith("http://127.0.0.1:")
    assert login.status_code in (302, 303, 307) and "/login" in login.headers["location"]
    assert setup.status_code == 200
    assert "one-time token" in printed
    assert (data_dir / "registry.db").is_file()  # the one the coordinator will use
    with Registry.open(f"sqlite:///{data_dir / 'registry.db'}") as registry:
        assert registry.counts().rounds == 0
