"""Backup bytes per adapter version: today's whole-folder archive against B only.

One personal adapter is trained on the demo notes (rank 8 on q_proj and v_proj of the
default base, SmolLM2-135M, unless ``--base`` names another), saved as version 1, then
backed up and restored along each path, side by side in one run:

- ``format-1`` (baseline, the archive before issue 15): the whole PEFT folder byte for
  byte, A and B in fp32 (:func:`lorafleet.client.archive.pack_version_v1`);
- ``format-2-fp32`` / ``-fp16`` / ``-int8``: B only, packed by the rounds' encoding
  (:func:`lorafleet.protocols.encoding.encode_tensors`); A rebuilt from the seed on
  restore (:func:`lorafleet.client.archive.pack_version`).
- with ``--a-lr`` the adapter also trains a personal A (as the federation's final
  personalization does), which no seed rebuilds: the packed paths are then
  ``format-3-*``, A packed with B the same way.

For each path: the archive's bytes and the sealed envelope's (real AES-256-GCM, what the
coordinator stores), their ratio to the baseline's, the time to pack and seal and to
open and unpack (median of the repeats after a warm-up, interleaved), and the held-out
loss of the restored adapter on notes set aside before training (nothing was tuned or
early-stopped on them) next to the original adapter's and the bare base's. The restored
folder goes through the same checks a restore makes (provenance, A against the seed, B
against the content hash) before its B is loaded; the default path's folder is also
loaded by stock ``PeftModel.from_pretrained`` on a fresh copy of the base and scored.

Usage (from the repository root, inside .venv)::

    python bench/backup_size.py                  # SmolLM2-135M, 24 training steps
    python bench/backup_size.py --quick --base PATH  # a small HF folder: seconds
    python bench/backup_size.py --json out.json  # also write the result file
    python bench/backup_size.py --a-lr 4e-3      # a personal A: format 3 against format 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import numpy as np

from lorafleet.client.adapter import adapter_disabled, read_adapter, read_provenance
from lorafleet.client.archive import BACKUP_PACKING, pack_version, pack_version_v1, unpack_archive
from lorafleet.client.base import load_base
from lorafleet.client.data import demo_notes_path, encode_blocks, read_examples, split_examples
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig
from lorafleet.protocols import crypto
from lorafleet.protocols.envelope import BlobContext, new_blob_id, open_blob, seal_blob

log = logging.getLogger("bench.backup_size")

BENCH = "backup_size"
BASELINE = "format-1"
PACKINGS = ("fp32", "fp16", "int8")
TARGET_RATIO = 0.2  # issue 15: per-version bytes <= 1/5 of today's
USERS, VERSIONS = 10**6, 10


@dataclass
class Measured:
    """One path's result."""

    name: str
    archive_bytes: int
    sealed_bytes: int
    pack_s: list[float]
    restore_s: list[float]
    loss: float
    max_abs_error: float
    same_files: bool


def paths(personal_a: bool) -> tuple[str, ...]:
    """The baseline and the packed paths (format 3 where the adapter has a personal A)."""
    fmt = 3 if personal_a else 2
    return (BASELINE, *(f"format-{fmt}-{p}" for p in PACKINGS))


def pack(name: str, profile: Path) -> bytes:
    if name == BASELINE:
        return pack_version_v1(profile, 1)
    return pack_version(profile, 1, packing=name.rsplit("-", 1)[1])  # type: ignore[arg-type]


