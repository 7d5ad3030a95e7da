"""Local training of a personal adapter: only B moves, on the device, over the user's text.

The loop is deliberately small: AdamW on the trainable B matrices, a constant learning
rate after a short warm-up, optional proximal pull toward a prior B (Ditto-style
personalization), periodic held-out evaluation with early stopping that keeps the best
B seen. B-only training needs a higher learning rate than full LoRA (about 4x on
SmolLM2-135M, see docs/architecture.md), hence the 2e-3 default.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from lorafleet.client.adapter import (
    ATensors,
    BTensors,
    adapter_layers,
    get_a,
    get_b,
    load_a,
    set_b,
)
from lorafleet.client.data import TokenBlocks
from lorafleet.client.device import limit_threads
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.qtrain import (
    QuantConfig,
    QuantizedCausalLM,
    prepare_quantized_model,
    unsupported_reason,
)
from lorafleet.client.runtime import (
    PRECISIONS,
    ConcretePrecision,
    Precision,
    autocast_context,
    place_on,
    precision_plan,
    resolve_device,
    resolve_precision,
)
from lorafleet.protocols.errors import SpecError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]
"""Called after every step with (step, total_steps, train_loss)."""


@dataclass(frozen=True)
class TrainConfig:
    """How a personal adapter is trained on the device.

    Examples
    --------
    >>> TrainConfig(steps=30, lr=2e-3).batch_size
    4
    """

    steps: int = field(
        default=60, metadata={"help": "Optimizer steps (an upper bound with early stop)."}
    )
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate for B."})
    a_lr: float = field(
        default=0.0,
        metadata={
            "help": "AdamW learning rate for A; 0 keeps A as loaded (the seeded A, or a "
            "version's personal A). > 0 trains a personal A with B: the version is then "
            "saved with personal_a and its A (lorafleet.client.profile)."
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Blocks per step."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on B."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."}
    )
    prox_mu: float = field(
        default=0.0, metadata={"help": "Weight of (mu/2)*||B - B_prior||^2; 0 disables."}
    )
    precision: Precision = field(
        default="auto",
        metadata={
            "help": "fp32, bf16-mixed (autocast), bf16 (bf16 base weights), the CPU lean paths "
            "fp32-lean, bf16-lean, int8 (int8 frozen matmuls, bf16 elsewhere) and int8-fp32 "
            "(int8 frozen matmuls, fp32 elsewhere; lorafleet.client.qtrain), nf4 (CUDA: "
            "4-bit bitsandbytes base), or auto (the device profile's choice, "
            "lorafleet.client.runtime)."
        },
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto."})
    eval_every: int = field(
        default=10, metadata={"help": "Held-out evaluation every N steps; 0: only at the end."}
    )
    patience: int = field(
        default=3, metadata={"help": "Stop after N evaluations without improvement; 0: never."}
    )
    plateau_decay: float = field(
        default=0.0,
        metadata={
            "help": "On an evaluation without improvement, go back to the best B seen and "
            "train on at this times the learning rate (fresh optimizer state); 0: keep going "
            "from where training is."
        },
    )
    steps_per_block: float = field(
        default=0.0,
        metadata={
            "help": "> 0: size the budget by the data, this many steps per training block "
            "(at least MIN_SIZED_STEPS), with steps the ceiling and the evaluations as dense; "
            "0: train for steps (lorafleet.client.train.steps_for_data)."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the lean forward's decoder layers with torch.compile (needs a "
            "C++ compiler; the first step compiles, tens of seconds on two cores, a few "
            "from inductor's cache later): faster steps for long or repeated training. "
            "Only the lean CPU precisions compile; without a compiler training runs eager."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the batch order."})
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads; None keeps torch's choice, lowered to the physical "
            "cores (or $OMP_NUM_THREADS) if it counts more."
        },
    )

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise SpecError(f"train config: {what}")

        for name in ("steps", "batch_size", "warmup_steps", "eval_every", "patience", "seed"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool),
                f"{name} must be an integer, got {value!r}",
            )
        for name in ("lr", "a_lr", "weight_decay", "max_grad_norm", "prox_mu", "steps_per_block"):
            value = getattr(self, name)
            need(
                isinstance(value, int | float) and not isinstance(value, bool),
                f"{name} must be a number, got {value!r}",
            )

        need(
            isinstance(self.steps, int) and self.steps >= 1,
            f"steps must be >= 1, got {self.steps!r}",
        )
        need(
            self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r}"
        )
        need(
            self.a_lr >= 0 and math.isfinite(self.a_lr),
            f"a_lr must be >= 0 (0 keeps A frozen), got {self.a_lr!r}",
        )
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        need(self.prox_mu >= 0, f"prox_mu must be >= 0, got {self.prox_mu!r}")
        need(
            self.steps_per_block >= 0 and math.isfinite(self.steps_per_block),
            f"steps_per_block must be >= 0 (0: a fixed budget), got {self.steps_per_block!r}",
        )
        need(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every!r}")
        need(self.patience >= 0, f"patience must be >= 0, got {self.patience!r}")
        need(
            isinstance(self.plateau_decay, int | float)
            and not isinstance(self.plateau_decay, bool)
            and 0 <= self.plateau_decay < 1,
            f"plateau_decay must be in [0, 1), got {self.plateau_decay!r}",
        )
        need(
            self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads!r}"
        )
        need(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")

    def sized(self, train_blocks: int) -> TrainConfig:
        """A copy with its steps sized by ``train_blocks`` (:func:`steps_for_data`).

        ``steps`` is the ceiling; the evaluation cadence and warm-up shrink with the
        steps, so a small user's few steps are still evaluated about as many times.
        Itself when :attr:`steps_per_block` is 0 or the data fills the budget; sizing a
        sized config changes nothing.
        """
        steps = steps_for_data(train_blocks, self.steps, self.steps_per_block)
        if steps == self.steps:
            return self
        scale = steps / self.steps
        return replace(
            self,
            steps=steps,
            eval_every=max(1, round(self.eval_every * scale)) if self.eval_every else 0,
            warmup_steps=min(self.warmup_steps, steps // 4),
        )


MIN_SIZED_STEPS = 8
"""The fewest steps :func:`steps_for_data` gives: room for a few evaluations."""

SIZED_STEPS_PER_BLOCK = 1.0
"""Steps per training block where lorafleet sizes the budget by the data.

