"""Round time with SecAgg+ against plain aggregation, at the real B size.

The coordinator's real rounds (:class:`lorafleet.server.flower_app.RoundLoop`) run on
Flower's simulation engine (Ray) with ``n`` simulated devices, 10 to 200 by default
(``--sizes``), to show how a round's cost grows with the cohort.
Two federations share the same devices and alternate round by round, in rotating order
after one warm-up round each:

- ``plain`` (baseline): deltas in the clear, encoded in the ``--packing`` (fp16, the
  default), validated one by one and averaged;
- ``secagg+``: the same deltas through Flower's ``SecAggPlusWorkflow`` and
  ``secaggplus_mod`` with the parameters :func:`lorafleet.server.secagg.secagg_params`
  derives from the clip norm and ``n`` (the default ``3 log2 n`` neighbours, dropout share
  0.2; ``--num-shares -1`` makes every sampled device a neighbour, the former default).

The devices do not train: each sends a synthetic delta of the real B size (the default
spec on the default base, SmolLM2-135M: rank 8 on ``q_proj``/``v_proj``), norm 0.9 x
the clip norm, reproducible per device and round
(:func:`lorafleet.sim.runner.make_synthetic_client_app`). The devices' masking and
key agreement run in the Ray workers and count in the round time, as they would
delay a real round. Each row reports the round's wall time on the coordinator
(median, min, max over the timed rounds), the payload bytes each device uploaded per
round (under SecAgg+: keys, shares and the masked vector, uint32 on the wire) and its
ratio to the FlowerTune-style record (A and B in fp32, ``ArrayRecord`` of the peft state,
deflated as Flower pushes it; real base only), and the largest
difference between the mean the coordinator applied (read back from the float32 prior
it saved, so the prior's float32 rounding is included: ``prior_float32_ulp``) and the
exact float64 mean of the deltas, with SecAgg+'s stated tolerance beside it.

Usage (from the repository root)::

    python bench/secagg.py                        # real B size, 10 to 200 devices
    python bench/secagg.py --sizes 10,50 --repeats 3
    python bench/secagg.py --quick                # tiny B, 3 devices, 2 timed rounds
    python bench/secagg.py --json out.json --plot docs/img/secagg_scaling.png

The round time's growth is compared with ``n log n``: the ``vs n log n`` column is
``(t(n) / t(n0)) / (n log n / (n0 log n0))`` for the smallest size ``n0``, at most 1
when time grows no faster than ``n log n``.

Peak memory is this process's max RSS (the coordinator); Ray worker processes are not
counted.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import numpy as np

from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.federation import flatten

log = logging.getLogger("bench.secagg")

BENCH = "secagg"
PATHS = ("plain", "secagg+")
CLIP = 1.0
NORM_FRACTION = 0.9
DROPOUT_SHARE = 0.2


@dataclass(frozen=True)
class Size:
    """How much to run."""

    clients: tuple[int, ...]
    warmup: int
    repeats: int


FULL = Size(clients=(10, 20, 50, 100, 200), warmup=1, repeats=5)
QUICK = Size(clients=(3,), warmup=1, repeats=2)
QUICK_SHAPES = {"l0.q_proj.lora_B": (48, 4), "l0.v_proj.lora_B": (16, 4)}


def default_b_shapes(
    base: str, cache_dir: Path | None
) -> tuple[dict[str, tuple[int, ...]], str, int]:
    """B's shapes for the default spec on ``base``, the base's id, the FlowerTune record bytes.

    The last is what a FlowerTune app's train reply pushes for the same adapter:
    ``ArrayRecord(get_peft_model_state_dict(model))`` (A and B, fp32), deflated.
    """
    from flwr.app import ArrayRecord
    from peft import get_peft_model_state_dict

    from lorafleet.client.adapter import get_b, materialize, set_b
    from lorafleet.client.base import load_base
    from lorafleet.protocols.spec import AdapterSpec
    from lorafleet.server.coordinator import CoordinatorConfig
    from lorafleet.sim.runner import synthetic_delta

    defaults = CoordinatorConfig()
    loaded = load_base(base, cache_dir=cache_dir)
    spec = AdapterSpec(
        base_model_id=loaded.model_id,
        base_sha256=loaded.sha256,
        rank=defaults.rank,
        alpha=defaults.alpha,
        target_modules=defaults.spec.target_modules,
    )
    model = materialize(loaded.model, spec, base_sha256=loaded.sha256)
    shapes = {k: tuple(v.shape) for k, v in get_b(model).items()}
    # A trained B is non-zero; a zero B would let Flower deduplicate identical chunks.
    set_b(model, synthetic_delta(shapes, 1.0, (0, 0)))
    flowertune = _common.flower_wire_bytes(ArrayRecord(get_peft_model_state_dict(model)))
    return shapes, loaded.model_id, flowertune


def exact_mean(shapes: Mapping[str, tuple[int, ...]], n: int, round_number: int) -> np.ndarray:
    """The float64 mean of the devices' synthetic deltas in one round."""
    from lorafleet.sim.runner import synthetic_delta

    total = np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float64)
    for pid in range(n):
        flat, _ = flatten(synthetic_delta(shapes, NORM_FRACTION * CLIP, (pid, round_number)))
        total += flat
    return total / n


