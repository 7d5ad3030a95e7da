"""The device side of a federated round (the Flower ClientApp is :mod:`~lorafleet.client.flower_app`).

A round on the device: measure held-out loss of the base and of the prior; take a prior
step (train a copy of the prior's B on local data) and return its clipped delta; train
the personal B pulled toward the prior (Ditto: a proximal term) and save it as a new
version in the user's profile. The personal adapter never leaves the device.

One worker process often serves many simulated users in turn, so the base and the peft
model are loaded once per process and only B is swapped between users: ten users then
cost one base's memory, not ten.

The ClientApp, its message layouts and the reply (with secure aggregation, SecAgg+'s
masking) live in :mod:`lorafleet.client.flower_app`, which imports this module only
for a round it runs itself; their names stay importable from here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from lorafleet.client.adapter import (
    ATensors,
    adapter_disabled,
    adapter_layers,
    get_a,
    get_b,
    has_seeded_a,
    load_a,
    materialize,
    seeded_a,
    set_a,
    set_b,
    set_weights,
)
from lorafleet.client.base import LoadedBase, load_base
from lorafleet.client.base_fetch import fetch_base, fetched_path
from lorafleet.client.data import (
    Example,
    TokenBlocks,
    encode_blocks,
    read_examples,
    split_examples,
)
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.layout import shared_a_path
from lorafleet.client.profile import Profile
from lorafleet.client.runtime import (
    Precision,
    base_dtype,
    base_quantization,
    place_on,
    resolve_device,
    resolve_precision,
)
from lorafleet.client.sketch import gradient_sketch
from lorafleet.client.train import (
    SIZED_STEPS_PER_BLOCK,
    LocalTrainer,
    TrainConfig,
    cycle_batches,
    train_adapter,
)
from lorafleet.protocols.encoding import decode_tensors
from lorafleet.protocols.errors import DataError, LorafleetError
from lorafleet.protocols.federation import (
    BTensors,
    RoundInstruction,
    RoundMetrics,
    clip_by_global_norm,
)
from lorafleet.protocols.shared_a import check_shared_a

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceData:
    """One user's private text on this device, already split."""

    user_id: str
    train: list[Example]
    heldout: list[Example]

    @classmethod
    def from_path(
        cls, path: Path, *, heldout_fraction: float = 0.2, user_id: str = ""
    ) -> DeviceData:
        """A folder with train + heldout files (.txt or .jsonl), or any notes (split here).

        The held-out side is what the device selects on (early stopping, the choice of
        its personal adapter); an experiment keeps its test notes off the device.
        """
        path = Path(path)
        for suffix in (".txt", ".jsonl"):
            train_file, held_file = path / f"train{suffix}", path / f"heldout{suffix}"
            if train_file.is_file() and held_file.is_file():
                return cls(
                    user_id or path.name, read_examples(train_file), read_examples(held_file)
                )
        train, held = split_examples(read_examples(path), heldout_fraction)
        return cls(user_id or path.name, train, held)


@dataclass
class _Worker:
    base: LoadedBase
    model: PeftModel
    device: torch.device
    precision: str
    # The bare base's loss per held-out token blocks (their digest): the base never
    # changes, so a device scores it once, not in every round (an evaluation a round).
    base_losses: dict[str, float] = field(default_factory=dict)


