"""Greedy generation on the CPU: peft + transformers against lorafleet's ONNX Runtime paths.

Every path generates from the same prompts (windows of the demo notes' token stream,
128 tokens each), with the same personal adapter (rank 8 on ``q_proj``/``v_proj``,
seeded A, a fixed random B), greedily, exactly 64 new tokens per row, at batch 1 and
batch 8, with 2 threads. Rows:

- ``peft-fp32``: the reference. lorafleet's adapter as a stock ``PeftModel`` on the
  float32 base, ``transformers`` ``generate`` (with its key/value cache).
- ``peft-bf16``: the same with base and adapter stored in bf16.
- ``onnx-fp32``, ``onnx-int8``, ``onnx-int4``: :class:`lorafleet.client.onnx_runtime.OnnxLM`
  on the cached export of the base (float32, 8-bit or 4-bit ``MatMulNBits`` weights), the
  adapter fed as graph inputs. int4 is exported with ``allow_quality_loss``: it fails
  the 3% gate on SmolLM2-135M, and its row says so.

Generations are timed interleaved, one generation of each path in turn, so machine drift
hits every path alike. The table gives tokens/s (new tokens of all rows / wall time,
prefill included; median [min-max]), the ratio to the reference, each path's peak memory
(max RSS of a child process that loads that path alone and generates once at the
largest batch; ONNX children import neither torch nor transformers), the export's
quality-gate cross-entropy, and the share of generated tokens equal to the reference's.

``--isa avx2`` measures the AVX2 class on any x86 CPU: the benchmark runs again in a
child process under ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
FBGEMM_ENABLE_INSTRUCTIONS=AVX2``, and
``peft-bf16`` is left out there (bf16 is emulated, 40-70x slower than fp32). ONNX Runtime
ignores those variables: its kernels follow the CPU itself, so in an ``--isa avx2`` table
only the torch rows hold for the AVX2 class, and the notes say so. Every table starts
with the CPU class and model it holds for.

Usage (from the repository root)::

    python bench/generate.py                  # full size: prompt 128, 64 new, batch 1 and 8
    python bench/generate.py --quick          # prompt 16, 8 new, batch 1 and 2, no children
    python bench/generate.py --json out.json  # also write the result file
    python bench/generate.py --isa avx2       # the AVX2 class (torch rows), on any x86 CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import numpy as np

from lorafleet.client.onnx_runtime import OnnxLM
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.spec import AdapterSpec

log = logging.getLogger("bench.generate")

BENCH = "generate"
RANK, ALPHA, TARGETS, COHORT_SEED, B_SEED, B_STD = 8, 16.0, ("q_proj", "v_proj"), 0, 0, 0.02
THREADS = 2
FULL = {"prompt_len": 128, "new_tokens": 64, "batches": (1, 8), "repeats": 3}
QUICK = {"prompt_len": 16, "new_tokens": 8, "batches": (1, 2), "repeats": 1}
TARGET_SPEEDUP, TARGET_RSS, TARGET_PATH = 3.0, 0.5, "onnx-int8"


@dataclass(frozen=True)
class GenPath:
    """One row kind of the table."""

    key: str
    kind: str  # "peft" or "onnx"
    precision: str  # peft: fp32 | bf16; onnx: none | int8 | int4
    what: str


PATHS = (
    GenPath("peft-fp32", "peft", "fp32", "PeftModel + transformers generate, fp32"),
    GenPath("peft-bf16", "peft", "bf16", "PeftModel + transformers generate, bf16 weights"),
    GenPath("onnx-fp32", "onnx", "none", "ONNX Runtime, fp32 weights, adapter as input"),
    GenPath("onnx-int8", "onnx", "int8", "ONNX Runtime, 8-bit weights (MatMulNBits)"),
    GenPath("onnx-int4", "onnx", "int4", "ONNX Runtime, 4-bit weights (MatMulNBits)"),
)
PATHS_BY_KEY = {p.key: p for p in PATHS}
REFERENCE = PATHS[0].key

Generator = Callable[[list[list[int]], int], list[list[int]]]


# --------------------------------------------------------------------------- inputs


def prompts_from_notes(tokenizer: Any, prompt_len: int, count: int) -> list[list[int]]:
    """``count`` prompts of ``prompt_len`` tokens: consecutive windows of the demo notes."""
    from lorafleet.client.data import demo_notes_path, encode_blocks, read_examples

    blocks = encode_blocks(read_examples(demo_notes_path()), tokenizer, seq_len=prompt_len)
    full = [
        row
        for row, m in zip(blocks.input_ids.tolist(), blocks.attention_mask.tolist(), strict=True)
        if all(m)
    ]
    if len(full) < count:
        raise LorafleetError(
            f"the demo notes give {len(full)} prompts of {prompt_len} tokens; need {count}"
        )
    return full[:count]


def make_b(adapted: Sequence[tuple[str, int]], seed: int) -> dict[str, np.ndarray]:
    """A fixed non-zero B per adapted module, shape (out, rank)."""
    rng = np.random.default_rng(seed)
    return {
        path: rng.normal(0.0, B_STD, (out, RANK)).astype(np.float32)
        for path, out in sorted(adapted)
    }


@dataclass(frozen=True)
class Inputs:
    """Everything a path needs besides its model; written to a folder for child processes."""

    spec: AdapterSpec
    b: dict[str, np.ndarray]
    prompts: list[list[int]]
    pad_token_id: int
    exports: dict[str, str]  # onnx path key -> export folder

    def save(self, folder: Path) -> None:
        """Write B as a plain .npz (no pickles) and the rest as JSON."""
        np.savez(folder / "b.npz", **self.b)
        doc = {
            "spec": self.spec.to_dict(),
            "prompts": self.prompts,
            "pad_token_id": self.pad_token_id,
            "exports": self.exports,
        }
        (folder / "inputs.json").write_text(json.dumps(doc), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Inputs:
        """Read what :meth:`save` wrote."""
        doc = json.loads((folder / "inputs.json").read_text(encoding="utf-8"))
        with np.load(folder / "b.npz", allow_pickle=False) as data:
            b = {k: data[k] for k in data.files}
        return cls(
            AdapterSpec.from_dict(doc["spec"]),
            b,
            doc["prompts"],
            int(doc["pad_token_id"]),
            doc["exports"],
        )


# --------------------------------------------------------------------------- paths


def build_onnx(path: GenPath, inputs: Inputs, threads: int) -> Generator:
    lm = OnnxLM(inputs.exports[path.key], provider="cpu", threads=threads)
    adapter = lm.adapter(inputs.spec, inputs.b)

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        return lm.generate(prompts, adapter, new_tokens, stop_at_eos=False)

    return run


def build_peft(path: GenPath, inputs: Inputs, args: argparse.Namespace) -> Generator:
    import torch

    from lorafleet.client.adapter import materialize
    from lorafleet.client.base import load_base

    dtype = torch.bfloat16 if path.precision == "bf16" else torch.float32
    base = load_base(args.base, cache_dir=args.cache_dir, dtype=dtype)
    model = materialize(base.model, inputs.spec, base_sha256=base.sha256, b=inputs.b)
    model = model.to(dtype).eval()
    pad = inputs.pad_token_id

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts)  # (B, T): equal lengths, no padding
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return [row[ids.shape[1] :] for row in out.tolist()]

    return run


def build(path: GenPath, inputs: Inputs, args: argparse.Namespace) -> Generator:
    if path.kind == "onnx":
        return build_onnx(path, inputs, args.threads)
    return build_peft(path, inputs, args)


def prepare(args: argparse.Namespace, size: dict[str, Any]) -> tuple[Inputs, dict[str, Any]]:
    """Load the base, export it (cached) and fix the prompts and the adapter."""
    import torch

    from lorafleet.client.adapter import lora_targets
    from lorafleet.client.base import load_base
    from lorafleet.client.onnx_export import OnnxExportConfig, export_base

    base = load_base(args.base, cache_dir=args.cache_dir, dtype=torch.float32)
    spec = AdapterSpec(
        base_model_id=base.model_id,
        base_sha256=base.sha256,
        rank=RANK,
        alpha=ALPHA,
        target_modules=TARGETS,
        cohort_seed=COHORT_SEED,
    )
    adapted = [
        (p, int(base.model.get_submodule(p).out_features))
        for p, _ in lora_targets(base.model, spec)
    ]
    exports, quality = {}, {}
    for path in PATHS:
        if path.kind != "onnx":
            continue
        config = OnnxExportConfig(path.precision, target_modules=TARGETS, allow_quality_loss=True)  # type: ignore[arg-type]
        log.info("export for %s (cached after the first run)", path.key)
        exported = export_base(base, config, cache_dir=args.cache_dir, progress=False)
        exports[path.key] = str(exported.folder)
        quality[path.key] = {
            "gate_ce": exported.quality.export_ce,
            "gate_ce_fp32": exported.quality.reference_ce,
            "gate_increase_pct": exported.quality.increase_pct,
            "gate_passed": exported.quality.passed(config.max_ce_increase_pct),
        }
    prompts = prompts_from_notes(base.tokenizer, size["prompt_len"], max(size["batches"]))
    pad = base.tokenizer.pad_token_id
    inputs = Inputs(
        spec, make_b(adapted, B_SEED), prompts, int(pad if pad is not None else 0), exports
    )
    return inputs, quality


# --------------------------------------------------------------------------- measuring


@dataclass
class Timing:
    """One path's timed generations at one batch size, and its last output."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def measure(
    runs: dict[str, Generator], prompts: list[list[int]], new_tokens: int, repeats: int
) -> tuple[dict[str, Timing], list[float]]:
    """Warm each path up once, then time ``repeats`` generations of each, interleaved."""
    timings = {key: Timing() for key in runs}
    loads: list[float] = []
    for key, run in runs.items():
        run(prompts, min(new_tokens, 4))
        log.info("warmed up %s", key)
    for i in range(repeats):
        for key, run in runs.items():
            started = time.perf_counter()
            out = run(prompts, new_tokens)
            timings[key].seconds.append(time.perf_counter() - started)
            timings[key].tokens = out
        load = _common.load_average()
        if load is not None:
            loads.append(load)
        log.info(
            "batch %d, repeat %d/%d: %s",
            len(prompts),
            i + 1,
            repeats,
            ", ".join(f"{k} {t.seconds[-1]:.2f}s" for k, t in timings.items()),
        )
    return timings, loads


