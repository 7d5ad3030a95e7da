"""Federated personalization experiments: the table that says whether it works.

A run generates synthetic users (or reads real per-user folders), federates them on
Flower's simulation engine, then measures for every user on their own held-out text:

- ``base``: the frozen base alone;
- ``prior``: the shared prior the federation learned (what a new user starts from);
- ``local``: a personal adapter trained only on the user's data, from zero, with as many
  steps as the federated personal adapter got (no federation at all);
- ``personal``: the personal adapter trained in the federation (from the prior, pulled
  toward it).

and a cold-start curve: a user who never took part, with k notes, trained from the prior
versus from zero. Those measurements run in the experiment's own process, which knows
which folder belongs to which user; the coordinator never learns it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lorafleet.client.adapter import BTensors, adapter_disabled, get_b, materialize, set_b
from lorafleet.client.base import LoadedBase, load_base
from lorafleet.client.data import Example, TokenBlocks, encode_blocks
from lorafleet.client.evaluate import heldout_loss
from lorafleet.client.profile import Profile
from lorafleet.client.runtime import base_dtype, resolve_device, resolve_precision
from lorafleet.client.train import TrainConfig, train_adapter
from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.errors import SpecError
from lorafleet.server.coordinator import Coordinator, CoordinatorConfig
from lorafleet.sim.personas import (
    PersonaConfig,
    UserData,
    generate_notes,
    generate_personas,
    load_user_folders,
    write_user_folders,
)
from lorafleet.sim.runner import SimResources, simulate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the users, the federation and the measurements."""

    output: Path = field(metadata={"help": "Folder for everything the run writes."})
    num_users: int = 8
    notes_per_user: int = 60
    users_dir: Path | None = field(
        default=None, metadata={"help": "Real per-user folders instead of personas."}
    )
    num_rounds: int = 3
    fraction_train: float = 0.5
    personal_steps: int = 6
    prior_steps: int = 6
    lr: float = 2e-3
    prox_mu: float = 0.01
    clip_norm: float = 1.0
    packing: str = "fp16"
    seq_len: int = 128
    rank: int = 8
    base: str = "default"
    precision: str = "auto"
    cold_start_ks: tuple[int, ...] = (4, 16, 64)
    cold_start_steps: int = 12
    seed: int = 0
    cpus_per_client: float = 1.0
    secure_aggregation: bool = field(
        default=False, metadata={"help": "Sum the prior deltas with SecAgg+."}
    )
    secagg_dropout_share: float = 0.2
    dp: str = field(default="off", metadata={"help": "Differential privacy: off, central, client."})
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_users < 2 and self.users_dir is None:
            raise SpecError(f"experiment: num_users must be >= 2, got {self.num_users}")
        if self.dp == "client" and not self.secure_aggregation:
            raise SpecError(
                "experiment: --dp client needs --secure-aggregation (without it the coordinator "
                "sees each delta with only a share of the noise); use --dp central"
            )
        if self.dp not in ("off", "central", "client"):
            raise SpecError(f"experiment: dp must be off, central or client, got {self.dp!r}")
        if any(k < 1 for k in self.cold_start_ks):
            raise SpecError(f"experiment: cold-start sizes must be >= 1, got {self.cold_start_ks}")


@dataclass
class UserResult:
    """Held-out losses of one user."""

    id: str
    base_loss: float
    prior_loss: float
    local_loss: float
    personal_loss: float
    rounds_taken_part: int


@dataclass
class ExperimentResult:
    """Everything the run measured; ``to_json`` is the results file's content."""

    users: list[UserResult]
    rounds: list[dict[str, Any]]
    bytes_up_per_client: float
    cold_start: list[dict[str, float]] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """Mean held-out loss per method."""
        keys = ("base_loss", "prior_loss", "local_loss", "personal_loss")
        return {k: float(np.mean([getattr(u, k) for u in self.users])) for k in keys}

    def to_json(self) -> str:
        """The results file: users, rounds, bytes, cold start, means."""
        record = {
            "users": [asdict(u) for u in self.users],
            "rounds": self.rounds,
            "bytes_up_per_client": self.bytes_up_per_client,
            "cold_start": self.cold_start,
            "privacy": self.privacy,
            "mean": self.means(),
            "seconds": self.seconds,
            "config": self.config,
        }
        return json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"


