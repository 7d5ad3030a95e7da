"""A coordinator's state as a finished federation leaves it, and a console over it.

The registry is filled through its public API (rounds, priors with metrics, users with
versions, evaluations and backup blobs, enrolled devices, SuperNodes) and results.json
is written in the layout ``server.flower_app.run_federation`` writes, so the console
sees what it sees after a real run, in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafleet.protocols.crypto import ScryptParams
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.console import AdminStore, ConsoleConfig, create_app
from lorafleet.server.console.app import blob_store_eraser
from lorafleet.server.registry import Registry, prior_ref

ADMIN = "admin"
PASSWORD = "correct horse battery staple"
CHEAP_KDF = ScryptParams(log2_n=4)  # tests only: production uses Argon2id at 64 MiB
SPEC = AdapterSpec(base_model_id="tiny", base_sha256=hashlib.sha256(b"tiny").hexdigest(), rank=4)
LOSSES = {  # round -> mean held-out loss of base, prior and personal adapter
    1: {"base_loss": 3.40, "prior_loss": 3.10, "personal_loss": 2.90},
    2: {"base_loss": 3.40, "prior_loss": 2.80, "personal_loss": 2.50},
    3: {"base_loss": 3.40, "prior_loss": 2.60, "personal_loss": 2.30},
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class State:
    """What the fixture built, for assertions."""

    data_dir: Path
    registry_url: str
    blob_root: Path
    users: tuple[str, ...]
    blob_user: str
    blob_shas: tuple[str, ...]
    device_ids: tuple[int, ...]
    spec: AdapterSpec


def build_state(data_dir: Path, *, n_users: int = 12) -> State:
    """Three finished rounds (round 2 retried once), priors v1..v3, users, blobs, nodes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{data_dir / 'registry.db'}"
    blob_root = data_dir / "blobs"
    store = BlobStore(blob_root)
    fp = SPEC.fingerprint()
    rounds_json = []
    with Registry.open(url) as reg:
        for number in (1, 2, 3):
            attempts = [False, True] if number == 2 else [True]
            for attempt, succeeds in enumerate(attempts):
                r = reg.start_round(
                    SPEC, number, config={"aggregator": "fedavg"}, retry=attempt > 0
                )
                if not succeeds:
                    reg.finish_round(
                        r.id,
                        participants=1,
                        dropouts=2,
                        refused=1,
                        bytes_up=20_000,
                        bytes_down=120_000,
                        status="failed",
                    )
                    rounds_json.append(
                        {
                            "round": number,
                            "attempt": attempt,
                            "sampled": 3,
                            "accepted": 1,
                            "refused": {"7": "norm too large"},
                            "dropouts": 2,
                            "bytes_up": 20_000,
                            "bytes_down": 120_000,
                            "seconds": 4.0,
                            "prior_version": None,
                            "metrics": {},
                        }
                    )
                    continue
                reg.add_prior_version(
                    SPEC,
                    number,
                    content_hash=sha(f"prior-{number}"),
                    size_bytes=48_000,
                    round=number,
                    metrics=LOSSES[number],
                    activate=True,
                )
                reg.finish_round(
                    r.id,
                    participants=3,
                    dropouts=0,
                    refused=0,
                    bytes_up=3 * 24_000,
                    bytes_down=3 * 48_000,
                    prior_ref=prior_ref(fp, number),
                    dp_epsilon=0.5 * number,
                    dp_delta=1e-5,
                )
                rounds_json.append(
                    {
                        "round": number,
                        "attempt": attempt,
                        "sampled": 3,
                        "accepted": 3,
                        "refused": {},
                        "dropouts": 0,
                        "bytes_up": 72_000,
                        "bytes_down": 144_000,
                        "seconds": 5.0,
                        "prior_version": prior_ref(fp, number),
                        "metrics": {
                            str(n): {**LOSSES[number], "num_examples": 10} for n in (1, 2, 3)
                        },
                    }
                )
        users = tuple(f"u-{i:04d}-{sha(str(i))[:8]}" for i in range(n_users))
        ids = reg.ensure_users(users)
        for i, pseudonym in enumerate(users):
            adapter = reg.create_adapter(ids[pseudonym], "default", SPEC)
            for v in (1, 2, 3):
                version = reg.add_version(
                    adapter,
                    AdapterProvenance(
                        spec=SPEC,
                        version=v,
                        content_hash=sha(f"{pseudonym}-{v}"),
                        parent=v - 1 if v > 1 else None,
                        prior_version=prior_ref(fp, v),
                        round=v,
                        created_at=f"2026-05-2{v}T10:00:00Z",
                        metrics={"heldout_loss_before": 3.4, "heldout_loss_after": 3.0 - 0.2 * v},
                    ),
                    size_bytes=24_000 + v,
                    num_params=6144,
                )
                if i == 0:
                    reg.add_evaluation(
                        version.id, {"personal_loss": 2.9 - 0.2 * v}, source="server", round=v
                    )
        blob_user = users[0]
        shas = []
        for v in (1, 2):
            data = f"ciphertext of {blob_user} v{v}".encode() * 100
            digest = store.put(data)
            shas.append(digest)
            reg.put_blob_meta(
                blob_user,
                f"b{v}-{sha(blob_user)[:12]}",
                size_bytes=len(data),
                sha256=digest,
                adapter_id=adapter_of(reg, blob_user),
                version=v,
            )
        token = reg.issue_enrolment_token(blob_user)
        phone = reg.redeem_enrolment_token(token, bytes(range(32)), name="pixel-7")
        node = reg.register_node(4242, name="supernode-a")
        reg.register_node(4343, name="supernode-b")
    results = {
        "prior_version": prior_ref(fp, 3),
        "rounds": rounds_json,
        "evaluation": {str(n): {**LOSSES[3], "num_examples": 10} for n in (1, 2, 3)},
        "bytes_up_per_client": 24_000.0,
    }
    (data_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return State(
        data_dir=data_dir,
        registry_url=url,
        blob_root=blob_root,
        users=users,
        blob_user=blob_user,
        blob_shas=tuple(shas),
        device_ids=(int(phone.id), int(node.id)),
        spec=SPEC,
    )


def adapter_of(reg: Registry, pseudonym: str) -> int:
    found = reg.find_adapter(pseudonym, "default")
    assert found is not None
    return int(found.id)


@pytest.fixture
def state(tmp_path: Path) -> State:
    return build_state(tmp_path / "coordinator")


def make_client(
    state: State,
    *,
    admin: bool = True,
    base_url: str = "http://testserver",
    blob_store: bool = True,
    **config: object,
) -> TestClient:
    if admin:
        AdminStore(state.data_dir).set_password(ADMIN, PASSWORD, params=CHEAP_KDF)
    app = create_app(
        ConsoleConfig(data_dir=str(state.data_dir), **config),  # type: ignore[arg-type]
        on_erase=blob_store_eraser(BlobStore(state.blob_root)) if blob_store else None,
    )
    return TestClient(app, base_url=base_url, follow_redirects=False)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def login(client: TestClient, password: str = PASSWORD, username: str = ADMIN) -> str:
    """Log in through the form; returns the logged-in session's CSRF token."""
    page = client.get("/login")
    assert page.status_code == 200, page.text
    reply = client.post(
        "/login",
        data={
            "csrf_token": csrf_of(page.text),
            "username": username,
            "password": password,
            "next": "/",
        },
    )
    assert reply.status_code == 303, reply.text
    return csrf_of(client.get("/").text)


@pytest.fixture
def client(state: State) -> Iterator[TestClient]:
    with make_client(state) as c:
        yield c


@pytest.fixture
def logged_in(client: TestClient) -> tuple[TestClient, str]:
    return client, login(client)
