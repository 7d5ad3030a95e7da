"""Choose the personal learning rate on validation, from a federation's saved prior.

``python -m lorafleet.sim.tune_personal USERS_DIR PRIOR --lrs 2e-3,4e-3,8e-3 --out F.json``
runs, for every user of ``USERS_DIR`` and every learning rate, exactly the final
personalization a device runs (:func:`lorafleet.client.federated.personal_train_config`:
the same budget, evaluation cadence, early stopping and blend with the prior) from
``PRIOR`` (a prior version's safetensors, e.g. ``seed-0/coordinator/priors/*/v0003``
of an experiment run) on the experiment's three-way split. ``--a-lrs`` also tries a
personal A at each of those rates (0: the seeded A), with the blend moving A along
with B as the device does. It prints the mean
validation loss per learning rate, the one it picks (the lowest mean validation loss:
nothing is selected on test), and the test losses beside them for the record.

It replays only the last step of the federation, so a learning rate costs minutes
instead of a full experiment; the prior must come from the same users and base. A run
with ``--shared-a gradient`` trained its prior on the cohort's shared A: pass
``--shared-a`` (the ``shared-a.safetensors`` beside the prior versions) so the prior is
read, and personalized, on that A.

``--max-train-notes K`` keeps each user's first K training notes (validation and test
stay whole), as ``lorafleet-sim experiment --max-train-notes`` does: run on newcomers,
users who never took part, it tunes the cold start (K notes from the prior) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from lorafleet.client.federated import personal_train_config
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.server.coordinator import DEFAULT_PERSONAL_A_LR
from lorafleet.sim.baselines import open_lab, read_prior, read_shared_a
from lorafleet.sim.experiment import _Scorer, three_way_split
from lorafleet.sim.personas import load_user_folders

__all__ = ["tune"]


def tune(
    users_dir: Path,
    prior_path: Path,
    lrs: Sequence[float],
    *,
    steps: int = 30,
    base: str = "default",
    precision: str = "auto",
    rank: int = 8,
    val_fraction: float = 0.2,
    seq_len: int = 128,
    decays: Sequence[float] | None = None,
    a_lrs: Sequence[float] | None = None,
    shared_a_path: Path | None = None,
    max_train_notes: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{lr: {user: {val, test, test_notes, mix, steps, train_notes, train_blocks}}}``.

    With ``decays`` every learning rate is also tried with each ``plateau_decay``
    (:class:`~lorafleet.client.train.TrainConfig`) and the keys read
    ``"<lr> decay <d>"``; with ``a_lrs``, with each A rate (``TrainConfig.a_lr``), keys
    ``"<lr> a <a_lr>"``; without either, the device's own recipe is replayed.
    """
    lab, loaded = open_lab(base, precision, rank=rank)
    splits = [three_way_split(u, val_fraction) for u in load_user_folders(users_dir)]
    if max_train_notes:
        splits = [s.truncated(max_train_notes) for s in splits]
    scorer = _Scorer(lab, loaded, splits, seq_len)
    prior = read_prior(lab, prior_path)
    if shared_a_path is not None:
        # The prior lives on the cohort's shared A; the personal A (if any) starts there.
        lab.use_a(read_shared_a(lab, shared_a_path))
    results: dict[str, dict[str, dict[str, float]]] = {}
    grid = [
        (lr, d, a)
        for lr in lrs
        for d in ([None] if decays is None else decays)
        for a in ([None] if a_lrs is None else a_lrs)
    ]
    for lr, decay, a_lr in grid:
        instr = RoundInstruction(
            round=0,
            spec=lab.spec,
            prior_version="tune",
            mode="personalize",
            personal_steps=steps,
            prior_steps=0,
            personal_lr=lr,
            personal_a_lr=DEFAULT_PERSONAL_A_LR,  # the device's recipe unless a_lrs says
            seq_len=seq_len,
        )
        config = personal_train_config(instr, precision=lab.precision, device=str(lab.device))
        label = f"{lr:g}"
        if decay is not None:
            config = replace(config, plateau_decay=decay)
            label += f" decay {decay:g}"
        if a_lr is not None:
            config = replace(config, a_lr=a_lr)
            label += f" a {a_lr:g}"
        per_user: dict[str, dict[str, float]] = {}
        for user, split in zip(scorer.users, splits, strict=True):
            chosen, taken, mix = lab.personalize(prior, user.train, user.val, config)
            test, notes, val = scorer.score(chosen, user)
            per_user[user.user_id] = {
                "val": val,
                "test": test,
                "test_notes": notes,
                "mix": mix,
                "steps": float(taken),
                "train_notes": float(len(split.train)),
                "train_blocks": float(len(user.train)),
            }
            print(
                f"lr {label} {user.user_id}: val {val:.4f} (mix {mix:g}, {taken} steps) "
                f"[{time.strftime('%H:%M:%S')}]",
                flush=True,
            )
        results[label] = per_user
    return results


