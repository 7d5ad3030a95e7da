"""The ``lorafleet`` command: the SDK from a shell.

Every user mistake prints one ``error:`` line and exits 2; an interrupt exits 130 and
leaves the last saved adapter version in place.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.client.data import SPLITS, TRAIN_ON, DataConfig, Example, to_examples
from lorafleet.protocols.cli import DefaultsHelpFormatter, add_version_flag
from lorafleet.protocols.errors import LorafleetError

if TYPE_CHECKING:  # the heavy imports wait until a command needs them: --help stays instant
    from lorafleet.client.sdk import PersonalModel

log = logging.getLogger("lorafleet")


_EXPORT_FORMATS = [
    "peft",
    "merged",
    "onnx-genai",
    "gguf-lora",
    "gguf",
]  # lorafleet.client.export.EXPORT_FORMATS, without torch
# runtime.PRECISIONS, spelled out so --help imports no torch (a test keeps them equal);
# lorafleet-sim's --precision offers the same.
PRECISION_CHOICES = [
    "auto",
    "fp32",
    "bf16-mixed",
    "bf16",
    "fp32-lean",
    "bf16-lean",
    "int8",
    "int8-fp32",
    "nf4",
]


def _add_cache_dir(p: argparse.ArgumentParser, what: str) -> None:
    lead = "where converted bases are cached" if what == "bases" else "lorafleet's cache root"
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"{lead} (default: $LORAFLEET_CACHE or ~/.cache/lorafleet)",
    )


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", required=True, type=Path, help="profile directory (created on first use)"
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model: default, a .gguf file, a folder or a hub id (default: the "
        "profile's own base; the default base for a new profile)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="weights and compute precision (auto: the device profile's fastest lean "
        "path, see `lorafleet device`)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_cache_dir(p, "bases")


def _add_data_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help=f"{what}: .txt/.md notes, .jsonl, .json, .csv, .tsv or .parquet records, or a "
        "folder (formats: docs/sdk.md)",
    )
    p.add_argument(
        "--split",
        default="auto",
        choices=list(SPLITS),
        help=".txt/.md notes are separated by blank lines (paragraphs) or one per line "
        "(lines); auto reads a lone file without blank lines one note per line",
    )
    p.add_argument(
        "--text-column",
        default=None,
        help="read only this field of every record (a table's text column) as a note",
    )
    p.add_argument(
        "--train-on",
        default="completion",
        choices=list(TRAIN_ON),
        help="loss on completions and assistant replies only (prompts masked, as in TRL), "
        "or on all tokens",
    )


def _parser() -> argparse.ArgumentParser:
    fmt = DefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Private on-device personalization of a language model.",
        formatter_class=fmt,
    )
    add_version_flag(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune the personal adapter on your text and save a version",
        formatter_class=fmt,
    )
    _add_profile_args(p)
    _add_data_args(p, "your text")
    p.add_argument(
        "--steps",
        type=int,
        default=60,
        help="optimizer steps at most (early stopping and --steps-per-block may take fewer)",
    )
    p.add_argument(
        "--steps-per-block",
        type=float,
        help="size the budget by your text: this many steps per training block, at least "
        "8 and at most --steps (default: lorafleet's sizing, one per block; 0: train for "
        "--steps)",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the adapter's B")
    p.add_argument(
        "--a-lr",
        type=float,
        default=0.0,
        help="learning rate of the adapter's A: > 0 trains a personal A too, kept in the "
        "profile (default 0: A stays the spec's seeded A)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="token blocks per step")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the lean CPU forward with torch.compile (needs a C++ compiler): "
        "faster steps after a first step that compiles (tens of seconds, once per machine "
        "and shape; cached)",
    )
    p.add_argument(
        "--heldout", type=float, default=0.2, help="share of notes held out for early stopping"
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="share of notes set aside first and only scored: the honest before/after (0: none)",
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (new profiles only)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed of A (new profiles only)")

    p = sub.add_parser(
        "eval",
        help="held-out loss of the base and of your adapter on a data set",
        formatter_class=fmt,
    )
    _add_profile_args(p)
    _add_data_args(p, "text to score")

    p = sub.add_parser("generate", help="reply to a prompt with your adapter", formatter_class=fmt)
    _add_profile_args(p)
    p.add_argument(
        "--prompt", required=True, help="your message (or, with --raw, text to continue)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens")
    p.add_argument(
        "--raw",
        action="store_true",
        help="continue the prompt as plain text instead of replying through the chat template",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy"
    )
    p.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus sampling mass (with --temperature > 0)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling (same seed, same text)"
    )
    p.add_argument("--no-adapter", action="store_true", help="use the bare base model")
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnx", "onnx-int8", "onnx-auto"],
        help="torch (PyTorch), onnx (ONNX Runtime, float32), onnx-int8 (int8 base weights) or "
        "onnx-auto (whichever of the two ONNX graphs decodes faster here, timed once and "
        "cached); the base is exported to ONNX once and cached",
    )
    p.add_argument(
        "--provider",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="ONNX Runtime execution provider for the onnx backends (auto: CUDA if "
        "onnxruntime-gpu is installed, else cpu)",
    )

    p = sub.add_parser(
        "info",
        help="show a profile's spec and versions, or this machine's set-up",
        formatter_class=fmt,
    )
    p.add_argument("--profile", type=Path, default=None, help="a profile directory")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (never imports torch: fast, scriptable)",
    )

    p = sub.add_parser(
        "device",
        help="this CPU's profile: ISA class, cores, matmul speed per dtype, what auto picks",
        formatter_class=fmt,
    )
    p.add_argument("--json", action="store_true", help="print the profile as one JSON document")
    p.add_argument(
        "--refresh", action="store_true", help="measure again instead of reading the cache"
    )
    _add_cache_dir(p, "root")

    # Not `device serve`: `device` is a leaf command whose flags describe this CPU, and a
    # subcommand under it would make `lorafleet device --json serve` parse (docs/deployment.md).
    p = sub.add_parser(
        "serve-device",
        help="keep the base loaded between federated rounds: a worker the ClientApp hands "
        "rounds to (node setting device-worker)",
        description="A long-lived local worker for a SuperNode: Flower 1.41 starts a fresh "
        "ClientApp process per round, which would load the base every round. With the node "
        "setting device-worker='PATH' the ClientApp runs each round here instead. Stop it "
        "with Ctrl-C or SIGTERM (docs/deployment.md#a-warm-device-worker).",
        formatter_class=fmt,
    )
    p.add_argument(
        "--socket",
        required=True,
        type=Path,
        help="Unix socket to listen on; its directory is created 0700 and must not be "
        "writable by other users",
    )

    p = sub.add_parser(
        "export",
        help="export a personal adapter version (peft, merged, onnx-genai, gguf-lora, gguf) "
        "or the base to ONNX (onnx)",
        description="--format peft|merged|onnx-genai|gguf-lora|gguf writes a profile's adapter version to --out for "
        "other tools (docs/sdk.md#exports); --format onnx exports the base to lorafleet's "
        "ONNX cache and prints its quality gate.",
        formatter_class=fmt,
    )
    p.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", *_EXPORT_FORMATS],
        help="peft: a portable PEFT adapter folder; merged: the base with the adapter "
        "folded in (transformers safetensors); onnx-genai: an ONNX Runtime GenAI folder with "
        "the adapter as .onnx_adapter; gguf-lora: a llama.cpp LoRA (--lora adapter.gguf) for the "
        "GGUF base; gguf: that base with the adapter folded in (float32 GGUF); onnx: the base "
        "for lorafleet's ONNX backends",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="the profile to export (every format but onnx)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to write; must not exist (every format but onnx)",
    )
    p.add_argument(
        "--adapter-version",
        type=int,
        default=None,
        help="which saved version (default: the current one)",
    )
    p.add_argument(
        "--base-id",
        default=None,
        help="name the base ORG/NAME[@REVISION] in the export (for a base loaded from a "
        "local file or folder; the default base is HuggingFaceTB/SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model: default, a .gguf file, a folder or a hub id (default: the "
        "profile's base; the default base for --format onnx)",
    )
    p.add_argument(
        "--quantization",
        default="int8",
        choices=["none", "int8", "int4"],
        help="weight quantization of the ONNX export (--format onnx)",
    )
    p.add_argument("--target-modules", default="q_proj,v_proj", help="layers that take the adapter")
    p.add_argument("--block-size", type=int, default=32, help="weights per quantization block")
    p.add_argument(
        "--keep-float", default="", help="layers left in float32, e.g. lm_head,down_proj"
    )
    p.add_argument(
        "--max-ce-increase-pct", type=float, default=3.0, help="quality gate vs float32, in %%"
    )
    p.add_argument(
        "--allow-quality-loss", action="store_true", help="keep an export that fails the gate"
    )
    _add_cache_dir(p, "root")

    p = sub.add_parser(
        "export-base",
        help="write a base as a plain transformers folder (config, tokenizer, safetensors)",
        description="For the default base these are the de-quantized Q4_1 weights of "
        "HuggingFaceTB/SmolLM2-135M-Instruct that lorafleet trains on: exported adapters "
        "load onto them with lorafleet's exact results.",
        formatter_class=fmt,
    )
    p.add_argument("out", type=Path, help="folder to write; must not exist")
    p.add_argument(
        "--base", default="default", help="base model: default, a .gguf file, a folder or a hub id"
    )
    _add_cache_dir(p, "root")

    p = sub.add_parser(
        "demo", help="the single-device story on the bundled demo notes", formatter_class=fmt
    )
    p.add_argument("--profile", type=Path, default=None, help="default: a fresh temporary profile")
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="weights and compute precision",
    )
    _add_cache_dir(p, "bases")
    return parser


def _open(
    args: argparse.Namespace, *, rank: int = 8, cohort_seed: int = 0, create: bool = False
) -> PersonalModel:
    from lorafleet.client.profile import Profile
    from lorafleet.client.sdk import PersonalModel

    if not create and Profile.read_spec(args.profile) is None:
        raise LorafleetError(
            f"{args.profile} is not a lorafleet profile yet; create it with lorafleet train --profile {args.profile} ..."
        )
    return PersonalModel.open(
        args.profile,
        base=args.base,
        precision=args.precision,
        device=args.device,
        cache_dir=args.cache_dir,
        rank=rank,
        cohort_seed=cohort_seed,
    )


def _read_data(args: argparse.Namespace) -> tuple[list[Example], DataConfig]:
    """The user's data, read and checked before any model is loaded (that takes seconds)."""
    config = DataConfig(split=args.split, text_field=args.text_column, train_on=args.train_on)
    return to_examples(args.data, config), config


