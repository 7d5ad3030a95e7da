"""Round time with SecAgg+ against plain aggregation, at the real B size.

The coordinator's real rounds (:class:`lorafleet.server.flower_app.Federation`) run on
Flower's simulation engine (Ray) with ``n`` simulated devices, 10 and 50 by default.
Two federations share the same devices and alternate round by round, in rotating order
after one warm-up round each:

- ``plain`` (baseline): deltas in the clear, encoded in the ``--packing`` (fp16, the
  default), validated one by one and averaged;
- ``secagg+``: the same deltas through Flower's ``SecAggPlusWorkflow`` and
  ``secaggplus_mod`` with the parameters :func:`lorafleet.server.secagg.secagg_params`
  derives from the clip norm (all sampled devices as neighbours, dropout share 0.2).

The devices do not train: each sends a synthetic delta of the real B size (the default
spec on the default base, SmolLM2-135M: rank 8 on ``q_proj``/``v_proj``), norm 0.9 x
the clip norm, reproducible per device and round
(:func:`lorafleet.sim.runner.make_synthetic_client_app`). The devices' masking and
key agreement run in the Ray workers and count in the round time, as they would
delay a real round. Each row reports the round's wall time on the coordinator
(median, min, max over the timed rounds), the payload bytes each device uploaded per
round (under SecAgg+: keys, shares and the masked int64 vector), and the largest
difference between the mean the coordinator applied (read back from the float32 prior
it saved, so the prior's float32 rounding is included: ``prior_float32_ulp``) and the
exact float64 mean of the deltas, with SecAgg+'s stated tolerance beside it.

Usage (from the repository root)::

    python bench/secagg.py                  # real B size, 10 and 50 devices
    python bench/secagg.py --quick          # tiny B, 3 devices, 2 timed rounds
    python bench/secagg.py --json out.json  # also write the result file

Peak memory is this process's max RSS (the coordinator); Ray worker processes are not
counted.
"""

from __future__ import annotations

import argparse
import logging
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


@dataclass(frozen=True)
class Size:
    """How much to run."""

    clients: tuple[int, ...]
    warmup: int
    repeats: int


FULL = Size(clients=(10, 50), warmup=1, repeats=5)
QUICK = Size(clients=(3,), warmup=1, repeats=2)
QUICK_SHAPES = {"l0.q_proj.lora_B": (48, 4), "l0.v_proj.lora_B": (16, 4)}


def default_b_shapes(base: str, cache_dir: Path | None) -> tuple[dict[str, tuple[int, ...]], str]:
    """B's shapes for the default spec (rank, targets) on ``base``, and the base's id."""
    from lorafleet.client.adapter import get_b, materialize
    from lorafleet.client.base import load_base
    from lorafleet.protocols.spec import AdapterSpec
    from lorafleet.server.coordinator import CoordinatorConfig

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
    return {k: tuple(v.shape) for k, v in get_b(model).items()}, loaded.model_id


def exact_mean(shapes: Mapping[str, tuple[int, ...]], n: int, round_number: int) -> np.ndarray:
    """The float64 mean of the devices' synthetic deltas in one round."""
    from lorafleet.sim.runner import synthetic_delta

    total = np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float64)
    for pid in range(n):
        flat, _ = flatten(synthetic_delta(shapes, NORM_FRACTION * CLIP, (pid, round_number)))
        total += flat
    return total / n


def run_pair(
    shapes: Mapping[str, tuple[int, ...]], n: int, size: Size, work: Path, packing: str
) -> list[dict[str, Any]]:
    """One Ray simulation with ``n`` devices; plain and SecAgg+ rounds interleaved."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from lorafleet.server.coordinator import Coordinator, CoordinatorConfig
    from lorafleet.server.flower_app import Federation
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
        )

    timings: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        coords = {p: Coordinator.open(cfg(p)) for p in PATHS}
        try:
            feds = {p: Federation(grid, coords[p]) for p in PATHS}
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
                    _, new_prior = coords[path].active_prior()
                    assert new_prior is not None
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
    tolerance = secagg_params(n, clip_norm=CLIP, dropout_share=0.2).tolerance
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
                **({"tolerance": tolerance} if path == "secagg+" else {}),
            }
        )
    return rows


def print_report(rows: Sequence[Mapping[str, Any]], shapes_note: str) -> None:
    """The table."""
    print(f"\nround time, SecAgg+ vs plain aggregation ({shapes_note})")
    headers = ["path", "devices", "round s (min-max)", "vs plain", "up/device", "max |err|"]
    table = [
        [
            str(r["path"]),
            str(r["clients"]),
            f"{r['seconds']:.2f} ({r['seconds_min']:.2f}-{r['seconds_max']:.2f})",
            f"{r['ratio_vs_baseline']:.2f}x",
            f"{r['bytes_up_per_client'] / 1e6:.2f} MB",
            f"{r['max_abs_err_vs_exact_mean']:.1e}",
        ]
        for r in rows
    ]
    print(_common.format_table(headers, table))
    tol = [r["tolerance"] for r in rows if "tolerance" in r]
    if tol:
        ulp = max(r["prior_float32_ulp"] for r in rows)
        print(
            f"SecAgg+ stated tolerance per value: < {max(tol):.1e} (one quantization step); "
            f"errors include the float32 prior's rounding (ulp {ulp:.1e})"
        )


def bench_main(args: argparse.Namespace) -> int:
    size = QUICK if args.quick else FULL
    if args.clients:
        size = Size(tuple(args.clients), size.warmup, size.repeats)
    if args.quick:
        shapes, model = dict(QUICK_SHAPES), "synthetic (quick)"
    else:
        log.info("loading %s to size B for the default spec", args.base)
        shapes, model = default_b_shapes(args.base, args.cache_dir)
    values = sum(int(np.prod(s)) for s in shapes.values())
    note = f"{values:,} B values ({len(shapes)} tensors) of {model}; deltas of norm {NORM_FRACTION} x clip {CLIP}"
    log.info(note)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-secagg-") as tmp:
        for n in size.clients:
            log.info(
                "%d devices: %d warm-up + %d timed rounds per path", n, size.warmup, size.repeats
            )
            rows += run_pair(shapes, n, size, Path(tmp), args.packing)
    print_report(rows, note)
    ratios = {
        "secagg_round_time_vs_plain": {
            str(r["clients"]): r["ratio_vs_baseline"]
            for r in rows
            if r["name"].startswith("secagg+")
        },
        "secagg_bytes_up_vs_plain": {
            str(s["clients"]): _common.ratio(s["bytes_up_per_client"], p["bytes_up_per_client"])
            for s, p in zip(rows[1::2], rows[0::2], strict=True)
        },
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
                "warmup": size.warmup,
                "repeats": size.repeats,
                "values": values,
                "shapes": {k: list(v) for k, v in shapes.items()},
                "packing": args.packing,
            },
        )
        log.info("wrote %s", args.json)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny B, 3 devices, 2 timed rounds")
    parser.add_argument("--base", default="default", help="base model whose B size to use")
    parser.add_argument("--cache-dir", type=Path, help="lorafleet cache root (base conversions)")
    parser.add_argument("--clients", type=int, nargs="+", help="device counts (default 10 50)")
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