def summary(results: dict[str, dict[str, dict[str, float]]]) -> tuple[str, list[str]]:
    """(the learning rate with the lowest mean validation loss, table lines)."""
    lines = [f"{'personal lr':<12} {'mean val':>9} {'mean test':>10} {'test notes':>11}"]
    means = {}
    for lr, users in results.items():
        m = {
            k: float(np.mean([u[k] for u in users.values()])) for k in ("val", "test", "test_notes")
        }
        means[lr] = m["val"]
        lines.append(f"{lr:<12} {m['val']:>9.4f} {m['test']:>10.4f} {m['test_notes']:>11.4f}")
    best = min(means, key=lambda k: means[k])
    lines.append(f"picked on validation: personal lr {best}")
    return best, lines


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m lorafleet.sim.tune_personal")
    parser.add_argument("users_dir", type=Path, help="one folder per user (the experiment's)")
    parser.add_argument("prior", type=Path, help="a prior version's .safetensors")
    parser.add_argument("--lrs", default="2e-3,4e-3,8e-3", help="comma-separated learning rates")
    parser.add_argument(
        "--plateau-decays",
        help="also try each of these comma-separated plateau decays in [0, 1) with every lr "
        "(default: the device's own recipe)",
    )
    parser.add_argument(
        "--a-lrs",
        help="also try a personal A at each of these comma-separated rates with every lr "
        "(0: the seeded A; default: the device's own recipe)",
    )
    parser.add_argument("--steps", type=int, default=30, help="personalization budget")
    parser.add_argument(
        "--shared-a",
        type=Path,
        help="the run's shared-a.safetensors, for a prior trained with --shared-a gradient",
    )
    parser.add_argument(
        "--max-train-notes",
        type=int,
        default=0,
        help="keep each user's first K training notes (0: all); on newcomers, the cold start",
    )
    parser.add_argument("--out", type=Path, help="also write every user's losses here (JSON)")
    args = parser.parse_args(argv)
    if args.max_train_notes != 0 and args.max_train_notes < 2:
        parser.error(f"--max-train-notes must be >= 2 (or 0 for all), got {args.max_train_notes}")
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    if not lrs or any(not (0 < lr < 1) for lr in lrs):
        parser.error(f"--lrs must be learning rates in (0, 1), got {args.lrs!r}")
    decays = None
    if args.plateau_decays is not None:
        try:
            decays = [float(x) for x in args.plateau_decays.split(",") if x.strip()]
        except ValueError:
            parser.error(
                f"--plateau-decays must be comma-separated numbers, got {args.plateau_decays!r}"
            )
        if not decays or any(not (0 <= d < 1) for d in decays):
            parser.error(f"--plateau-decays must be in [0, 1), got {args.plateau_decays!r}")
    a_lrs = None
    if args.a_lrs is not None:
        try:
            a_lrs = [float(x) for x in args.a_lrs.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--a-lrs must be comma-separated numbers, got {args.a_lrs!r}")
        if not a_lrs or any(not (0 <= a < 1) for a in a_lrs):
            parser.error(f"--a-lrs must be in [0, 1), got {args.a_lrs!r}")
    if not args.prior.is_file():
        parser.error(f"prior {args.prior} is not a file (a prior version's .safetensors)")
    if args.shared_a is not None and not args.shared_a.is_file():
        parser.error(f"shared A {args.shared_a} is not a file (the run's shared-a.safetensors)")
    try:
        results = tune(
            args.users_dir,
            args.prior,
            lrs,
            steps=args.steps,
            decays=decays,
            a_lrs=a_lrs,
            shared_a_path=args.shared_a,
            max_train_notes=args.max_train_notes,
        )
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _, lines = summary(results)
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
