"""The real console (uvicorn on 127.0.0.1) driven by headless Chromium through Playwright.

Screenshots of every page go to ``LORAFLEET_CONSOLE_SCREENSHOTS`` when set (the docs'
images: ``LORAFLEET_CONSOLE_SCREENSHOTS=docs/img pytest tests/server/console/test_e2e.py``),
else to the test's temp folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.server.blob_store import BlobStore
from lorafleet.server.console import AdminStore, ConsoleConfig, create_app
from lorafleet.server.console.app import ConsoleServer, blob_store_eraser
from lorafleet.server.registry import Registry

from .conftest import ADMIN, CHEAP_KDF, PASSWORD, State

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)",
)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LORAFLEET_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def served(state: State) -> Iterator[str]:
    AdminStore(state.data_dir).set_password(ADMIN, PASSWORD, params=CHEAP_KDF)
    config = ConsoleConfig(data_dir=str(state.data_dir), port=0)
    app = create_app(config, on_erase=blob_store_eraser(BlobStore(state.blob_root)))
    with ConsoleServer(app, config) as server:
        yield server.url


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def log_in(page: Any, url: str) -> None:
    page.goto(url + "/")
    assert "/login" in page.url  # not logged in: sent to the login page
    page.fill("input[name=username]", ADMIN)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    page.wait_for_url(url + "/")


def test_operator_logs_in_sees_rounds_opens_a_history_rolls_back_and_finds_the_audit_entry(
    served: str, browser: Any, state: State, shots: Path
) -> None:
    # Prepare
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    snap: Callable[[str], None] = lambda name: page.screenshot(  # noqa: E731
        path=str(shots / f"console-{name}.png"), full_page=True
    )

    # Execute + Assert: log in, overview with the finished run's rounds and charts
    log_in(page, served)
    rounds = page.locator("#rounds tbody tr")
    assert rounds.count() == 3
    assert "finished" in rounds.nth(0).inner_text()
    assert page.locator("#loss-chart svg polyline").count() == 3  # base, prior, personal
    assert page.locator("#bytes-chart svg rect.bar").count() == 6  # up and down, 3 rounds
    assert "/v3" in page.locator("#status").inner_text()
    snap("overview")

    # Every round, newest first, on a page of its own
    page.click("nav >> text=Rounds")
    assert page.locator("#rounds tbody tr").count() == 3
    snap("rounds")

    # A user's history: search, open, see versions, evaluations and backup sizes
    page.click("nav >> text=Users")
    snap("users")
    page.fill("input[name=q]", state.blob_user[:6])
    page.click("button:has-text('Search')")
    page.click(f"a:has-text('{state.blob_user}')")
    assert page.locator("#history tbody tr").count() == 3
    assert "personal_loss" in page.locator("#history").inner_text()
    backups = page.locator("#backups tbody tr")
    assert backups.count() == 2
    assert "KiB" in backups.nth(0).inner_text()
    assert "pixel-7" in page.locator("#devices").inner_text()
    snap("user")

    # Roll the prior back to v1; dismissing the confirmation first changes nothing
    page.click("nav >> text=Prior versions")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#prior-v1 button:has-text('Make active')")
    assert "active" in page.locator("#prior-v3").inner_text()
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#prior-v1 button:has-text('Make active')")
    page.wait_for_selector(".flash.ok")
    assert "active" in page.locator("#prior-v1").inner_text()
    assert "Make active" in page.locator("#prior-v3").inner_text()
    snap("priors")

    page.click("nav >> text=Nodes")
    assert page.locator("#nodes tbody tr").count() == 3
    snap("nodes")

    # The audit log names who rolled back what
    page.click("nav >> text=Audit log")
    first = page.locator("#audit tbody tr").nth(0).inner_text()
    assert "prior.rollback" in first and ADMIN in first and "/v1" in first
    snap("audit")
    with Registry.open(state.registry_url) as reg:
        active = reg.active_prior(state.spec)
        assert active is not None and active.version == 1


def test_pausing_from_the_header_flips_the_control_the_coordinator_reads(
    served: str, browser: Any, state: State
) -> None:
    # Prepare
    page = browser.new_page()
    log_in(page, served)

    # Execute
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button:has-text('Pause training')")
    page.wait_for_selector(".flash.ok")

    # Assert
    assert page.inner_text("#training-state") == "training paused"
    with Registry.open(state.registry_url) as reg:
        assert reg.get_control("training.paused") is True
