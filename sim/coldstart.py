"""Replay the cold-start curve from a finished federation's prior, on any newcomers.

``python -m lorafleet.sim.coldstart NEWCOMERS_DIR --run runs/x/seed-1 --ks 16,64``
trains every newcomer of ``NEWCOMERS_DIR`` (users who never took part, one folder each
as ``--newcomers-dir`` takes them) on k of their training notes, from ``PRIOR`` (a prior
version's safetensors, e.g. ``seed-1/coordinator/priors/*/v0003`` of an experiment run)
and from zero, with exactly the experiment's cold start
(:func:`lorafleet.sim.experiment.cold_start_curve`: the devices' final personalization,
early-stopped on the newcomer's validation notes), and prints the mean test loss per k.

With ``--run`` inside an experiment (``runs/NAME/seed-N``), the replay also takes the
recipe that experiment recorded in its results.json (the base, the budgets, the personal
rates, the blend, the sequence length; :data:`RUN_RECIPE_KEYS`), so it repeats the run's
own cold start rather than the defaults'. ``--steps`` still overrides the budget.

It replays only the newcomers, so a federation that ran without ``--cold-start`` (or a
new set of newcomers) gets its curve in minutes instead of a rerun.

``--run`` (an experiment's seed folder, or any coordinator data dir) is the safe way in:
it reads from the registry the prior a newcomer of that run would really get, the
*active* version (the newest file may be a candidate the devices' scores held back),
checks it against the registry's content hash, and takes the cohort's seed, rank and
shared A (digest checked) from the same place. A prior file can also be named directly
(``PRIOR``, e.g. ``seed-1/coordinator/priors/*/v0003.safetensors``); then ``--cohort-seed``
must be the seed of the experiment's run the prior came from: the prior's B means
something only on that cohort's seeded A. A run with ``--shared-a gradient`` trained its
prior on the cohort's shared A instead: pass that file too (``--shared-a``, the
``shared-a.safetensors`` beside the prior versions), or the prior is read on the wrong A.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from lorafleet.client.cli import PRECISION_CHOICES
from lorafleet.protocols.encoding import content_hash, decode_tensors
from lorafleet.protocols.errors import DataError, IntegrityError, LorafleetError
from lorafleet.protocols.shared_a import shared_a_digest
from lorafleet.protocols.spec import DEFAULT_TARGETS
from lorafleet.server.coordinator import (
    SHARED_A_FILE,
    prior_file_name,
    priors_dir,
    shared_a_control,
    split_prior_tensors,
)
from lorafleet.server.registry import Registry
from lorafleet.sim.baselines import open_lab, read_prior, read_shared_a
from lorafleet.sim.experiment import ExperimentConfig, cold_start_curve, cold_start_wins
from lorafleet.sim.personas import load_user_folders

__all__ = ["RUN_RECIPE_KEYS", "RunPrior", "replay", "run_prior", "run_recipe"]

RUN_RECIPE_KEYS: tuple[str, ...] = (
    "base",
    "precision",
    "num_rounds",
    "prior_steps",
    "local_steps",
    "personalize_steps",
    "cold_start_steps",
    "personalize_blend",
    "lr",
    "personal_lr",
    "personal_lr_shared_a",
    "personal_a_lr",
    "prox_mu",
    "seq_len",
)
"""The experiment options a newcomer's training depends on (its budget is the local
budget unless set, so the prior's rounds and steps count too), read from the run.
``precision`` is only the replay's default: ``--precision`` still chooses."""


