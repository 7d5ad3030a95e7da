"""Registry scale: a million adapter versions, against the same lookups on a small registry.

Two registries on the same backend are loaded with the same shape of data (users with
one adapter each and a chain of ten versions per adapter) through the coordinator's
real reporting path: round after round, every user's device reports its next version
(with its evaluation and pointer) and the reports go in with ``Registry.record_reports``,
one transaction per 1,000 devices, as ``server.reports.RoundReports`` writes a round.
The **baseline** holds 10,000 versions, the **scaled** one 1,000,000. Then the lookups
the console and the backup service make are timed, interleaved (one call on each
registry in turn, every query kind in turn) after a warm-up, so machine drift hits both
sides alike:

- ``latest_user_version``: the newest version of a random user;
- ``get_version``: a version by a random id;
- ``user_history``: the first page (limit 50) of a random user's history;
- ``users_page``: a page (50) of the users list resumed by keyset from a random
  pseudonym prefix (``after=<random 4 hex chars>``; the console's user list, target
  p95 < 300 ms). Both registries return full pages, so the two sides do equal work.

On SQLite the newest-version lookup is also run with the very SQL the registry sends,
on a plain ``sqlite3`` connection to the same file, interleaved with the others: the
floor the database itself sets on this machine in this run, so a tail the registry adds
shows against it and one the machine adds (a busy shared host preempting the process)
shows in both.

The table gives the insert rate (versions/s, median over the report batches) and
p50/p95/p99 latency per lookup, with the ratio scaled/baseline: near 1 means the lookup
does not grow with the registry. Then the coordinator's write path for devices' round reports
(``Registry.record_reports``, one transaction per round: a new version, its evaluation
and the pointer of each of up to 1,000 devices) is timed over a few rounds on both
registries, interleaved. Peak memory is this process's max RSS.

Usage (from the repository root)::

    python bench/registry_scale.py                    # SQLite in a temp folder, 1M vs 10k
    python bench/registry_scale.py --quick            # 20,000 vs 2,000 versions
    python bench/registry_scale.py --url postgresql+psycopg://me@127.0.0.1:5432/postgres
    python bench/registry_scale.py --json out.json    # also write the result file

With ``--url`` the benchmark creates (and afterwards drops) two databases of its own on
that PostgreSQL server, ``lorafleet_bench_scaled`` and ``lorafleet_bench_baseline``; the
user in the URL needs ``CREATEDB``. The database the URL names is only used to connect.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from tqdm import tqdm

from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry import (
    DeviceReport,
    Registry,
    RegistryError,
    VersionId,
    parse_url,
)

log = logging.getLogger("bench.registry_scale")

BENCH = "registry_scale"
VERSIONS_PER_USER = 10
FULL_VERSIONS, FULL_BASELINE, FULL_LOOKUPS, FULL_WARMUP = 1_000_000, 10_000, 1000, 100
QUICK_VERSIONS, QUICK_BASELINE, QUICK_LOOKUPS, QUICK_WARMUP = 20_000, 2_000, 200, 20
REPORTS_PER_ROUND = 1000  # devices reporting a new version per record_reports call
REPORT_ROUNDS, QUICK_REPORT_ROUNDS = 5, 3
PAGE = 50
TARGET_USERS_PAGE_P95_MS = 300.0
QUERIES = ("latest_user_version", "get_version", "user_history", "users_page")
RAW_QUERY = "latest_user_version_raw_sqlite3"
"""The baseline beside the registry's lookup: the same SQL on a plain sqlite3 connection."""
SPEC = AdapterSpec(
    base_model_id="smollm2-135m-instruct", base_sha256=hashlib.sha256(b"bench-base").hexdigest()
)
PG_DATABASES = {"scaled": "lorafleet_bench_scaled", "baseline": "lorafleet_bench_baseline"}


def pseudonym(i: int) -> str:
    """A hex pseudonym, uniformly spread so two-character prefixes split users evenly."""
    return hashlib.sha256(f"bench-user-{i}".encode()).hexdigest()[:20]


@dataclass
class Loaded:
    """One loaded registry and what the lookups draw from."""

    name: str
    registry: Registry
    versions: int
    pseudonyms: list[str]
    min_version_id: int
    max_version_id: int
    load_s: float
    batch_rates: list[float] = field(default_factory=list)
    size_mb: float = float("nan")
    sqlite_path: Path | None = None


