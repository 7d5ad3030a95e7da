"""Console pages at a million adapters, against the same pages on a small registry.

Two coordinator data dirs get a registry of the same shape (one user per adapter, each
adapter with a chain of versions, written with the batched registry calls that
``bench/registry_scale.py`` uses): the **baseline** with 10,000 adapters, the
**scaled** one with 1,000,000. A real console (uvicorn on 127.0.0.1, logged in) serves
each; an HTTP client with keep-alive times whole page loads, interleaved between the
two consoles (one request on each in turn, every page kind in turn) after a warm-up:

- ``users_page``: the users list resumed by keyset from a random position
  (``/users?after=<4 random hex>``): the page the target is about
  (**p95 < 300 ms** at a million adapters);
- ``users_search``: the users list filtered by a random two-character prefix;
- ``user_detail``: one random user's page (adapters, version history with
  evaluations, backups, devices).

Each users-list page lists 50 users with their latest version. Reported: p50/p95/p99
per page on both sides and the scaled/baseline ratios (near 1: the page does not grow
with the registry). Server and client share this process (and its GIL), as a console
and its operator's browser never do, so absolute times are pessimistic.

Usage (from the repository root)::

    python bench/console.py                 # 1,000,000 vs 10,000 adapters (SQLite)
    python bench/console.py --quick         # 5,000 vs 500 adapters
    python bench/console.py --dir /tmp/cb   # keep the data dirs (default: temp)
    python bench/console.py --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import httpx
import registry_scale
from tqdm import tqdm

from lorafleet.protocols.crypto import ScryptParams
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.server.console import AdminStore, ConsoleConfig, create_app
from lorafleet.server.console.app import ConsoleServer
from lorafleet.server.registry import NewVersion, Registry

log = logging.getLogger("bench.console")

BENCH = "console"
FULL_ADAPTERS, FULL_BASELINE, FULL_REQUESTS, FULL_WARMUP = 1_000_000, 10_000, 500, 50
QUICK_ADAPTERS, QUICK_BASELINE, QUICK_REQUESTS, QUICK_WARMUP = 5_000, 500, 40, 5
VERSIONS_PER_ADAPTER = 2
BATCH = 5000  # users (and adapters) per batch
PAGES = ("users_page", "users_search", "user_detail")
TARGET_P95_MS = 300.0
ADMIN, PASSWORD = "bench", "bench password, not a secret"
SPEC = registry_scale.SPEC


@dataclass
class Side:
    """One filled data dir and its console."""

    name: str
    data_dir: Path
    adapters: int
    pseudonyms: list[str] = field(default_factory=list)
    load_s: float = 0.0
    url: str = ""


def fill(registry: Registry, n_adapters: int, *, name: str, progress: bool) -> list[str]:
    """``n_adapters`` users with one adapter each and a short version chain; returns pseudonyms."""
    names = [registry_scale.pseudonym(i) for i in range(n_adapters)]
    with tqdm(
        total=n_adapters,
        unit="adapters",
        desc=f"filling {name}",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for lo in range(0, n_adapters, BATCH):
            chunk = names[lo : lo + BATCH]
            user_ids = registry.ensure_users(chunk)
            adapter_ids = registry.create_adapters([(user_ids[p], "default", SPEC) for p in chunk])
            registry.add_versions(
                [
                    NewVersion(
                        adapter,
                        AdapterProvenance(
                            spec=SPEC,
                            version=v,
                            content_hash=hashlib.sha256(f"{adapter}-{v}".encode()).hexdigest(),
                            parent=v - 1 if v > 1 else None,
                            prior_version="bench/v1",
                            round=v,
                            created_at="2026-05-20T00:00:00Z",
                            metrics={"heldout_loss_before": 3.0, "heldout_loss_after": 2.5},
                        ),
                        size_bytes=55_000,
                        num_params=442_368,
                    )
                    for adapter in adapter_ids
                    for v in range(1, VERSIONS_PER_ADAPTER + 1)
                ]
            )
            bar.update(len(chunk))
    return names


@contextmanager
def data_dirs(folder: Path | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lorafleet-console-bench-") as tmp:
        root = folder or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        yield root


def prepare(side: Side, *, progress: bool) -> None:
    """Fill a fresh registry in the side's data dir and set the bench admin."""
    side.data_dir.mkdir(parents=True, exist_ok=True)
    for old in side.data_dir.glob("registry.db*"):
        old.unlink()
    start = time.perf_counter()
    with Registry.open(f"sqlite:///{side.data_dir / 'registry.db'}") as reg:
        side.pseudonyms = fill(reg, side.adapters, name=side.name, progress=progress)
    side.load_s = time.perf_counter() - start
    AdminStore(side.data_dir).set_password(ADMIN, PASSWORD, params=ScryptParams(log2_n=10))


