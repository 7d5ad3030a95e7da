"""The baselines a reviewer asks for, run in the experiment's own process on one base.

Every personalization figure lorafleet reports stands next to what a user would get
without it, measured on the same users, the same splits and the same base:

- **local-only, stock peft**: a full LoRA (A and B trained, peft's default init: A
  Kaiming-uniform, B zero) on the user's own text, the recipe a user would copy from
  peft's docs (rank 8 on q and v, lr 5e-4);
- **local-only, lorafleet**: B only on the cohort's seeded A, lorafleet's own recipe,
  with no federation (isolates what the federation adds);
- **FedAvg global**: a full LoRA trained FlowerTune-style, every round each sampled
  user trains the global A and B for some steps and the server averages them weighted
  by example counts;
- **FedAvg global, fine-tuned locally**: the classic personalized-FL baseline, the
  FedAvg model trained further on each user's text.

They run sequentially here (an exact FedAvg: the same sampling, the same weighted
mean) rather than through Flower, because they are references and not lorafleet's
path: lorafleet's own prior and personal adapters come from the real Flower
federation (:func:`lorafleet.sim.runner.simulate`). :class:`Lab` holds one peft model
and swaps the adapter state (B, or A and B) between users and methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors.numpy import load_file

from lorafleet.client.adapter import (
    adapter_disabled,
    adapter_layers,
    get_b,
    materialize,
    seeded_a,
    set_b,
)
from lorafleet.client.base import LoadedBase, load_base
from lorafleet.client.data import TokenBlocks
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.federated import blend_with_prior
from lorafleet.client.runtime import (
    ConcretePrecision,
    base_dtype,
    resolve_device,
    resolve_precision,
)
from lorafleet.client.train import LocalTrainer, TrainConfig, cycle_batches, train_adapter
from lorafleet.protocols.encoding import decode_tensors
from lorafleet.protocols.errors import LorafleetError, SpecError
from lorafleet.protocols.shared_a import ROW_NORM, check_shared_a, shared_a_digest
from lorafleet.protocols.spec import DEFAULT_TARGETS, AdapterSpec
from lorafleet.server.coordinator import split_prior_tensors

__all__ = ["AdapterState", "Lab", "LabUser", "fedavg_global", "open_lab", "read_prior"]

AdapterState = dict[str, npt.NDArray[np.float32]]
"""Adapter weights keyed ``"<module path>:A"`` / ``"<module path>:B"`` (full LoRA) or
``"<module path>"`` (B only, lorafleet's layout)."""


@dataclass(frozen=True)
class LabUser:
    """One user's token blocks: train, validation (for selection) and test (reported)."""

    user_id: str
    train: TokenBlocks
    val: TokenBlocks
    num_examples: int


class Lab:
    """One base with one adapter, whose state is swapped per user and method."""

    def __init__(
        self, base: LoadedBase, spec: AdapterSpec, *, precision: ConcretePrecision, device: str
    ) -> None:
        self.precision = precision
        self.device = torch.device(device)
        self.spec = spec
        self.model = materialize(base.model, spec, base_sha256=base.sha256)
        self.model.to(self.device)
        self.layers = adapter_layers(self.model)
        self.seeded_a = {k: a.weight.detach().clone() for k, (a, _) in self.layers.items()}
        self._spec_a = self.seeded_a  # the spec's own A, which use_a(None) goes back to
        self.zero_b: AdapterState = {k: np.zeros_like(v) for k, v in get_b(self.model).items()}

    def use_spec(self, spec: AdapterSpec) -> None:
        """Rebuild the seeded A from ``spec`` (another cohort seed: another seed's run).

        B-only states (the prior, local B, a personal B) mean something only on the A
        they were trained on, so every seed of an experiment scores its own cohort's A.
        """
        self.spec = spec
        fresh = seeded_a(self.model, spec)
        self.seeded_a = {
            k: torch.from_numpy(fresh[k]).to(self.device, self.seeded_a[k].dtype)
            for k in self.layers
        }
        self._spec_a = self.seeded_a
        self._restore_seeded()

    def use_a(self, a: Mapping[str, npt.NDArray[np.floating[Any]]] | None) -> None:
        """Make ``a`` (a cohort's shared A) the A that B-only states live on; None: the seeded.

        A prior trained on a gradient-aligned shared A (``CoordinatorConfig.shared_a``)
        is scored, and personalized from, on that A; the baselines go back to the seeded
        A of :meth:`use_spec`.
        """
        if a is None:
            self.seeded_a = self._spec_a
            self._restore_seeded()
            return
        self.seeded_a = {
            k: torch.from_numpy(np.asarray(a[k], np.float32)).to(
                self.device, self.seeded_a[k].dtype
            )
            for k in self.layers
        }
        self._restore_seeded()

    # ------------------------------------------------------------------ state
    def peft_init(self, seed: int) -> AdapterState:
        """Stock peft's fresh LoRA: A Kaiming-uniform (a=sqrt(5)), B zero."""
        gen = torch.Generator().manual_seed(seed)
        state: AdapterState = {}
        for path, (lin_a, lin_b) in self.layers.items():
            fan_in = lin_a.weight.shape[1]
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a=sqrt(5)
            a = (torch.rand(lin_a.weight.shape, generator=gen) * 2 - 1) * bound
            state[f"{path}:A"] = a.numpy().astype(np.float32)
            state[f"{path}:B"] = np.zeros(tuple(lin_b.weight.shape), dtype=np.float32)
        return state

    def _load(self, state: Mapping[str, npt.NDArray[np.floating[Any]]]) -> bool:
        """Put ``state`` in the model; returns whether it is a full LoRA (A trainable)."""
        full = any(k.endswith(":A") for k in state)
        with torch.no_grad():
            for path, (lin_a, lin_b) in self.layers.items():
                if full:
                    lin_a.weight.copy_(torch.from_numpy(np.asarray(state[f"{path}:A"])))
                    lin_b.weight.copy_(torch.from_numpy(np.asarray(state[f"{path}:B"])))
                else:
                    lin_a.weight.copy_(self.seeded_a[path])
                lin_a.weight.requires_grad_(full)
        if not full:
            set_b(self.model, state)
        return full

    def _read(self, full: bool) -> AdapterState:
        if not full:
            return get_b(self.model)
        out: AdapterState = {}
        for path, (lin_a, lin_b) in self.layers.items():
            out[f"{path}:A"] = lin_a.weight.detach().float().cpu().numpy().copy()
            out[f"{path}:B"] = lin_b.weight.detach().float().cpu().numpy().copy()
        return out

    def _restore_seeded(self) -> None:
        with torch.no_grad():
            for path, (lin_a, _) in self.layers.items():
                lin_a.weight.copy_(self.seeded_a[path])
                lin_a.weight.requires_grad_(False)

    # ------------------------------------------------------------------ work
    def loss(
        self, state: Mapping[str, npt.NDArray[np.floating[Any]]] | None, blocks: TokenBlocks
    ) -> float:
        """Held-out loss of ``state`` (``None``: the bare base) on ``blocks``."""
        if state is None:
            with adapter_disabled(self.model):
                return heldout_loss(
                    self.model, blocks, precision=self.precision, device=self.device
                )
        self._load(state)
        try:
            return heldout_loss(self.model, blocks, precision=self.precision, device=self.device)
        finally:
            self._restore_seeded()

    def train(
        self,
        state: Mapping[str, npt.NDArray[np.floating[Any]]],
        train: TokenBlocks,
        config: TrainConfig,
        *,
        val: TokenBlocks | None = None,
    ) -> tuple[AdapterState, int]:
        """Train from ``state``; returns (trained state, steps taken).

        With ``val`` a B-only run early-stops and keeps the best validation state (the
        config's ``eval_every``/``patience``); otherwise it runs ``config.steps``. A B-only
        start with ``config.a_lr`` > 0 trains a personal A too, and the state returned is
        then a full LoRA (``":A"``/``":B"`` keys).
        """
        # A full LoRA (stock peft's baselines) trains on the device's lean forward too, A
        # and B through the same branches as a personal A: every method of a table then
        # runs the same kernels, and the baselines 1.5x faster than on the peft forward.
        full = self._load(state)
        try:
            if val is not None and not full:
                steps = train_adapter(self.model, train, val, config).steps
                if config.a_lr > 0:  # the device's personal A: the state is a full LoRA now
                    full = True
            else:  # a fixed budget: no evaluation, nothing selected
                trainer = LocalTrainer(self.model, config)
                batches = cycle_batches(
                    train, config.batch_size, torch.Generator().manual_seed(config.seed)
                )
                for _ in range(config.steps):
                    trainer.step(next(batches))
                self.model.eval()
                steps = config.steps
            return self._read(full), steps
        finally:
            self._restore_seeded()

    def personalize(
        self,
        start: Mapping[str, npt.NDArray[np.floating[Any]]],
        train: TokenBlocks,
        val: TokenBlocks,
        config: TrainConfig,
        *,
        blend: bool = True,
    ) -> tuple[AdapterState, int, float]:
        """A device's final personalization from the B-only ``start``: (state, steps, mix).

        The same as the device's personalize round (``run_round``): train with early
        stopping on ``val`` (a personal A when ``config.a_lr`` > 0, the proximal pull
        toward ``start`` when ``config.prox_mu`` > 0), then keep the blend of ``start``
        and the trained adapter that validates best (``mix`` is the trained one's
        weight; 1.0 without ``blend``). The state is a full LoRA if A trained.
        """

        def val_loss() -> float:  # the model as it stands (the blend's too), A included
            return heldout_loss(self.model, val, precision=self.precision, device=self.device)

        self._load(start)
        try:
            start_loss = val_loss() if blend else 0.0  # only the blend compares with it
            same = blend and config.precision == self.precision  # then it is train's first too
            result = train_adapter(
                self.model,
                train,
                val,
                config,
                prior_b=start if config.prox_mu > 0 else None,
                heldout_loss_before=start_loss if same else None,
            )
            full = config.a_lr > 0
            mix = 1.0
            if blend:
                seeded = {k: v.float().cpu().numpy().copy() for k, v in self.seeded_a.items()}
                _, mix = blend_with_prior(
                    self.model,
                    dict(start),
                    start_loss,
                    result.heldout_loss_after,
                    val_loss,
                    prior_a=seeded if full else None,
                )
            return self._read(full), result.steps, mix
        finally:
            self._restore_seeded()


def open_lab(
    base: str,
    precision: str,
    *,
    rank: int,
    cohort_seed: int = 0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> tuple[Lab, LoadedBase]:
    """Load ``base`` for ``precision`` (resolved on this device) and a lab on the cohort's A.

    The replays (``tune_personal``, ``coldstart``) start here; ``cohort_seed`` must be the
    experiment seed whose prior they replay, since a prior's B fits only its seeded A.
    """
    dev = resolve_device("auto")
    prec = resolve_precision(precision, dev)  # type: ignore[arg-type]
    loaded = load_base(base, dtype=base_dtype(prec, dev))
    spec = AdapterSpec(
        base_model_id=loaded.model_id,
        base_sha256=loaded.sha256,
        rank=rank,
        target_modules=tuple(targets),
        cohort_seed=cohort_seed,
    )
    return Lab(loaded, spec, precision=prec, device=str(dev)), loaded


def read_prior(lab: Lab, path: Path) -> AdapterState:
    """A prior version's B (safetensors), checked against the lab's modules and rank."""
    b, _ = split_prior_tensors(load_file(path))  # without the server optimizer's state
    prior = {k: np.asarray(v, dtype=np.float32) for k, v in b.items()}
    if set(prior) != set(lab.zero_b) or any(prior[k].shape != lab.zero_b[k].shape for k in prior):
        raise SpecError(
            f"{path} is not a prior of this base at rank {lab.spec.rank} on "
            f"{', '.join(lab.spec.target_modules)}"
        )
    return prior


def read_shared_a(lab: Lab, path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """A run's shared A (``shared-a.safetensors``), checked as a device checks it.

    The file comes from the run's own coordinator folder, so its digest is taken from
    the file itself; the shape, module and orthonormality checks are the device's.
    """
    try:
        a, _ = decode_tensors(path.read_bytes())
    except LorafleetError as exc:
        raise SpecError(f"{path} is not a shared A file: {exc}") from exc
    fan_ins = {k: int(v.shape[1]) for k, v in lab.seeded_a.items()}
    try:
        return check_shared_a(a, fan_ins, lab.spec.rank, shared_a_digest(a))
    except LorafleetError as exc:
        raise SpecError(
            f"{path} is not a shared A of this base at rank {lab.spec.rank} "
            f"(rows of norm {ROW_NORM:.3f}): {exc}"
        ) from exc


def fedavg_global(
    lab: Lab,
    users: Sequence[LabUser],
    *,
    rounds: int,
    steps: int,
    fraction: float,
    lr: float,
    seed: int,
    batch_size: int = 4,
    precision: ConcretePrecision,
    device: str,
) -> tuple[AdapterState, dict[str, int]]:
    """FlowerTune-style FedAvg of a full LoRA; returns (global state, steps per user).

    Each round samples ``max(2, round(fraction * n))`` users (a PCG64 generator keyed by
    ``seed`` and the round), trains each from the global state for ``steps`` steps and
    averages A and B weighted by the users' example counts.
    """
    state = lab.peft_init(seed)
    spent = {u.user_id: 0 for u in users}
    for rnd in range(1, rounds + 1):
        rng = np.random.Generator(np.random.PCG64([seed, rnd]))
        k = min(len(users), max(2, round(fraction * len(users))))
        sampled = [users[i] for i in sorted(rng.choice(len(users), size=k, replace=False))]
        total = sum(u.num_examples for u in sampled)
        acc = {key: np.zeros_like(v, dtype=np.float64) for key, v in state.items()}
        for user in sampled:
            cfg = TrainConfig(
                steps=steps,
                lr=lr,
                batch_size=batch_size,
                warmup_steps=min(5, steps // 4),
                precision=precision,
                device=device,
                seed=seed * 1000 + rnd,
            )
            trained, done = lab.train(state, user.train, cfg)
            spent[user.user_id] += done
            for key, value in trained.items():
                acc[key] += value * (user.num_examples / total)
        state = {key: v.astype(np.float32) for key, v in acc.items()}
    return state, spent
