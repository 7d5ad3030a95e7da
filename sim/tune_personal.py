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

``--steps-per-block 0,1,2`` also sizes each user's budget by their training blocks
(``TrainConfig.steps_per_block``; 0: the fixed budget). ``PRIOR`` may be ``zero``: each
user then trains from zero B on the seeded A, local-only training on the same recipe.

``--max-train-notes K`` keeps each user's first K training notes (validation and test
stay whole), as ``lorafleet-sim experiment --max-train-notes`` does: run on newcomers,
users who never took part, it tunes the cold start (K notes from the prior) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
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
    prior_path: Path | None,
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
    per_blocks: Sequence[float] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{lr: {user: {val, test, test_notes, mix, steps, train_notes, train_blocks}}}``.

    With ``decays`` every learning rate is also tried with each ``plateau_decay``
    (:class:`~lorafleet.client.train.TrainConfig`) and the keys read
    ``"<lr> decay <d>"``; with ``a_lrs``, with each A rate (``TrainConfig.a_lr``), keys
    ``"<lr> a <a_lr>"``; with ``per_blocks``, with each user's budget sized by their
    training blocks (:func:`~lorafleet.client.train.steps_for_data`; 0: the fixed
    budget), keys ``"<lr> per-block <f>"``; without any, the device's own recipe is
    replayed. ``prior_path`` None trains from zero B on the seeded A (local-only).
    """
    lab, loaded = open_lab(base, precision, rank=rank)
    splits = [three_way_split(u, val_fraction) for u in load_user_folders(users_dir)]
    if max_train_notes:
        splits = [s.truncated(max_train_notes) for s in splits]
    scorer = _Scorer(lab, loaded, splits, seq_len)
    prior = lab.zero_b if prior_path is None else read_prior(lab, prior_path)
    if shared_a_path is not None:
        # The prior lives on the cohort's shared A; the personal A (if any) starts there.
        lab.use_a(read_shared_a(lab, shared_a_path))
    results: dict[str, dict[str, dict[str, float]]] = {}
    grid = [
        (lr, d, a, f)
        for lr in lrs
        for d in ([None] if decays is None else decays)
        for a in ([None] if a_lrs is None else a_lrs)
        for f in ([None] if per_blocks is None else per_blocks)
    ]
    for lr, decay, a_lr, per_block in grid:
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
        if per_block is not None:
            config = replace(config, steps_per_block=per_block)
            label += f" per-block {per_block:g}"
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
    parser.add_argument(
        "prior", help="a prior version's .safetensors, or 'zero' to train from zero (local-only)"
    )
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
        "--steps-per-block",
        help="also size each user's budget at each of these comma-separated steps per "
        "training block (0: the fixed budget; default: the device's own recipe)",
    )
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

    def numbers(
        flag: str, text: str | None, ok: Callable[[float], bool], what: str
    ) -> list[float] | None:
        if text is None:
            return None
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            parser.error(f"{flag} must be comma-separated numbers, got {text!r}")
        if not values or not all(ok(v) for v in values):
            parser.error(f"{flag} must be {what}, got {text!r}")
        return values

    lrs = numbers("--lrs", args.lrs, lambda v: 0 < v < 1, "learning rates in (0, 1)")
    assert lrs is not None  # --lrs has a default
    decays = numbers("--plateau-decays", args.plateau_decays, lambda v: 0 <= v < 1, "in [0, 1)")
    a_lrs = numbers("--a-lrs", args.a_lrs, lambda v: 0 <= v < 1, "in [0, 1)")
    per_blocks = numbers("--steps-per-block", args.steps_per_block, lambda v: v >= 0, ">= 0")
    prior = None if args.prior == "zero" else Path(args.prior)
    if prior is not None and not prior.is_file():
        parser.error(f"prior {prior} is not a file (a prior version's .safetensors, or 'zero')")
    if args.shared_a is not None and not args.shared_a.is_file():
        parser.error(f"shared A {args.shared_a} is not a file (the run's shared-a.safetensors)")
    try:
        results = tune(
            args.users_dir,
            prior,
            lrs,
            steps=args.steps,
            decays=decays,
            a_lrs=a_lrs,
            shared_a_path=args.shared_a,
            max_train_notes=args.max_train_notes,
            per_blocks=per_blocks,
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
