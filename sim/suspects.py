"""Measure one suspect at a time: why a personal adapter could lose to local training.

``python -m lorafleet.sim.suspects USERS_DIR --out FILE.json --suspects clip,prox`` runs,
in this process on one base and on the experiment's three-way split, a reference set
(base, local B-only, stock peft local, a B-only FedAvg prior without clipping, and that
prior fine-tuned on each user with early stopping on validation) and then each named
suspect changed alone:

- ``clip``: the prior's per-device delta clipped to L2 norm 1 (the old default);
- ``prior_lr``: the prior trained at twice the device learning rate;
- ``prox``: the personal fine-tuning pulled toward the prior (Ditto), mu 0.1 and 1;
- ``fixed``: the personal fine-tuning without early stopping (all steps, no selection).

Every figure is a test-split loss (validation is used only for early stopping); the
JSON holds each user's validation and test loss per method. It is a diagnosis tool,
sequential and slow on a CPU (about 6 minutes per method for 8 users at 45 steps on
2 cores); docs/personalization.md records what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from lorafleet.client.base import load_base
from lorafleet.client.data import encode_blocks
from lorafleet.client.runtime import ConcretePrecision, base_dtype, resolve_device
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.federation import clip_by_global_norm
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.sim.baselines import AdapterState, Lab, LabUser
from lorafleet.sim.experiment import three_way_split
from lorafleet.sim.personas import load_user_folders

log = logging.getLogger(__name__)

SUSPECTS = ("clip", "prior_lr", "prox", "fixed")


def fedavg_b(
    lab: Lab,
    users: Sequence[LabUser],
    config: TrainConfig,
    *,
    rounds: int,
    clip: float | None,
) -> AdapterState:
    """A B-only FedAvg prior (every user every round), deltas optionally clipped."""
    prior = lab.zero_b
    total = sum(u.num_examples for u in users)
    for rnd in range(1, rounds + 1):
        acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in prior.items()}
        for user in users:
            trained, _ = lab.train(
                prior, user.train, replace(config, seed=config.seed * 1000 + rnd)
            )
            delta = {k: trained[k] - prior[k] for k in prior}
            if clip is not None:
                delta = clip_by_global_norm(delta, clip)[0]
            for k in acc:
                acc[k] += delta[k] * (user.num_examples / total)
        norm = math.sqrt(sum(float(np.square(v).sum()) for v in acc.values()))
        log.info("prior round %d: mean delta norm %.3f", rnd, norm)
        prior = {k: (prior[k] + acc[k]).astype(np.float32) for k in prior}
    return prior


def run(
    users_dir: Path,
    out: Path,
    *,
    suspects: Sequence[str],
    steps: int = 45,
    rounds: int = 3,
    lr: float = 2e-3,
    peft_lr: float = 5e-4,
    precision: ConcretePrecision = "int8",
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Run the reference methods and the named suspects; writes and returns the results."""
    unknown = sorted(set(suspects) - set(SUSPECTS))
    if unknown:
        raise LorafleetError(f"unknown suspect(s) {unknown}; choose from {', '.join(SUSPECTS)}")
    device = resolve_device("auto")
    base = load_base("default", dtype=base_dtype(precision, device))
    spec = AdapterSpec(base_model_id=base.model_id, base_sha256=base.sha256)
    lab = Lab(base, spec, precision=precision, device=str(device))
    tok = base.tokenizer
    users, tests = [], {}
    for data in load_user_folders(users_dir):
        split = three_way_split(data, 0.2)
        users.append(
            LabUser(
                split.user_id,
                encode_blocks(split.train, tok),
                encode_blocks(split.val, tok),
                len(split.train),
            )
        )
        tests[split.user_id] = encode_blocks(split.test, tok)
    results: dict[str, dict[str, dict[str, float]]] = {u.user_id: {} for u in users}

    def cfg(**kw: object) -> TrainConfig:
        args: dict[str, object] = {
            "steps": steps,
            "lr": lr,
            "precision": precision,
            "device": str(device),
            "warmup_steps": min(5, steps // 4),
            "seed": seed,
            "eval_every": 5,
            "patience": 3,
        }
        args.update(kw)
        return TrainConfig(**args)  # type: ignore[arg-type]

    def record(method: str, state_for: Callable[[LabUser], AdapterState | None]) -> None:
        for u in users:
            state = state_for(u)
            results[u.user_id][method] = {
                "val": lab.loss(state, u.val),
                "test": lab.loss(state, tests[u.user_id]),
            }
        mean = np.mean([results[u.user_id][method]["test"] for u in users])
        print(f"{method:<24} mean test loss {mean:.4f}  [{time.strftime('%H:%M:%S')}]", flush=True)
        out.write_text(json.dumps(results, indent=1, sort_keys=True))

    def per_user(
        start: Callable[[LabUser], AdapterState], config: TrainConfig, *, es: bool
    ) -> Callable[[LabUser], AdapterState]:
        states = {
            u.user_id: lab.train(start(u), u.train, config, val=u.val if es else None)[0]
            for u in users
        }
        return lambda u: states[u.user_id]

    record("base", lambda u: None)
    record("local_b", per_user(lambda u: lab.zero_b, cfg(), es=True))
    record(
        "local_peft",
        per_user(lambda u: lab.peft_init(seed), cfg(lr=peft_lr, precision="bf16"), es=False),
    )
    prior_cfg = cfg(steps=max(1, steps // rounds))
    prior = fedavg_b(lab, users, prior_cfg, rounds=rounds, clip=None)
    record("prior", lambda u: prior)
    record("personal_ft_es", per_user(lambda u: prior, cfg(), es=True))
    if "fixed" in suspects:
        record("personal_ft_fixed", per_user(lambda u: prior, cfg(), es=False))
    if "prox" in suspects:
        for mu in (0.1, 1.0):
            # TrainConfig's prox term needs the prior as a mapping of B tensors
            states = {u.user_id: _train_prox(lab, prior, u, cfg(prox_mu=mu)) for u in users}
            record(f"personal_prox_{mu:g}", _lookup(states))
    if "clip" in suspects:
        clipped = fedavg_b(lab, users, prior_cfg, rounds=rounds, clip=1.0)
        record("prior_clip_1", lambda u: clipped)
    if "prior_lr" in suspects:
        fast = fedavg_b(lab, users, replace(prior_cfg, lr=2 * lr), rounds=rounds, clip=None)
        record("prior_lr_x2", lambda u: fast)
    return results


def _lookup(states: dict[str, AdapterState]) -> Callable[[LabUser], AdapterState]:
    return lambda u: states[u.user_id]


def _train_prox(lab: Lab, prior: AdapterState, user: LabUser, config: TrainConfig) -> AdapterState:
    from lorafleet.client.adapter import get_b, set_b
    from lorafleet.client.train import train_adapter

    set_b(lab.model, prior)
    train_adapter(lab.model, user.train, user.val, config, prior_b=prior)
    return get_b(lab.model)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m lorafleet.sim.suspects")
    parser.add_argument("users_dir", type=Path, help="one folder per user")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--suspects", default="", help=f"comma-separated: {','.join(SUSPECTS)}")
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen = [s for s in args.suspects.split(",") if s]
    try:
        run(args.users_dir, args.out, suspects=chosen, steps=args.steps, seed=args.seed)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
