"""Admin password storage, sessions and throttling, without HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.protocols.crypto import Argon2idParams
from lorafleet.server.console.auth import (
    AdminStore,
    ConsoleAuthError,
    LoginThrottle,
    SessionStore,
    SetupToken,
    csrf_ok,
)

from .conftest import CHEAP_KDF


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_admin_file_holds_a_kdf_hash_readable_only_by_its_owner(tmp_path: Path) -> None:
    # Prepare
    store = AdminStore(tmp_path)
    params = Argon2idParams(iterations=1, memory_kib=64, lanes=1)

    # Execute
    store.set_password("ops", "a long passphrase", params=params)

    # Assert
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert "a long passphrase" not in store.path.read_text()
    assert store.verify("ops", "a long passphrase")
    assert not store.verify("ops", "a long passphrasE")
    assert not store.verify("root", "a long passphrase")


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [("ops", "short", "at least 12"), ("has space", "long enough pass", "admin name")],
)
def test_weak_or_malformed_credentials_are_refused_with_the_rule(
    tmp_path: Path, username: str, password: str, message: str
) -> None:
    with pytest.raises(ConsoleAuthError, match=message):
        AdminStore(tmp_path).set_password(username, password, params=CHEAP_KDF)
    assert not (tmp_path / "console-admin.json").exists()


def test_a_damaged_admin_file_is_one_clear_error_naming_the_fix(tmp_path: Path) -> None:
    # Prepare
    store = AdminStore(tmp_path)
    store.path.write_text("{not json")

    # Execute / Assert
    with pytest.raises(ConsoleAuthError, match="delete it and restart"):
        store.verify("admin", "whatever password")


def test_a_setup_token_works_once() -> None:
    # Prepare
    setup = SetupToken()
    token = setup.issue()

    # Execute / Assert
    assert not setup.redeem("guess")
    assert setup.redeem(token)
    assert not setup.redeem(token)


def test_sessions_expire_when_idle_and_at_their_maximum_age() -> None:
    # Prepare
    clock = Clock()
    store = SessionStore(idle_s=60, max_age_s=300, clock=clock)
    idle = store.new(user="ops")
    busy = store.new(user="ops")

    # Execute: keep one busy every 50 s
    for _ in range(5):
        clock.now += 50
        assert store.get(store.cookie_value(busy)) is busy

    # Assert
    assert store.get(store.cookie_value(idle)) is None
    clock.now += 60
    assert store.get(store.cookie_value(busy)) is None  # 310 s old


def test_a_cookie_with_a_wrong_signature_names_no_session() -> None:
    # Prepare
    store = SessionStore()
    session = store.new(user="ops")
    other = SessionStore()  # another process: another key

    # Execute / Assert
    assert store.get(other.cookie_value(session)) is None
    assert store.get(session.sid) is None
    assert store.get(store.cookie_value(session)) is session


def test_csrf_tokens_belong_to_one_session() -> None:
    store = SessionStore()
    a, b = store.new(), store.new()
    assert csrf_ok(a, a.csrf)
    assert not csrf_ok(a, b.csrf)
    assert not csrf_ok(a, None) and not csrf_ok(None, a.csrf)


def test_failed_logins_block_an_account_from_one_address_for_the_window_only() -> None:
    # Prepare
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, window_s=60, clock=clock)

    # Execute
    for _ in range(3):
        throttle.failed("admin", "10.0.0.1")

    # Assert
    assert throttle.blocked("admin", "10.0.0.1") and not throttle.blocked("admin", "10.0.0.2")
    clock.now += 61
    assert not throttle.blocked("admin", "10.0.0.1")
