"""The frozen matmuls of one training step, fp32 against the int8 training kernel.

Why this exists: on a CPU without int8 dot products (AVX2, no VNNI) the int8 training
path (``precision="int8-fp32"``) can only be as much faster than fp32 as its int8
kernel is per matmul, on the matmuls it quantizes. This benchmark measures exactly that,
on the base's own shapes, so a training-throughput figure can be read against its
ceiling instead of guessed at.

Rows: every frozen matmul of one training step of the base at batch 4 x 128 tokens, in
both directions autograd runs it (forward ``x @ W.T``; the gradient with respect to the
input ``g @ W``; the frozen base has no weight gradient), timed in fp32 (``torch.mm``)
and through :func:`lorafleet.client.int8mm.int8_forward` and ``int8_grad_input``
(the two halves of ``int8_linear``, which training runs) with the
kernel ``auto`` picks on this CPU (``int_mm`` with VNNI/AMX, fbgemm without). Shapes
are the training path's: q/k/v and gate/up fused, lm_head in chunks of 256 positions.
Weights and activations are random: the kernels' speed does not depend on the values.
Calls are interleaved fp32/int8 and repeated; each cell is the median [min-max].

The summary lines weigh each row by how often a step runs it (layers x directions,
lm_head chunks) and give the matmul time of a step for all-fp32, for what
``int8-fp32`` quantizes today (``qtrain.DEFAULT_INT8_MODULES``: all but ``down_proj``
and lm_head), and for int8 wherever it measured faster: the last is an upper bound on
what any choice of int8 matmuls can give the matmul part of a step, before the rest of
the step (attention, norms, the softmax, the optimizer) is counted.

Usage (from the repository root)::

    python bench/int8_matmul.py                 # full size, 1 thread
    python bench/int8_matmul.py --threads 2
    python bench/int8_matmul.py --isa avx2      # the AVX2 class, on any x86 CPU
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import _common
import torch

from lorafleet.client.device import detect_cpu
from lorafleet.client.int8mm import (
    Int8Kernel,
    Int8Weight,
    default_kernel,
    int8_forward,
    int8_grad_input,
    quantize_weight,
)

log = logging.getLogger("bench.int8_matmul")

TOKENS = 512  # batch 4 x 128
CE_CHUNK = 256  # qtrain.QuantConfig.ce_chunk
QUICK_TOKENS = 32
REPEATS, QUICK_REPEATS = 7, 2


@dataclass(frozen=True)
class Shape:
    """One frozen matmul of the step: ``rows`` x ``k`` times a (``n``, ``k``) weight."""

    name: str
    rows: int
    k: int
    n: int
    per_step: int  # forward calls per step (layers, or lm_head chunks)
    int8_today: bool  # quantized by int8-fp32's default modules


@dataclass
class Row:
    """Timings of one matmul in one direction."""

    shape: Shape
    direction: str  # "forward" or "grad-input"
    fp32_ms: list[float]
    int8_ms: list[float]

    @property
    def fp32(self) -> float:
        """Median fp32 milliseconds."""
        return float(statistics.median(self.fp32_ms))

    @property
    def int8(self) -> float:
        """Median int8 milliseconds."""
        return float(statistics.median(self.int8_ms))


def shapes(base: str, cache_dir: Path | None, tokens: int) -> tuple[list[Shape], str]:
    """The training step's frozen matmuls for ``base`` (read from its config)."""
    from lorafleet.client.base import load_base

    loaded = load_base(base, cache_dir=cache_dir, dtype=torch.float32)
    cfg = loaded.model.config
    hidden, inter = int(cfg.hidden_size), int(cfg.intermediate_size)
    heads, kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    layers, vocab = int(cfg.num_hidden_layers), int(cfg.vocab_size)
    q, kvw = heads * head_dim, kv * head_dim
    chunk = min(CE_CHUNK, tokens)
    out = [
        Shape("q_proj+k_proj+v_proj", tokens, hidden, q + 2 * kvw, layers, True),
        Shape("o_proj", tokens, q, hidden, layers, True),
        Shape("gate_proj+up_proj", tokens, hidden, 2 * inter, layers, True),
        Shape("down_proj", tokens, inter, hidden, layers, False),
        Shape("lm_head", chunk, hidden, vocab, -(-tokens // chunk), False),
    ]
    return out, loaded.model_id


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def measure(shape: Shape, kernel: Int8Kernel, repeats: int) -> list[Row]:
    """Forward and grad-input of ``shape``, fp32 and int8, interleaved call by call."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape.n, shape.k, generator=gen) * 0.02
    x = torch.randn(shape.rows, shape.k, generator=gen)
    g = torch.randn(shape.rows, shape.n, generator=gen) * 1e-3
    qw: Int8Weight = quantize_weight(w, kernel)
    fwd = Row(shape, "forward", [], [])
    bwd = Row(shape, "grad-input", [], [])
    calls: list[tuple[list[float], Callable[[], object]]] = [
        (fwd.fp32_ms, lambda: x @ w.T),
        (fwd.int8_ms, lambda: int8_forward(x, qw)),  # what int8_linear runs, both ways
        (bwd.fp32_ms, lambda: g @ w),
        (bwd.int8_ms, lambda: int8_grad_input(g, qw)),
    ]
    with torch.no_grad():
        for _, fn in calls:  # warm-up
            fn()
        for _ in range(repeats):
            for times, fn in calls:
                times.append(_timed(fn))
    return [fwd, bwd]


def step_totals(rows: Sequence[Row]) -> dict[str, float]:
    """Matmul milliseconds of one step: all fp32, int8-fp32 today, int8 where faster."""
    total = {"fp32": 0.0, "int8_fp32_today": 0.0, "best": 0.0}
    for row in rows:
        n = row.shape.per_step
        total["fp32"] += n * row.fp32
        total["int8_fp32_today"] += n * (row.int8 if row.shape.int8_today else row.fp32)
        total["best"] += n * min(row.int8, row.fp32)
    return total


def fmt(values: Sequence[float]) -> str:
    stats = _common.Stats.of(values)
    return f"{stats.median:.2f} [{stats.min:.2f}-{stats.max:.2f}]"


def bench_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    cpu = detect_cpu()
    kernel = default_kernel(cpu.native_int8)
    step_shapes, model_id = shapes(args.base, args.cache_dir, tokens)
    started = time.perf_counter()
    rows: list[Row] = []
    for shape in step_shapes:
        log.info("timing %s (%d x %d -> %d)", shape.name, shape.rows, shape.k, shape.n)
        rows.extend(measure(shape, kernel, repeats))
    machine = _common.machine_info(threads=args.threads, device="cpu")
    machine["load_average_1m"] = _common.load_average()
    machine["wall_s"] = round(time.perf_counter() - started, 1)
    table = _common.format_table(
        [
            "matmul",
            "direction",
            "rows x in -> out",
            "per step",
            "fp32 ms",
            f"int8 ({kernel}) ms",
            "x fp32",
        ],
        [
            [
                r.shape.name,
                r.direction,
                f"{r.shape.rows} x {r.shape.k} -> {r.shape.n}",
                str(r.shape.per_step),
                fmt(r.fp32_ms),
                fmt(r.int8_ms),
                f"{r.fp32 / r.int8:.2f}x",
            ]
            for r in rows
        ],
    )
    total = step_totals(rows)
    today = total["fp32"] / total["int8_fp32_today"]
    best = total["fp32"] / total["best"]
    print(_common.class_line(machine))
    print()
    print(table)
    print()
    print(
        f"matmul time of one step ({model_id}, {tokens} tokens): fp32 {total['fp32']:.0f} ms; "
        f"int8-fp32 as it quantizes today {total['int8_fp32_today']:.0f} ms ({today:.2f}x); "
        f"int8 wherever it measured faster {total['best']:.0f} ms ({best:.2f}x, the ceiling "
        "for the matmul part of a step)"
    )
    print(
        f"{repeats} interleaved calls per cell after one warm-up, median [min-max], "
        f"{args.threads} thread(s). "
        f"Machine: {machine['cpu_model']}, torch {machine['torch']}; wall {machine['wall_s']} s; "
        f"1-min load average {machine['load_average_1m']}."
    )
    if args.json:
        _common.write_json(
            args.json,
            bench="int8_matmul",
            machine=machine,
            rows=[
                {
                    "name": f"{r.shape.name}/{r.direction}",
                    "rows": r.shape.rows,
                    "in": r.shape.k,
                    "out": r.shape.n,
                    "per_step": r.shape.per_step,
                    "fp32_ms": r.fp32,
                    "fp32_ms_min": min(r.fp32_ms),
                    "fp32_ms_max": max(r.fp32_ms),
                    "int8_ms": r.int8,
                    "int8_ms_min": min(r.int8_ms),
                    "int8_ms_max": max(r.int8_ms),
                }
                for r in rows
            ],
            ratios={"int8_fp32_today_vs_fp32": today, "int8_best_vs_fp32": best},
            kernel=kernel,
            step_ms=total,
        )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A training step's frozen matmuls: fp32 vs the int8 training kernel (CPU)."
    )
    parser.add_argument("--quick", action="store_true", help="reduced size for the test suite")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"calls per cell ({REPEATS}; --quick {QUICK_REPEATS})",
    )
    _common.add_base_arguments(parser)
    _common.add_isa_argument(parser)
    args = parser.parse_args(argv)
    _common.require_positive(parser, args, "threads", "repeats")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rerun = _common.rerun_under_isa(args.isa, __file__, argv)
    if rerun is not None:
        return rerun
    return _common.run_main(bench_main, args, log)


if __name__ == "__main__":
    sys.exit(main())