def _cmd_train(args: argparse.Namespace) -> None:
    from lorafleet.client.profile import Profile
    from lorafleet.client.sdk import PersonalModel
    from lorafleet.client.train import SIZED_STEPS_PER_BLOCK, TrainConfig

    # Everything a user can get wrong fails here, before the base loads and before a
    # new profile is created.
    config = TrainConfig(
        steps=args.steps,
        steps_per_block=SIZED_STEPS_PER_BLOCK
        if args.steps_per_block is None
        else args.steps_per_block,
        lr=args.lr,
        a_lr=args.a_lr,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        compile=args.compile,
    )
    if args.rank < 1:
        raise LorafleetError(f"--rank must be >= 1, got {args.rank}")
    examples, data_config = _read_data(args)
    PersonalModel.split_data(
        examples, heldout_fraction=args.heldout, test_fraction=args.test_fraction, seed=config.seed
    )
    new = Profile.read_spec(args.profile) is None
    try:
        pm = _open(args, rank=args.rank, cohort_seed=args.seed, create=True)
        report = pm.train(
            examples,
            config,
            data_config=data_config,
            heldout_fraction=args.heldout,
            test_fraction=args.test_fraction,
        )
    except BaseException:
        if new:  # a failed first run leaves no empty profile to trip over later
            Profile.remove_unused(args.profile)
        raise
    r = report.result
    print(
        f"trained {r.steps} steps on {report.train_examples} notes ({r.tokens_per_second:.0f} tokens/s)"
    )
    print(f"held-out loss: {r.heldout_loss_before:.4f} -> {r.heldout_loss_after:.4f}")
    if report.test_loss_before is not None and report.test_loss_after is not None:
        print(
            f"test loss ({report.test_examples} notes nothing was selected on): "
            f"{report.test_loss_before:.4f} -> {report.test_loss_after:.4f}"
        )
    if report.provenance is not None:
        print(f"saved version {report.provenance.version} in {pm.profile}")


