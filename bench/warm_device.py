"""A real deployment's round time and device memory: fresh ClientApp per round vs a warm worker.

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message, so
without a device worker each round loads the base again. This benchmark runs the same
federation twice on loopback, as docs/deployment.md sets one up (a SuperLink with TLS
and SuperNode authentication, N registered SuperNodes, each with its own user's notes,
the app submitted with ``flwr run .``):

- ``fresh-process`` (baseline): today's default, the ClientApp loads the base per round;
- ``device-worker``: each SuperNode has its own ``lorafleet serve-device`` worker
  (``device-worker`` in its node config), started before the run, so round 1 pays the
  worker's one base load and later rounds find the base warm.

Reported per mode: seconds per round (the coordinator's own round time from
``results.json``, median with min/max over the rounds, and round 1 apart since it
includes the worker's load), and device memory over time: the summed RSS of every
``flwr-clientapp`` process under the SuperNodes plus the workers, sampled with psutil
every 0.25 s during the run (peak and mean; the series goes to ``--json``). Ratios are
against ``fresh-process`` measured in the same run.

Usage (from the repository root)::

    python bench/warm_device.py                      # default base, 4 nodes, 3 rounds
    python bench/warm_device.py --base /path/to/model --nodes 2 --rounds 2 --steps 2
    python bench/warm_device.py --quick --base /path/to/tiny-model   # 2 nodes, 2 rounds
    python bench/warm_device.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common
import psutil

from lorafleet.sim import loopback

log = logging.getLogger("bench.warm_device")

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "lorafleet-bench"
MODES = ("fresh-process", "device-worker")


def device_process(name: str, proc: psutil.Process) -> bool:
    """A device's process: its worker, or a ClientApp a SuperNode started."""
    if name.startswith("worker-"):
        return True
    return name.startswith("supernode-") and any("flwr-clientapp" in p for p in proc.cmdline())