def device_report(user: str, version: int, round: int) -> DeviceReport:
    """What a device's round reply becomes on the coordinator: version, evaluation, pointer."""
    return DeviceReport(
        pseudonym=user,
        adapter="default",
        spec=SPEC,
        current=version,
        provenance=AdapterProvenance(
            spec=SPEC,
            version=version,
            content_hash=hashlib.sha256(f"{user}-{version}".encode()).hexdigest(),
            parent=version - 1 if version > 1 else None,
            prior_version=f"bench/v{round}",
            round=round,
            created_at="2026-05-20T00:00:00+00:00",
            metrics={"val_loss": 2.5, "num_examples": 24.0},
        ),
        size_bytes=55_000,
        evaluation={"val_loss": 2.5, "num_examples": 24.0},
        evaluated=version,
        round=round,
    )


def load(name: str, registry: Registry, n_versions: int, *, progress: bool) -> Loaded:
    """Users, one adapter each, and a 10-version chain per adapter, as devices report them.

    Round ``v`` (1..10): every user's device reports version ``v`` (parent ``v - 1``);
    the reports go to ``record_reports`` :data:`REPORTS_PER_ROUND` at a time. The first
    round's reports also register the users and their adapters, as on a real coordinator.
    """
    n_users = n_versions // VERSIONS_PER_USER
    names = [pseudonym(i) for i in range(n_users)]
    rates: list[float] = []
    stored = 0
    start = time.perf_counter()
    with tqdm(
        total=n_users * VERSIONS_PER_USER,
        unit="versions",
        desc=f"loading {name}",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for version in range(1, VERSIONS_PER_USER + 1):
            for lo in range(0, n_users, REPORTS_PER_ROUND):
                batch = [
                    device_report(p, version, version) for p in names[lo : lo + REPORTS_PER_ROUND]
                ]
                t0 = time.perf_counter()
                counts = registry.record_reports(batch)
                rates.append(counts.versions / (time.perf_counter() - t0))
                stored += counts.versions
                bar.update(counts.versions)
    if stored != n_users * VERSIONS_PER_USER:
        raise LorafleetError(
            f"{name}: {stored} versions recorded, {n_users * VERSIONS_PER_USER} reported"
        )
    with registry.engine.connect() as conn:
        low, high = conn.execute(text("SELECT min(id), max(id) FROM adapter_versions")).one()
    return Loaded(
        name=name,
        registry=registry,
        versions=stored,
        pseudonyms=names,
        min_version_id=int(low),
        max_version_id=int(high),
        load_s=time.perf_counter() - start,
        batch_rates=rates,
    )


def lookups(loaded: Loaded, rng: random.Random) -> dict[str, Callable[[], object]]:
    """One callable per query kind, each drawing a fresh random key per call."""
    reg = loaded.registry

    def latest() -> object:
        return reg.latest_user_version(rng.choice(loaded.pseudonyms))

    def by_id() -> object:
        return reg.get_version(VersionId(rng.randint(loaded.min_version_id, loaded.max_version_id)))

    def history() -> object:
        return reg.user_history(rng.choice(loaded.pseudonyms), limit=PAGE)

    def users_page() -> object:
        # The console's user list, resumed from a random keyset position: a full page
        # of 50 on both registries (a prefix filter would return fewer on the small one).
        return reg.search_users(after=f"{rng.randrange(16**4):04x}", limit=PAGE)

    return {
        "latest_user_version": latest,
        "get_version": by_id,
        "user_history": history,
        "users_page": users_page,
    }


def raw_latest(loaded: Loaded, rng: random.Random) -> Callable[[], object] | None:
    """The registry's own newest-version SQL on a plain sqlite3 connection (None off SQLite)."""
    if loaded.sqlite_path is None:
        return None
    loaded.registry.latest_user_version(loaded.pseudonyms[0])  # compiles the statement
    prepared = loaded.registry._prepared["latest_of_pseudonym"]
    assert prepared.positions is not None  # sqlite3 binds by position
    conn = sqlite3.connect(str(loaded.sqlite_path), isolation_level=None, check_same_thread=False)

    def call() -> object:
        values = {**prepared.defaults, "pseudonym": rng.choice(loaded.pseudonyms)}
        return conn.execute(prepared.sql, tuple(values[k] for k in prepared.positions)).fetchall()

    return call


def measure(
    sides: Sequence[Loaded], n: int, warmup: int, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Latencies in ms: ``[query][side] -> samples``, every call interleaved across sides."""
    calls = {s.name: lookups(s, random.Random(seed)) for s in sides}
    for s in sides:
        raw = raw_latest(s, random.Random(seed))
        if raw is not None:
            calls[s.name][RAW_QUERY] = raw
    queries = [q for q in (*QUERIES, RAW_QUERY) if all(q in calls[s.name] for s in sides)]
    samples: dict[str, dict[str, list[float]]] = {q: {s.name: [] for s in sides} for q in queries}
    for i in range(warmup + n):
        for query in queries:
            order = sides if i % 2 == 0 else list(reversed(sides))
            for side in order:
                call = calls[side.name][query]
                t0 = time.perf_counter_ns()
                call()
                elapsed_ms = (time.perf_counter_ns() - t0) / 1e6
                if i >= warmup:
                    samples[query][side.name].append(elapsed_ms)
    return samples


def report_rounds(sides: Sequence[Loaded], rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per ``record_reports`` round, ``[side] -> samples``, sides interleaved.

    Each round, the same number (up to ``REPORTS_PER_ROUND``) of random users of each
    registry report the
    next version of their adapter (parent: their newest), with its evaluation and
    pointer: what a federated round's replies become on the coordinator.
    """
    rng = random.Random(seed)
    n = min(REPORTS_PER_ROUND, *(len(s.pseudonyms) for s in sides))  # equal work per side
    out: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(1, rounds + 1):
        for side in sides if r % 2 else list(reversed(sides)):
            users = rng.sample(side.pseudonyms, n)
            batch = [device_report(p, VERSIONS_PER_USER + r, 100 + r) for p in users]
            t0 = time.perf_counter()
            side.registry.record_reports(batch)
            out[side.name].append(time.perf_counter() - t0)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def database_size_mb(registry: Registry, sqlite_path: Path | None) -> float:
    """Bytes on disk (SQLite file + WAL, or pg_database_size), in MiB."""
    if sqlite_path is not None:
        total = sum(
            p.stat().st_size for p in sqlite_path.parent.glob(sqlite_path.name + "*") if p.is_file()
        )
        return total / 2**20
    with registry.engine.connect() as conn:
        size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
    return int(size) / 2**20


@contextmanager
def sqlite_registries(folder: Path | None) -> Iterator[dict[str, tuple[str, Path | None]]]:
    """Two fresh SQLite files in ``folder`` (or a temp folder removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        root = folder or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        out: dict[str, tuple[str, Path | None]] = {}
        for side in ("scaled", "baseline"):
            path = root / f"registry-{side}.db"
            for old in root.glob(path.name + "*"):
                old.unlink()
            out[side] = (f"sqlite:///{path}", path)
        yield out


@contextmanager
def postgres_registries(url: str) -> Iterator[dict[str, tuple[str, Path | None]]]:
    """Two fresh databases on the server ``url`` points at, dropped afterwards."""
    hint = (
        "--url must name a PostgreSQL server, e.g. postgresql+psycopg://me@127.0.0.1:5432/postgres"
    )
    try:
        admin_url: URL = parse_url(url)
    except RegistryError as exc:
        raise RegistryError(f"{hint} ({exc})") from None
    if admin_url.get_backend_name() != "postgresql":
        raise RegistryError(f"{hint}; got {admin_url.render_as_string(hide_password=True)}")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def drop_all() -> None:
        with admin.connect() as conn:
            for name in PG_DATABASES.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    try:
        drop_all()
        with admin.connect() as conn:
            for name in PG_DATABASES.values():
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        shown = admin_url.render_as_string(hide_password=True)
        raise RegistryError(
            f"cannot create the benchmark databases on {shown} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); the URL's user needs CREATEDB"
        ) from None
    try:
        yield {
            side: (admin_url.set(database=name).render_as_string(hide_password=False), None)
            for side, name in PG_DATABASES.items()
        }
    finally:
        drop_all()
        admin.dispose()


def fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def bench_main(args: argparse.Namespace) -> int:
    n_versions = args.versions or (QUICK_VERSIONS if args.quick else FULL_VERSIONS)
    n_baseline = args.baseline_versions or (QUICK_BASELINE if args.quick else FULL_BASELINE)
    n_lookups = args.lookups or (QUICK_LOOKUPS if args.quick else FULL_LOOKUPS)
    warmup = QUICK_WARMUP if args.quick else FULL_WARMUP
    for what, n in (("--versions", n_versions), ("--baseline-versions", n_baseline)):
        if n < VERSIONS_PER_USER * 10:
            raise RegistryError(f"{what} must be at least {VERSIONS_PER_USER * 10}, got {n}")
    progress = not args.no_progress
    targets = postgres_registries(args.url) if args.url else sqlite_registries(args.dir)
    with targets as urls:
        loaded: dict[str, Loaded] = {}
        registries: list[Registry] = []
        try:
            for side, n in (("baseline", n_baseline), ("scaled", n_versions)):
                url, path = urls[side]
                reg = Registry.open(url)
                registries.append(reg)
                log.info("loading %s: %d versions into %s", side, n, reg.url)
                loaded[side] = load(side, reg, n, progress=progress)
                loaded[side].size_mb = database_size_mb(reg, path)
                loaded[side].sqlite_path = path
            backend = registries[0].dialect
            log.info(
                "timing %d lookups of each kind per registry (after %d warm-up)", n_lookups, warmup
            )
            samples = measure([loaded["baseline"], loaded["scaled"]], n_lookups, warmup)
            n_rounds = QUICK_REPORT_ROUNDS if args.quick else REPORT_ROUNDS
            log.info("timing %d report rounds per registry", n_rounds)
            reports = report_rounds([loaded["baseline"], loaded["scaled"]], n_rounds)
            server_version = _server_version(registries[0])
        finally:
            for reg in registries:
                reg.close()

    base, big = loaded["baseline"], loaded["scaled"]
    rows: list[dict[str, Any]] = []
    insert_base = _common.Stats.of(base.batch_rates)
    insert_big = _common.Stats.of(big.batch_rates)
    rows.append(
        {
            "name": "insert",
            "backend": backend,
            "rows_per_s": insert_big.median,
            "rows_per_s_min": insert_big.min,
            "rows_per_s_max": insert_big.max,
            "rows_per_s_baseline": insert_base.median,
            "batches": insert_big.n,
            "load_s": big.load_s,
            "load_s_baseline": base.load_s,
            "versions": big.versions,
            "versions_baseline": base.versions,
            "db_size_mb": big.size_mb,
            "db_size_mb_baseline": base.size_mb,
        }
    )
    ratios: dict[str, Any] = {
        "insert_rows_per_s_vs_baseline": _common.ratio(insert_big.median, insert_base.median),
        "p50_vs_baseline": {},
        "p99_vs_baseline": {},
    }
    for query in samples:
        s_base, s_big = samples[query]["baseline"], samples[query]["scaled"]
        row: dict[str, Any] = {
            "name": query,
            "backend": backend,
            "p50_ms": percentile(s_big, 50),
            "p95_ms": percentile(s_big, 95),
            "p99_ms": percentile(s_big, 99),
            "min_ms": min(s_big),
            "max_ms": max(s_big),
            "p50_ms_baseline": percentile(s_base, 50),
            "p95_ms_baseline": percentile(s_base, 95),
            "p99_ms_baseline": percentile(s_base, 99),
            "n": len(s_big),
        }
        rows.append(row)
        ratios["p50_vs_baseline"][query] = _common.ratio(row["p50_ms"], row["p50_ms_baseline"])
        ratios["p99_vs_baseline"][query] = _common.ratio(row["p99_ms"], row["p99_ms_baseline"])

    if RAW_QUERY in samples:
        for q in ("p50", "p99"):
            ratios[f"latest_user_version_{q}_vs_raw_sqlite3"] = _common.ratio(
                percentile(samples["latest_user_version"]["scaled"], int(q[1:])),
                percentile(samples[RAW_QUERY]["scaled"], int(q[1:])),
            )
    per_round = {side: _common.Stats.of([t * 1e3 for t in v]) for side, v in reports.items()}
    rows.append(
        {
            "name": "report_round",
            "backend": backend,
            "reports": min(REPORTS_PER_ROUND, len(big.pseudonyms), len(base.pseudonyms)),
            "round_ms": per_round["scaled"].median,
            "round_ms_min": per_round["scaled"].min,
            "round_ms_max": per_round["scaled"].max,
            "round_ms_baseline": per_round["baseline"].median,
            "rounds": per_round["scaled"].n,
        }
    )
    ratios["report_round_ms_vs_baseline"] = _common.ratio(
        per_round["scaled"].median, per_round["baseline"].median
    )
    users_p95 = next(r["p95_ms"] for r in rows if r["name"] == "users_page")
    target = {
        "users_page_p95_ms": users_p95,
        "target_ms": TARGET_USERS_PAGE_P95_MS,
        "met": users_p95 < TARGET_USERS_PAGE_P95_MS,
    }
    print_table(backend, server_version, base, big, rows, ratios, target, n_lookups)

    if args.json:
        import sqlalchemy

        machine = _common.machine_info()
        machine.update(
            {
                "backend": backend,
                "server_version": server_version,
                "sqlalchemy": sqlalchemy.__version__,
                "max_rss_mb": _common.max_rss_mb(),
                "max_rss_of": "this process",
            }
        )
        _common.write_json(
            args.json, bench=BENCH, machine=machine, rows=rows, ratios=ratios, target=target
        )
        log.info("wrote %s", args.json)
    return 0


def _server_version(registry: Registry) -> str:
    with registry.engine.connect() as conn:
        if registry.dialect == "postgresql":
            return str(conn.execute(text("SHOW server_version")).scalar_one())
        return "sqlite " + str(conn.execute(text("SELECT sqlite_version()")).scalar_one())


def print_table(
    backend: str,
    server_version: str,
    base: Loaded,
    big: Loaded,
    rows: list[dict[str, Any]],
    ratios: dict[str, Any],
    target: dict[str, Any],
    n_lookups: int,
) -> None:
    insert = rows[0]
    print(
        f"\nregistry_scale on {backend} ({server_version}): {big.versions:,} versions "
        f"(scaled) vs {base.versions:,} (baseline), {VERSIONS_PER_USER} versions per user, "
        f"{n_lookups} interleaved lookups of each kind\n"
    )
    print(
        _common.format_table(
            ["insert (record_reports, 1k reports/batch)", "baseline", "scaled", "scaled/baseline"],
            [
                [
                    "versions/s (median over batches)",
                    f"{insert['rows_per_s_baseline']:,.0f}",
                    f"{insert['rows_per_s']:,.0f}",
                    f"{ratios['insert_rows_per_s_vs_baseline']:.2f}",
                ],
                [
                    "total load time incl. users+adapters (s)",
                    f"{insert['load_s_baseline']:.1f}",
                    f"{insert['load_s']:.1f}",
                    "",
                ],
                [
                    "database size (MiB)",
                    f"{insert['db_size_mb_baseline']:.1f}",
                    f"{insert['db_size_mb']:.1f}",
                    "",
                ],
            ],
        )
    )
    print()
    table_rows = []
    for row in rows[1:]:
        q = row["name"]
        if q not in (*QUERIES, RAW_QUERY):
            continue
        table_rows.append(
            [
                q,
                fmt_ms(row["p50_ms_baseline"]),
                fmt_ms(row["p99_ms_baseline"]),
                fmt_ms(row["p50_ms"]),
                fmt_ms(row["p95_ms"]),
                fmt_ms(row["p99_ms"]),
                f"{ratios['p50_vs_baseline'][q]:.2f}",
                f"{ratios['p99_vs_baseline'][q]:.2f}",
            ]
        )
    print(
        _common.format_table(
            [
                "lookup (ms)",
                "p50 base",
                "p99 base",
                "p50",
                "p95",
                "p99",
                "p50 ratio",
                "p99 ratio",
            ],
            table_rows,
        )
    )
    if "latest_user_version_p99_vs_raw_sqlite3" in ratios:
        print(
            "\nlatest_user_version against the same SQL on a plain sqlite3 connection (scaled): "
            f"p50 x{ratios['latest_user_version_p50_vs_raw_sqlite3']:.2f}, "
            f"p99 x{ratios['latest_user_version_p99_vs_raw_sqlite3']:.2f}"
        )
    rep = next(r for r in rows if r["name"] == "report_round")
    print(
        f"\nrecord_reports, one round of {rep['reports']:,} device reports (version + "
        f"evaluation + pointer, one transaction): median {rep['round_ms_baseline']:.0f} ms "
        f"baseline, {rep['round_ms']:.0f} ms scaled (min {rep['round_ms_min']:.0f}, max "
        f"{rep['round_ms_max']:.0f}; ratio {ratios['report_round_ms_vs_baseline']:.2f})"
    )
    verdict = "met" if target["met"] else "NOT met"
    print(
        f"\nconsole users page p95: {target['users_page_p95_ms']:.2f} ms "
        f"(target < {target['target_ms']:.0f} ms: {verdict}); "
        f"peak RSS {_common.max_rss_mb():.0f} MiB (this process)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 vs 2,000 versions")
    parser.add_argument(
        "--url",
        help="a PostgreSQL server to benchmark instead of SQLite "
        "(postgresql+psycopg://user@host:port/postgres; needs CREATEDB)",
    )
    parser.add_argument("--dir", type=Path, help="folder for the SQLite files (default: temp)")
    parser.add_argument("--versions", type=int, help="versions in the scaled registry")
    parser.add_argument("--baseline-versions", type=int, help="versions in the baseline")
    parser.add_argument("--lookups", type=int, help="timed lookups of each kind per registry")
    parser.add_argument("--json", help="also write the result file here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return bench_main(args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
