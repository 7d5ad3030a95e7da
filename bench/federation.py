"""Federated rounds: upload bytes against FlowerTune, gain per packing, aggregation time.

Three measurements of lorafleet's federation, each beside the baseline it must beat:

1. **Bytes uploaded per client per round.** The baseline is what a FlowerTune app sends:
   the full peft LoRA state dict (A and B, fp32) as ``ArrayRecord(get_peft_model_state_dict
   (model))`` (the FlowerTune template's train reply). Its size is what Flower 1.41's
   transport pushes for that record: the deflated bytes of the record and every object
   under it (``Array`` metadata and ``ArrayChunk`` data, ``np.save`` format), summed over
   ``get_all_nested_objects`` as ``push_objects`` does; gRPC framing and the message
   envelope are left out on both sides. lorafleet's rows are the reply payload
   :func:`lorafleet.client.federated` builds: ``encode_tensors(delta_B, packing=p,
   metadata={"prior_version": ...})``, for ``p`` in fp32, fp16 and int8; the same
   payload wrapped in the reply's ``ConfigRecord`` and deflated the same way is shown
   too. Shapes come from the real base (adapter materialized on it; rank 8 on
   ``q_proj``/``v_proj``); byte counts do not depend on values, but B holds non-zero
   values so Flower's content-addressed chunks are not deduplicated.
2. **Personalization gain per packing.** One small real federation per packing (same
   personas, seeds and hyper-parameters; fresh coordinator state and profiles each)
   through :func:`lorafleet.sim.runner.simulate`. The gain is the mean over users of
   ``(base_loss - personal_loss) / base_loss`` from the final evaluation; each packing's
   gain is compared with fp32's (target: within 2%). The coordinator's own count of
   accepted upload bytes per client is reported as a cross-check of (1).
3. **Coordinator aggregation time per round** for 10, 100 and 1000 clients' synthetic
   deltas of the real B shapes (global norm 0.9 under clip norm 1.0; example weights
   20..200). Timed, interleaved in rotating order, median after one warm-up:

   - ``flower-aggregate_arrayrecords`` (baseline): Flower's own weighted mean of
     ArrayRecords, ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords``, the
     function Flower's FedAvg aggregates with, on the same deltas as fp32 ``Array`` objects
     (it deserializes each array, averages, and serializes the result);
   - ``lorafleet-fedavg`` / ``lorafleet-fedadam``: ``refusal_reason`` on every update
     plus ``FedAvg().step`` / ``FedAdam().step`` on the decoded deltas;
   - ``lorafleet-fedavg+decode-fp16``: the coordinator's whole path from received bytes:
     ``decode_tensors`` of each client's fp16 payload, then the above.

   Per-client decode time of the packed payloads (``decode_tensors``), on the
   coordinator's path, is given for each packing beside Flower's per-client
   deserialization (``Array.numpy()`` of each array of the FlowerTune-style B record).

Usage (from the repository root)::

    python bench/federation.py                  # default base (SmolLM2-135M), full size
    python bench/federation.py --quick          # tiny test model, 3 users, 1 round
    python bench/federation.py --json out.json  # also write the result file

Peak memory is this process's max RSS; the simulated devices run in Ray worker
processes that are not counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import numpy as np

from lorafleet.protocols.encoding import Packing, decode_tensors, encode_tensors
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.federation import DELTA_FIELD, BTensors, global_norm
from lorafleet.protocols.spec import AdapterSpec

log = logging.getLogger("bench.federation")

BENCH = "federation"
REPO = Path(__file__).resolve().parents[1]
PACKINGS: tuple[Packing, ...] = ("fp32", "fp16", "int8")
RANK, ALPHA, TARGETS = 8, 16.0, ("q_proj", "v_proj")
CLIP_NORM, DELTA_NORM = 1.0, 0.9
TARGET_BYTES = {"fp16": 1 / 4, "int8": 1 / 8}
TARGET_GAIN_REL = 0.02
BASELINE = "flower-aggregate_arrayrecords"
AGG_PATHS = (BASELINE, "lorafleet-fedavg", "lorafleet-fedadam", "lorafleet-fedavg+decode-fp16")
DECODE_SAMPLE = 40  # clients whose payloads are decoded one by one for the per-client time


@dataclass(frozen=True)
class Size:
    """Everything ``--quick`` shrinks."""

    users: int
    notes_per_user: int
    rounds: int
    steps: int
    seq_len: int
    lr: float
    clients: tuple[int, ...]
    repeats: Mapping[int, int]
    decode_repeats: int
    actors: int  # Ray actors (simulated devices in flight), one CPU each


FULL = Size(
    users=4,
    notes_per_user=60,
    rounds=2,
    steps=4,
    seq_len=128,
    lr=2e-3,
    clients=(10, 100, 1000),
    repeats={10: 30, 100: 10, 1000: 5},
    decode_repeats=5,
    actors=2,
)
QUICK = Size(
    users=3,
    notes_per_user=30,
    rounds=1,
    steps=2,
    seq_len=32,
    lr=0.05,
    clients=(10, 100, 1000),
    repeats={10: 5, 100: 3, 1000: 2},
    decode_repeats=2,
    actors=1,  # the tiny model trains in milliseconds; a second actor only costs start-up
)


# ----------------------------------------------------------------------------- the base
@dataclass
class Base:
    """The base in use: where simulations load it from, its identity and its B shapes."""

    source: str
    model_id: str
    sha256: str
    spec: AdapterSpec
    b_shapes: dict[str, tuple[int, ...]]
    flowertune_state: dict[str, Any]  # peft state dict (A and B), torch tensors
    b_values: BTensors  # the B the state dict holds, keyed as lorafleet sends it


def build_tiny_model(folder: Path) -> Path:
    """The test suite's tiny Llama (``tests/conftest.py::build_tiny_model``)."""
    path = REPO / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_lorafleet_tests_conftest", path)
    if spec is None or spec.loader is None:
        raise LorafleetError(f"cannot load {path}; --quick needs the repository's tests/")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: a dataclass in it looks its module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    built: Path = module.build_tiny_model(folder)
    return built


