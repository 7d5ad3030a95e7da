"""The console's HTTP surface: who may see and do what, CSRF, and what each action changes."""

from __future__ import annotations

import stat

import pytest
from fastapi.testclient import TestClient

from lorafleet.server.console import ConsoleConfig, create_app
from lorafleet.server.console.app import COOKIE
from lorafleet.server.registry import Registry

from .conftest import ADMIN, PASSWORD, State, csrf_of, login, make_client

PAGES = ["/", "/users", "/users/u-0000", "/priors", "/nodes", "/audit"]
ACTIONS = [
    ("/actions/pause", {}),
    ("/actions/resume", {}),
    ("/actions/rollback", {"spec": "0" * 64, "version": "1"}),
    ("/actions/revoke", {"device_id": "1"}),
    ("/actions/erase", {"pseudonym": "u-0000", "confirm": "u-0000"}),
    ("/logout", {}),
]


def audit_actions(state: State) -> list[str]:
    with Registry.open(state.registry_url) as reg:
        return [e.action for e in reg.list_audit(limit=100).items]


# ------------------------------------------------------------------ authorization


@pytest.mark.parametrize("path", PAGES)
def test_pages_send_a_visitor_without_a_session_to_the_login_page(
    client: TestClient, path: str
) -> None:
    # Execute
    reply = client.get(path)

    # Assert
    assert reply.status_code == 303
    assert reply.headers["location"].startswith("/login?next=/")


@pytest.mark.parametrize(("path", "data"), ACTIONS)
def test_actions_without_a_login_are_refused_with_401_and_change_nothing(
    client: TestClient, state: State, path: str, data: dict[str, str]
) -> None:
    # Prepare: a pre-login session has a CSRF token, which must not be enough
    token = csrf_of(client.get("/login").text)

    # Execute
    reply = client.post(path, data={**data, "csrf_token": token})

    # Assert
    assert reply.status_code == 401
    assert audit_actions(state) == []
    with Registry.open(state.registry_url) as reg:
        assert reg.get_control("training.paused") is None


def test_a_forged_session_cookie_is_not_a_login(client: TestClient) -> None:
    # Prepare
    login(client)
    real = client.cookies[COOKIE]
    sid, _, mac = real.partition(".")
    client.cookies.clear()
    client.cookies.set(COOKIE, f"{sid}.{'0' * len(mac)}")

    # Execute
    reply = client.get("/")

    # Assert
    assert reply.status_code == 303


def test_the_session_cookie_is_httponly_samesite_strict_and_changes_at_login(
    client: TestClient,
) -> None:
    # Prepare
    page = client.get("/login")
    before = client.cookies[COOKIE]

    # Execute
    reply = client.post(
        "/login",
        data={"csrf_token": csrf_of(page.text), "username": ADMIN, "password": PASSWORD},
    )

    # Assert
    header = reply.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header
    assert "secure" not in header  # plain HTTP on loopback: a Secure cookie would never return
    assert client.cookies[COOKIE] != before  # no session fixation


def test_over_https_the_session_cookie_is_secure(state: State) -> None:
    with make_client(state, base_url="https://testserver") as client:
        # Execute
        page = client.get("/login")

        # Assert
        assert "secure" in page.headers["set-cookie"].lower()


def test_pages_forbid_framing_and_inline_script(logged_in: tuple[TestClient, str]) -> None:
    # Execute
    reply = logged_in[0].get("/")

    # Assert
    csp = reply.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["cache-control"] == "no-store"


def test_a_wrong_password_is_refused_and_repeated_failures_are_throttled(
    client: TestClient,
) -> None:
    # Prepare
    token = csrf_of(client.get("/login").text)
    bad = {"csrf_token": token, "username": ADMIN, "password": "not the password"}

    # Execute
    statuses = [client.post("/login", data=bad).status_code for _ in range(6)]
    correct = client.post("/login", data={**bad, "password": PASSWORD})

    # Assert
    assert statuses == [401] * 5 + [429]
    assert correct.status_code == 429  # even the right password waits out the window
    assert client.get("/").status_code == 303


def test_logout_ends_the_session(logged_in: tuple[TestClient, str]) -> None:
    # Prepare
    client, token = logged_in
    cookie = client.cookies[COOKIE]

    # Execute
    reply = client.post("/logout", data={"csrf_token": token})

    # Assert
    assert reply.status_code == 303
    client.cookies.set(COOKIE, cookie)  # replaying the old cookie does not help
    assert client.get("/").status_code == 303


def test_login_only_redirects_to_paths_on_this_console(client: TestClient) -> None:
    # Prepare
    page = client.get("/login")

    # Execute
    reply = client.post(
        "/login",
        data={
            "csrf_token": csrf_of(page.text),
            "username": ADMIN,
            "password": PASSWORD,
            "next": "//evil.example/phish",
        },
    )

    # Assert
    assert reply.headers["location"] == "/"


# ------------------------------------------------------------------ CSRF


