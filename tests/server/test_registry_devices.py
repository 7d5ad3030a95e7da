"""Registry: enrolled devices and SuperNodes, enrolment tokens, audit log, controls, DP per round."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import select, update

from lorafleet.protocols import AdapterSpec
from lorafleet.server.registry import (
    AuthorizationError,
    ConflictError,
    DeviceId,
    NotFoundError,
    Registry,
    RegistryValueError,
)
from lorafleet.server.registry.database import (
    alembic_config,
    create_registry_engine,
    parse_url,
    write_connection,
)
from lorafleet.server.registry.models import devices, enrolment_tokens

SPEC = AdapterSpec(base_model_id="tiny", base_sha256="a" * 64)


@pytest.fixture
def reg(registry_url: str) -> Iterator[Registry]:
    registry = Registry.open(registry_url)
    yield registry
    registry.close()


def key(n: int) -> bytes:
    return bytes([n]) * 32


def test_a_token_enrols_exactly_one_device_of_its_user(reg: Registry) -> None:
    # Prepare
    reg.ensure_user("alice")
    token = reg.issue_enrolment_token("alice")

    # Execute
    device = reg.redeem_enrolment_token(token, key(1), name="alice-phone")

    # Assert
    assert (device.kind, device.pseudonym, device.name, device.public_key) == (
        "device",
        "alice",
        "alice-phone",
        key(1),
    )
    assert not device.revoked and device.last_seen_at is not None
    assert reg.find_device_by_key(key(1)) == device
    with pytest.raises(AuthorizationError, match="unknown, used or expired"):
        reg.redeem_enrolment_token(token, key(2), name="second")
    assert reg.find_device_by_key(key(2)) is None


def test_only_the_tokens_digest_is_stored(reg: Registry) -> None:
    # Prepare
    reg.ensure_user("alice")

    # Execute
    token = reg.issue_enrolment_token("alice")

    # Assert
    with reg.engine.connect() as conn:
        stored = conn.execute(select(enrolment_tokens.c.token_sha256)).scalars().all()
    assert len(stored) == 1 and token not in stored[0]


def test_an_expired_or_unknown_token_is_refused_without_echoing_it(reg: Registry) -> None:
    # Prepare
    reg.ensure_user("alice")
    token = reg.issue_enrolment_token("alice", ttl_s=60)
    with reg.engine.begin() as conn:
        expires = conn.execute(select(enrolment_tokens.c.expires_at)).scalar_one()
        conn.execute(update(enrolment_tokens).values(expires_at=expires - timedelta(hours=1)))

    # Execute / Assert
    for bad in (token, "x" * 43):
        with pytest.raises(AuthorizationError) as err:
            reg.redeem_enrolment_token(bad, key(1), name="phone")
        assert bad not in str(err.value)


def test_a_key_enrols_once_even_after_revocation(reg: Registry) -> None:
    # Prepare
    reg.ensure_user("alice")
    first = reg.redeem_enrolment_token(reg.issue_enrolment_token("alice"), key(1), name="a")
    revoked = reg.revoke_device(first.id)

    # Execute / Assert
    with pytest.raises(ConflictError, match="already enrolled"):
        reg.redeem_enrolment_token(reg.issue_enrolment_token("alice"), key(1), name="b")
    assert revoked.revoked
    assert reg.revoke_device(first.id).revoked_at == revoked.revoked_at  # idempotent


@pytest.mark.parametrize(
    ("public_key", "name", "error"),
    [
        (b"short", "phone", "32-byte"),
        (key(1), "has space", "device name"),
    ],
)
def test_bad_enrolment_input_is_one_clear_line(
    reg: Registry, public_key: bytes, name: str, error: str
) -> None:
    # Prepare
    reg.ensure_user("alice")
    token = reg.issue_enrolment_token("alice")

    # Execute / Assert
    with pytest.raises(RegistryValueError, match=error):
        reg.redeem_enrolment_token(token, public_key, name=name)


def test_supernodes_are_registered_once_touched_and_revoked(reg: Registry) -> None:
    # Prepare
    big = 14781019532714943782  # Flower node ids are unsigned 64-bit
    first = reg.register_node(big)

    # Execute
    again = reg.register_node(big)
    reg.register_node(7)
    reg.revoke_device(again.id)

    # Assert
    assert again.id == first.id and again.kind == "supernode" and again.user_id is None
    assert again.last_seen_at is not None and first.last_seen_at is not None
    assert again.last_seen_at >= first.last_seen_at
    assert reg.revoked_node_ids() == frozenset({big})
    with pytest.raises(RegistryValueError, match="node id"):
        reg.register_node(2**64)
    assert reg.find_node(7) is not None and reg.find_node(8) is None


def test_devices_list_newest_first_by_kind_and_user(reg: Registry) -> None:
    # Prepare
    reg.ensure_users(["alice", "bob"])
    a = reg.redeem_enrolment_token(reg.issue_enrolment_token("alice"), key(1), name="a1")
    b = reg.redeem_enrolment_token(reg.issue_enrolment_token("bob"), key(2), name="b1")
    n = reg.register_node(3)

    # Execute
    first = reg.list_devices(limit=2)
    rest = reg.list_devices(limit=2, after=DeviceId(first.next_after or 0))

    # Assert
    assert [d.id for d in first.items + rest.items] == [n.id, b.id, a.id]
    assert rest.next_after is None
    assert [d.id for d in reg.list_devices(kind="device").items] == [b.id, a.id]
    assert [d.id for d in reg.list_devices(user="alice").items] == [a.id]
    with pytest.raises(RegistryValueError, match="device kind"):
        reg.list_devices(kind="phone")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        reg.get_device(DeviceId(999))


def test_erasing_a_user_deletes_their_devices_and_tokens_only(reg: Registry) -> None:
    # Prepare
    reg.ensure_users(["alice", "bob"])
    reg.redeem_enrolment_token(reg.issue_enrolment_token("alice"), key(1), name="a1")
    reg.issue_enrolment_token("alice")
    bob = reg.redeem_enrolment_token(reg.issue_enrolment_token("bob"), key(2), name="b1")
    reg.register_node(5)

    # Execute
    counts = reg.erase_user("alice")

    # Assert
    assert counts.devices == 1
    with reg.engine.connect() as conn:
        left = conn.execute(select(devices.c.id)).scalars().all()
        tokens = conn.execute(select(enrolment_tokens.c.user_id)).scalars().all()
    assert len(left) == 2 and bob.id in left
    assert set(tokens) == {bob.user_id}


def test_the_audit_log_pages_newest_first_and_keeps_details(reg: Registry) -> None:
    # Prepare
    for i in range(3):
        reg.record_audit("admin", "prior.rollback", f"cohort-{i}", {"to": i})

    # Execute
    page = reg.list_audit(limit=2)
    rest = reg.list_audit(after=page.next_after, limit=2)

    # Assert
    assert [e.target for e in page.items + rest.items] == ["cohort-2", "cohort-1", "cohort-0"]
    assert page.items[0].detail == {"to": 2} and page.items[0].actor == "admin"
    with pytest.raises(RegistryValueError, match="JSON"):
        reg.record_audit("admin", "x", "y", {"bad": object()})


def test_controls_default_then_hold_the_last_value(reg: Registry) -> None:
    # Prepare
    assert reg.get_control("training.paused", False) is False

    # Execute
    reg.set_control("training.paused", True)
    reg.set_control("training.paused", False)
    reg.set_control("note", {"a": [1, 2]})

    # Assert
    assert reg.get_control("training.paused") is False
    assert reg.get_control("note") == {"a": [1, 2]}


def test_a_round_records_the_privacy_spent(reg: Registry) -> None:
    # Prepare
    plain = reg.start_round(SPEC, 1)
    private = reg.start_round(SPEC, 2)

    # Execute
    plain = reg.finish_round(plain.id, participants=3)
    private = reg.finish_round(private.id, participants=3, dp_epsilon=1.25, dp_delta=1e-5)

    # Assert
    assert (plain.dp_epsilon, plain.dp_delta) == (None, None)
    assert (private.dp_epsilon, private.dp_delta) == (1.25, 1e-5)
    third = reg.start_round(SPEC, 3)
    with pytest.raises(RegistryValueError, match="dp_epsilon"):
        reg.finish_round(third.id, participants=1, dp_epsilon=float("nan"))


def test_a_registry_at_revision_0001_upgrades_in_place(registry_url: str) -> None:
    # Prepare: a database created by the previous release, holding one finished round
    engine = create_registry_engine(parse_url(registry_url))
    config = alembic_config()
    with write_connection(engine) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    engine.dispose()

    # Execute
    reg = Registry.open(registry_url)
    try:
        started = reg.start_round(SPEC, 1)
        done = reg.finish_round(started.id, participants=2, dp_epsilon=0.5, dp_delta=1e-6)
    finally:
        reg.close()

    # Assert
    assert done.dp_epsilon == 0.5


def test_cohorts_are_listed_latest_first_whether_they_ran_rounds_or_only_hold_a_prior(
    reg: Registry,
) -> None:
    # Prepare: cohort A ran a round; cohort B later only got a prior (no round yet)
    other = AdapterSpec(base_model_id="tiny", base_sha256="b" * 64)
    reg.start_round(SPEC, 1)
    reg.add_prior_version(other, 1, content_hash="c" * 64, size_bytes=10)

    # Execute
    cohorts = reg.list_cohorts()

    # Assert
    assert cohorts == [other.fingerprint(), SPEC.fingerprint()]


def test_a_blob_shared_with_another_user_is_detected(reg: Registry) -> None:
    # Prepare
    reg.ensure_users(["alice", "bob", "carol"])
    reg.put_blob_meta("alice", "a-1", size_bytes=3, sha256="d" * 64)
    reg.put_blob_meta("bob", "b-1", size_bytes=3, sha256="d" * 64)
    reg.put_blob_meta("carol", "c-1", size_bytes=3, sha256="e" * 64)

    # Execute / Assert
    assert reg.blob_shared_with_others("d" * 64, "alice")
    assert not reg.blob_shared_with_others("e" * 64, "carol")