@dataclass(frozen=True)
class RunPrior:
    """What a finished run hands a newcomer: its active prior, on the A it was trained on."""

    prior: Path
    """The active prior version's file (B only)."""
    shared_a: Path | None
    """The cohort's gradient-aligned shared A, or None (the prior is on the seeded A)."""
    cohort_seed: int
    rank: int
    version: int
    rounds: int
    """The run's last finished round: a newcomer's batch order is seeded by the round it
    joins in, so the replay takes it to repeat the run's own cold start exactly."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """The modules the cohort adapts."""


def run_prior(run: Path) -> RunPrior:
    """The active prior of a coordinator data dir (or of an experiment's seed folder).

    Read-only: the registry is opened, not the coordinator's state (which would mark
    interrupted rounds failed). Both files are checked against what the registry
    recorded, as the coordinator checks them before it serves them.

    Raises
    ------
    DataError
        No registry there, more than one cohort, or no prior promoted yet.
    IntegrityError
        A file is missing or does not match the registry.
    """
    run = Path(run)
    data_dir = next((d for d in (run, run / "coordinator") if (d / "registry.db").is_file()), None)
    if data_dir is None:
        raise DataError(
            f"{run} holds no registry.db: name a coordinator data dir or an experiment's "
            "seed folder (runs/NAME/seed-N)"
        )
    with Registry.open(data_dir / "registry.db") as reg:
        cohorts = reg.list_cohorts()
        if len(cohorts) != 1:
            raise DataError(
                f"{data_dir} holds {len(cohorts)} cohorts; name one prior file instead "
                "(PRIOR with --cohort-seed)"
            )
        (fp,) = cohorts
        spec = reg.get_spec(fp)
        record = reg.active_prior(fp)
        digest = reg.get_control(shared_a_control(fp))
        finished = [r.number for r in reg.list_rounds(fp).items if r.status == "finished"]
    if record is None:
        raise DataError(f"{data_dir}: no prior version was promoted yet; run a round first")
    folder = priors_dir(data_dir, fp)
    prior = folder / prior_file_name(record.version)
    if not prior.is_file():
        raise IntegrityError(f"prior file {prior} is missing; restore the data dir")
    b, _ = split_prior_tensors(load_file(prior))
    if content_hash(b, spec_fingerprint=fp) != record.content_hash:
        raise IntegrityError(f"prior file {prior} does not match the registry's content hash")
    shared_a = None
    if digest is not None:
        shared_a = folder / SHARED_A_FILE
        if not shared_a.is_file():
            raise IntegrityError(f"shared A file {shared_a} is missing; restore the data dir")
        if shared_a_digest(decode_tensors(shared_a.read_bytes())[0]) != digest:
            raise IntegrityError(f"shared A file {shared_a} does not match the registry's digest")
    return RunPrior(
        prior,
        shared_a,
        spec.cohort_seed,
        spec.rank,
        record.version,
        max(finished, default=0),
        spec.target_modules,
    )


def run_recipe(run: Path) -> dict[str, Any]:
    """The cold-start options an experiment's seed folder ran with, from its results.json.

    Empty for a coordinator data dir outside an experiment (nothing recorded them: the
    replay then uses the experiment's defaults). Only :data:`RUN_RECIPE_KEYS` are kept.

    Raises
    ------
    DataError
        The experiment's results.json is there but unreadable.
    """
    run = Path(run)
    if (run / "registry.db").is_file():  # a data dir; an experiment's is seed-N/coordinator
        run = run.parent
    path = run.parent / "results.json"
    if not run.name.startswith("seed-") or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())["config"]
        recipe = {k: config[k] for k in RUN_RECIPE_KEYS if k in config}
        # A file from before the shared A's own rate: its gradient-A runs used personal_lr.
        if "personal_lr" in recipe and "personal_lr_shared_a" not in config:
            recipe["personal_lr_shared_a"] = recipe["personal_lr"]
        return recipe
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is not a readable results file ({exc}); pass --steps and "
            "name a prior file instead"
        ) from exc


def replay(
    newcomers_dir: Path,
    prior_path: Path,
    ks: Sequence[int],
    *,
    cohort_seed: int = 0,
    steps: int = 0,
    base: str = "default",
    precision: str | None = None,
    rank: int = 8,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seq_len: int = 128,
    shared_a_path: Path | None = None,
    num_rounds: int = 3,
    recipe: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The cold-start rows (``k``, ``from_prior``, ``from_zero``, ``prior_alone``, ...).

    ``steps`` is the newcomer's budget (0: the experiment's default, its personalize
    budget) and ``precision`` the newcomers' (None: the recipe's, else ``auto``); every
    other choice is the experiment's default recipe, or what ``recipe``
    (:func:`run_recipe`, keys of :data:`RUN_RECIPE_KEYS`) sets. ``num_rounds`` is the
    run's rounds: it seeds the newcomers' batch order, so only the run's own value
    repeats its figures exactly (another gives another, equally valid, order).
    """
    cfg = ExperimentConfig(
        output=Path("."),  # nothing is written
        newcomers_dir=newcomers_dir,
        cold_start_ks=tuple(ks),
        base=base,
        rank=rank,
        targets=tuple(targets),
        seq_len=seq_len,
    )
    unknown = set(recipe or {}) - set(RUN_RECIPE_KEYS)
    if unknown:
        raise ValueError(f"replay: recipe keys {sorted(unknown)} are not cold-start options")
    cfg = replace(cfg, **{**(recipe or {}), "num_rounds": num_rounds})
    if steps:
        cfg = replace(cfg, cold_start_steps=steps)
    if precision:
        cfg = replace(cfg, precision=precision)
    lab, loaded = open_lab(
        cfg.base, cfg.precision, rank=rank, cohort_seed=cohort_seed, targets=tuple(targets)
    )
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
    parser.add_argument(
        "prior", type=Path, nargs="?", help="a prior version's .safetensors (or use --run)"
    )
    parser.add_argument(
        "--run",
        type=Path,
        help="an experiment's seed folder or a coordinator data dir: its active prior, "
        "cohort seed, rank and shared A, all checked against its registry",
    )
    parser.add_argument("--ks", default="16,64", help="comma-separated notes per newcomer")
    parser.add_argument(
        "--cohort-seed", type=int, default=0, help="the experiment seed the prior came from"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="newcomer's budget (0: the run's, with --run in an experiment; else the "
        "experiment's default)",
    )
    parser.add_argument(
        "--shared-a",
        type=Path,
        help="the run's shared-a.safetensors, for a prior trained with --shared-a gradient",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISION_CHOICES,
        help="newcomers' training precision (default: the one an experiment's --run named, "
        "which repeats its figures; else auto, by the device profile)",
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
    if (args.prior is None) == (args.run is None):
        parser.error("name either a prior file (PRIOR) or a run (--run), not both")
    if args.run is not None and args.shared_a is not None:
        parser.error("--shared-a comes from the run's registry with --run; leave it out")
    if args.prior is not None and not args.prior.is_file():
        parser.error(f"prior {args.prior} is not a file (a prior version's .safetensors)")
    if args.shared_a is not None and not args.shared_a.is_file():
        parser.error(f"shared A {args.shared_a} is not a file (the run's shared-a.safetensors)")
    if not args.newcomers_dir.is_dir():
        parser.error(f"newcomers folder {args.newcomers_dir} does not exist")
    try:
        if args.run is not None:
            found = run_prior(args.run)
            print(
                f"{args.run}: active prior v{found.version} after round {found.rounds} "
                f"(cohort seed {found.cohort_seed}, rank {found.rank} on "
                f"{', '.join(found.targets)}, {'shared' if found.shared_a else 'seeded'} A)"
            )
            prior, cohort_seed, rank, shared_a, rounds, targets = (
                found.prior,
                found.cohort_seed,
                found.rank,
                found.shared_a,
                found.rounds,
                found.targets,
            )
            recipe = run_recipe(args.run)
            shown = ", ".join(f"{k} {recipe[k]}" for k in RUN_RECIPE_KEYS if k in recipe)
            print(
                f"the experiment's recipe (its results.json): {shown}"
                if recipe
                else "no experiment's results.json beside the run: the experiment's default recipe"
            )
        else:
            prior, cohort_seed, rank, shared_a = args.prior, args.cohort_seed, 8, args.shared_a
            rounds, targets, recipe = 3, DEFAULT_TARGETS, {}
        rows = replay(
            args.newcomers_dir,
            prior,
            ks,
            cohort_seed=cohort_seed,
            steps=args.steps,
            precision=args.precision,
            rank=rank,
            targets=targets,
            shared_a_path=shared_a,
            num_rounds=rounds,
            recipe=recipe,
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
    wins = cold_start_wins(rows)
    if wins is not None:
        small, large, won, of = wins
        print(f"{small} notes from the prior beat {large} from zero on {won}/{of} newcomers")
    if not rows:
        print("no newcomer has enough training notes for any k", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