def load_base_info(source: str, *, cache_dir: Path | None, seed: int = 0) -> Base:
    """Load the base, materialize the cohort's adapter and give B realistic values."""
    import torch
    from peft import get_peft_model_state_dict

    from lorafleet.client.adapter import get_b, materialize, set_b
    from lorafleet.client.base import load_base

    started = time.perf_counter()
    base = load_base(source, cache_dir=cache_dir)
    spec = AdapterSpec(
        base_model_id=base.model_id,
        base_sha256=base.sha256,
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
    )
    model = materialize(base.model, spec, base_sha256=base.sha256)
    shapes = {k: tuple(v.shape) for k, v in get_b(model).items()}
    # Trained B is non-zero; zero B would let Flower deduplicate identical chunks.
    b_values = synthetic_deltas(shapes, 1, np.random.default_rng(seed))[0]
    set_b(model, b_values)
    with torch.no_grad():
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    log.info(
        "base %s loaded and adapted in %.1f s: %d B tensors, %d LoRA tensors (A+B)",
        base.model_id,
        time.perf_counter() - started,
        len(shapes),
        len(state),
    )
    return Base(source, base.model_id, base.sha256, spec, shapes, state, b_values)


# ----------------------------------------------------------------------------- 1. bytes
def measure_bytes(base: Base) -> list[dict[str, Any]]:
    """The FlowerTune-style upload against lorafleet's payload in each packing."""
    from flwr.app import ArrayRecord, ConfigRecord

    from lorafleet.server.registry import prior_ref

    record = ArrayRecord(base.flowertune_state)  # as the FlowerTune template replies
    raw = sum(int(t.numel()) * t.element_size() for t in base.flowertune_state.values())
    params = sum(int(t.numel()) for t in base.flowertune_state.values())
    baseline_bytes = _common.flower_wire_bytes(record)
    rows: list[dict[str, Any]] = [
        {
            "name": "bytes/flowertune-AB-fp32",
            "section": "bytes",
            "what": "ArrayRecord(get_peft_model_state_dict(model)), A and B fp32",
            "bytes": baseline_bytes,
            "payload_bytes": raw,
            "record_bytes": baseline_bytes,
            "tensors": len(base.flowertune_state),
            "params": params,
            "ratio_vs_baseline": 1.0,
            "record_ratio_vs_baseline": 1.0,
        }
    ]
    metadata = {"prior_version": prior_ref(base.spec.fingerprint(), 1)}
    b_params = sum(math.prod(s) for s in base.b_shapes.values())
    for packing in PACKINGS:
        payload = encode_tensors(base.b_values, packing=packing, metadata=metadata)
        wrapped = _common.flower_wire_bytes(
            ConfigRecord({DELTA_FIELD: payload})
        )  # the reply's record
        rows.append(
            {
                "name": f"bytes/lorafleet-B-{packing}",
                "section": "bytes",
                "what": f"encode_tensors(delta_B, packing={packing!r})",
                "bytes": len(payload),
                "payload_bytes": len(payload),
                "record_bytes": wrapped,
                "tensors": len(base.b_values),
                "params": b_params,
                "ratio_vs_baseline": _common.ratio(len(payload), baseline_bytes),
                "record_ratio_vs_baseline": _common.ratio(wrapped, baseline_bytes),
            }
        )
    return rows