def _cmd_eval(args: argparse.Namespace) -> None:
    examples, data_config = _read_data(args)
    pm = _open(args)
    rep = pm.evaluate(examples, data_config)
    print(f"tokens: {rep.tokens}")
    print(f"base     loss {rep.base_loss:.4f}  perplexity {rep.base_perplexity:.2f}")
    print(f"adapter  loss {rep.adapter_loss:.4f}  perplexity {rep.adapter_perplexity:.2f}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from lorafleet.client.evaluate import check_sampling

    check_sampling(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    if not args.prompt:
        raise LorafleetError("--prompt is empty; say something to reply to")
    provider = None if args.provider == "auto" else args.provider
    if args.backend == "torch":
        if provider is not None:
            raise LorafleetError(
                f"--provider {provider} applies to the --backend onnx variants; the torch "
                "backend runs on --device"
            )
    else:  # a provider that is not there fails now, before the model loads
        from lorafleet.client.onnx_runtime import select_providers

        if args.temperature > 0:
            raise LorafleetError(
                f"--temperature {args.temperature} samples on --backend torch only; use "
                f"--temperature 0 with --backend {args.backend}"
            )
        select_providers(provider)
        log.info("generating with the %s backend", args.backend)
    pm = _open(args)
    print(
        pm.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            use_adapter=not args.no_adapter,
            chat=not args.raw,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            backend=args.backend,
            provider=provider,
        )
    )


def _cmd_info(args: argparse.Namespace) -> None:
    if args.json:
        from lorafleet.client.info import info_document

        print(json.dumps(info_document(args.profile), indent=2, sort_keys=True))
        return
    if args.profile is None:
        from lorafleet.client.base import default_gguf_path
        from lorafleet.client.runtime import resolve_device

        try:
            default = str(default_gguf_path())
        except LorafleetError as exc:
            default = f"missing ({exc})"
        print(
            json.dumps({"default_base": default, "device": str(resolve_device("auto"))}, indent=2)
        )
        return
    from lorafleet.client.profile import Profile

    profile = Profile.open(args.profile)
    print(
        json.dumps(
            {"profile": str(args.profile), "spec": profile.spec.to_dict()}, indent=2, sort_keys=True
        )
    )
    current = profile.current_version()
    for p in profile.versions():
        mark = "*" if p.version == current else " "
        metrics = " ".join(f"{k}={v:.4g}" for k, v in p.metrics.items())
        print(f"{mark} v{p.version:04d}  parent={p.parent}  {p.created_at}  {metrics}")


def _cmd_device(args: argparse.Namespace) -> None:
    from lorafleet.client.device import device_profile

    profile = device_profile(cache_dir=args.cache_dir, refresh=args.refresh)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2, sort_keys=True))
    else:
        print(profile.summary())