def run_pair(
    shapes: Mapping[str, tuple[int, ...]],
    n: int,
    size: Size,
    work: Path,
    packing: str,
    num_shares: int,
) -> list[dict[str, Any]]:
    """One Ray simulation with ``n`` devices; plain and SecAgg+ rounds interleaved."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from lorafleet.server.coordinator import CoordinatorConfig, CoordinatorState
    from lorafleet.server.flower_app import RoundLoop
    from lorafleet.server.secagg import secagg_params
    from lorafleet.sim.runner import make_synthetic_client_app

    def cfg(path: str) -> CoordinatorConfig:
        return CoordinatorConfig(
            num_rounds=size.warmup + size.repeats,
            fraction_train=1.0,
            min_train_nodes=2,
            min_available_nodes=n,
            wait_for_nodes_s=300,
            clip_norm=CLIP,
            packing=packing,
            base_model_id="synthetic",
            base_sha256="0" * 64,
            data_dir=str(work / f"{path}-{n}"),
            final_evaluation=False,
            secure_aggregation=path == "secagg+",
            secagg_dropout_share=DROPOUT_SHARE,
            secagg_num_shares=num_shares,
            shared_a="seeded",  # synthetic devices send deltas, never a gradient sketch
        )

    timings: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        coords = {p: CoordinatorState.open(cfg(p)) for p in PATHS}
        try:
            feds = {p: RoundLoop(grid, coords[p]) for p in PATHS}
            feds["plain"].wait_for_nodes()
            state: dict[str, tuple[str, Any]] = {p: ("zero", None) for p in PATHS}
            for rep in range(size.warmup + size.repeats):
                number = rep + 1
                exact = exact_mean(shapes, n, number)
                order = PATHS if rep % 2 == 0 else tuple(reversed(PATHS))
                for path in order:
                    ref, prior = state[path]
                    outcome = feds[path].run_round(number, 0, ref, prior)
                    if outcome.prior_version is None:
                        raise LorafleetError(f"{path} round {number} failed: {outcome.failure}")
                    # The round's aggregate (a candidate until the next round scores it)
                    new_prior = coords[path].load_prior(
                        coords[path].registry.get_prior(outcome.prior_version)
                    )
                    before = flatten(prior)[0] if prior is not None else 0.0
                    applied = flatten(new_prior)[0].astype(np.float64) - before
                    state[path] = (outcome.prior_version, new_prior)
                    log.info("%s, %d devices, round %d: %.2f s", path, n, number, outcome.seconds)
                    if rep >= size.warmup:
                        timings[path].append(
                            {
                                "seconds": outcome.seconds,
                                "bytes_up_per_client": outcome.bytes_up / outcome.accepted,
                                "max_abs_err": float(np.abs(applied - exact).max()),
                                # the prior is stored in float32: its rounding is in the error
                                "ulp": float(
                                    np.spacing(np.float32(np.abs(flatten(new_prior)[0]).max()))
                                ),
                            }
                        )
        finally:
            for coord in coords.values():
                coord.close()

    os.environ.setdefault("RAY_TMPDIR", f"/tmp/lorafleet-ray-{os.getpid()}")
    os.environ.setdefault("FLWR_HOME", str(work / "flwr-home"))
    run_simulation(
        server_app=server_app,
        client_app=make_synthetic_client_app(shapes, norm_fraction=NORM_FRACTION),
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    if any(len(t) != size.repeats for t in timings.values()):
        raise LorafleetError(f"the {n}-device simulation did not finish; see the log above")
    values = sum(int(np.prod(s)) for s in shapes.values())
    params = secagg_params(
        n,
        clip_norm=CLIP,
        dropout_share=DROPOUT_SHARE,
        num_shares=num_shares,
        max_weight=cfg("secagg+").example_weight_cap,
    )
    rows: list[dict[str, Any]] = []
    base_stats = _common.Stats.of([t["seconds"] for t in timings["plain"]])
    for path in PATHS:
        stats = _common.Stats.of([t["seconds"] for t in timings[path]])
        rows.append(
            {
                "section": "round",
                "name": f"{path}/{n}",
                "path": path if path != "plain" else f"plain-{packing}",
                "clients": n,
                "values": values,
                "seconds": stats.median,
                "seconds_min": stats.min,
                "seconds_max": stats.max,
                "repeats": stats.n,
                "ratio_vs_baseline": _common.ratio(stats.median, base_stats.median),
                "bytes_up_per_client": float(
                    np.median([t["bytes_up_per_client"] for t in timings[path]])
                ),
                "max_abs_err_vs_exact_mean": max(t["max_abs_err"] for t in timings[path]),
                "prior_float32_ulp": max(t["ulp"] for t in timings[path]),
                **(
                    {
                        "tolerance": params.tolerance,
                        "num_shares": params.num_shares,
                        "threshold": params.threshold,
                    }
                    if path == "secagg+"
                    else {}
                ),
            }
        )
    return rows


def add_growth(rows: Sequence[dict[str, Any]], flowertune_bytes: int | None) -> None:
    """Each row's growth against ``n log n`` from the smallest size, and its FlowerTune ratio."""
    for path in {r["path"] for r in rows}:
        mine = sorted((r for r in rows if r["path"] == path), key=lambda r: r["clients"])
        n0, t0 = mine[0]["clients"], mine[0]["seconds"]
        for r in mine:
            n = r["clients"]
            r["time_growth"] = r["seconds"] / t0
            r["nlogn_growth"] = (n * math.log(n)) / (n0 * math.log(n0))
            r["growth_vs_nlogn"] = r["time_growth"] / r["nlogn_growth"]
    for r in rows:
        if flowertune_bytes:
            r["bytes_up_vs_flowertune"] = r["bytes_up_per_client"] / flowertune_bytes