# -------------------------------------------------------------------- 2. personalization
def run_federation(
    base: Base, packing: Packing, size: Size, root: Path, *, cache_dir: Path | None
) -> dict[str, Any]:
    """One real federation in ``root`` (fresh users, coordinator state and profiles)."""
    from lorafleet.server.coordinator import CoordinatorConfig
    from lorafleet.sim.personas import PersonaConfig, generate_personas, write_user_folders
    from lorafleet.sim.runner import SimResources, simulate

    users = write_user_folders(
        generate_personas(
            PersonaConfig(num_users=size.users, notes_per_user=size.notes_per_user, seed=0)
        ),
        root / "users",
    )
    config = CoordinatorConfig(
        num_rounds=size.rounds,
        fraction_train=1.0,
        min_train_nodes=size.users,
        min_available_nodes=size.users,
        wait_for_nodes_s=600,
        personal_steps=size.steps,
        prior_steps=size.steps,
        lr=size.lr,
        clip_norm=CLIP_NORM,
        seq_len=size.seq_len,
        packing=packing,
        aggregator="fedavg",
        rank=RANK,
        alpha=ALPHA,
        target_modules=",".join(TARGETS),
        base_model_id=base.model_id,
        base_sha256=base.sha256,
        data_dir=str(root / "coordinator"),
        seed=0,
        shared_a="seeded",  # rounds of B only, comparable across packings (no round 0)
    )
    started = time.perf_counter()
    results = simulate(
        users,
        root / "run",
        config,
        base=base.source,
        precision="fp32",
        device="cpu",
        cache_dir=cache_dir,
        resources=SimResources(cpus_per_client=1, total_cpus=size.actors),
    )
    results["seconds"] = time.perf_counter() - started
    return results


def gain_row(packing: Packing, results: Mapping[str, Any]) -> dict[str, Any]:
    """Mean relative held-out loss reduction of the personal adapters over the base."""
    evaluation: Mapping[str, Mapping[str, float]] = results["evaluation"]
    if not evaluation:
        raise LorafleetError(f"the {packing} federation returned no final evaluation")
    gains = [(e["base_loss"] - e["personal_loss"]) / e["base_loss"] for e in evaluation.values()]
    prior_gains = [(e["base_loss"] - e["prior_loss"]) / e["base_loss"] for e in evaluation.values()]
    return {
        "name": f"personalization/{packing}",
        "section": "personalization",
        "packing": packing,
        "gain": float(np.mean(gains)),
        "gain_per_user": [float(g) for g in gains],
        "prior_gain": float(np.mean(prior_gains)),
        "base_loss": float(np.mean([e["base_loss"] for e in evaluation.values()])),
        "prior_loss": float(np.mean([e["prior_loss"] for e in evaluation.values()])),
        "personal_loss": float(np.mean([e["personal_loss"] for e in evaluation.values()])),
        "users": len(evaluation),
        "rounds": len(results["rounds"]),
        "accepted": [r["accepted"] for r in results["rounds"]],
        "bytes_up_per_client": float(results["bytes_up_per_client"]),
        "seconds": float(results["seconds"]),
    }