def _cmd_serve_device(args: argparse.Namespace) -> int:
    from lorafleet.client.device_worker import serve

    logging.getLogger("lorafleet.client.device_worker").setLevel(logging.INFO)

    def ready(path: Path) -> None:
        print(
            f"device worker serving on {path} (pid {os.getpid()}); the base loads on the "
            "first round and stays loaded; stop with Ctrl-C or SIGTERM",
            flush=True,
        )

    return serve(args.socket, on_ready=ready)


def _cmd_export(args: argparse.Namespace) -> None:
    if args.format != "onnx":
        _export_adapter(args)
        return
    from lorafleet.client.base import load_base
    from lorafleet.client.onnx_export import OnnxExportConfig, export_base

    def names(text: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in text.split(",") if n.strip())

    for flag in ("profile", "out", "adapter_version", "base_id"):
        if getattr(args, flag) is not None:
            raise LorafleetError(
                f"--{flag.replace('_', '-')} applies to the adapter formats "
                f"({', '.join(_EXPORT_FORMATS)}); --format onnx exports the base into "
                "lorafleet's cache"
            )
    config = OnnxExportConfig(
        quantization=args.quantization,
        target_modules=names(args.target_modules),
        block_size=args.block_size,
        keep_float=names(args.keep_float),
        max_ce_increase_pct=args.max_ce_increase_pct,
        allow_quality_loss=args.allow_quality_loss,
    )
    exported = export_base(
        load_base(args.base or "default", cache_dir=args.cache_dir),
        config,
        cache_dir=args.cache_dir,
    )
    print(exported.quality.summary())
    print(f"exported to {exported.folder}")


