"""The real console (uvicorn on 127.0.0.1) over HTTP: concurrent logins, the login throttle.

These talk to the console through a socket, as a browser or an attacker does, so what
uvicorn itself decides (the peer address, proxy headers) is part of what is tested.
Distinct peers are distinct loopback source addresses (127.0.0.x), which Linux routes
to the console's 127.0.0.1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from lorafleet.protocols import crypto
from lorafleet.protocols.errors import SpecError
from lorafleet.server.console import AdminStore, ConsoleConfig, create_app
from lorafleet.server.console.app import ConsoleServer
from lorafleet.server.registry import Registry

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


# --- the login throttle and the client's address ------------------------------------------

CHEAP = crypto.ScryptParams(log2_n=4)  # the throttle, not the KDF, is under test here


def audit_addresses(state: State, action: str) -> list[str]:
    with Registry.open(state.registry_url) as reg:
        return [e.detail["address"] for e in reg.list_audit(limit=100).items if e.action == action]


def from_peer(peer: str, url: str, password: str, forwarded: str | None = None) -> int:
    """One login from the local address ``peer`` (any 127.x.y.z on Linux's loopback)."""
    transport = httpx.HTTPTransport(local_address=peer)
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    with httpx.Client(
        base_url=url, timeout=TIMEOUT_S, follow_redirects=False, transport=transport
    ) as http:
        page = http.get("/login", headers=headers)
        assert page.status_code == 200, page.text
        return http.post(
            "/login",
            data={"csrf_token": csrf_of(page.text), "username": ADMIN, "password": password},
            headers=headers,
        ).status_code


def test_a_rotating_x_forwarded_for_neither_dodges_the_throttle_nor_reaches_the_audit_log(
    state: State,
) -> None:
    # Prepare
    with serve(state, CHEAP) as server:
        # Execute: every attempt claims to come from somewhere else
        wrong = [
            from_peer("127.0.0.1", server.url, "wrong", forwarded=f"203.0.113.{i}")
            for i in range(6)
        ]
        right = from_peer("127.0.0.1", server.url, PASSWORD, forwarded="198.51.100.1")
        elsewhere = from_peer("127.0.0.2", server.url, PASSWORD, forwarded="198.51.100.2")

    # Assert: the header changed nothing; the admin still logs in from another peer,
    # and the audit log holds the real peer address only
    assert wrong == [401] * 5 + [429]
    assert right == 429
    assert elsewhere == 303
    assert audit_addresses(state, "login") == ["127.0.0.2"]


def test_failures_from_one_peer_do_not_lock_the_admin_out_from_another(state: State) -> None:
    # Prepare
    with serve(state, CHEAP) as server:
        # Execute: the attacker even claims to be the admin's address
        attacker = [
            from_peer("127.0.0.1", server.url, "guess", forwarded="127.0.0.4") for _ in range(7)
        ]
        admin = from_peer("127.0.0.4", server.url, PASSWORD)

    # Assert
    assert attacker == [401] * 5 + [429, 429]
    assert admin == 303


def test_a_named_proxy_is_believed_and_no_one_else(state: State) -> None:
    # Prepare: the operator runs a reverse proxy on 127.0.0.5
    with serve(state, CHEAP, forwarded_allow_ips="127.0.0.5") as server:
        # Execute
        via_proxy = [
            from_peer("127.0.0.5", server.url, "wrong", forwarded="203.0.113.9") for _ in range(5)
        ]
        other_client_via_proxy = from_peer(
            "127.0.0.5", server.url, PASSWORD, forwarded="192.0.2.44"
        )
        not_the_proxy = from_peer("127.0.0.6", server.url, PASSWORD, forwarded="192.0.2.66")

    # Assert: behind the proxy, clients are told apart by what it forwards; a header
    # from a peer that is not the proxy is ignored
    assert via_proxy == [401] * 5
    assert other_client_via_proxy == 303 and not_the_proxy == 303
    assert audit_addresses(state, "login") == ["127.0.0.6", "192.0.2.44"]


@pytest.mark.parametrize("value", ["*", "proxy.example", "127.0.0.1,nope"])
def test_a_proxy_that_is_not_an_address_is_refused_with_the_fix(state: State, value: str) -> None:
    with pytest.raises(SpecError, match="name the reverse proxy's address"):
        ConsoleConfig(data_dir=str(state.data_dir), forwarded_allow_ips=value)