def logged_in_client(url: str) -> httpx.Client:
    """An HTTP client with the bench admin's session (through the login form)."""
    client = httpx.Client(base_url=url, timeout=60.0)
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    reply = client.post(
        "/login", data={"csrf_token": token, "username": ADMIN, "password": PASSWORD, "next": "/"}
    )
    if reply.status_code != 303:
        raise LorafleetError(f"bench: login failed with HTTP {reply.status_code}")
    return client


def requests_for(
    side: Side, client: httpx.Client, rng: random.Random
) -> dict[str, Callable[[], None]]:
    def get(path: str) -> None:
        reply = client.get(path)
        if reply.status_code != 200:
            raise LorafleetError(f"bench: GET {path} answered HTTP {reply.status_code}")

    return {
        "users_page": lambda: get(f"/users?after={rng.randrange(16**4):04x}"),
        "users_search": lambda: get(f"/users?q={rng.randrange(16**2):02x}"),
        "user_detail": lambda: get(f"/users/{rng.choice(side.pseudonyms)}"),
    }


def measure(
    sides: Sequence[Side], clients: Sequence[httpx.Client], n: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Latencies in ms, ``[page][side] -> samples``, interleaved across sides."""
    calls = [requests_for(s, c, random.Random(0)) for s, c in zip(sides, clients, strict=True)]
    samples: dict[str, dict[str, list[float]]] = {p: {s.name: [] for s in sides} for p in PAGES}
    for i in range(warmup + n):
        for page in PAGES:
            order = range(len(sides)) if i % 2 == 0 else reversed(range(len(sides)))
            for k in order:
                t0 = time.perf_counter_ns()
                calls[k][page]()
                elapsed = (time.perf_counter_ns() - t0) / 1e6
                if i >= warmup:
                    samples[page][sides[k].name].append(elapsed)
    return samples


def bench_main(args: argparse.Namespace) -> int:
    n_scaled = args.adapters or (QUICK_ADAPTERS if args.quick else FULL_ADAPTERS)
    n_base = args.baseline_adapters or (QUICK_BASELINE if args.quick else FULL_BASELINE)
    n_requests = args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS)
    warmup = QUICK_WARMUP if args.quick else FULL_WARMUP
    for what, n in (("--adapters", n_scaled), ("--baseline-adapters", n_base)):
        if n < 100:
            raise LorafleetError(f"{what} must be at least 100, got {n}")
    progress = not args.no_progress
    with data_dirs(args.dir) as root, ExitStack() as stack:
        sides = [
            Side("baseline", root / "baseline", n_base),
            Side("scaled", root / "scaled", n_scaled),
        ]
        clients = []
        for side in sides:
            log.info("filling %s: %d adapters", side.name, side.adapters)
            prepare(side, progress=progress)
            config = ConsoleConfig(data_dir=str(side.data_dir), port=0)
            server = stack.enter_context(ConsoleServer(create_app(config), config))
            side.url = server.url
            client = logged_in_client(side.url)
            stack.callback(client.close)
            clients.append(client)
        log.info(
            "timing %d requests of each page per console (after %d warm-up)", n_requests, warmup
        )
        samples = measure(sides, clients, n_requests, warmup)

    rows: list[dict[str, Any]] = []
    ratios: dict[str, Any] = {"p50_vs_baseline": {}, "p95_vs_baseline": {}}
    pct = registry_scale.percentile
    for page in PAGES:
        base, big = samples[page]["baseline"], samples[page]["scaled"]
        row = {
            "name": page,
            "p50_ms": pct(big, 50),
            "p95_ms": pct(big, 95),
            "p99_ms": pct(big, 99),
            "min_ms": min(big),
            "max_ms": max(big),
            "p50_ms_baseline": pct(base, 50),
            "p95_ms_baseline": pct(base, 95),
            "p99_ms_baseline": pct(base, 99),
            "n": len(big),
            "adapters": n_scaled,
            "adapters_baseline": n_base,
        }
        rows.append(row)
        ratios["p50_vs_baseline"][page] = _common.ratio(row["p50_ms"], row["p50_ms_baseline"])
        ratios["p95_vs_baseline"][page] = _common.ratio(row["p95_ms"], row["p95_ms_baseline"])
    users_p95 = rows[0]["p95_ms"]
    target = {
        "users_page_p95_ms": users_p95,
        "target_ms": TARGET_P95_MS,
        "met": users_p95 < TARGET_P95_MS,
    }
    print_table(sides, rows, ratios, target, n_requests)
    if args.json:
        machine = _common.machine_info()
        machine.update(
            {
                "backend": "sqlite",
                "max_rss_mb": _common.max_rss_mb(),
                "max_rss_of": "this process (server and client)",
            }
        )
        loads = {s.name + "_load_s": s.load_s for s in sides}
        _common.write_json(
            args.json,
            bench=BENCH,
            machine={**machine, **loads},
            rows=rows,
            ratios=ratios,
            target=target,
        )
        log.info("wrote %s", args.json)
    return 0


def print_table(
    sides: Sequence[Side],
    rows: list[dict[str, Any]],
    ratios: dict[str, Any],
    target: dict[str, Any],
    n: int,
) -> None:
    base, big = sides
    print(
        f"\nconsole pages over HTTP (uvicorn on loopback, SQLite): {big.adapters:,} adapters "
        f"(scaled, filled in {big.load_s:.0f} s) vs {base.adapters:,} (baseline), "
        f"{VERSIONS_PER_ADAPTER} versions each, {n} interleaved requests per page\n"
    )
    fmt = registry_scale.fmt_ms
    print(
        _common.format_table(
            ["page (ms)", "p50 base", "p95 base", "p50", "p95", "p99", "p50 ratio", "p95 ratio"],
            [
                [
                    r["name"],
                    fmt(r["p50_ms_baseline"]),
                    fmt(r["p95_ms_baseline"]),
                    fmt(r["p50_ms"]),
                    fmt(r["p95_ms"]),
                    fmt(r["p99_ms"]),
                    f"{ratios['p50_vs_baseline'][r['name']]:.2f}",
                    f"{ratios['p95_vs_baseline'][r['name']]:.2f}",
                ]
                for r in rows
            ],
        )
    )
    verdict = "met" if target["met"] else "NOT met"
    print(
        f"\nusers list p95: {target['users_page_p95_ms']:.2f} ms at {big.adapters:,} adapters "
        f"(target < {target['target_ms']:.0f} ms: {verdict})"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 vs 500 adapters")
    parser.add_argument("--dir", type=Path, help="folder for the two data dirs (default: temp)")
    parser.add_argument("--adapters", type=int, help="adapters in the scaled registry")
    parser.add_argument("--baseline-adapters", type=int, help="adapters in the baseline")
    parser.add_argument("--requests", type=int, help="timed requests of each page per console")
    parser.add_argument("--json", help="also write the result file here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return bench_main(args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