@pytest.mark.parametrize(("path", "data"), ACTIONS)
@pytest.mark.parametrize("token", [None, "", "wrong"])
def test_every_action_needs_the_sessions_csrf_token(
    logged_in: tuple[TestClient, str],
    state: State,
    path: str,
    data: dict[str, str],
    token: str | None,
) -> None:
    # Prepare
    client, _ = logged_in
    form = dict(data) if token is None else {**data, "csrf_token": token}

    # Execute
    reply = client.post(path, data=form)

    # Assert
    assert reply.status_code == 403
    assert audit_actions(state) == ["login"]


def test_another_sessions_csrf_token_is_refused(state: State) -> None:
    with make_client(state) as client:
        # Prepare: two sessions of one console; the second must not accept the first's token
        first = login(client)
        client.cookies.clear()
        login(client)

        # Execute
        reply = client.post("/actions/pause", data={"csrf_token": first})

    # Assert
    assert reply.status_code == 403


def test_the_csrf_token_may_come_as_a_header(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Execute
    reply = logged_in[0].post("/actions/pause", headers={"X-CSRF-Token": logged_in[1]})

    # Assert
    assert reply.status_code == 303
    assert audit_actions(state)[0] == "training.pause"


def test_a_post_from_another_origin_is_refused_even_with_the_token(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Execute
    reply = logged_in[0].post(
        "/actions/pause",
        data={"csrf_token": logged_in[1]},
        headers={"Origin": "https://evil.example"},
    )

    # Assert
    assert reply.status_code == 403
    assert "training.pause" not in audit_actions(state)


def test_the_login_form_itself_needs_a_csrf_token(client: TestClient) -> None:
    # Prepare
    client.get("/login")

    # Execute
    reply = client.post("/login", data={"username": ADMIN, "password": PASSWORD})

    # Assert
    assert reply.status_code == 403


# ------------------------------------------------------------------ first start


def test_first_start_lets_the_setup_token_holder_set_the_password_once(state: State) -> None:
    # Prepare
    app = create_app(ConsoleConfig(data_dir=str(state.data_dir)))
    token = app.state.setup_token
    with TestClient(app, follow_redirects=False) as client:
        assert client.get("/login").headers["location"] == "/setup"
        csrf = csrf_of(client.get("/setup").text)
        form = {"csrf_token": csrf, "username": "ops", "password": "x" * 12, "password2": "x" * 12}

        # Execute
        wrong = client.post("/setup", data={**form, "token": "guess"})
        right = client.post("/setup", data={**form, "token": token})

        # Assert
        assert wrong.status_code == 400
        assert right.status_code == 303
        assert client.get("/").status_code == 200  # logged in as the new admin
    admin_file = state.data_dir / "console-admin.json"
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    assert "x" * 12 not in admin_file.read_text()
    assert app.state.setup_token is None
    assert audit_actions(state)[0] == "admin.setup"


def test_a_short_setup_password_is_refused_with_the_rule(state: State) -> None:
    # Prepare
    app = create_app(ConsoleConfig(data_dir=str(state.data_dir)))
    with TestClient(app, follow_redirects=False) as client:
        csrf = csrf_of(client.get("/setup").text)

        # Execute
        reply = client.post(
            "/setup",
            data={
                "csrf_token": csrf,
                "token": app.state.setup_token,
                "username": "ops",
                "password": "short",
                "password2": "short",
            },
        )

        # Assert
        assert reply.status_code == 400
        assert "at least 12 characters" in reply.text
    assert not (state.data_dir / "console-admin.json").exists()


# ------------------------------------------------------------------ pages


def test_the_users_list_searches_by_prefix_and_pages_by_keyset(state: State) -> None:
    with make_client(state, page_size=5) as client:
        login(client)

        # Execute
        first = client.get("/users")
        after = first.text.split("after=")[1].split('"')[0]
        second = client.get(f"/users?after={after}")
        found = client.get("/users?q=u-0003")

        # Assert
        assert first.status_code == second.status_code == found.status_code == 200
        assert all(u in first.text for u in state.users[:5])
        assert state.users[5] not in first.text and state.users[5] in second.text
        assert state.users[3] in found.text and state.users[4] not in found.text


def test_an_impossible_search_is_one_clear_message(logged_in: tuple[TestClient, str]) -> None:
    # Execute
    reply = logged_in[0].get("/users?q=%3Cscript%3E")

    # Assert
    assert reply.status_code == 400
    assert "search prefix" in reply.text and "<script>" not in reply.text


def test_a_users_page_shows_history_evaluations_and_backup_sizes(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Execute
    reply = logged_in[0].get(f"/users/{state.blob_user}")

    # Assert
    assert reply.status_code == 200
    text = reply.text
    assert text.count("heldout_loss_after") == 3
    assert "server r2: personal_loss 2.5" in text
    assert text.count("3.12 KiB") == 2  # the two backup blobs
    assert "pixel-7" in text


def test_an_unknown_user_is_a_404_page(logged_in: tuple[TestClient, str]) -> None:
    # Execute
    reply = logged_in[0].get("/users/nobody")

    # Assert
    assert reply.status_code == 404
    assert "nobody" in reply.text


def test_the_overview_charts_loss_and_bytes_per_round(logged_in: tuple[TestClient, str]) -> None:
    # Execute
    text = logged_in[0].get("/").text

    # Assert
    assert text.count('<polyline class="line series-') == 3
    assert text.count('<rect class="bar series-') == 6
    assert "personal, round 3: 2.3" in text
    assert "Final evaluation" in text


# ------------------------------------------------------------------ actions


def test_pause_and_resume_set_the_control_and_are_audited(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Prepare
    client, token = logged_in

    # Execute
    client.post("/actions/pause", data={"csrf_token": token})
    paused_page = client.get("/").text
    client.post("/actions/resume", data={"csrf_token": token})

    # Assert
    assert "training paused" in paused_page
    with Registry.open(state.registry_url) as reg:
        assert reg.get_control("training.paused") is False
        entries = reg.list_audit(limit=10).items
    assert [e.action for e in entries[:2]] == ["training.resume", "training.pause"]
    assert entries[0].actor == ADMIN and entries[0].detail["address"] == "testclient"


def test_rollback_moves_the_active_prior_and_records_from_what(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Prepare
    client, token = logged_in
    fp = state.spec.fingerprint()

    # Execute
    reply = client.post("/actions/rollback", data={"csrf_token": token, "spec": fp, "version": "1"})

    # Assert
    assert reply.status_code == 303
    with Registry.open(state.registry_url) as reg:
        active = reg.active_prior(fp)
        entry = reg.list_audit(limit=1).items[0]
    assert active is not None and active.version == 1
    assert entry.action == "prior.rollback" and entry.target.endswith("/v1")
    assert entry.detail["previous"].endswith("/v3")


def test_rollback_to_a_version_that_does_not_exist_changes_nothing(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Prepare
    client, token = logged_in
    fp = state.spec.fingerprint()

    # Execute
    client.post("/actions/rollback", data={"csrf_token": token, "spec": fp, "version": "9"})

    # Assert
    assert "no prior version 9" in client.get(f"/priors?spec={fp}").text
    with Registry.open(state.registry_url) as reg:
        active = reg.active_prior(fp)
    assert active is not None and active.version == 3
    assert audit_actions(state) == ["login"]


def test_revoke_marks_the_node_revoked_and_is_audited(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Prepare
    client, token = logged_in
    node = state.device_ids[1]

    # Execute
    client.post("/actions/revoke", data={"csrf_token": token, "device_id": str(node)})

    # Assert
    with Registry.open(state.registry_url) as reg:
        assert 4242 in reg.revoked_node_ids()
        assert reg.list_audit(limit=1).items[0].target == f"supernode:{node}"


def test_erase_deletes_the_users_blobs_on_disk_and_every_registry_row(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Prepare
    client, token = logged_in
    user = state.blob_user
    files = [state.blob_root / "objects" / s[:2] / s for s in state.blob_shas]
    assert all(f.exists() for f in files)

    # Execute
    reply = client.post(
        "/actions/erase", data={"csrf_token": token, "pseudonym": user, "confirm": user}
    )

    # Assert
    assert reply.status_code == 303
    assert not any(f.exists() for f in files)
    with Registry.open(state.registry_url) as reg:
        assert [u.pseudonym for u in reg.search_users(user).items] == []
        assert reg.list_devices(kind="device").items == ()
        entry = reg.list_audit(limit=1).items[0]
    assert entry.action == "user.erase" and entry.target == f"user:{user}"
    assert entry.detail["blob_files"] == 2 and entry.detail["versions"] == 3
    listing = client.get("/users").text
    assert f"erased {user}" in listing and f'href="/users/{user}"' not in listing


def test_erase_without_the_typed_confirmation_deletes_nothing(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    # Prepare
    client, token = logged_in

    # Execute
    client.post(
        "/actions/erase", data={"csrf_token": token, "pseudonym": state.blob_user, "confirm": ""}
    )

    # Assert
    with Registry.open(state.registry_url) as reg:
        assert reg.get_user(state.blob_user).pseudonym == state.blob_user
    assert "user.erase" not in audit_actions(state)


def test_erase_is_refused_when_blobs_exist_but_no_blob_store_is_configured(
    state: State,
) -> None:
    with make_client(state, blob_store=False) as client:
        token = login(client)

        # Execute
        client.post(
            "/actions/erase",
            data={"csrf_token": token, "pseudonym": state.blob_user, "confirm": state.blob_user},
        )

        # Assert
        assert "no blob store" in client.get(f"/users/{state.blob_user}").text
    with Registry.open(state.registry_url) as reg:
        assert len(reg.list_blobs(state.blob_user).items) == 2