# ------------------------------------------------------------------------ 3. aggregation
def synthetic_deltas(
    shapes: Mapping[str, tuple[int, ...]], n: int, rng: np.random.Generator
) -> list[BTensors]:
    """``n`` clipped-looking deltas: Gaussian values scaled to global norm 0.9."""
    out: list[BTensors] = []
    for _ in range(n):
        delta = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
        scale = DELTA_NORM / global_norm(delta)
        out.append({k: (v * np.float32(scale)).astype(np.float32) for k, v in delta.items()})
    return out


@dataclass
class Round:
    """One round's inputs for every path: the same deltas in each path's form."""

    clients: int
    shapes: dict[str, tuple[int, ...]]
    deltas: list[BTensors]
    weights: list[float]
    records: list[Any]  # Flower RecordDicts: ArrayRecord of fp32 B + MetricRecord
    payloads: list[bytes]  # fp16 encode_tensors payloads
    prior: BTensors


def make_round(shapes: Mapping[str, tuple[int, ...]], n: int, seed: int) -> Round:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    rng = np.random.default_rng(seed)
    deltas = synthetic_deltas(shapes, n, rng)
    weights = [float(w) for w in rng.integers(20, 201, size=n)]
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in d.items()}),
                "metrics": MetricRecord({"num-examples": int(w)}),
            }
        )
        for d, w in zip(deltas, weights, strict=True)
    ]
    payloads = [encode_tensors(d, packing="fp16") for d in deltas]
    prior = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    return Round(n, dict(shapes), deltas, weights, records, payloads, prior)


def aggregation_paths(rnd: Round) -> dict[str, Callable[[], Mapping[str, Any]]]:
    """One callable per path; each returns the aggregated tensors (name -> array)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from lorafleet.server.aggregation import Aggregator, FedAdam, FedAvg, Update, refusal_reason

    fedavg, fedadam = FedAvg(1.0), FedAdam()

    def validated(updates: list[Update], aggregator: Aggregator) -> BTensors:
        for u in updates:
            reason = refusal_reason(u.delta, rnd.shapes, CLIP_NORM)
            if reason is not None:
                raise LorafleetError(f"synthetic update {u.node_id} refused: {reason}")
        return aggregator.step(rnd.prior, updates)

    decoded_updates = [
        Update(i, d, w) for i, (d, w) in enumerate(zip(rnd.deltas, rnd.weights, strict=True))
    ]

    def flower() -> Mapping[str, Any]:
        record = aggregate_arrayrecords(rnd.records, "num-examples")
        return {k: a.numpy() for k, a in record.items()}

    def with_decode() -> Mapping[str, Any]:
        updates = [
            Update(i, decode_tensors(p)[0], w)
            for i, (p, w) in enumerate(zip(rnd.payloads, rnd.weights, strict=True))
        ]
        return validated(updates, fedavg)

    return {
        BASELINE: flower,
        "lorafleet-fedavg": lambda: validated(decoded_updates, fedavg),
        "lorafleet-fedadam": lambda: validated(decoded_updates, fedadam),
        "lorafleet-fedavg+decode-fp16": with_decode,
    }


def time_interleaved(
    paths: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each path, one call of each in turn (rotating order)."""
    names = list(paths)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            paths[name]()
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                samples[name].append(elapsed)
    return samples