def _export_adapter(args: argparse.Namespace) -> None:
    """``export --format peft|merged|...``: every argument is checked before the base loads."""
    from lorafleet.client.export import BaseRef, check_new_folder
    from lorafleet.client.profile import Profile

    if args.profile is None or args.out is None:
        raise LorafleetError(
            f"--format {args.format} needs --profile (the adapter to export) and --out (a new folder)"
        )
    check_new_folder(args.out)
    if args.base_id is not None:
        BaseRef.parse(args.base_id, sha256="0" * 64)  # only checks the spelling
    profile = Profile.open(args.profile)
    known = [p.version for p in profile.versions()]
    if not known:
        raise LorafleetError(f"{args.profile} has no saved adapter version yet; train first")
    if args.adapter_version is not None and args.adapter_version not in known:
        raise LorafleetError(
            f"--adapter-version {args.adapter_version}: {args.profile} has versions {known}"
        )
    if args.format in ("gguf-lora", "gguf"):
        from lorafleet.client.gguf_export import gguf_base

        gguf_base(args.base or Profile.read_base_source(args.profile) or "default", args.format)
    args.precision, args.device = "fp32", "cpu"  # exports are float32 on any machine
    pm = _open(args)
    out = pm.export(args.out, args.format, version=args.adapter_version, base_id=args.base_id)
    print(
        f"exported adapter version {args.adapter_version or pm.version} as {args.format} to {out}"
    )


def _cmd_export_base(args: argparse.Namespace) -> None:
    from lorafleet.client.export import export_base_folder

    out, ref = export_base_folder(args.base, args.out, cache_dir=args.cache_dir)
    print(f"wrote base {ref.name_or_path} (lorafleet sha256 {ref.sha256[:12]}…) to {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from lorafleet.client.demo import run_demo

    run_demo(
        profile=args.profile, steps=args.steps, precision=args.precision, cache_dir=args.cache_dir
    )


_COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "info": _cmd_info,
    "device": _cmd_device,
    "serve-device": _cmd_serve_device,
    "export": _cmd_export,
    "export-base": _cmd_export_base,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose and args.command not in ("info", "device"):
        # transformers and peft are chatty about things users cannot act on; our own
        # progress bars stay.
        import warnings

        from transformers.utils import logging as hf_logging

        warnings.filterwarnings("ignore", category=FutureWarning)
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        code = _COMMANDS[args.command](args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last saved adapter version is unchanged", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
