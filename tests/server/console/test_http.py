"""The real console (uvicorn on 127.0.0.1) over HTTP: concurrent logins, the login throttle.

These talk to the console through a socket, as a browser or an attacker does, so what
uvicorn itself decides (the peer address, proxy headers) is part of what is tested.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from lorafleet.protocols import crypto
from lorafleet.server.console import AdminStore, ConsoleConfig, create_app
from lorafleet.server.console.app import ConsoleServer

from .conftest import ADMIN, PASSWORD, State, csrf_of

TIMEOUT_S = 60.0
"""Per request: a deadlocked console fails the test instead of hanging it."""


@dataclass
class Served:
    url: str
    state: State


def serve(state: State, kdf: crypto.KdfParams, **config: object) -> ConsoleServer:
    AdminStore(state.data_dir).set_password(ADMIN, PASSWORD, params=kdf)
    console_config = ConsoleConfig(data_dir=str(state.data_dir), port=0, **config)  # type: ignore[arg-type]
    return ConsoleServer(create_app(console_config), console_config)


def try_login(url: str, password: str, headers: dict[str, str] | None = None) -> int:
    """One login in a fresh browser session; the status of the POST."""
    with httpx.Client(base_url=url, timeout=TIMEOUT_S, follow_redirects=False) as http:
        page = http.get("/login")
        assert page.status_code == 200, page.text
        reply = http.post(
            "/login",
            data={"csrf_token": csrf_of(page.text), "username": ADMIN, "password": password},
            headers=headers or {},
        )
        return reply.status_code


ARGON_OLD = crypto.Argon2idParams(iterations=1, memory_kib=1024, lanes=4)
ARGON_NEW = crypto.Argon2idParams(iterations=1, memory_kib=1024, lanes=1)


@pytest.fixture(params=["argon2id, 4 lanes (older hashes)", "argon2id, 1 lane (default)"])
def served(request: pytest.FixtureRequest, state: State) -> Iterator[Served]:
    if not crypto.argon2id_available():
        pytest.skip("this OpenSSL lacks Argon2id")
    kdf = ARGON_OLD if "4 lanes" in request.param else ARGON_NEW
    with serve(state, kdf) as server:
        yield Served(server.url, state)


def test_eight_concurrent_logins_are_all_answered(served: Served) -> None:
    # Prepare: 4 wrong and 4 right passwords at once (fewer failures than the throttle
    # allows, so each answer says whether its password was right).
    passwords = ["wrong password", PASSWORD] * 4
    statuses: dict[int, int] = {}
    errors: list[str] = []

    def attempt(i: int) -> None:
        try:
            statuses[i] = try_login(served.url, passwords[i])
        except Exception as exc:  # a timeout: reported in the assertion below
            errors.append(repr(exc))

    # Execute
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(passwords))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * TIMEOUT_S)

    # Assert
    assert errors == []
    assert [statuses.get(i) for i in range(8)] == [401, 303] * 4
    assert try_login(served.url, PASSWORD) == 303  # and the console still works afterwards