def restore(
    data: bytes, folder: Path
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Unpack, write and check a version folder as restore_profile does; its B and A."""
    archive = unpack_archive(data)
    folder.mkdir(parents=True)
    for rel, blob in archive.files.items():
        (folder / rel).write_bytes(blob)
    return read_adapter(folder, read_provenance(folder))


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in got)


def run(args: argparse.Namespace) -> int:
    steps = args.steps or (3 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-backup-size-") as tmp:
        root = Path(tmp)
        pm = PersonalModel.open(
            root / "profile",
            base=args.base,
            precision="fp32",
            device="cpu",
            seq_len=args.seq_len,
            cache_dir=args.cache_dir,
        )
        notes = read_examples(args.notes or demo_notes_path())
        rest, test = split_examples(notes, 0.2, seed=1234, min_train=6, min_heldout=1)
        log.info("training %d steps on %d notes (%d set aside)", steps, len(rest), len(test))
        config = TrainConfig(
            steps=steps, eval_every=max(1, steps // 3), precision="fp32", a_lr=args.a_lr
        )
        pm.train(rest, config, progress=False)
        original = pm.adapter_b()
        original_a = pm.adapter_a()
        if args.a_lr > 0 and original_a is None:
            log.warning("the best step kept was before A moved: no personal A to measure")
        blocks = encode_blocks(test, pm.base.tokenizer, seq_len=args.seq_len)
        original_loss = heldout_loss(pm.model, blocks, device="cpu")
        with adapter_disabled(pm.model):
            base_loss = heldout_loss(pm.model, blocks, device="cpu")
        folder = pm.profile / "adapters" / "v0001"
        originals = {p.name: p.read_bytes() for p in folder.iterdir()}
        names = paths(original_a is not None)
        results = measure(root, pm, blocks, (original, original_a), originals, repeats, names)
        default = next(n for n in names if n.endswith(f"-{BACKUP_PACKING}"))
        stock = stock_peft_loss(args, root / f"restore-{default}-final", blocks)
    report(results, original_loss, base_loss, stock, len(test), steps, repeats, args)
    return 0


def stock_peft_loss(args: argparse.Namespace, folder: Path, blocks: Any) -> float:
    """Held-out loss of a restored folder loaded by stock peft on a fresh copy of the base.

    The folder must be a plain PEFT adapter: ``PeftModel.from_pretrained`` reads its A
    and B from the rebuilt weights file, lorafleet's code plays no part.
    """
    from peft import PeftModel

    base = load_base(args.base, cache_dir=args.cache_dir)
    return heldout_loss(PeftModel.from_pretrained(base.model, str(folder)), blocks, device="cpu")


def measure(
    root: Path,
    pm: PersonalModel,
    blocks: Any,
    original: tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None],
    originals: dict[str, bytes],
    repeats: int,
    names: tuple[str, ...],
) -> list[Measured]:
    """Bytes, times (interleaved, rotating order) and restored loss per path."""
    key = crypto.random_key()
    spec = pm.spec
    times: dict[str, tuple[list[float], list[float]]] = {p: ([], []) for p in names}
    last: dict[str, tuple[bytes, bytes]] = {}
    for i in range(1 + repeats):  # one warm-up
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            context = BlobContext("bench-user", "bench", 1, spec.base_sha256, new_blob_id())
            t0 = time.perf_counter()
            plaintext = pack(name, pm.profile)
            sealed = seal_blob(key, context, plaintext, key_id=1)
            t1 = time.perf_counter()
            restore(open_blob(key, context, sealed), root / f"restore-{name}-{i}")
            t2 = time.perf_counter()
            if i > 0:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
            last[name] = (plaintext, sealed)
    results = []
    original_b, original_a = original
    for name in names:
        plaintext, sealed = last[name]
        folder = root / f"restore-{name}-final"
        b, a = restore(plaintext, folder)
        pm.load_b(b, a)
        loss = heldout_loss(pm.model, blocks, device="cpu")
        error = _max_error(b, original_b)
        if a is not None and original_a is not None:
            error = max(error, _max_error(a, original_a))
        same = {p.name: p.read_bytes() for p in folder.iterdir()} == originals
        results.append(Measured(name, len(plaintext), len(sealed), *times[name], loss, error, same))
    pm.load_b(original_b, original_a)
    return results


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def report(
    results: list[Measured],
    original_loss: float,
    base_loss: float,
    stock_loss: float,
    test_notes: int,
    steps: int,
    repeats: int,
    args: argparse.Namespace,
) -> None:
    base = next(r for r in results if r.name == BASELINE)
    gain = base_loss - original_loss
    table, rows = [], []
    for r in results:
        pack_st = _common.Stats.of([t * 1e3 for t in r.pack_s])
        restore_st = _common.Stats.of([t * 1e3 for t in r.restore_s])
        x = _common.ratio(r.sealed_bytes, base.sealed_bytes)
        delta = r.loss - original_loss
        table.append(
            [
                r.name,
                f"{r.archive_bytes:,}",
                f"{r.sealed_bytes:,}",
                f"{x:.3f}",
                f"{r.loss:.5f}",
                f"{delta:+.1e}",
                f"{r.max_abs_error:.1e}",
                "yes" if r.same_files else "no",
                f"{pack_st.median:.1f}",
                f"{restore_st.median:.1f}",
            ]
        )
        rows.append(
            {
                "name": r.name,
                "archive_bytes": r.archive_bytes,
                "sealed_bytes": r.sealed_bytes,
                "sealed_x_format_1": x,
                "heldout_loss": r.loss,
                "heldout_loss_delta": delta,
                "max_abs_error": r.max_abs_error,
                "same_files_as_saved": r.same_files,
                "pack_seal_ms": pack_st.to_dict(),
                "open_unpack_ms": restore_st.to_dict(),
                "storage_bytes_1e6_users_x_10_versions": r.sealed_bytes * USERS * VERSIONS,
            }
        )
    machine = _common.machine_info()
    machine["load_average"] = _common.load_average()
    print(
        f"{machine['cpu_model']} ({machine['cpu_class']}), {machine['threads']} threads, "
        f"torch {machine['torch']}, peft {machine['peft']}; {steps} training steps, "
        f"loss on {test_notes} held-out notes, {repeats} timed repeats"
    )
    headers = [
        "path",
        "archive B",
        "sealed B",
        "x today",
        "held-out loss",
        "d loss",
        "max |dA|,|dB|",
        "same files",
        "pack+seal ms",
        "open+unpack ms",
    ]
    print(_common.format_table(headers, table))
    print(
        f"\noriginal adapter loss {original_loss:.5f}; bare base {base_loss:.5f} "
        f"(the adapter's gain: {gain:.4f})"
    )
    chosen = next(r for r in results if r.name.endswith(f"-{BACKUP_PACKING}"))
    print(
        f"{chosen.name} restored folder loaded by stock PeftModel.from_pretrained: loss "
        f"{stock_loss:.5f} ({stock_loss - chosen.loss:+.1e} from lorafleet's own load)"
    )
    x = _common.ratio(chosen.sealed_bytes, base.sealed_bytes)
    share = abs(chosen.loss - original_loss) / gain if gain > 0 else float("nan")
    print(
        f"default ({chosen.name}): {x:.3f}x today's bytes (target <= {TARGET_RATIO:g}: "
        f"{'met' if x <= TARGET_RATIO else 'NOT met'}); loss change "
        f"{chosen.loss - original_loss:+.1e} ({share:.2%} of the adapter's gain)"
    )
    print(
        f"{USERS:.0e} users x {VERSIONS} versions: today {_size(base.sealed_bytes * USERS * VERSIONS)}, "
        f"{chosen.name} {_size(chosen.sealed_bytes * USERS * VERSIONS)}"
    )
    if args.json:
        ratios = {
            "sealed_bytes_x_format_1": {r["name"]: r["sealed_x_format_1"] for r in rows},
            "heldout_loss_delta": {r["name"]: r["heldout_loss_delta"] for r in rows},
        }
        _common.write_json(
            args.json,
            bench=BENCH,
            machine=machine,
            rows=rows,
            ratios=ratios,
            original_loss=original_loss,
            base_loss=base_loss,
            stock_peft_loss=stock_loss,
            default_packing=BACKUP_PACKING,
            target={"sealed_x_format_1": TARGET_RATIO, "met": x <= TARGET_RATIO},
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 training steps, 1 repeat")
    parser.add_argument("--base", default="default", help="base model (default: SmolLM2-135M)")
    parser.add_argument("--cache-dir", type=Path, help="lorafleet's cache folder")
    parser.add_argument("--notes", type=Path, help="notes to train on (default: the demo's)")
    parser.add_argument("--steps", type=int, help="training steps (default 24)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    parser.add_argument("--repeats", type=int, help="timed repeats after one warm-up")
    parser.add_argument("--json", help="also write the result file here")
    parser.add_argument(
        "--a-lr",
        type=float,
        default=0.0,
        help="also train a personal A at this rate (0: seeded A, format 2)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_main(run, parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