The SDK's and ``lorafleet train``'s default, and the devices' final personalization
(:func:`lorafleet.client.federated.personal_train_config`). Chosen on the fortunes
benchmark's validation notes among 1, 1.5, 2 and a fixed budget, from the prior and from
zero; it held on the held-out users (docs/personalization.md, "The budget sized by the
data")."""


def steps_for_data(train_blocks: int, budget: int, per_block: float) -> int:
    """The steps a user's data is worth: ``per_block`` per training block, within the budget.

    Early stopping already ends training when validation stops improving, but the budget
    also sets how often it looks (:meth:`TrainConfig.sized`): a user with five blocks
    given the budget of one with forty is checked too rarely to catch the few steps that
    help, then spends steps to learn that none did. Sizing the budget by the data keeps
    the evaluations as dense as the data needs; never below :data:`MIN_SIZED_STEPS` nor
    above ``budget``. ``per_block <= 0`` keeps the budget as it is.
    """
    if per_block <= 0:
        return budget
    return max(1, min(budget, max(MIN_SIZED_STEPS, math.ceil(per_block * train_blocks))))


@dataclass(frozen=True)
class TrainResult:
    """What a training run did and how well the adapter does on held-out text."""

    steps: int
    tokens: int
    seconds: float
    heldout_loss_before: float
    heldout_loss_after: float
    best_step: int
    stopped_early: bool
    train_losses: tuple[float, ...]
    heldout_curve: tuple[tuple[int, float], ...]
    lr_drops: int = 0
    """Times training went back to the best B at a lower rate (``plateau_decay``)."""

    @property
    def tokens_per_second(self) -> float:
        """Training throughput (tokens that carried loss, forward and backward)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def cycle_batches(
    blocks: TokenBlocks, batch_size: int, generator: torch.Generator
) -> Iterator[TokenBlocks]:
    """Shuffled batches, epoch after epoch, for as many steps as the caller takes."""
    while True:
        yield from blocks.batches(batch_size, shuffle=True, generator=generator)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters training updates (the B matrices unless a caller unfroze more)."""
    return [p for p in model.parameters() if p.requires_grad]


class LocalTrainer:
    """One optimizer over a model's trainable adapter parameters, stepped batch by batch.

    :func:`train_adapter` drives it for the SDK; benchmarks and the federated client drive
    it directly so every path shares the same step. With a lean precision (``fp32-lean``,
    ``bf16-lean``, ``int8``, ``int8-fp32``; what ``auto`` picks on a CPU) the step's loss
    comes from :mod:`lorafleet.client.qtrain`'s fast forward (``quant`` overrides the
    plan's settings); on a base that forward cannot run, the step falls back to the
    model's own forward in the plan's fallback precision and logs why.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        *,
        prior_b: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
        quant: QuantConfig | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        elif self.device.type == "cpu":  # hyperthreads add no matmul throughput
            limit_threads()
        place_on(model, self.device)
        self._a_params: list[torch.nn.Parameter] = []
        if config.a_lr > 0:  # a personal A: every A trains too, at its own rate
            self._a_params = [
                cast(torch.nn.Parameter, a.weight) for a, _ in adapter_layers(model).values()
            ]
            for p in self._a_params:
                p.requires_grad_(True)
        self.params = trainable_parameters(model)
        if not self.params:
            raise SpecError(
                "train: the model has no trainable parameters; materialize an adapter first"
            )
        self._fast: QuantizedCausalLM | None = None
        self._forward_precision: ConcretePrecision = resolve_precision(
            config.precision, self.device
        )
        plan = precision_plan(config.precision, self.device)
        if plan.lean is not None:
            reason = unsupported_reason(model)
            if reason is None:
                quant = quant or QuantConfig(
                    weights=plan.lean[0], compute=plan.lean[1], compile=config.compile
                )
                self._fast = prepare_quantized_model(model, quant, params=self.params)
            elif plan.fallback is not None:
                log.warning(
                    "precision %s: %s; training through the model's own forward in %s",
                    self._forward_precision,
                    reason,
                    plan.fallback,
                )
                self._forward_precision = plan.fallback
        if config.compile and self._fast is None:
            log.warning(
                "compile: only the lean CPU precisions compile; %s trains eager",
                self._forward_precision,
            )
        self._prox: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if config.prox_mu > 0:
            if prior_b is None:
                raise SpecError("train: prox_mu > 0 needs prior_b (the shared prior's B)")
            b_params = [p for p in self.params if all(p is not a for a in self._a_params)]
            start_b = get_b(model)
            set_b(model, prior_b)  # validates shapes; the starting point is restored below
            anchors = {id(p): p.detach().clone() for p in b_params}
            set_b(model, start_b)
            self._prox = [(p, anchors[id(p)]) for p in b_params]
        self.optimizer = torch.optim.AdamW(
            self._groups(config.lr), weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1))
        )
        self.steps_done = 0

    def _groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: B at ``lr``; a training A at ``a_lr`` scaled alike.

        A restart at half the rate halves both.
        """
        a_ids = {id(p) for p in self._a_params}
        groups: list[dict[str, Any]] = [
            {"params": [p for p in self.params if id(p) not in a_ids], "lr": lr}
        ]
        if self._a_params:
            groups.append({"params": self._a_params, "lr": self.config.a_lr * lr / self.config.lr})
        return groups

    @property
    def trains_a(self) -> bool:
        """Whether this trainer trains a personal A (``TrainConfig.a_lr`` > 0)."""
        return bool(self._a_params)

    def freeze_a(self) -> None:
        """Make every A frozen again (the model keeps the A values it has)."""
        for p in self._a_params:
            p.requires_grad_(False)

    def restart(self, lr: float) -> None:
        """Go on at ``lr`` with fresh AdamW moments and no warm-up.

        After the caller puts an earlier B back, the moments are those of a trajectory
        that was abandoned; keeping them would push B the way that just failed.
        """
        self.optimizer = torch.optim.AdamW(self._groups(lr), weight_decay=self.config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def _loss(self, batch: TokenBlocks) -> torch.Tensor:
        """The batch's mean token loss through the trainer's forward (lean or the model's)."""
        dev = self.device
        self.model.train()
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        labels = batch.labels.to(dev)
        if self._fast is not None:
            return self._fast.loss(ids, mask, labels)
        with autocast_context(self._forward_precision, dev):
            out = self.model(input_ids=ids, attention_mask=mask, labels=labels)
        return cast(torch.Tensor, out.loss.float())  # mean over the batch's labelled tokens

    def backward(self, batch: TokenBlocks) -> float:
        """Forward and backward on ``batch``, no step: gradients add up in ``.grad``.

        A gradient sketch (client/sketch.py) reads A's gradient this way, through the
        same forward the device trains with.
        """
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise SpecError(f"train: loss is {loss.item()} on this batch")
        torch.autograd.backward(loss)
        return float(loss.item())

    def step(self, batch: TokenBlocks) -> tuple[float, int]:
        """One optimizer step on ``batch``; returns (loss, tokens that carried loss)."""
        cfg = self.config
        loss = self._loss(batch)
        if self._prox:
            loss = loss + 0.5 * cfg.prox_mu * sum(
                ((p.float() - p0) ** 2).sum() for p, p0 in self._prox
            )
        if not torch.isfinite(loss):
            raise SpecError(
                f"train: loss became {loss.item()} at step {self.steps_done + 1}; lower lr (now {cfg.lr})"
            )
        torch.autograd.backward(loss)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return float(loss.item()), int((batch.labels[:, 1:] != -100).sum())

    def evaluate(self, heldout: TokenBlocks) -> float:
        """Held-out loss in the trainer's precision on its device."""
        return heldout_loss(
            self.model, heldout, precision=self.config.precision, device=self.device
        )


def train_adapter(
    model: torch.nn.Module,
    train: TokenBlocks,
    heldout: TokenBlocks,
    config: TrainConfig | None = None,
    *,
    prior_b: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
    progress: ProgressFn | None = None,
    heldout_loss_before: float | None = None,
) -> TrainResult:
    """Train the model's trainable adapter parameters in place; keep the best state seen.

    The best state is B's, and A's too when ``config.a_lr`` trains a personal A; the
    model holds it (A frozen again) when this returns.

    Parameters
    ----------
    model
        A peft model from :func:`lorafleet.client.adapter.materialize`.
    train, heldout
        Token blocks from :func:`lorafleet.client.data.encode_blocks`.
    config
        Training settings; defaults suit a few hundred notes on a laptop CPU. With
        ``steps_per_block > 0`` the budget is first sized by ``train``
        (:meth:`TrainConfig.sized`).
    prior_b
        B of the shared prior. With ``config.prox_mu > 0`` training is pulled toward it.
    progress
        Called after every step; the SDK passes a progress bar here.
    heldout_loss_before
        The model's loss on ``heldout`` as it is now, in ``config``'s precision, where
        the caller has just measured it (a device round has): the first evaluation is
        skipped. Left out, it is measured here.

    Examples
    --------
    >>> result = train_adapter(peft_model, train_blocks, heldout_blocks)  # doctest: +SKIP
    >>> result.heldout_loss_after < result.heldout_loss_before  # doctest: +SKIP
    True
    """
    if len(train) == 0:
        raise SpecError("train: no training blocks; add more text")
    config = (config or TrainConfig()).sized(len(train))
    trainer = LocalTrainer(model, config, prior_b=prior_b)

    def snapshot() -> tuple[BTensors, ATensors | None]:
        return get_b(model), get_a(model) if trainer.trains_a else None

    def put_back(state: tuple[BTensors, ATensors | None]) -> None:
        set_b(model, state[0])
        if state[1] is not None:
            load_a(model, state[1])

    batches = cycle_batches(train, config.batch_size, torch.Generator().manual_seed(config.seed))
    before = trainer.evaluate(heldout) if heldout_loss_before is None else heldout_loss_before
    best_loss, best_step, best = before, 0, snapshot()
    curve: list[tuple[int, float]] = [(0, before)]
    losses: list[float] = []
    tokens, bad_evals, stopped = 0, 0, False
    lr, drops = config.lr, 0
    step, seconds = 0, 0.0
    try:
        for step in range(1, config.steps + 1):
            started = time.perf_counter()
            loss, n = trainer.step(next(batches))
            seconds += time.perf_counter() - started  # training time only, not evaluation
            losses.append(loss)
            tokens += n
            if progress is not None:
                progress(step, config.steps, loss)
            due = config.eval_every and step % config.eval_every == 0
            if due or step == config.steps:
                current = trainer.evaluate(heldout)
                curve.append((step, current))
                if current < best_loss:
                    best_loss, best_step, best, bad_evals = current, step, snapshot(), 0
                else:
                    bad_evals += 1
                    if config.patience and bad_evals >= config.patience:
                        stopped = True
                        log.info(
                            "early stop at step %d: best held-out loss %.4f at step %d",
                            step,
                            best_loss,
                            best_step,
                        )
                        break
                    if config.plateau_decay > 0 and step < config.steps:
                        # The rate overshot for this user's data: back to the best B,
                        # on at a smaller rate. Small users overshoot within a few steps
                        # at a rate that larger ones need; this picks it per user, on
                        # validation, within the same budget.
                        lr *= config.plateau_decay
                        put_back(best)
                        trainer.restart(lr)
                        drops += 1
    finally:
        model.eval()
        trainer.freeze_a()  # a trained A stays in the model, frozen, as any loaded A
    put_back(best)
    return TrainResult(
        steps=step,
        tokens=tokens,
        seconds=seconds,
        heldout_loss_before=before,
        heldout_loss_after=best_loss,
        best_step=best_step,
        stopped_early=stopped,
        train_losses=tuple(losses),
        heldout_curve=tuple(curve),
        lr_drops=drops,
    )