def _blocks_digest(blocks: TokenBlocks) -> str:
    """A digest of what an evaluation reads from ``blocks``: ids, mask and labels."""
    h = hashlib.sha256()
    for t in (blocks.input_ids, blocks.attention_mask, blocks.labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


_WORKERS: dict[tuple[str, str, str], _Worker] = {}


def warm_models() -> list[tuple[str, str, str]]:
    """The (base digest, spec fingerprint, precision) of every model this process holds.

    A device worker (:mod:`lorafleet.client.device_worker`) reports how many bases it
    loaded from this: one per device, however many rounds.
    """
    return list(_WORKERS)


def worker_for(
    instr: RoundInstruction,
    *,
    base_source: str = "default",
    precision: Precision = "auto",
    device: str = "auto",
    cache_dir: Path | None = None,
    base_service: str = "",
    base_service_ca: str = "",
) -> _Worker:
    """The process's base + adapter for this spec, loaded on first use.

    With ``base_service`` (``host:port`` of the coordinator's BaseService) the base is
    fetched by the round's manifest digest unless it is already cached; either way
    ``load_base`` refuses a base whose digest differs from the round's.
    """
    dev = resolve_device(device)
    concrete = resolve_precision(precision, dev)
    key = (instr.spec.base_sha256, instr.spec.fingerprint(), concrete)
    worker = _WORKERS.get(key)
    if worker is None:
        if base_service:
            # The device lacks this base: download it once from the coordinator, verified
            # chunk by chunk against the round's manifest digest (resumable, cached).
            base_source = str(
                fetched_path(instr.spec.base_sha256, cache_dir=cache_dir)
                or fetch_base(
                    base_service,
                    instr.spec.base_sha256,
                    cache_dir=cache_dir,
                    tls_root_cert=Path(base_service_ca) if base_service_ca else None,
                    progress=False,
                )
            )
        base = load_base(
            base_source,
            cache_dir=cache_dir,
            expected_sha256=instr.spec.base_sha256,
            dtype=base_dtype(concrete, dev),
            quantization=base_quantization(concrete, dev),
        )
        model = materialize(base.model, instr.spec, base_sha256=base.sha256)
        place_on(model, dev)
        worker = _Worker(base, model, dev, concrete)
        _WORKERS[key] = worker
    return worker


def run_round(
    instr: RoundInstruction,
    prior_b: BTensors | None,
    data: DeviceData,
    profile_root: Path,
    *,
    base_source: str = "default",
    precision: Precision = "auto",
    device: str = "auto",
    cache_dir: Path | None = None,
    base_service: str = "",
    base_service_ca: str = "",
) -> tuple[BTensors | None, RoundMetrics]:
    """Run one round for one user; returns (clipped prior delta or None, metrics).

    In ``evaluate`` mode nothing is trained: the metrics compare base, prior and the
    user's current personal adapter on their held-out text.
    """
    started = time.perf_counter()
    w = worker_for(
        instr,
        base_source=base_source,
        precision=precision,
        device=device,
        cache_dir=cache_dir,
        base_service=base_service,
        base_service_ca=base_service_ca,
    )
    # A warm worker serves every user of this process: whatever A the last one left
    # (a personal A) goes, and the prior is scored, trained and averaged on the cohort's
    # A: the seeded one, or the shared A the instruction names (checked here first).
    cohort_a = read_shared_a(profile_root, instr, w.model) if instr.shared_a else None
    set_a(w.model, instr.spec, cohort_a)
    if prior_b is None:  # the zero prior of round 1
        prior_b = {k: np.zeros_like(v) for k, v in get_b(w.model).items()}
    tok = w.base.tokenizer
    train_blocks = encode_blocks(data.train, tok, seq_len=instr.seq_len)
    held_blocks = encode_blocks(data.heldout, tok, seq_len=instr.seq_len)
    if len(train_blocks) == 0 or held_blocks.num_tokens == 0:
        raise DataError(f"user {data.user_id}: not enough text for a round")

    def loss() -> float:
        return heldout_loss(w.model, held_blocks, precision=w.precision, device=w.device)  # type: ignore[arg-type]

    held_key = _blocks_digest(held_blocks)
    base_loss = w.base_losses.get(held_key)
    if base_loss is None:
        with adapter_disabled(w.model):
            base_loss = w.base_losses[held_key] = loss()
    if instr.mode == "sketch":
        # Round 0 of a gradient-aligned shared A: this device's gradient sketch at the
        # bare base goes up in place of a delta; nothing is trained or saved.
        sketch = gradient_sketch(
            w.model,
            instr.spec,
            train_blocks,
            passes=instr.sketch_passes,
            batches=instr.sketch_batches,
            batch_size=instr.batch_size,
            precision=w.precision,
            device=str(w.device),
            seed=round_seed(instr),
        )
        set_a(w.model, instr.spec, None)
        return sketch, RoundMetrics(
            num_examples=len(data.train),
            base_loss=base_loss,
            prior_loss=base_loss,
            personal_loss=base_loss,
            delta_norm=1.0,
            train_seconds=time.perf_counter() - started,
        )
    set_b(w.model, prior_b)
    prior_loss = loss()

    profile = _open_profile(profile_root, instr, base_source)
    current = profile.current_version()
    # New users warm-start from the prior on the cohort's A; a saved version without an
    # A of its own was trained on the seeded A, and is scored on it.
    personal_b, personal_a = prior_b, cohort_a
    if current is not None:
        _, personal_b, personal_a = profile.read(current)

    if instr.mode == "evaluate":
        set_weights(w.model, instr.spec, personal_b, personal_a)
        metrics = RoundMetrics(len(data.train), base_loss, prior_loss, loss())
        set_a(w.model, instr.spec, None)
        return None, metrics

    # Prior step: plain local training from the prior, no early stop (selecting on this
    # user's held-out text would bias the shared prior toward them). A personalize
    # round has none: it only fine-tunes the personal adapter from the final prior.
    delta: BTensors | None = None
    if instr.mode == "train" and instr.prior_steps > 0:
        config = TrainConfig(
            steps=instr.prior_steps,
            lr=instr.lr,
            batch_size=instr.batch_size,
            warmup_steps=min(5, instr.prior_steps // 4),
            precision=w.precision,  # type: ignore[arg-type]
            device=str(w.device),
            seed=round_seed(instr),
        )
        trainer = LocalTrainer(w.model, config)
        batches = cycle_batches(
            train_blocks, instr.batch_size, torch.Generator().manual_seed(round_seed(instr))
        )
        for _ in range(instr.prior_steps):
            trainer.step(next(batches))
        stepped = get_b(w.model)
        delta = {k: stepped[k] - prior_b[k] for k in prior_b}
    # Personal step. It starts from whichever of {the prior just received, the user's
    # current personal B} is better on the user's validation notes, trains, and keeps the
    # best B it saw on them (the start included). So a round never leaves the personal
    # adapter worse on validation than the prior or than itself: when the prior has
    # improved past an old personal adapter the user moves on from the prior, and when
    # a user's own text says training hurts (too few notes), the prior is kept.
    # Validation is the device's held-out side; an experiment's test notes never get here.
    # The personalize round after the last one gets the whole personal budget at once,
    # from the final prior: the fine-tuned-global recipe, with early stopping and the
    # choice on top (docs/personalization.md measured why one run beats per-round bits).
    start_a: ATensors | None = None
    if current is None:
        start_b, start_a, start_loss, start_from = prior_b, cohort_a, prior_loss, "prior"
    else:
        set_weights(w.model, instr.spec, personal_b, personal_a)
        own_loss = loss()
        if own_loss <= prior_loss:
            start_b, start_a, start_loss, start_from = personal_b, personal_a, own_loss, "personal"
        else:
            start_b, start_a, start_loss, start_from = prior_b, cohort_a, prior_loss, "prior"
    set_weights(w.model, instr.spec, start_b, start_a)
    if instr.personal_steps == 0:
        personal_loss = start_loss
    else:
        final = instr.mode == "personalize"
        personal_cfg = personal_train_config(instr, precision=w.precision, device=str(w.device))
        result = train_adapter(
            w.model,
            train_blocks,
            held_blocks,
            personal_cfg,
            prior_b=prior_b,
            heldout_loss_before=start_loss,  # measured above on this very state
        )
        personal_loss, mix = result.heldout_loss_after, 1.0
        if final and instr.blend:
            personal_loss, mix = blend_with_prior(
                w.model,
                prior_b,
                prior_loss,
                personal_loss,
                loss,
                # A can differ from the cohort's only if it trained or the start had its own
                prior_a=(cohort_a if cohort_a is not None else seeded_a(w.model, instr.spec))
                if personal_cfg.a_lr > 0 or start_a is not None
                else None,
            )
        # A version on a shared A keeps it: the spec alone does not rebuild it.
        trained_a = (
            None if cohort_a is None and has_seeded_a(w.model, instr.spec) else get_a(w.model)
        )
        profile.save(
            w.model,
            get_b(w.model),
            a=trained_a,
            metrics={
                "base_loss": base_loss,
                "prior_loss": prior_loss,
                "personal_loss": personal_loss,
                "start_loss": start_loss,
                "started_from_prior": float(start_from == "prior"),
                "best_step": float(result.best_step),
                "mix": mix,
                "steps": float(result.steps),
                "lr_drops": float(result.lr_drops),
                "prior_steps": float(instr.prior_steps if delta is not None else 0),
                "personal_a": float(trained_a is not None),
            },
            prior_version=instr.prior_version,
            round=instr.round,
        )
    set_a(w.model, instr.spec, None)  # the user's A does not stay in the warm worker
    clipped: BTensors | None = None
    norm, was_clipped = 0.0, False
    if delta is not None:
        clipped, norm, was_clipped = clip_by_global_norm(delta, instr.clip_norm)
    metrics = RoundMetrics(
        num_examples=len(data.train),
        base_loss=base_loss,
        prior_loss=prior_loss,
        personal_loss=personal_loss,
        delta_norm=norm,
        clipped=was_clipped,
        train_seconds=time.perf_counter() - started,
    )
    return clipped, metrics


def read_shared_a(profile_root: Path, instr: RoundInstruction, model: torch.nn.Module) -> ATensors:
    """The shared A ``instr`` names, from this device's cache, checked before any use.

    The coordinator chose it; the device accepts it only if it hashes to the digest the
    instruction names, fits this adapter, is finite and has orthogonal rows of the fixed
    norm (:func:`lorafleet.protocols.shared_a.check_shared_a`).
    """
    path = shared_a_path(profile_root, instr.shared_a)
    if not path.is_file():
        raise LorafleetError(
            f"the shared A {instr.shared_a[:12]}… is not cached on this device; "
            "the coordinator must send it"
        )
    tensors, _ = decode_tensors(path.read_bytes())
    fan_ins = {p: int(a.weight.shape[1]) for p, (a, _) in adapter_layers(model).items()}
    return check_shared_a(tensors, fan_ins, instr.spec.rank, instr.shared_a)


def round_seed(instr: RoundInstruction) -> int:
    """The device's batch-order seed for a round: the round and the cohort's seed.

    Two cohorts (two experiment seeds) then see their notes in different orders, as
    well as training on different seeded A; cohort 0 keeps the round alone, as before.
    """
    return (instr.spec.cohort_seed * 1_000_003 + instr.round) % (1 << 62)


PLATEAU_DECAY = 0.5
"""The personal steps' rate factor after an evaluation without progress (TrainConfig).

Chosen on the fortunes benchmark's validation notes (docs/personalization.md)."""


def personal_train_config(instr: RoundInstruction, *, precision: str, device: str) -> TrainConfig:
    """The personal steps' training recipe for ``instr`` (shared with the sim's tuning).

    A personalize round (the final fine-tuning from the last prior) evaluates about
    eight times over its budget and stops after three evaluations without progress; a
    train round's personal steps evaluate three times and keep the best without
    stopping early. Both train at the instruction's personal learning rate, and after
    an evaluation without progress go back to the best B and on at
    :data:`PLATEAU_DECAY` times the rate: one rate does not suit every user's amount of
    text (a 13-note user overshoots within 3 steps at a rate a 130-note user needs for
    20), and this lets each user's validation notes pick, within the same budget.

    The personalize round's budget is sized by the user's training blocks
    (:data:`~lorafleet.client.train.SIZED_STEPS_PER_BLOCK` steps per block, with the
    instruction's budget as the ceiling; :meth:`TrainConfig.sized`). A small user is
    then evaluated every step or two and stops within a few, instead of spending 9 of 30
    steps to find that the start was best.
    """
    final = instr.mode == "personalize"
    return TrainConfig(
        steps=instr.personal_steps,
        lr=instr.personal_learning_rate,
        batch_size=instr.batch_size,
        warmup_steps=min(2, instr.personal_steps // 4),
        a_lr=instr.personal_a_lr if final else 0.0,
        prox_mu=instr.prox_mu,
        precision=precision,  # type: ignore[arg-type]
        device=device,
        eval_every=max(1, instr.personal_steps // (8 if final else 3)),
        patience=3 if final else 0,
        plateau_decay=PLATEAU_DECAY,
        seed=round_seed(instr) + (7919 if final else 0),
        steps_per_block=SIZED_STEPS_PER_BLOCK if final else 0.0,
    )


BLEND_WEIGHTS: tuple[float, ...] = (0.75, 0.5, 0.25)
"""Weights of the trained B, against the prior's, that the personalize step also tries."""


def blend_with_prior(
    model: torch.nn.Module,
    prior_b: BTensors,
    prior_loss: float,
    trained_loss: float,
    loss: Callable[[], float],
    *,
    prior_a: ATensors | None = None,
) -> tuple[float, float]:
    """Keep the point on the line from the prior to the trained adapter that validates best.

    A and the base are shared, so a weighted mean of two B matrices is the same weighted
    mean of the two adapters' weight deltas: the interpolation of weight-space ensembles
    (WiSE-FT, Wortsman et al. 2022), applied per user. Fine-tuning a few notes pulls B
    toward them and away from what the cohort knows; a point in between often holds more
    of both. The candidates are the trained adapter (weight 1), the prior (weight 0,
    whose loss is known) and :data:`BLEND_WEIGHTS`, each scored once on the user's
    validation notes: forward passes only, no training step. With a personal A
    (``prior_a`` is then the prior's A, the seeded one) A moves along its own line from
    ``prior_a`` to the trained A with the same weight. Leaves the model holding the
    winner and returns its validation loss and weight; ties keep the larger weight.
    """
    trained = get_b(model)
    trained_a = get_a(model) if prior_a is not None else None

    def put(weight: float) -> None:
        if weight == 1.0:  # exactly, not prior + (trained - prior) in float32
            set_b(model, trained)
            if trained_a is not None:
                load_a(model, trained_a)
            return
        set_b(model, {k: prior_b[k] + weight * (trained[k] - prior_b[k]) for k in trained})
        if trained_a is not None and prior_a is not None:
            load_a(
                model,
                {k: prior_a[k] + weight * (trained_a[k] - prior_a[k]) for k in trained_a},
            )

    best_loss, best_weight = trained_loss, 1.0
    if prior_loss < best_loss:
        best_loss, best_weight = prior_loss, 0.0
    for weight in BLEND_WEIGHTS:
        put(weight)
        candidate = loss()
        if candidate < best_loss:
            best_loss, best_weight = candidate, weight
    put(best_weight)
    return best_loss, best_weight


def _open_profile(root: Path, instr: RoundInstruction, base_source: str) -> Profile:
    spec = Profile.read_spec(root)
    if spec is None:
        return Profile.create(root, instr.spec, base_source=base_source)
    if spec != instr.spec:
        raise LorafleetError(
            f"profile {root} holds an adapter of another spec ({spec.fingerprint()[:12]}…) than this "
            f"federation's ({instr.spec.fingerprint()[:12]}…); use a separate profile per federation"
        )
    return Profile.open(root)


# The ClientApp half, importable from here as before (lorafleet.client.federated:app).
from lorafleet.client.flower_app import (  # noqa: E402
    adapter_report,
    is_secure,
    make_client_app,
    read_instruction,
    secure_aggregation_mod,
    update_reply,
)
from lorafleet.client.flower_app import app as app  # noqa: E402

__all__ = [
    "BLEND_WEIGHTS",
    "DeviceData",
    "adapter_report",
    "app",
    "blend_with_prior",
    "is_secure",
    "make_client_app",
    "personal_train_config",
    "read_instruction",
    "run_round",
    "secure_aggregation_mod",
    "update_reply",
    "warm_models",
    "worker_for",
]