class _Evaluator:
    """One base and adapter in this process, for every user's measurements."""

    def __init__(
        self, cfg: ExperimentConfig, coord_cfg: CoordinatorConfig, base: LoadedBase
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device("auto")
        self.precision = resolve_precision(cfg.precision, self.device)  # type: ignore[arg-type]
        self.base = base
        self.model = materialize(base.model, coord_cfg.spec, base_sha256=base.sha256)
        self.zero = {k: np.zeros_like(v) for k, v in get_b(self.model).items()}

    def blocks(self, examples: Sequence[Example]) -> TokenBlocks:
        return encode_blocks(examples, self.base.tokenizer, seq_len=self.cfg.seq_len)

    def loss(self, b: BTensors | None, held: TokenBlocks) -> float:
        if b is None:
            with adapter_disabled(self.model):
                return heldout_loss(self.model, held, precision=self.precision, device=self.device)
        set_b(self.model, b)
        return heldout_loss(self.model, held, precision=self.precision, device=self.device)

    def train_from(
        self, start: BTensors, train: TokenBlocks, held: TokenBlocks, steps: int
    ) -> float:
        set_b(self.model, start)
        config = TrainConfig(
            steps=max(1, steps),
            lr=self.cfg.lr,
            precision=self.precision,
            device=str(self.device),
            eval_every=0,  # one evaluation, at the end: these are measurements, not tuning
            patience=0,
            warmup_steps=min(5, steps // 4),
            seed=self.cfg.seed,
        )
        return train_adapter(self.model, train, held, config).heldout_loss_after


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> ExperimentResult:
    """Run the federation and every measurement; writes results.json, table.txt, plot.png."""
    started = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.users_dir is not None:
        users_dir = Path(cfg.users_dir)
        users: list[UserData] = load_user_folders(users_dir, seed=cfg.seed)
    else:
        personas = generate_personas(
            PersonaConfig(num_users=cfg.num_users, notes_per_user=cfg.notes_per_user, seed=cfg.seed)
        )
        users_dir = out / "users"
        if not users_dir.exists():
            write_user_folders(personas, users_dir)
        users = load_user_folders(users_dir, seed=cfg.seed)
    # Load the base here first: it converts the default GGUF once before the workers start.
    dev = resolve_device("auto")
    base = load_base(cfg.base, dtype=base_dtype(cfg.precision, dev))  # type: ignore[arg-type]
    coord_cfg = CoordinatorConfig(
        num_rounds=cfg.num_rounds,
        fraction_train=cfg.fraction_train,
        min_train_nodes=min(2, len(users)),
        min_available_nodes=len(users),
        personal_steps=cfg.personal_steps,
        prior_steps=cfg.prior_steps,
        lr=cfg.lr,
        prox_mu=cfg.prox_mu,
        clip_norm=cfg.clip_norm,
        seq_len=cfg.seq_len,
        packing=cfg.packing,
        rank=cfg.rank,
        base_model_id=base.model_id,
        base_sha256=base.sha256,
        data_dir=str(out / "coordinator"),
        final_evaluation=False,
        seed=cfg.seed,
        secure_aggregation=cfg.secure_aggregation,
        secagg_dropout_share=cfg.secagg_dropout_share,
        dp=cfg.dp,
        dp_noise_multiplier=cfg.dp_noise_multiplier,
        dp_delta=cfg.dp_delta,
    )
    fed = simulate(
        users_dir,
        out,
        coord_cfg,
        base=cfg.base,
        precision=cfg.precision,
        resources=SimResources(cpus_per_client=cfg.cpus_per_client),
    )
    evaluator = _Evaluator(cfg, coord_cfg, base)
    coord = Coordinator.open(coord_cfg)
    try:
        _, prior = coord.active_prior()
    finally:
        coord.close()
    prior = prior or evaluator.zero
    results: list[UserResult] = []
    bar = tqdm(users, desc="evaluating users", unit="user", disable=not progress)
    for user in bar:
        held = evaluator.blocks(user.heldout)
        train = evaluator.blocks(user.train)
        profile_dir = out / "profiles" / user.user_id
        versions = (
            Profile.open(profile_dir).versions() if (profile_dir / "profile.json").is_file() else []
        )
        personal = Profile.open(profile_dir).read(versions[-1].version)[1] if versions else None
        steps = cfg.personal_steps * max(1, len(versions))
        results.append(
            UserResult(
                id=user.user_id,
                base_loss=evaluator.loss(None, held),
                prior_loss=evaluator.loss(prior, held),
                personal_loss=evaluator.loss(personal if personal is not None else prior, held),
                local_loss=evaluator.train_from(evaluator.zero, train, held, steps),
                rounds_taken_part=len(versions),
            )
        )
    cold = _cold_start(cfg, evaluator, prior, progress=progress) if cfg.cold_start_ks else []
    result = ExperimentResult(
        users=results,
        rounds=fed.get("rounds", []),
        bytes_up_per_client=float(fed.get("bytes_up_per_client", 0.0)),
        cold_start=cold,
        privacy={"secure_aggregation": cfg.secure_aggregation, **fed.get("privacy", {})},
        seconds=time.perf_counter() - started,
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    )
    atomic_write_text(out / "results.json", result.to_json())
    atomic_write_text(out / "table.txt", format_table(result))
    _plot(result, out / "plot.png")
    return result


def _cold_start(
    cfg: ExperimentConfig, ev: _Evaluator, prior: BTensors, *, progress: bool
) -> list[dict[str, float]]:
    """A new user with k notes: from the prior versus from zero."""
    index = cfg.num_users  # a persona that never took part
    newcomer = generate_personas(
        PersonaConfig(num_users=index + 1, notes_per_user=cfg.notes_per_user, seed=cfg.seed)
    )[index]
    held = ev.blocks([Example(text=t) for t in newcomer.heldout])
    notes = generate_notes(index, max(cfg.cold_start_ks), seed=cfg.seed)
    rows = []
    for k in tqdm(cfg.cold_start_ks, desc="cold start", unit="k", disable=not progress):
        train = ev.blocks([Example(text=t) for t in notes[:k]])
        rows.append(
            {
                "k": float(k),
                "from_prior": ev.train_from(prior, train, held, cfg.cold_start_steps),
                "from_zero": ev.train_from(ev.zero, train, held, cfg.cold_start_steps),
            }
        )
    return rows


def format_table(result: ExperimentResult) -> str:
    """Per-user and mean held-out losses (lower is better), and the cold-start rows."""
    lines = [f"{'user':<18}{'base':>9}{'prior':>9}{'local':>9}{'personal':>10}{'rounds':>8}"]
    for u in result.users:
        lines.append(
            f"{u.id:<18}{u.base_loss:9.4f}{u.prior_loss:9.4f}{u.local_loss:9.4f}{u.personal_loss:10.4f}{u.rounds_taken_part:8d}"
        )
    m = result.means()
    lines.append(
        f"{'mean':<18}{m['base_loss']:9.4f}{m['prior_loss']:9.4f}{m['local_loss']:9.4f}{m['personal_loss']:10.4f}"
    )
    lines.append(f"bytes uploaded per client per round: {result.bytes_up_per_client:,.0f}")
    if result.privacy.get("secure_aggregation"):
        lines.append("prior deltas summed with SecAgg+: the coordinator saw only their sum")
    if result.privacy.get("epsilon") is not None:
        lines.append(
            f"differential privacy ({result.privacy['dp']}): epsilon {result.privacy['epsilon']:.3g} "
            f"at delta {result.privacy['delta']:g}"
        )
    if result.cold_start:
        lines.append("")
        lines.append(f"{'cold start k':<18}{'from prior':>12}{'from zero':>12}")
        for row in result.cold_start:
            lines.append(f"{int(row['k']):<18}{row['from_prior']:12.4f}{row['from_zero']:12.4f}")
    return "\n".join(lines) + "\n"


def _plot(result: ExperimentResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, 2 if result.cold_start else 1, figsize=(11 if result.cold_start else 6, 4)
    )
    ax = axes[0] if result.cold_start else axes
    means = result.means()
    names = ["base", "prior", "local", "personal"]
    ax.bar(
        names, [means[f"{n}_loss"] for n in names], color=["#999", "#6a9fd4", "#e0a458", "#3c8d5a"]
    )
    ax.set_ylabel("held-out loss (mean over users)")
    ax.set_title("personalization")
    low = min(means.values())
    ax.set_ylim(low * 0.95, max(means.values()) * 1.02)
    if result.cold_start:
        ks = [r["k"] for r in result.cold_start]
        axes[1].plot(ks, [r["from_prior"] for r in result.cold_start], "o-", label="from prior")
        axes[1].plot(ks, [r["from_zero"] for r in result.cold_start], "o-", label="from zero")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("notes of a new user (k)")
        axes[1].set_ylabel("held-out loss")
        axes[1].set_title("cold start")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
