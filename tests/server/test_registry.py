"""The adapter registry on SQLite and on a real PostgreSQL server (see conftest.py)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text, update
from sqlalchemy.exc import DBAPIError

from lorafleet.protocols import AdapterProvenance, AdapterSpec, LorafleetError
from lorafleet.server.registry import (
    AdapterId,
    ConflictError,
    NewVersion,
    NotFoundError,
    Registry,
    RegistryError,
    RegistryValueError,
    UnavailableError,
    VersionId,
    parse_url,
    prior_ref,
)
from lorafleet.server.registry.database import current_revision, head_revision
from lorafleet.server.registry.models import (
    VERSION_TABLE,
    adapter_versions,
    adapters,
    blobs,
    evaluations,
    metadata,
)

SPEC = AdapterSpec(base_model_id="smollm2-135m-instruct", base_sha256="a" * 64)
OTHER_SPEC = AdapterSpec(base_model_id="smollm2-135m-instruct", base_sha256="a" * 64, rank=4)
TABLES = {
    "users",
    "specs",
    "adapters",
    "adapter_versions",
    "evaluations",
    "prior_versions",
    "active_priors",
    "rounds",
    "blobs",
    "prior_evaluations",
    "prior_decisions",
}


def chash(n: int) -> str:
    return f"{n:064x}"


def prov(
    version: int, parent: int | None = None, spec: AdapterSpec = SPEC, **kw: object
) -> AdapterProvenance:
    return AdapterProvenance(
        spec=spec,
        version=version,
        content_hash=chash(version),
        parent=parent,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def reg(registry_url: str) -> Iterator[Registry]:
    with Registry.open(registry_url) as registry:
        yield registry


def new_adapter(
    reg: Registry, pseudonym: str = "u-1", name: str = "default", spec: AdapterSpec = SPEC
) -> AdapterId:
    return reg.create_adapter(reg.ensure_user(pseudonym), name, spec)


def add_chain(
    reg: Registry, adapter: AdapterId, n: int, spec: AdapterSpec = SPEC
) -> list[VersionId]:
    items = [
        NewVersion(adapter, prov(v, v - 1 if v > 1 else None, spec), size_bytes=100 + v)
        for v in range(1, n + 1)
    ]
    return reg.add_versions(items)


# ---------------------------------------------------------------- opening and migrations


def test_open_migrates_a_fresh_database_to_head_and_reopening_is_idempotent(
    registry_url: str,
) -> None:
    # Execute
    with Registry.open(registry_url) as first:
        adapter = new_adapter(first)
        add_chain(first, adapter, 2)
    with Registry.open(registry_url) as second:
        with second.engine.connect() as conn:
            revision = current_revision(conn)
            tables = set(inspect(conn).get_table_names())
        latest = second.latest_version(adapter)

    # Assert
    assert revision == head_revision()
    assert TABLES | {VERSION_TABLE} <= tables
    assert latest is not None and latest.version == 2  # reopening kept the data


def test_migrations_create_exactly_the_models_schema(reg: Registry) -> None:
    # Execute
    with reg.engine.connect() as conn:
        diffs = compare_metadata(
            MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
            ),
            metadata,
        )

    # Assert
    assert diffs == []


def test_a_database_migrated_by_a_newer_lorafleet_is_refused(registry_url: str) -> None:
    # Prepare
    with Registry.open(registry_url) as reg, reg.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))

    # Execute
    with pytest.raises(RegistryError) as err:
        Registry.open(registry_url)

    # Assert
    assert "9999" in str(err.value) and "upgrade lorafleet" in str(err.value)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    # Prepare
    with Registry.open(f"sqlite:///{tmp_path}/r.db") as reg, reg.engine.connect() as conn:
        # Execute
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        fks = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()

    # Assert
    assert (mode, fks) == ("wal", 1)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://root:hunter2@db/reg", "not supported"),
        ("postgresql+psycopg://me:hunter2@db:5432", "names no database"),
        ("", "empty"),
        ("postgresql://me:hunter2@db:notaport/reg", "not a database URL"),
    ],
)
def test_a_bad_url_is_one_line_without_the_password(url: str, expected: str) -> None:
    # Execute
    with pytest.raises(RegistryError) as err:
        Registry.open(url)

    # Assert
    message = str(err.value)
    assert expected in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_an_unreachable_server_is_one_line_naming_host_and_port_not_password() -> None:
    # Prepare: a loopback port nobody listens on
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    # Execute
    with pytest.raises(UnavailableError) as err:
        Registry.open(f"postgresql://lorafleet:s3cret-pw@127.0.0.1:{port}/registry")

    # Assert
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message
    assert "start the server" in message
    assert "s3cret-pw" not in message
    assert "\n" not in message
    assert isinstance(err.value, LorafleetError)


def test_an_sqlite_path_that_cannot_be_opened_is_one_clear_line(tmp_path: Path) -> None:
    # Prepare: the "database file" is a folder
    (tmp_path / "registry.db").mkdir()

    # Execute
    with pytest.raises(UnavailableError) as err:
        Registry.open(tmp_path / "registry.db")

    # Assert
    assert "cannot open the SQLite registry" in str(err.value)
    assert "\n" not in str(err.value)


def test_pseudonyms_sort_bytewise_on_postgresql_whatever_the_cluster_locale(
    postgres_server: Any,  # conftest.PostgresServer
) -> None:
    # Prefix search is a range scan only if the column sorts by code point; clusters
    # initialized with en_US etc. would not, so the column carries collation "C" itself.
    url = postgres_server.create_database()
    try:
        with Registry.open(url) as reg, reg.engine.connect() as conn:
            collation = conn.execute(
                text(
                    "SELECT collation_name FROM information_schema.columns "
                    "WHERE table_name = 'users' AND column_name = 'pseudonym'"
                )
            ).scalar()
    finally:
        postgres_server.drop_database(url)
    assert collation == "C"


def test_postgresql_urls_default_to_psycopg_3() -> None:
    assert parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"


# ---------------------------------------------------------------- users and adapters


def test_ensure_user_is_idempotent_and_batches_agree(reg: Registry) -> None:
    # Execute
    first = reg.ensure_user("u-1")
    again = reg.ensure_user("u-1")
    batch = reg.ensure_users(["u-2", "u-1", "u-3", "u-2"])

    # Assert
    assert first == again == batch["u-1"]
    assert sorted(batch) == ["u-1", "u-2", "u-3"]
    assert len(set(batch.values())) == 3


@pytest.mark.parametrize("bad", ["", "has space", "ünïcode", "x" * 129, "a/b"])
def test_a_bad_pseudonym_is_refused_by_name(reg: Registry, bad: str) -> None:
    with pytest.raises(RegistryValueError, match="pseudonym"):
        reg.ensure_user(bad)


def test_adapter_names_are_unique_per_user_and_users_must_exist(reg: Registry) -> None:
    # Prepare
    user = reg.ensure_user("u-1")
    reg.create_adapter(user, "default", SPEC)

    # Execute / Assert
    with pytest.raises(ConflictError, match="already has an adapter named 'default'"):
        reg.create_adapter(user, "default", OTHER_SPEC)
    with pytest.raises(NotFoundError, match="ghost"):
        reg.create_adapter("ghost", "default", SPEC)
    other = reg.create_adapter("u-1", "work", OTHER_SPEC)  # by pseudonym
    assert reg.get_adapter(other).spec == OTHER_SPEC
    assert [a.name for a in reg.list_adapters(user)] == ["default", "work"]
    assert reg.find_adapter("u-1", "nope") is None


# ---------------------------------------------------------------- versions


def test_provenance_round_trips_exactly(registry_url: str) -> None:
    # Prepare: every provenance field set, a non-default spec
    spec = AdapterSpec(
        base_model_id="hf/some-model",
        base_sha256="b" * 64,
        rank=4,
        alpha=7.5,
        target_modules=("v_proj", "o_proj", "q_proj"),
        cohort_seed=2**63 - 1,
        a_init="sign",
        dtype="bfloat16",
    )
    v1 = prov(1, spec=spec, metrics={"heldout_loss_after": 2.718281828459045})
    v2 = AdapterProvenance(
        spec=spec,
        version=2,
        content_hash=chash(2),
        parent=1,
        prior_version="0123456789abcdef/v7",
        round=12,
        created_at="2026-05-20T10:11:12.123456Z",
        metrics={"heldout_loss_before": 3.25, "heldout_loss_after": 0.1 + 0.2, "steps": 45},
    )
    with Registry.open(registry_url) as reg:
        adapter = new_adapter(reg, spec=spec)
        reg.add_version(adapter, v1, size_bytes=4096, num_params=1024)
        stored = reg.add_version(adapter, v2, size_bytes=8192)

    # Execute: a fresh registry, so the spec comes from the database, not a cache
    with Registry.open(registry_url) as fresh:
        by_id = fresh.get_version(stored.id)
        by_number = fresh.get_adapter_version(adapter, 2)
        first = fresh.get_adapter_version(adapter, 1)

    # Assert
    assert by_id.provenance == v2
    assert by_id.provenance.to_json() == v2.to_json()
    assert by_number == by_id
    assert first.provenance == v1 and first.num_params == 1024 and first.size_bytes == 4096
    assert by_id.pseudonym == "u-1" and by_id.adapter_name == "default"
    assert by_id.registered_at.tzinfo == UTC


def test_a_duplicate_version_is_refused_and_the_stored_one_kept(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    add_chain(reg, adapter, 2)
    rewrite = AdapterProvenance(spec=SPEC, version=2, content_hash="f" * 64, parent=1)

    # Execute
    with pytest.raises(ConflictError) as err:
        reg.add_version(adapter, rewrite, size_bytes=1)

    # Assert
    assert "already has version 2" in str(err.value) and "e.g. 3" in str(err.value)
    assert reg.get_adapter_version(adapter, 2).provenance.content_hash == chash(2)


def test_stored_versions_cannot_be_updated_even_with_raw_sql(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    (vid,) = add_chain(reg, adapter, 1)

    # Execute
    with pytest.raises(DBAPIError, match="immutable"), reg.engine.begin() as conn:
        conn.execute(
            update(adapter_versions)
            .where(adapter_versions.c.id == vid)
            .values(content_hash="f" * 64)
        )

    # Assert
    assert reg.get_version(vid).provenance.content_hash == chash(1)


def test_a_parent_must_be_an_existing_version_of_the_same_adapter(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    other = new_adapter(reg, name="other")
    add_chain(reg, other, 3)  # `other` has a version 2; `adapter` does not
    reg.add_version(adapter, prov(1), size_bytes=1)

    # Execute
    with pytest.raises(NotFoundError) as err:
        reg.add_version(adapter, prov(3, parent=2), size_bytes=1)

    # Assert
    assert "parent version 2" in str(err.value)
    assert reg.latest_version(adapter).version == 1  # type: ignore[union-attr]


def test_a_parent_may_arrive_in_the_same_batch_in_any_order(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    items = [
        NewVersion(adapter, prov(v, v - 1 if v > 1 else None), size_bytes=v) for v in (3, 1, 2)
    ]

    # Execute
    ids = reg.add_versions(items)

    # Assert: ids come back in input order
    assert [reg.get_version(i).version for i in ids] == [3, 1, 2]


def test_the_spec_must_be_the_adapters(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)

    # Execute / Assert
    with pytest.raises(RegistryValueError, match="create a new adapter"):
        reg.add_version(adapter, prov(1, spec=OTHER_SPEC), size_bytes=1)
    assert reg.latest_version(adapter) is None


def test_a_batch_is_all_or_nothing(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    add_chain(reg, adapter, 1)
    other = new_adapter(reg, "u-2")
    batch = [NewVersion(other, prov(1), size_bytes=1), NewVersion(adapter, prov(1), size_bytes=1)]

    # Execute
    with pytest.raises(ConflictError):
        reg.add_versions(batch)

    # Assert
    assert reg.latest_version(other) is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.get_version(VersionId(10**9)), "no adapter version"),
        (lambda r: r.get_adapter(AdapterId(10**9)), "no adapter with id"),
        (lambda r: r.history(AdapterId(10**9)), "no adapter with id"),
        (lambda r: r.latest_user_version("nobody"), "no user with pseudonym 'nobody'"),
        (lambda r: r.add_version(AdapterId(10**9), prov(1), size_bytes=1), "no adapter"),
        (lambda r: r.add_evaluation(VersionId(10**9), {"loss": 1.0}), "no adapter version"),
    ],
)
def test_unknown_ids_raise_not_found(reg: Registry, call: object, match: str) -> None:
    with pytest.raises(NotFoundError, match=match):
        call(reg)  # type: ignore[operator]


def test_latest_version_of_an_adapter_and_of_a_user(reg: Registry) -> None:
    # Prepare: two adapters of one user; the newest stored is on `work`
    default = new_adapter(reg)
    work = new_adapter(reg, name="work", spec=OTHER_SPEC)
    add_chain(reg, default, 3)
    add_chain(reg, work, 1, spec=OTHER_SPEC)

    # Execute
    latest_default = reg.latest_version(default)
    latest_user = reg.latest_user_version("u-1")

    # Assert
    assert latest_default is not None and latest_default.version == 3
    assert latest_user is not None and (latest_user.adapter_id, latest_user.version) == (work, 1)
    assert reg.latest_user_version(reg.ensure_user("u-new")) is None


def test_history_pages_cover_every_version_once_newest_first_even_while_inserting(
    reg: Registry,
) -> None:
    # Prepare
    adapter = new_adapter(reg)
    add_chain(reg, adapter, 23)

    # Execute: page by 5, storing two new versions after the first page
    seen: list[int] = []
    page = reg.history(adapter, limit=5)
    seen += [v.version for v in page.items]
    reg.add_versions([NewVersion(adapter, prov(v, v - 1), size_bytes=1) for v in (24, 25)])
    while page.next_after is not None:
        page = reg.history(adapter, after=page.next_after, limit=5)
        seen += [v.version for v in page.items]

    # Assert
    assert seen == list(range(23, 0, -1))
    assert [v.version for v in reg.history(adapter, limit=3).items] == [25, 24, 23]


def test_user_history_spans_adapters_by_keyset(reg: Registry) -> None:
    # Prepare
    a = new_adapter(reg)
    b = new_adapter(reg, name="b")
    ids = add_chain(reg, a, 4) + add_chain(reg, b, 3)
    add_chain(reg, new_adapter(reg, "u-2"), 2)  # someone else's

    # Execute
    seen: list[VersionId] = []
    after = None
    while True:
        page = reg.user_history("u-1", after=after, limit=2)
        seen += [v.id for v in page.items]
        if page.next_after is None:
            break
        after = VersionId(page.next_after)

    # Assert
    assert seen == sorted(ids, reverse=True)


@pytest.mark.parametrize("limit", [0, -1, 1001])
def test_a_page_limit_out_of_range_is_refused(reg: Registry, limit: int) -> None:
    with pytest.raises(RegistryValueError, match="page limit"):
        reg.search_users("", limit=limit)


def test_search_users_by_prefix_in_bytewise_order_by_keyset(reg: Registry) -> None:
    # Prepare: tricky neighbours of the prefix "ab"
    names = ["a", "aa", "ab", "ab-1", "ab.2", "abZ", "abz", "ab~", "aB", "ac", "b", "AB"]
    names = [n for n in names if "~" not in n]  # not in the pseudonym alphabet
    reg.ensure_users(random.Random(0).sample(names, len(names)))

    # Execute
    found: list[str] = []
    page = reg.search_users("ab", limit=2)
    found += [u.pseudonym for u in page.items]
    while page.next_after is not None:
        page = reg.search_users("ab", after=page.next_after, limit=2)
        found += [u.pseudonym for u in page.items]
    everyone = reg.search_users(limit=100)

    # Assert
    assert found == sorted(n for n in names if n.startswith("ab"))  # Python sorts by code point
    assert [u.pseudonym for u in everyone.items] == sorted(names)
    assert everyone.next_after is None
    assert reg.search_users("zz").items == ()


def test_a_bad_search_prefix_is_refused(reg: Registry) -> None:
    with pytest.raises(RegistryValueError, match="search prefix"):
        reg.search_users("a%")


# ---------------------------------------------------------------- rollback pointer


def test_rollback_moves_a_pointer_and_a_new_version_moves_it_forward(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    add_chain(reg, adapter, 3)

    # Execute / Assert: roll back to 1
    reg.set_current(adapter, 1)
    assert reg.current_version(adapter).version == 1  # type: ignore[union-attr]
    assert reg.latest_version(adapter).version == 3  # type: ignore[union-attr]
    assert reg.get_adapter(adapter).pinned_version == 1
    # a version stored without make_current keeps the pin
    reg.add_version(adapter, prov(4, parent=1), size_bytes=1, make_current=False)
    assert reg.current_version(adapter).version == 1  # type: ignore[union-attr]
    # a new version trained after the rollback becomes current
    reg.add_version(adapter, prov(5, parent=1), size_bytes=1)
    assert reg.current_version(adapter).version == 5  # type: ignore[union-attr]
    # and history still holds everything
    assert [v.version for v in reg.history(adapter).items] == [5, 4, 3, 2, 1]


def test_rolling_back_to_a_missing_version_is_refused(reg: Registry) -> None:
    adapter = new_adapter(reg)
    add_chain(reg, adapter, 2)
    with pytest.raises(NotFoundError, match="no version 7"):
        reg.set_current(adapter, 7)
    assert reg.current_version(adapter).version == 2  # type: ignore[union-attr]


# ---------------------------------------------------------------- evaluations


def test_evaluations_are_added_beside_an_unchanged_version(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    (vid,) = add_chain(reg, adapter, 1)

    # Execute
    reg.add_evaluation(vid, {"heldout_loss": 2.5}, source="server", round=3)
    reg.add_evaluation(vid, {"heldout_loss": 2.25, "ppl": 9.49}, source="client")

    # Assert
    evals = reg.list_evaluations(vid)
    assert [(e.source, e.round, e.metrics) for e in evals] == [
        ("server", 3, {"heldout_loss": 2.5}),
        ("client", None, {"heldout_loss": 2.25, "ppl": 9.49}),
    ]
    assert reg.get_version(vid).provenance.metrics == {}
    with pytest.raises(RegistryValueError, match="finite"):
        reg.add_evaluation(vid, {"loss": float("nan")})


# ---------------------------------------------------------------- priors


def test_prior_versions_with_an_active_pointer(reg: Registry) -> None:
    # Prepare
    p1 = reg.add_prior_version(SPEC, 1, content_hash=chash(1), size_bytes=10, round=1)
    p2 = reg.add_prior_version(
        SPEC, 2, content_hash=chash(2), size_bytes=10, round=2, metrics={"loss": 1.5}
    )

    # Execute / Assert: the newest is active by default
    assert reg.active_prior(SPEC) == p2
    assert p2.ref == prior_ref(SPEC.fingerprint(), 2)
    rolled = reg.set_active_prior(SPEC.fingerprint(), 1)
    assert rolled.active and rolled.id == p1.id
    listing = reg.list_prior_versions(SPEC)
    assert [(p.version, p.active, p.metrics) for p in listing.items] == [
        (2, False, {"loss": 1.5}),
        (1, True, {}),
    ]
    assert reg.active_prior(OTHER_SPEC) is None
    with pytest.raises(ConflictError, match="already has prior version 2"):
        reg.add_prior_version(SPEC, 2, content_hash=chash(9), size_bytes=1)
    with pytest.raises(NotFoundError):
        reg.set_active_prior(SPEC, 5)


def test_a_candidate_prior_waits_for_its_verdict_and_an_operator_pick_is_recorded(
    reg: Registry,
) -> None:
    # Prepare: v1 active, v2 a candidate the devices scored
    v1 = reg.add_prior_version(SPEC, 1, content_hash=chash(1), size_bytes=10, round=1)
    v2 = reg.add_prior_version(SPEC, 2, content_hash=chash(2), size_bytes=10, activate=False)
    assert reg.pending_prior(SPEC) == v2 and reg.active_prior(SPEC) == v1
    score = {"rel_loss_mean": 0.97, "val_loss_mean": 2.9, "val_loss_std": 0.2}
    evaluation = reg.add_prior_evaluation(v2.ref, score, devices=3, round=3)

    # Execute: the rule holds v2, promotes v3; an operator rolls back while v4 waits
    held = reg.decide_prior(
        v2.ref, "held", reason="held: worse", against=v1.ref, round=3, scores=(0.97, 0.95, 0.01)
    )
    v3 = reg.add_prior_version(SPEC, 3, content_hash=chash(3), size_bytes=10, activate=False)
    reg.decide_prior(v3.ref, "promoted", reason="promoted: better", against=v1.ref, round=4)
    active_after_v3 = reg.active_prior(SPEC)
    v4 = reg.add_prior_version(SPEC, 4, content_hash=chash(4), size_bytes=10, activate=False)
    reg.set_active_prior(SPEC, 1)

    # Assert: every verdict appended with who decided and why; pointers moved only so
    assert reg.list_prior_evaluations(v2.ref) == [evaluation]
    assert (held.against, held.decided_by, held.round) == (v1.ref, "policy", 3)
    assert (held.candidate_score, held.active_score, held.tolerance) == (0.97, 0.95, 0.01)
    assert active_after_v3 is not None and active_after_v3.version == 3
    decisions = reg.list_prior_decisions(SPEC)
    assert [(d.ref, d.decision, d.decided_by) for d in decisions] == [
        (v2.ref, "held", "policy"),
        (v3.ref, "promoted", "policy"),
        (v4.ref, "held", "operator"),
    ]
    assert v1.ref in decisions[-1].reason and decisions[-1].against is None
    assert reg.active_prior(SPEC) == reg.get_prior(v1.ref)
    assert reg.pending_prior(SPEC) is None
    assert reg.prior_decisions_for([v2.ref, v4.ref]) == {v2.ref: held, v4.ref: decisions[-1]}
    assert reg.latest_prior_evaluations([v2.ref, v3.ref]) == {v2.ref: evaluation}
    with pytest.raises(ConflictError, match="already decided"):
        reg.decide_prior(v2.ref, "promoted", reason="again")
    with pytest.raises(RegistryValueError, match="promoted or held"):
        reg.decide_prior(v4.ref, "maybe", reason="x")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        reg.add_prior_evaluation("nope/v1", score, devices=1)


def test_versions_record_the_prior_they_started_from(reg: Registry) -> None:
    prior = reg.add_prior_version(SPEC, 1, content_hash=chash(1), size_bytes=10)
    adapter = new_adapter(reg)
    stored = reg.add_version(adapter, prov(1, prior_version=prior.ref), size_bytes=1)
    assert reg.get_prior(stored.provenance.prior_version) == prior  # type: ignore[arg-type]


# ---------------------------------------------------------------- rounds


def test_rounds_record_participants_dropouts_refusals_duration_and_bytes(reg: Registry) -> None:
    # Prepare
    r1 = reg.start_round(SPEC, 1, config={"local-steps": 45})

    # Execute
    done = reg.finish_round(
        r1.id,
        participants=10,
        dropouts=2,
        refused=1,
        bytes_up=7 * 4096,
        bytes_down=10 * 4096,
        prior_ref="p/v1",
    )
    r2 = reg.start_round(SPEC, 2)

    # Assert
    assert (done.status, done.participants, done.dropouts, done.refused) == ("finished", 10, 2, 1)
    assert (done.bytes_up, done.bytes_down, done.prior_ref) == (28672, 40960, "p/v1")
    assert done.config == {"local-steps": 45}
    assert done.duration_s is not None and done.duration_s >= 0
    assert r2.status == "running" and r2.duration_s is None
    assert [r.number for r in reg.list_rounds(SPEC).items] == [2, 1]
    with pytest.raises(ConflictError, match="already finished"):
        reg.finish_round(r1.id, participants=1)
    with pytest.raises(ConflictError, match="already has a round 1"):
        reg.start_round(SPEC, 1)


# ---------------------------------------------------------------- blobs


def test_blob_metadata_is_idempotent_immutable_and_listed_per_user(reg: Registry) -> None:
    # Prepare
    adapter = new_adapter(reg)
    meta = {"size_bytes": 4123, "sha256": chash(7), "adapter_id": adapter, "version": 1}

    # Execute
    first = reg.put_blob_meta("u-1", "blob-1", **meta)  # type: ignore[arg-type]
    retry = reg.put_blob_meta("u-1", "blob-1", **meta)  # type: ignore[arg-type]
    reg.put_blob_meta("u-1", "blob-2", size_bytes=10, sha256=chash(8), kind="keystore")

    # Assert
    assert first == retry
    with pytest.raises(ConflictError, match="blob-1"):
        reg.put_blob_meta("u-1", "blob-1", size_bytes=1, sha256=chash(7))
    listed = reg.list_blobs("u-1", limit=1)
    assert [b.blob_id for b in listed.items] == ["blob-2"]
    assert [b.blob_id for b in reg.list_blobs("u-1", after=listed.next_after).items] == ["blob-1"]
    assert [b.blob_id for b in reg.list_blobs("u-1", adapter_id=adapter).items] == ["blob-1"]
    other = new_adapter(reg, "u-2")
    with pytest.raises(NotFoundError, match="no adapter"):
        reg.put_blob_meta("u-1", "blob-3", size_bytes=1, sha256=chash(1), adapter_id=other)


# ---------------------------------------------------------------- erasure


def populate(reg: Registry, pseudonym: str) -> None:
    adapter = new_adapter(reg, pseudonym)
    ids = add_chain(reg, adapter, 3)
    reg.add_evaluation(ids[0], {"loss": 1.0})
    reg.add_evaluation(ids[2], {"loss": 0.5})
    reg.put_blob_meta(
        pseudonym, f"{pseudonym}-b1", size_bytes=5, sha256=chash(1), adapter_id=adapter, version=3
    )


def test_erase_user_removes_every_row_of_that_user_and_no_one_elses(reg: Registry) -> None:
    # Prepare
    populate(reg, "alice")
    populate(reg, "bob")
    bob_before = reg.user_history("bob").items
    alice_id = reg.get_user("alice").id
    totals_before = reg.counts()

    # Execute
    counts = reg.erase_user("alice")
    again = reg.erase_user("alice")

    # Assert
    assert (counts.users, counts.adapters, counts.versions, counts.evaluations, counts.blobs) == (
        1,
        1,
        3,
        2,
        1,
    )
    assert again.total == 0
    with pytest.raises(NotFoundError):
        reg.get_user("alice")
    assert reg.user_history("bob").items == bob_before
    assert len(reg.list_blobs("bob").items) == 1
    totals = reg.counts()
    assert (totals.users, totals.versions, totals.blobs) == (
        totals_before.users - 1,
        totals_before.versions - 3,
        totals_before.blobs - 1,
    )
    with reg.engine.connect() as conn:
        for table in (adapters, adapter_versions, blobs):
            rows = conn.execute(select(table.c.id).where(table.c.user_id == alice_id)).all()
            assert rows == [], table.name
        assert conn.execute(select(func.count()).select_from(evaluations)).scalar() == 2  # bob's


# ---------------------------------------------------------------- concurrency


def test_concurrent_writers_neither_fail_nor_duplicate(registry_url: str) -> None:
    # Prepare: two registry objects (two coordinators) on one database, four threads
    from concurrent.futures import ThreadPoolExecutor

    regs = [Registry.open(registry_url), Registry.open(registry_url)]

    def work(i: int) -> tuple[int, list[VersionId]]:
        reg = regs[i % 2]
        shared = reg.ensure_user("shared")
        adapter = reg.create_adapter(reg.ensure_user(f"u-{i}"), "default", SPEC)
        return int(shared), add_chain(reg, adapter, 5)

    # Execute
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(work, range(8)))
        total = regs[0].counts()
    finally:
        for reg in regs:
            reg.close()

    # Assert
    assert len({shared for shared, _ in results}) == 1
    assert len({vid for _, ids in results for vid in ids}) == 40
    assert (total.users, total.adapters, total.versions) == (9, 8, 40)


def test_a_failed_round_is_retried_under_its_number_but_a_finished_one_never(reg: Registry) -> None:
    from lorafleet.server.registry import ConflictError

    first = reg.start_round(SPEC, 1, config={"k": 1})
    reg.finish_round(first.id, participants=0, status="failed")
    again = reg.start_round(SPEC, 1, config={"k": 1}, retry=True)
    assert again.id == first.id and again.status == "running" and again.config["attempts"] == 2
    reg.finish_round(again.id, participants=3, prior_ref="x/v1")
    with pytest.raises(ConflictError, match="only a failed round"):
        reg.start_round(SPEC, 1, retry=True)
    fresh = reg.start_round(SPEC, 2, retry=True)
    assert fresh.number == 2 and fresh.status == "running"
