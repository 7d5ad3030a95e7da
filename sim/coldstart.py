"""Replay the cold-start curve from a finished federation's prior, on any newcomers.

``python -m lorafleet.sim.coldstart NEWCOMERS_DIR PRIOR --cohort-seed 1 --ks 16,64``
trains every newcomer of ``NEWCOMERS_DIR`` (users who never took part, one folder each
as ``--newcomers-dir`` takes them) on k of their training notes, from ``PRIOR`` (a prior
version's safetensors, e.g. ``seed-1/coordinator/priors/*/v0003`` of an experiment run)
and from zero, with exactly the experiment's cold start
(:func:`lorafleet.sim.experiment.cold_start_curve`: the devices' final personalization,
early-stopped on the newcomer's validation notes), and prints the mean test loss per k.

It replays only the newcomers, so a federation that ran without ``--cold-start`` (or a
new set of newcomers) gets its curve in minutes instead of a rerun. ``--cohort-seed``
must be the seed of the experiment's run the prior came from: the prior's B means
something only on that cohort's seeded A. A run with ``--shared-a gradient`` trained its
prior on the cohort's shared A instead: pass that file too (``--shared-a``, the
``shared-a.safetensors`` beside the prior versions), or the prior is read on the wrong A.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lorafleet.protocols.errors import LorafleetError
from lorafleet.sim.baselines import open_lab, read_prior, read_shared_a
from lorafleet.sim.experiment import ExperimentConfig, cold_start_curve
from lorafleet.sim.personas import load_user_folders

__all__ = ["replay"]


def replay(
    newcomers_dir: Path,
    prior_path: Path,
    ks: Sequence[int],
    *,
    cohort_seed: int = 0,
    steps: int = 0,
    base: str = "default",
    precision: str = "auto",
    rank: int = 8,
    seq_len: int = 128,
    shared_a_path: Path | None = None,
) -> list[dict[str, float]]:
    """The cold-start rows (``k``, ``from_prior``, ``from_zero``, ``prior_alone``, ...).

    ``steps`` is the newcomer's budget (0: the experiment's default, its personalize
    budget); every other choice is the experiment's default recipe.
    """
    cfg = ExperimentConfig(
        output=Path("."),  # nothing is written
        newcomers_dir=newcomers_dir,
        cold_start_ks=tuple(ks),
        cold_start_steps=steps,
        base=base,
        precision=precision,
        rank=rank,
        seq_len=seq_len,
    )
    lab, loaded = open_lab(base, precision, rank=rank, cohort_seed=cohort_seed)
    prior = read_prior(lab, prior_path)
    prior_a = read_shared_a(lab, shared_a_path) if shared_a_path is not None else None
    newcomers = load_user_folders(newcomers_dir)
    return cold_start_curve(cfg, lab, loaded, prior, newcomers, progress=True, prior_a=prior_a)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorafleet.sim.coldstart",
        description="Replay the cold-start curve from a finished federation's prior.",
    )
    parser.add_argument("newcomers_dir", type=Path, help="one folder per newcomer")
    parser.add_argument("prior", type=Path, help="a prior version's .safetensors")
    parser.add_argument("--ks", default="16,64", help="comma-separated notes per newcomer")
    parser.add_argument(
        "--cohort-seed", type=int, default=0, help="the experiment seed the prior came from"
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="newcomer's budget (0: the experiment's default)"
    )
    parser.add_argument(
        "--shared-a",
        type=Path,
        help="the run's shared-a.safetensors, for a prior trained with --shared-a gradient",
    )
    parser.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    args = parser.parse_args(argv)
    try:
        ks = [int(x) for x in args.ks.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--ks must be comma-separated whole numbers, got {args.ks!r}")
    if not ks or min(ks) < 1:
        parser.error(f"--ks must be whole numbers >= 1, got {args.ks!r}")
    if args.steps < 0 or args.cohort_seed < 0:
        parser.error("--steps and --cohort-seed must be >= 0")
    if not args.prior.is_file():
        parser.error(f"prior {args.prior} is not a file (a prior version's .safetensors)")
    if args.shared_a is not None and not args.shared_a.is_file():
        parser.error(f"shared A {args.shared_a} is not a file (the run's shared-a.safetensors)")
    if not args.newcomers_dir.is_dir():
        parser.error(f"newcomers folder {args.newcomers_dir} does not exist")
    try:
        rows = replay(
            args.newcomers_dir,
            args.prior,
            ks,
            cohort_seed=args.cohort_seed,
            steps=args.steps,
            shared_a_path=args.shared_a,
        )
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'k':<6}{'from prior':>12}{'from zero':>12}{'prior alone':>13}   (mean test loss)")
    for row in rows:
        print(
            f"{int(row['k']):<6}{row['from_prior']:12.4f}{row['from_zero']:12.4f}"
            f"{row['prior_alone']:13.4f}   ({int(row['newcomers'])} newcomers)"
        )
    if not rows:
        print("no newcomer has enough training notes for any k", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
