"""The console for operators who script: the JSON API, previous/next links, the rounds page."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from lorafleet.server.registry import Registry

from .conftest import ADMIN, PASSWORD, State, login, make_client

API = [
    "/api/v1/overview",
    "/api/v1/rounds",
    "/api/v1/users",
    "/api/v1/users/{user}",
    "/api/v1/priors",
    "/api/v1/nodes",
    "/api/v1/audit",
]


def hrefs(html: str, rel: str) -> list[str]:
    return [h.replace("&amp;", "&") for h in re.findall(rf'rel="{rel}"[^>]*href="([^"]+)"', html)]


# ------------------------------------------------------------------ authorization


@pytest.mark.parametrize("path", API)
def test_the_api_answers_401_in_json_without_a_logged_in_session(
    client: TestClient, state: State, path: str
) -> None:
    # Prepare: a pre-login session (what GET /login gives) is not enough
    client.get("/api/v1/session")

    # Execute
    reply = client.get(path.format(user=state.blob_user))

    # Assert
    assert reply.status_code == 401
    assert reply.headers["content-type"].startswith("application/json")
    assert "log in first" in reply.json()["error"]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", API)
def test_the_api_has_no_write_methods(
    logged_in: tuple[TestClient, str], state: State, path: str, method: str
) -> None:
    client, csrf = logged_in

    # Execute: even with the session's CSRF token
    reply = client.request(
        method, path.format(user=state.blob_user), headers={"X-CSRF-Token": csrf}
    )

    # Assert
    assert reply.status_code == 405
    with Registry.open(state.registry_url) as reg:
        assert [e.action for e in reg.list_audit(limit=10).items] == ["login"]


def test_a_script_logs_in_with_json_and_a_header_only(state: State) -> None:
    with make_client(state) as client:
        # Execute: the session endpoint hands out the CSRF token; the form takes it as a header
        before = client.get("/api/v1/session").json()
        reply = client.post(
            "/login",
            data={"username": ADMIN, "password": PASSWORD},
            headers={"X-CSRF-Token": before["csrf_token"]},
        )
        after = client.get("/api/v1/session").json()
        users = client.get("/api/v1/users")

    # Assert
    assert before["user"] is None
    assert reply.status_code == 303
    assert after["user"] == ADMIN and after["csrf_token"] != before["csrf_token"]
    assert users.status_code == 200 and users.json()["page"] == "users"


# ------------------------------------------------------------------ the same data as the pages


def test_each_api_document_holds_what_its_page_shows(
    logged_in: tuple[TestClient, str], state: State
) -> None:
    client, _ = logged_in

    # Execute
    overview = client.get("/api/v1/overview").json()
    rounds = client.get("/api/v1/rounds").json()
    users = client.get("/api/v1/users").json()
    user = client.get(f"/api/v1/users/{state.blob_user}").json()
    priors = client.get("/api/v1/priors").json()
    nodes = client.get("/api/v1/nodes").json()
    users_page = client.get("/users").text
    rounds_page = client.get("/rounds").text

    # Assert: the figures and rows of the pages, as data
    assert overview["counts"]["users"] == len(state.users)
    assert overview["active"]["ref"].endswith("v3") and overview["paused"] is False
    assert [p["loss"] for p in overview["loss_per_round"]["prior"]] == [3.10, 2.80, 2.60]
    assert overview["final"]["nodes"] == 3
    assert [
        (r["number"], r["status"], r["config"].get("attempts", 1)) for r in rounds["rounds"]
    ] == [
        (3, "finished", 1),
        (2, "finished", 2),
        (1, "finished", 1),
    ]
    assert rounds_page.count('<tr class="status-') == len(rounds["rounds"])
    assert rounds["rounds"][0]["duration_s"] is not None
    assert [u["pseudonym"] for u in users["users"]] == list(state.users)
    assert all(u["pseudonym"] in users_page for u in users["users"])
    assert users["latest"][state.users[0]]["version"] == 3
    assert [v["version"] for v in user["history"]] == [3, 2, 1]
    assert sorted(b["sha256"] for b in user["blobs"]) == sorted(state.blob_shas)
    assert user["devices"][0]["name"] == "pixel-7"
    assert [p["version"] for p in priors["priors"]] == [3, 2, 1]
    assert sorted(n["name"] for n in nodes["nodes"]) == ["pixel-7", "supernode-a", "supernode-b"]


def test_the_rounds_page_is_in_the_menu_and_pages_back_and_forth(state: State) -> None:
    with make_client(state, page_size=2) as client:
        login(client)

        # Execute
        first = client.get("/rounds")
        second = client.get(hrefs(first.text, "next")[0])
        back = client.get(hrefs(second.text, "prev")[0])
        overview = client.get("/")

    # Assert
    assert first.status_code == second.status_code == back.status_code == 200
    assert '<a href="/rounds"' in overview.text and 'id="older-rounds"' in overview.text
    assert hrefs(first.text, "prev") == []
    assert hrefs(second.text, "next") == []  # three rounds, two a page
    assert re.findall(r"<tr class=\"status-\w+\">\s*<td>(\d+)", back.text) == ["3", "2"]
    assert re.findall(r"<tr class=\"status-\w+\">\s*<td>(\d+)", second.text) == ["1"]


@pytest.mark.parametrize("path", ["/users", "/audit", "/nodes", "/priors"])
def test_previous_links_lead_back_to_the_page_before(state: State, path: str) -> None:
    with make_client(state, page_size=1) as client:
        login(client)
        for _ in range(3):  # some audit entries to page through
            client.get("/api/v1/session")
            client.post(
                "/actions/pause",
                headers={"X-CSRF-Token": client.get("/api/v1/session").json()["csrf_token"]},
            )

        # Execute: forward twice through the pages, then back once
        first = client.get(path)
        second = client.get(hrefs(first.text, "next")[0])
        third = client.get(hrefs(second.text, "next")[0])
        back = client.get(hrefs(third.text, "prev")[0])

    # Assert: back is the second page again, and it links on both sides
    assert back.status_code == 200
    assert back.text.split("<main>")[1] == second.text.split("<main>")[1]
    assert hrefs(back.text, "prev") and hrefs(back.text, "next")
    assert hrefs(first.text, "prev") == []


def test_api_documents_carry_their_page_links(state: State) -> None:
    with make_client(state, page_size=5) as client:
        login(client)

        # Execute
        first = client.get("/api/v1/users?q=u-00").json()
        second = client.get(first["links"]["next"]).json()
        back = client.get(second["links"]["prev"]).json()

    # Assert: links stay in the API and keep the search
    assert first["links"]["next"].startswith("/api/v1/users?q=u-00&after=")
    assert first["links"]["prev"] is None and first["prev_before"] is None
    assert [u["pseudonym"] for u in second["users"]] == list(state.users[5:10])
    assert back["users"] == first["users"]


# ------------------------------------------------------------------ untrusted query parameters


@pytest.mark.parametrize(
    "query",
    [
        "after=abc",
        "after=-1",
        "before=1e3",
        "after=99999999999999999999999",
        "before=%00",
        "after=1&before=3",
    ],
)
@pytest.mark.parametrize("path", ["/rounds", "/priors", "/nodes", "/audit", "/users/{user}"])
def test_a_bad_page_cursor_is_one_400_message_on_the_page_and_the_api(
    logged_in: tuple[TestClient, str], state: State, path: str, query: str
) -> None:
    client, _ = logged_in
    path = path.format(user=state.blob_user)

    # Execute
    page = client.get(f"{path}?{query}")
    api = client.get(f"/api/v1{path}?{query}")

    # Assert
    assert page.status_code == api.status_code == 400
    assert "Bad request" in page.text and "Traceback" not in page.text
    message = api.json()["error"]
    assert ("after" in message or "before" in message) and "\n" not in message


@pytest.mark.parametrize("query", ["after=%3Cscript%3E", "before=" + "x" * 300, "q=%3Cscript%3E"])
def test_a_bad_users_cursor_or_search_is_a_400_not_a_500(
    logged_in: tuple[TestClient, str], query: str
) -> None:
    client, _ = logged_in

    # Execute
    page = client.get(f"/users?{query}")
    api = client.get(f"/api/v1/users?{query}")

    # Assert
    assert page.status_code == api.status_code == 400
    assert "<script>" not in page.text
    assert api.json()["error"]


def test_an_unknown_user_is_a_404_in_json(logged_in: tuple[TestClient, str]) -> None:
    # Execute
    reply = logged_in[0].get("/api/v1/users/nobody-here")

    # Assert
    assert reply.status_code == 404
    assert "nobody-here" in reply.json()["error"]