def print_report(rows: Sequence[Mapping[str, Any]], shapes_note: str) -> None:
    """The table."""
    print(f"\nround time, SecAgg+ vs plain aggregation ({shapes_note})")
    headers = [
        "path",
        "devices",
        "k/t",
        "round s (min-max)",
        "vs plain",
        "vs n log n",
        "up/device",
        "vs FlowerTune",
        "max |err|",
    ]
    table = [
        [
            str(r["path"]),
            str(r["clients"]),
            f"{r['num_shares']}/{r['threshold']}" if "num_shares" in r else "-",
            f"{r['seconds']:.2f} ({r['seconds_min']:.2f}-{r['seconds_max']:.2f})",
            f"{r['ratio_vs_baseline']:.2f}x",
            f"{r['growth_vs_nlogn']:.2f}",
            f"{r['bytes_up_per_client'] / 1e6:.3f} MB",
            f"{r['bytes_up_vs_flowertune']:.3f}x" if "bytes_up_vs_flowertune" in r else "n/a",
            f"{r['max_abs_err_vs_exact_mean']:.1e}",
        ]
        for r in rows
    ]
    print(_common.format_table(headers, table))
    tol = [r["tolerance"] for r in rows if "tolerance" in r]
    if tol:
        ulp = max(r["prior_float32_ulp"] for r in rows)
        print(
            f"SecAgg+ stated tolerance per value: < {max(tol):.1e} (a quantization step "
            "times the weight cap); "
            f"errors include the float32 prior's rounding (ulp {ulp:.1e})"
        )
    print(
        "k/t: SecAgg+ neighbours per device (itself included) and threshold; vs n log n: "
        "(t(n)/t(n0)) / (n log n / n0 log n0), <= 1 when time grows no faster than n log n"
    )


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Round time against devices, per path, with ``n log n`` through the first point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["path"] for r in rows):
        mine = sorted((r for r in rows if r["path"] == name), key=lambda r: r["clients"])
        ns = [r["clients"] for r in mine]
        ax.errorbar(
            ns,
            [r["seconds"] for r in mine],
            yerr=[
                [r["seconds"] - r["seconds_min"] for r in mine],
                [r["seconds_max"] - r["seconds"] for r in mine],
            ],
            marker="o",
            capsize=3,
            label=f"{name} (median, min-max)",
        )
        if name == "secagg+":
            grid = np.linspace(ns[0], ns[-1], 100)
            ref = mine[0]["seconds"] * grid * np.log(grid) / (ns[0] * math.log(ns[0]))
            ax.plot(grid, ref, "k:", label="n log n through the first point")
    ax.set_xlabel("devices in the round (n)")
    ax.set_ylabel("coordinator seconds per round")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_main(args: argparse.Namespace) -> int:
    size = QUICK if args.quick else FULL
    if args.sizes:
        size = Size(tuple(args.sizes), size.warmup, size.repeats)
    if args.repeats:
        size = Size(size.clients, size.warmup, args.repeats)
    flowertune: int | None = None
    if args.quick:
        shapes, model = dict(QUICK_SHAPES), "synthetic (quick)"
    else:
        log.info("loading %s to size B for the default spec", args.base)
        shapes, model, flowertune = default_b_shapes(args.base, args.cache_dir)
    values = sum(int(np.prod(s)) for s in shapes.values())
    note = f"{values:,} B values ({len(shapes)} tensors) of {model}; deltas of norm {NORM_FRACTION} x clip {CLIP}"
    log.info(note)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-secagg-") as tmp:
        for n in size.clients:
            log.info(
                "%d devices: %d warm-up + %d timed rounds per path", n, size.warmup, size.repeats
            )
            rows += run_pair(shapes, n, size, Path(tmp), args.packing, args.num_shares)
    add_growth(rows, flowertune)
    print_report(rows, note)
    if args.plot:
        plot(rows, Path(args.plot), note)
        log.info("wrote %s", args.plot)
    ratios: dict[str, Any] = {
        "secagg_round_time_vs_plain": {
            str(r["clients"]): r["ratio_vs_baseline"]
            for r in rows
            if r["name"].startswith("secagg+")
        },
        "secagg_bytes_up_vs_plain": {
            str(s["clients"]): _common.ratio(s["bytes_up_per_client"], p["bytes_up_per_client"])
            for s, p in zip(rows[1::2], rows[0::2], strict=True)
        },
        "secagg_time_growth_vs_nlogn": {
            str(r["clients"]): r["growth_vs_nlogn"] for r in rows if r["path"] == "secagg+"
        },
    }
    if flowertune:
        ratios["secagg_bytes_up_vs_flowertune"] = {
            str(r["clients"]): r["bytes_up_vs_flowertune"] for r in rows if r["path"] == "secagg+"
        }
    if args.json:
        import flwr

        machine = _common.machine_info()
        machine.update(
            {
                "flwr": flwr.__version__,
                "numpy": np.__version__,
                "base": model,
                "max_rss_mb": _common.max_rss_mb(),
                "max_rss_of": "this process (Ray worker processes not counted)",
                "load_average": _common.load_average(),
            }
        )
        _common.write_json(
            args.json,
            bench=BENCH,
            machine=machine,
            rows=rows,
            ratios=ratios,
            size={
                "quick": bool(args.quick),
                "clients": list(size.clients),
                "num_shares": args.num_shares,
                "warmup": size.warmup,
                "repeats": size.repeats,
                "values": values,
                "shapes": {k: list(v) for k, v in shapes.items()},
                "packing": args.packing,
                "flowertune_record_bytes": flowertune,
            },
        )
        log.info("wrote %s", args.json)
    return 0


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes takes counts like 10,50,200, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"--sizes needs counts of at least 2, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny B, 3 devices, 2 timed rounds")
    parser.add_argument("--base", default="default", help="base model whose B size to use")
    parser.add_argument("--cache-dir", type=Path, help="lorafleet cache root (base conversions)")
    parser.add_argument(
        "--sizes",
        type=_sizes,
        help="device counts, comma-separated (default 10,20,50,100,200; --quick: 3)",
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per path and size (default 5)")
    parser.add_argument(
        "--num-shares",
        type=int,
        default=0,
        help="secagg-num-shares: 0 auto (3 log2 n), -1 every device, or a count >= 3",
    )
    parser.add_argument("--plot", help="also write the round-time curve (PNG) here")
    parser.add_argument("--packing", default="fp16", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--json", help="also write the result file here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("alembic", "lorafleet.server.registry", "flwr", "lorafleet.server.flower_app"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = time.perf_counter()
    try:
        code = bench_main(args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("done in %.0f s", time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