def max_abs_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def measure_aggregation(
    shapes: Mapping[str, tuple[int, ...]], size: Size
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float]] = {p: {} for p in AGG_PATHS[1:]}
    for n in size.clients:
        started = time.perf_counter()
        rnd = make_round(shapes, n, seed=n)
        paths = aggregation_paths(rnd)
        reference = paths[BASELINE]()
        fp32_diff = max_abs_diff(paths["lorafleet-fedavg"](), reference)
        fp16_diff = max_abs_diff(paths["lorafleet-fedavg+decode-fp16"](), reference)
        log.info(
            "aggregation, %d clients: inputs built in %.1f s; timing %d rounds per path",
            n,
            time.perf_counter() - started,
            size.repeats[n],
        )
        samples = time_interleaved(paths, size.repeats[n])
        base_median = _common.Stats.of(samples[BASELINE]).median
        for name in AGG_PATHS:
            stats = _common.Stats.of(samples[name])
            row: dict[str, Any] = {
                "name": f"aggregation/{name}/{n}",
                "section": "aggregation",
                "path": name,
                "clients": n,
                "ms": stats.median * 1e3,
                "ms_min": stats.min * 1e3,
                "ms_max": stats.max * 1e3,
                "n": stats.n,
                "ratio_vs_baseline": _common.ratio(stats.median, base_median),
            }
            if name == "lorafleet-fedavg":
                row["max_abs_diff_vs_baseline"] = fp32_diff
            if name == "lorafleet-fedavg+decode-fp16":
                row["max_abs_diff_vs_baseline"] = fp16_diff
            rows.append(row)
            if name != BASELINE:
                ratios[name][str(n)] = row["ratio_vs_baseline"]
        del rnd, paths, samples
    return rows, ratios