def run_mode(mode: str, args: argparse.Namespace, work: Path, users: list[Path]) -> dict[str, Any]:
    """One federation in ``mode``; round times from results.json and the RSS series."""
    from lorafleet.client.base import load_base

    root = work / mode
    certs, keys = root / "certs", root / "keys"
    names = [f"sn-{i}" for i in range(1, args.nodes + 1)]
    script = REPO / "deploy" / "credentials.py"
    loopback.credentials(script, "tls", str(certs))
    loopback.credentials(script, "node-keys", str(keys), *names)
    sockets = Path(tempfile.mkdtemp(prefix="lfb-", dir="/tmp"))  # sun_path: 107 bytes
    fleet = loopback.Processes(root / "logs")
    port = loopback.free_port()
    # A device's processes (its SuperNode, the ClientApps it spawns, its worker) share its
    # thread budget; torch reads OMP_NUM_THREADS when it starts.
    device_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}

    def flwr_json(*flwr_args: str) -> Any:
        return loopback.flwr_json(cli, *flwr_args, cwd=REPO)

    try:
        fleet.start(
            "superlink",
            loopback.superlink(port, certs, root / "superlink.db"),
            loopback.flower_env(root / "home" / "superlink"),
            root,
        )
        cli = loopback.flower_env(root / "home" / "cli")
        loopback.write_connection(root / "home" / "cli", CONNECTION, port, certs / "ca.crt")

        def listening() -> bool:
            try:
                return bool(flwr_json("supernode", "list", CONNECTION))
            except RuntimeError:
                return False

        loopback.wait_until(listening, 120, "the SuperLink", fleet.tail)
        for name in names:
            flwr_json("supernode", "register", str(keys / f"{name}.pub"), CONNECTION)
        for name, user in zip(names, users, strict=True):
            config = (
                f"data='{user}' profile='{root / 'profiles' / user.name}' base='{args.base}' "
                f"precision='{args.precision}' device='cpu'"
            )
            if args.cache_dir:
                config += f" cache-dir='{args.cache_dir}'"
            if mode == "device-worker":
                sock = sockets / name / "w.sock"
                fleet.start(
                    f"worker-{name}",
                    [str(loopback.BIN / "lorafleet"), "serve-device", "--socket", str(sock)],
                    loopback.flower_env(root / "home" / f"worker-{name}", **device_env),
                    root,
                )
                loopback.wait_until(
                    lambda n=name: "serving on" in fleet.log(f"worker-{n}"),  # type: ignore[misc]
                    180,
                    f"worker-{name}",
                    fleet.tail,
                )
                config += f" device-worker='{sock}'"
            fleet.start(
                f"supernode-{name}",
                loopback.supernode(port, certs, keys / name, config, max_wait_time=120),
                loopback.flower_env(root / "home" / name, **device_env),
                root,
            )

        def online() -> bool:
            nodes = flwr_json("supernode", "list", CONNECTION)["nodes"]
            return sum(n["status"] == "online" for n in nodes) == args.nodes

        loopback.wait_until(online, 180, f"{args.nodes} SuperNodes online", fleet.tail)
        overrides = {
            "num-rounds": args.rounds,
            "fraction-train": 1.0,
            "min-train-nodes": args.nodes,
            "min-available-nodes": args.nodes,
            "wait-for-nodes-s": 120.0,
            "round-timeout-s": args.round_timeout,
            "max-round-retries": 0,
            "personal-steps": args.steps,
            "prior-steps": args.steps,
            "personalize-steps": 0,
            "final-evaluation": False,
            "seq-len": args.seq_len,
            "base-model-id": "bench",
            "base-sha256": load_base(args.base, cache_dir=args.cache_dir).sha256,
            "data-dir": str(root / "coordinator"),
        }
        series: list[tuple[float, float]] = []
        done = threading.Event()
        started = time.perf_counter()

        def sample() -> None:
            while not done.wait(0.25):
                series.append((time.perf_counter() - started, fleet.rss_mib(device_process)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        config_arg = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        run_id = str(flwr_json("run", ".", CONNECTION, "-c", config_arg)["run-id"])

        def finished() -> bool:
            found = flwr_json("list", CONNECTION, "--run-id", run_id)["runs"][0]
            status = str(found["status"])
            if status.startswith("finished") and status != "finished:completed":
                raise SystemExit(f"{mode}: run {status}: {found.get('status-details', '')}")
            return status == "finished:completed"

        loopback.wait_until(
            finished, args.rounds * args.round_timeout + 300, f"the {mode} run", fleet.tail
        )
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    finally:
        fleet.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    results = json.loads((root / "coordinator" / "results.json").read_text())
    seconds = [float(r["seconds"]) for r in results["rounds"]]
    accepted = [int(r["accepted"]) for r in results["rounds"]]
    if accepted != [args.nodes] * args.rounds:
        raise SystemExit(f"{mode}: accepted updates per round {accepted}, not all {args.nodes}")
    rss = [m for _, m in series] or [0.0]
    return {
        "name": mode,
        "nodes": args.nodes,
        "rounds": args.rounds,
        "round_seconds": seconds,
        "round_s": _common.Stats.of(seconds).to_dict(),
        "first_round_s": seconds[0],
        "later_rounds_s": _common.Stats.of(seconds[1:]).to_dict() if len(seconds) > 1 else None,
        "run_wall_s": wall,
        "device_rss_peak_mb": max(rss),
        "device_rss_mean_mb": statistics.fmean(rss),
        "rss_series": [[round(t, 2), round(m, 1)] for t, m in series],
    }


def write_users(n: int, folder: Path) -> list[Path]:
    from lorafleet.sim.personas import PersonaConfig, generate_personas, write_user_folders

    users = write_user_folders(
        generate_personas(PersonaConfig(num_users=n, notes_per_user=30)), folder
    )
    return sorted(p for p in users.iterdir() if p.is_dir())


def bench_main(args: argparse.Namespace) -> int:
    if args.quick:
        args.nodes, args.rounds, args.steps = 2, 2, min(args.steps, 2)
    if args.nodes < 1 or args.rounds < 1 or args.steps < 1:
        raise SystemExit("error: --nodes, --rounds and --steps must be >= 1")
    if args.threads < 0:
        raise SystemExit("error: --threads must be >= 0 (0: torch's default)")
    with tempfile.TemporaryDirectory(prefix="warm-device-") as tmp:
        work = Path(tmp)
        users = write_users(args.nodes, work / "users")
        rows = [run_mode(mode, args, work, users) for mode in MODES]
    base, warm = rows
    ratios = {
        "round_s_median": _common.ratio(warm["round_s"]["median"], base["round_s"]["median"]),
        "later_rounds_s_median": _common.ratio(
            (warm["later_rounds_s"] or warm["round_s"])["median"],
            (base["later_rounds_s"] or base["round_s"])["median"],
        ),
        "device_rss_peak": _common.ratio(warm["device_rss_peak_mb"], base["device_rss_peak_mb"]),
        "device_rss_mean": _common.ratio(warm["device_rss_mean_mb"], base["device_rss_mean_mb"]),
    }
    machine = _common.machine_info()
    print(_common.class_line(machine))
    print(
        f"{args.nodes} SuperNodes (TLS, node auth) on loopback, {args.rounds} rounds, "
        f"{args.steps} prior + {args.steps} personal steps, base {args.base}, "
        f"torch threads per device: {args.threads or 'default'}\n"
    )
    headers = [
        "mode",
        "round s (median)",
        "min..max",
        "round 1 s",
        "later rounds s",
        "RSS peak MiB",
        "RSS mean MiB",
    ]
    table = []
    for r in rows:
        later = r["later_rounds_s"]
        table.append(
            [
                r["name"],
                f"{r['round_s']['median']:.1f}",
                f"{r['round_s']['min']:.1f}..{r['round_s']['max']:.1f}",
                f"{r['first_round_s']:.1f}",
                f"{later['median']:.1f}" if later else "-",
                f"{r['device_rss_peak_mb']:.0f}",
                f"{r['device_rss_mean_mb']:.0f}",
            ]
        )
    print(_common.format_table(headers, table))
    print(
        "\nratios device-worker / fresh-process: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    )
    for r in rows:
        trace = " ".join(
            f"{t:.0f}s:{m:.0f}" for t, m in r["rss_series"][:: max(1, len(r["rss_series"]) // 12)]
        )
        print(f"device RSS over time, {r['name']} (s:MiB): {trace}")
    if args.json:
        _common.write_json(
            args.json,
            bench="warm_device",
            machine=machine,
            rows=rows,
            ratios=ratios,
            size={
                "nodes": args.nodes,
                "rounds": args.rounds,
                "steps": args.steps,
                "base": str(args.base),
                "threads": args.threads,
                "quick": args.quick,
            },
        )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4, help="SuperNodes (one user each)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds per mode")
    parser.add_argument("--base", default="default", help="base model: default or a folder")
    parser.add_argument("--steps", type=int, default=8, help="prior and personal steps per round")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training block")
    parser.add_argument("--precision", default="fp32", help="device precision (fp32: comparable)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per device (0: torch's default); with more devices than cores, "
        "1 keeps them from oversubscribing the machine",
    )
    parser.add_argument("--round-timeout", type=float, default=900.0, help="seconds per round")
    parser.add_argument("--cache-dir", type=Path, help="lorafleet cache root (base conversions)")
    parser.add_argument("--quick", action="store_true", help="2 nodes, 2 rounds, 2 steps")
    parser.add_argument("--json", help="also write the result file here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return _common.run_main(bench_main, args, log)


if __name__ == "__main__":
    sys.exit(main())