def same_tokens(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy outputs agree."""
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def child_main(args: argparse.Namespace) -> int:
    """``--child KEY``: load one path alone, generate once at the largest batch, report RSS."""
    path = PATHS_BY_KEY[args.child]
    inputs = Inputs.load(args.inputs)
    if path.kind == "peft":
        import torch

        torch.set_num_threads(args.threads)
    run = build(path, inputs, args)
    run(inputs.prompts, args.new_tokens)
    _common.report_child_result(
        {
            "path": path.key,
            "peak_rss_mb": _common.own_peak_rss_mb(),
            "torch_imported": "torch" in sys.modules,
        }
    )
    return 0


def measure_child_rss(
    path: GenPath, args: argparse.Namespace, folder: Path, new_tokens: int
) -> float:
    argv = [
        str(Path(__file__).resolve()),
        "--child",
        path.key,
        "--inputs",
        str(folder),
        "--new-tokens",
        str(new_tokens),
        "--threads",
        str(args.threads),
        "--base",
        args.base,
    ]
    if args.cache_dir is not None:
        argv += ["--cache-dir", str(args.cache_dir)]
    return float(_common.run_child(argv)["peak_rss_mb"])


# --------------------------------------------------------------------------- reporting


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def bench_main(args: argparse.Namespace) -> int:
    import torch

    size = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        size["repeats"] = args.repeats
    with_rss = args.rss if args.rss is not None else not args.quick
    from lorafleet.client.device import detect_cpu

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    native_bf16 = detect_cpu().native_bf16
    paths = [p for p in PATHS if native_bf16 or p.precision != "bf16"]
    inputs, quality = prepare(args, size)
    batches: tuple[int, ...] = size["batches"]

    rss: dict[str, float | None] = {p.key: None for p in paths}
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        inputs.save(Path(tmp))
        if with_rss:
            for path in paths:
                log.info("peak RSS: child process for %s", path.key)
                rss[path.key] = measure_child_rss(path, args, Path(tmp), size["new_tokens"])

    runs = {p.key: build(p, inputs, args) for p in paths}
    rows: list[dict[str, Any]] = []
    loads: list[float] = []
    for batch in batches:
        prompts = inputs.prompts[:batch]
        timings, seen = measure(runs, prompts, size["new_tokens"], size["repeats"])
        loads += seen
        ref_tokens = timings[REFERENCE].tokens
        for path in paths:
            t = timings[path.key]
            rates = [batch * size["new_tokens"] / s for s in t.seconds]
            stats = _common.Stats.of(rates)
            q = quality.get(path.key, {})
            rows.append(
                {
                    "name": f"{path.key}/b{batch}",
                    "path": path.key,
                    "reference": path.key == REFERENCE,
                    "what": path.what,
                    "batch": batch,
                    "tokens_per_s": stats.median,
                    "tokens_per_s_min": stats.min,
                    "tokens_per_s_max": stats.max,
                    "repeats": stats.n,
                    "peak_rss_mb": rss[path.key],
                    "same_tokens_as_reference": same_tokens(t.tokens, ref_tokens),
                    **q,
                }
            )
    by_name = {r["name"]: r for r in rows}
    ratios: dict[str, dict[str, float | None]] = {
        "tokens_per_s_vs_reference": {},
        "peak_rss_vs_reference": {},
    }
    for r in rows:
        ref = by_name[f"{REFERENCE}/b{r['batch']}"]
        ratios["tokens_per_s_vs_reference"][r["name"]] = _common.ratio(
            r["tokens_per_s"], ref["tokens_per_s"]
        )
        ratios["peak_rss_vs_reference"][r["name"]] = (
            None
            if r["peak_rss_mb"] is None or ref["peak_rss_mb"] is None
            else _common.ratio(r["peak_rss_mb"], ref["peak_rss_mb"])
        )
    goal = target(rows, ratios, quality)
    machine = _common.machine_info(threads=args.threads, device="cpu")
    machine["onnxruntime"] = _common._version("onnxruntime")
    machine["load_average_1m_max"] = max(loads) if loads else None
    machine["native_bf16"] = native_bf16
    notes_ = notes(args, size, machine, loads, with_rss, started, quality)
    if not native_bf16:
        notes_.append("left out (bf16 arithmetic is emulated on this class): peft-bf16.")
    if machine["isa_restriction"]:
        notes_.append(
            f"ONNX Runtime does not read {machine['isa_restriction']}: its rows ran the CPU's "
            "own kernels, so only the torch rows hold for the restricted class."
        )
    head = _common.class_line(machine)
    print(head + "\n\n" + render(rows, ratios, goal, notes_), flush=True)
    if args.json is not None:
        _common.write_json(
            args.json,
            bench=BENCH,
            machine=machine,
            rows=rows,
            ratios=ratios,
            target=goal,
            settings={
                "isa": args.isa,
                "quick": args.quick,
                "base": args.base,
                "prompt_len": size["prompt_len"],
                "new_tokens": size["new_tokens"],
                "batches": list(batches),
                "repeats": size["repeats"],
                "threads": args.threads,
                "rank": RANK,
                "alpha": ALPHA,
                "target_modules": list(TARGETS),
                "peak_rss": "child process max RSS (VmHWM on Linux)" if with_rss else None,
            },
        )
        log.info("wrote %s", args.json)
    return 0


def target(
    rows: Sequence[dict[str, Any]],
    ratios: dict[str, dict[str, float | None]],
    quality: dict[str, Any],
) -> dict[str, Any]:
    """The issue's goal for the int8 path: >= 3x tokens/s, <= 0.5x peak RSS, at the gate."""
    names = [r["name"] for r in rows if r["path"] == TARGET_PATH]
    speed = {n: ratios["tokens_per_s_vs_reference"][n] for n in names}
    mem = {n: ratios["peak_rss_vs_reference"][n] for n in names}
    passed = bool(quality.get(TARGET_PATH, {}).get("gate_passed", False))
    met = (
        passed
        and all(v is not None and v >= TARGET_SPEEDUP for v in speed.values())
        and all(v is not None and v <= TARGET_RSS for v in mem.values())
    )
    return {
        "goal": f"{TARGET_PATH}: >= {TARGET_SPEEDUP:g}x reference tokens/s and <= {TARGET_RSS:g}x its peak RSS, within the quality gate",
        "path": TARGET_PATH,
        "tokens_per_s_vs_reference": speed,
        "peak_rss_vs_reference": mem,
        "gate_passed": passed,
        "met": met,
    }


def render(
    rows: Sequence[dict[str, Any]],
    ratios: dict[str, dict[str, float | None]],
    goal: dict[str, Any],
    notes_: Sequence[str],
) -> str:
    headers = [
        "path",
        "batch",
        "tokens/s median [min-max]",
        "x ref",
        "peak RSS MB",
        "RSS x ref",
        "gate CE (vs fp32)",
        "same tokens",
    ]
    cells = []
    for r in rows:
        mem = ratios["peak_rss_vs_reference"][r["name"]]
        gate = "-"
        if "gate_ce" in r:
            gate = f"{r['gate_ce']:.4f} ({fmt_pct(r['gate_increase_pct'])}{'' if r['gate_passed'] else ', FAILS'})"
        cells.append(
            [
                f"{r['path']} (reference)" if r["reference"] else r["path"],
                str(r["batch"]),
                f"{r['tokens_per_s']:.1f} [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}]",
                f"{ratios['tokens_per_s_vs_reference'][r['name']]:.2f}x",
                "skipped" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
                "-" if mem is None else f"{mem:.2f}x",
                gate,
                f"{r['same_tokens_as_reference'] * 100:.0f}%",
            ]
        )
    speeds = ", ".join(f"{k}: {v:.2f}x" for k, v in goal["tokens_per_s_vs_reference"].items())
    mems = ", ".join(
        f"{k}: {'n/a' if v is None else f'{v:.2f}x'}"
        for k, v in goal["peak_rss_vs_reference"].items()
    )
    verdict = (
        f"{goal['path']}: tokens/s vs reference {speeds}; peak RSS vs reference {mems}; quality gate "
        f"{'passed' if goal['gate_passed'] else 'FAILED'}; target >= {TARGET_SPEEDUP:g}x tokens/s at "
        f"<= {TARGET_RSS:g}x peak RSS: {'MET' if goal['met'] else 'NOT MET'}"
    )
    return "\n".join([_common.format_table(headers, cells), "", verdict, "", *notes_])


def notes(
    args: argparse.Namespace,
    size: dict[str, Any],
    machine: dict[str, Any],
    loads: list[float],
    with_rss: bool,
    started: float,
    quality: dict[str, Any],
) -> list[str]:
    fp32_ce = next((q["gate_ce_fp32"] for q in quality.values()), float("nan"))
    out = [
        f"Same inputs for every path: {max(size['batches'])} prompts of {size['prompt_len']} tokens "
        f"(windows of the demo notes), {size['new_tokens']} new tokens per row (EOS ignored), greedy; "
        f"adapter rank {RANK} on {'+'.join(TARGETS)}, seeded A, fixed random B; {args.threads} threads.",
        f"tokens/s = new tokens of all rows / wall time of one generate call (prefill included); "
        f"{size['repeats']} timed generations per path and batch after one warm-up, interleaved.",
        f"Gate CE: the export's mean next-token cross-entropy on the demo notes; the fp32 PyTorch base: {fp32_ce:.4f}. "
        "'same tokens': share of generated tokens equal to the reference's at the same position.",
        "Peak RSS: "
        + (
            "child process max RSS (its own VmHWM on Linux): a fresh process loads that path alone and "
            f"generates once at batch {max(size['batches'])}; ONNX children import no torch."
            if with_rss
            else "skipped (--quick)."
        ),
        f"Machine: {machine['cpu_model']}, {machine['usable_cores']} cores, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}, onnxruntime {machine['onnxruntime']}; "
        f"wall {time.perf_counter() - started:.0f} s; 1-min load average up to "
        f"{'n/a' if not loads else f'{max(loads):.1f}'}.",
    ]
    if loads and max(loads) > float(machine["usable_cores"] or 1) + 0.5:
        out.append(
            f"WARNING: the machine was busy with other work (load up to {max(loads):.1f}); "
            "timings are noisy, rerun on a quiet machine."
        )
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Greedy generation: peft + transformers vs lorafleet's ONNX Runtime paths (CPU)."
    )
    parser.add_argument("--quick", action="store_true", help="reduced size for the test suite")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed generations per path and batch"
    )
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch and ONNX Runtime threads"
    )
    parser.add_argument(
        "--base", default="default", help="base model: 'default', a .gguf file or a folder"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="lorafleet cache (exports land here)"
    )
    parser.add_argument(
        "--rss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure each path's peak RSS in a child process (default: on, off with --quick)",
    )
    _common.add_isa_argument(parser)
    parser.add_argument("--child", choices=sorted(PATHS_BY_KEY), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--new-tokens", type=int, default=FULL["new_tokens"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    for name in ("repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.child is not None and args.inputs is None:
        parser.error("--child needs --inputs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rerun = _common.rerun_under_isa(args.isa, __file__, argv)
    if rerun is not None:
        return rerun
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.child is None or PATHS_BY_KEY[args.child].kind == "peft":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        return child_main(args) if args.child is not None else bench_main(args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