def measure_decode(
    shapes: Mapping[str, tuple[int, ...]], size: Size
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-client time to turn one received upload into arrays, per packing and Flower."""
    from flwr.app import Array, ArrayRecord

    deltas = synthetic_deltas(shapes, DECODE_SAMPLE, np.random.default_rng(7))
    inputs: dict[str, list[Any]] = {
        "flower-Array.numpy-fp32": [
            ArrayRecord({k: Array(v) for k, v in d.items()}) for d in deltas
        ]
    }
    for packing in PACKINGS:
        inputs[f"decode_tensors-{packing}"] = [encode_tensors(d, packing=packing) for d in deltas]

    def one(name: str) -> Callable[[], object]:
        items = inputs[name]
        if name.startswith("flower"):
            return lambda: [{k: a.numpy() for k, a in rec.items()} for rec in items]
        return lambda: [decode_tensors(p) for p in items]

    samples = time_interleaved({name: one(name) for name in inputs}, size.decode_repeats)
    base_name = "flower-Array.numpy-fp32"
    base_median = _common.Stats.of(samples[base_name]).median
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    for name, values in samples.items():
        per_client = [v / DECODE_SAMPLE for v in values]
        stats = _common.Stats.of(per_client)
        rows.append(
            {
                "name": f"decode/{name}",
                "section": "decode",
                "path": name,
                "ms_per_client": stats.median * 1e3,
                "ms_per_client_min": stats.min * 1e3,
                "ms_per_client_max": stats.max * 1e3,
                "clients_per_repeat": DECODE_SAMPLE,
                "n": stats.n,
                "ratio_vs_baseline": _common.ratio(stats.median * DECODE_SAMPLE, base_median),
            }
        )
        if name != base_name:
            ratios[name] = rows[-1]["ratio_vs_baseline"]
    return rows, ratios


# ------------------------------------------------------------------------------- report
def targets(
    bytes_rows: Sequence[Mapping[str, Any]], gain_rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    by_packing = {r["name"].rsplit("-", 1)[1]: r for r in bytes_rows[1:]}
    gains = {r["packing"]: r["gain"] for r in gain_rows}
    out: dict[str, Any] = {}
    for packing, limit in TARGET_BYTES.items():
        got = by_packing[packing]["ratio_vs_baseline"]
        rel = _common.ratio(gains[packing] - gains["fp32"], abs(gains["fp32"]))
        out[packing] = {
            "bytes_ratio": got,
            "bytes_ratio_max": limit,
            "bytes_met": bool(got <= limit),
            "gain_rel_vs_fp32": rel,
            "gain_rel_max": TARGET_GAIN_REL,
            "gain_met": bool(math.isfinite(rel) and abs(rel) <= TARGET_GAIN_REL),
        }
    return out


def fmt_bytes(n: float) -> str:
    return f"{n:,.0f}"


def fmt_ms(value: float) -> str:
    if value < 1:
        return f"{value:.3f}"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def print_report(
    base: Base,
    size: Size,
    bytes_rows: Sequence[Mapping[str, Any]],
    gain_rows: Sequence[Mapping[str, Any]],
    agg_rows: Sequence[Mapping[str, Any]],
    decode_rows: Sequence[Mapping[str, Any]],
    target: Mapping[str, Any],
) -> None:
    n_b = len(base.b_shapes)
    shapes = sorted({s for s in base.b_shapes.values()})
    print(
        f"\nfederation on {base.model_id}: rank {RANK}, {'/'.join(TARGETS)}, {n_b} B "
        f"tensors of shapes {', '.join(str(s) for s in shapes)}\n"
    )
    print("1. bytes uploaded per client per round (Flower 1.41 object bytes, see docstring)")
    print(
        _common.format_table(
            ["upload", "payload B", "as Flower record B", "ratio", "record ratio", "target"],
            [
                [
                    r["name"].split("/", 1)[1],
                    fmt_bytes(r["payload_bytes"]),
                    fmt_bytes(r["record_bytes"]),
                    f"{r['ratio_vs_baseline']:.4f}",
                    f"{r['record_ratio_vs_baseline']:.4f}",
                    _bytes_target(r["name"], target),
                ]
                for r in bytes_rows
            ],
        )
    )
    print(
        "   ratio = lorafleet payload / FlowerTune record bytes; record ratio = "
        "lorafleet ConfigRecord bytes / FlowerTune record bytes\n"
    )
    print(
        f"2. personalization gain, {size.users} users x {size.rounds} round(s), "
        f"{size.steps}+{size.steps} steps, seq {size.seq_len} (gain = mean (base - personal) / base)"
    )
    fp32 = next(r for r in gain_rows if r["packing"] == "fp32")

    def rel(row: Mapping[str, Any], key: str) -> str:
        return f"{100 * _common.ratio(row[key] - fp32[key], abs(fp32[key])):+.3f}"

    print(
        _common.format_table(
            [
                "packing",
                "base loss",
                "prior loss",
                "personal loss",
                "gain %",
                "vs fp32 %",
                "prior gain %",
                "vs fp32 %",
                "bytes up/client",
                "run s",
            ],
            [
                [
                    r["packing"],
                    f"{r['base_loss']:.4f}",
                    f"{r['prior_loss']:.4f}",
                    f"{r['personal_loss']:.4f}",
                    f"{100 * r['gain']:.3f}",
                    rel(r, "gain"),
                    f"{100 * r['prior_gain']:.3f}",
                    rel(r, "prior_gain"),
                    fmt_bytes(r["bytes_up_per_client"]),
                    f"{r['seconds']:.0f}",
                ]
                for r in gain_rows
            ],
        )
    )
    print(
        "   vs fp32 = (gain - gain_fp32) / gain_fp32, target within +-2%; prior gain = mean "
        "(base - prior) / base,\n   the shared prior alone (the packed uploads only reach "
        "users through it)\n"
    )
    print("3. coordinator aggregation time per round (ms, median [min-max]; ratio to Flower)")
    table = []
    for r in agg_rows:
        extra = (
            f"  (max |diff| vs Flower {r['max_abs_diff_vs_baseline']:.1e})"
            if "max_abs_diff_vs_baseline" in r
            else ""
        )
        table.append(
            [
                f"{r['path']}{extra}",
                str(r["clients"]),
                f"{fmt_ms(r['ms'])} [{fmt_ms(r['ms_min'])}-{fmt_ms(r['ms_max'])}]",
                f"{r['ratio_vs_baseline']:.2f}",
                str(r["n"]),
            ]
        )
    print(_common.format_table(["path", "clients", "ms", "ratio", "repeats"], table))
    print()
    print(f"   per-client decode of one upload ({DECODE_SAMPLE} clients per timed repeat)")
    print(
        _common.format_table(
            ["decode", "ms/client", "ratio"],
            [
                [
                    r["path"],
                    f"{fmt_ms(r['ms_per_client'])} [{fmt_ms(r['ms_per_client_min'])}-"
                    f"{fmt_ms(r['ms_per_client_max'])}]",
                    f"{r['ratio_vs_baseline']:.2f}",
                ]
                for r in decode_rows
            ],
        )
    )
    print()
    for packing, t in target.items():
        print(
            f"target {packing}: bytes {t['bytes_ratio']:.4f} of baseline (max "
            f"{t['bytes_ratio_max']:.4f}: {'met' if t['bytes_met'] else 'NOT met'}); gain "
            f"{100 * t['gain_rel_vs_fp32']:+.3f}% vs fp32 (within 2%: "
            f"{'met' if t['gain_met'] else 'NOT met'})"
        )
    print(f"peak RSS {_common.max_rss_mb():.0f} MiB (this process; Ray workers not counted)")


def _bytes_target(name: str, target: Mapping[str, Any]) -> str:
    packing = name.rsplit("-", 1)[1]
    if "lorafleet" not in name or packing not in target:
        return ""
    t = target[packing]
    return f"<= {t['bytes_ratio_max']:.3f} {'met' if t['bytes_met'] else 'NOT met'}"


# --------------------------------------------------------------------------------- main
def bench_main(args: argparse.Namespace) -> int:
    size = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-fed-") as tmp:
        work = Path(tmp)
        source = args.base
        if args.quick and source == "default":
            source = str(build_tiny_model(work / "tiny-model"))
        base = load_base_info(source, cache_dir=args.cache_dir)

        log.info("1/3 upload bytes")
        bytes_rows = measure_bytes(base)

        log.info("2/3 aggregation and decode time")
        agg_rows, agg_ratios = measure_aggregation(base.b_shapes, size)
        decode_rows, decode_ratios = measure_decode(base.b_shapes, size)

        log.info("3/3 one federation per packing")
        gain_rows = []
        for packing in PACKINGS:
            log.info("federation with %s uploads", packing)
            results = run_federation(
                base, packing, size, work / f"fed-{packing}", cache_dir=args.cache_dir
            )
            gain_rows.append(gain_row(packing, results))
            log.info("%s: gain %.4f in %.0f s", packing, gain_rows[-1]["gain"], results["seconds"])

    target = targets(bytes_rows, gain_rows)
    fp32_gain = gain_rows[0]["gain"]
    ratios: dict[str, Any] = {
        "bytes_vs_flowertune": {
            r["name"].rsplit("-", 1)[1]: r["ratio_vs_baseline"] for r in bytes_rows[1:]
        },
        "gain_vs_fp32": {r["packing"]: _common.ratio(r["gain"], fp32_gain) for r in gain_rows[1:]},
        "prior_gain_vs_fp32": {
            r["packing"]: _common.ratio(r["prior_gain"], gain_rows[0]["prior_gain"])
            for r in gain_rows[1:]
        },
        "aggregation_time_vs_flower": agg_ratios,
        "decode_time_vs_flower": decode_ratios,
    }
    print_report(base, size, bytes_rows, gain_rows, agg_rows, decode_rows, target)
    if args.json:
        import flwr

        machine = _common.machine_info()
        machine.update(
            {
                "flwr": flwr.__version__,
                "numpy": np.__version__,
                "base": base.model_id,
                "max_rss_mb": _common.max_rss_mb(),
                "max_rss_of": "this process (Ray worker processes not counted)",
            }
        )
        _common.write_json(
            args.json,
            bench=BENCH,
            machine=machine,
            rows=[*bytes_rows, *gain_rows, *agg_rows, *decode_rows],
            ratios=ratios,
            target=target,
            size={
                "quick": bool(args.quick),
                "users": size.users,
                "rounds": size.rounds,
                "steps": size.steps,
                "seq_len": size.seq_len,
                "clients": list(size.clients),
            },
        )
        log.info("wrote %s", args.json)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny test model, 3 users, 1 round, small repeats"
    )
    parser.add_argument(
        "--base",
        default="default",
        help="base model source (default: SmolLM2-135M; with --quick: the tiny test model)",
    )
    parser.add_argument("--cache-dir", type=Path, help="lorafleet cache root (base conversions)")
    parser.add_argument("--json", help="also write the result file here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("alembic", "lorafleet.server.registry"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        return bench_main(args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
