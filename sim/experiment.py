"""Federated personalization experiments: the table that says whether it works.

An experiment splits every user's notes three ways by a hash of their content:
**train** (what every method trains on), **validation** (the only text any choice is
made on: early stopping, the device's choice of its personal adapter) and **test**
(the figure reported, seen by nothing before). Devices in the federation get train and
validation only; the test notes stay in this process.

It then runs, on the same users, splits and base, for each seed (a seed is a cohort:
its seeded A, the devices' batch order, the baselines' initialisation and batch order):

- ``base``: the frozen base alone;
- ``local_peft``: stock peft, a full LoRA (A and B) trained on the user's text alone;
- ``local_b``: lorafleet's B-only adapter trained on the user's text alone (no
  federation), with the same early stopping the personal adapter gets;
- ``fedavg`` and ``fedavg_ft``: a FlowerTune-style FedAvg global LoRA, and that model
  fine-tuned on each user's text (the classic personalized-FL baseline);
- ``prior`` and ``personal``: lorafleet's shared prior and each user's personal adapter,
  from the real Flower federation (:func:`lorafleet.sim.runner.simulate`).

Each is scored on the test split twice: on packed ``seq_len``-token chunks of the
concatenated notes, and note by note in a fresh context (how a user meets the model);
short notes rank methods differently under the two. Device steps and tokens are counted
per user and method, the prior's steps included. A cold-start curve trains a newcomer
(a user who never took part: a real one with ``newcomers_dir``, else a synthetic one)
on k notes from the prior and from zero, with the devices' own final personalization
(:meth:`lorafleet.sim.baselines.Lab.personalize`): only the start differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from lorafleet.client.base import LoadedBase, load_base
from lorafleet.client.data import Example, encode_blocks, encode_notes, split_examples
from lorafleet.client.federated import personal_train_config
from lorafleet.client.profile import Profile
from lorafleet.client.runtime import base_dtype, resolve_device, resolve_precision
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.encoding import decode_tensors
from lorafleet.protocols.errors import DataError, SpecError
from lorafleet.protocols.federation import RoundInstruction
from lorafleet.protocols.spec import DEFAULT_TARGETS
from lorafleet.server.aggregation import AGGREGATORS
from lorafleet.server.coordinator import (
    DEFAULT_PERSONAL_A_LR,
    DEFAULT_PERSONAL_LR,
    DEFAULT_PERSONAL_LR_SHARED_A,
    SHARED_A_MODES,
    CoordinatorConfig,
    CoordinatorState,
    resolve_shared_a,
)
from lorafleet.sim.baselines import AdapterState, Lab, LabUser, fedavg_global
from lorafleet.sim.personas import (
    PersonaConfig,
    UserData,
    generate_personas,
    load_user_folders,
    write_user_folders,
)
from lorafleet.sim.runner import SimResources, simulate

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = (
    "base",
    "local_peft",
    "local_b",
    "fedavg",
    "fedavg_ft",
    "prior",
    "personal",
)
"""Every method an experiment scores, in table order."""

LABELS = {
    "base": "base",
    "local_peft": "local peft",
    "local_b": "local B",
    "fedavg": "FedAvg",
    "fedavg_ft": "FedAvg+FT",
    "prior": "prior",
    "personal": "personal",
}
_LOCAL = ("local_peft", "local_b")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the users, the federation, the baselines and the measurements."""

    output: Path = field(metadata={"help": "Folder for everything the run writes."})
    num_users: int = 8
    notes_per_user: int = 60
    users_dir: Path | None = field(
        default=None, metadata={"help": "Real per-user folders instead of personas."}
    )
    newcomers_dir: Path | None = field(
        default=None, metadata={"help": "Real users who never take part, for the cold start."}
    )
    num_rounds: int = 3
    fraction_train: float = 0.5
    personal_steps: int = field(
        default=0, metadata={"help": "Personal steps inside each round (0: only at the end)."}
    )
    prior_steps: int = 6
    personalize_steps: int = field(
        default=0,
        metadata={
            "help": "At most this many steps of personal fine-tuning from the final prior, "
            "early-stopped on validation; 0: the local-only budget."
        },
    )
    step_bound: bool = field(
        default=True,
        metadata={
            "help": "Cap the final personalization so that no user spends more device steps "
            "(prior, round 0's sketch, personal) than local-only plus FedAvg global; off: "
            "the whole personalize budget."
        },
    )
    personalize_blend: bool = field(
        default=True,
        metadata={
            "help": "Also keep blends of the prior and the fine-tuned B if they validate best."
        },
    )
    lr: float = 2e-3
    """Learning rate of B on the devices: the B-only local baseline's, and the prior's
    unless ``prior_lr`` sets its own."""
    prior_lr: float = 0.0
    """Learning rate of the devices' prior steps alone; 0: ``lr``. Its own option so a
    recipe can move the prior's rate and still read its baselines back
    (``baselines_from``): the B-only local baseline trains at ``lr``."""
    personal_lr: float = DEFAULT_PERSONAL_LR
    """Learning rate of the devices' personal steps (the newcomers' too) on the seeded A;
    0: ``lr``."""
    personal_lr_shared_a: float = DEFAULT_PERSONAL_LR_SHARED_A
    """The same on a gradient-aligned shared A (``shared_a="gradient"``): the prior's
    arm of the cold start too; its "from zero" arm is on the seeded A."""
    personal_a_lr: float = DEFAULT_PERSONAL_A_LR
    """Learning rate of A in the final personalization (a personal A); 0: seeded A."""
    prox_mu: float = 0.0
    clip_norm: float = 10.0
    server_lr: float = field(
        default=1.0,
        metadata={
            "help": "The coordinator's step along the mean of the devices' prior deltas "
            "(FedAvg's server learning rate; 1.0 is plain FedAvg), or FedAdam's step size."
        },
    )
    aggregator: str = field(
        default="fedavg",
        metadata={
            "help": "How the coordinator turns the mean prior delta into the next prior: "
            "fedavg (a step of server_lr along it) or fedadam (Adam on the coordinator, "
            "Reddi et al. 2021; its server_lr is a per-entry step size, about 1e-3)."
        },
    )
    packing: str = "fp16"
    seq_len: int = 128
    rank: int = 8
    targets: tuple[str, ...] = field(
        default=DEFAULT_TARGETS,
        metadata={"help": "The cohort's adapted modules (every method of the run uses them)."},
    )
    base: str = "default"
    precision: str = "auto"
    cold_start_ks: tuple[int, ...] = (4, 16, 64)
    cold_start_steps: int = field(
        default=0,
        metadata={
            "help": "At most this many steps for a cold-start newcomer, both starts; "
            "0: the devices' personalize budget."
        },
    )
    seed: int = 0
    seeds: tuple[int, ...] = field(
        default=(), metadata={"help": "Seeds to repeat the run with; empty: (seed,)."}
    )
    val_fraction: float = field(
        default=0.2, metadata={"help": "Share of each user's training notes for validation."}
    )
    max_train_notes: int = field(
        default=0,
        metadata={
            "help": "Keep only each user's first k training notes, cut after the three-way "
            "split so validation and test stay the same for every k; 0: all of them."
        },
    )
    baselines: bool = field(default=True, metadata={"help": "Run the reviewer's baselines."})
    baselines_from: Path | None = field(
        default=None,
        metadata={
            "help": "Read each seed's baselines from this finished experiment (same users, "
            "splits, seeds and every option the baselines depend on) instead of training "
            "them again."
        },
    )
    local_steps: int = field(
        default=0, metadata={"help": "Steps of the local-only baselines; 0: rounds x steps."}
    )
    peft_lr: float = field(default=5e-4, metadata={"help": "Learning rate of stock peft LoRA."})
    engine: str = field(
        default="ray", metadata={"help": "Flower's Ray simulation, or local (in-process)."}
    )
    cpus_per_client: float = 1.0
    secure_aggregation: bool = field(
        default=False, metadata={"help": "Sum the prior deltas with SecAgg+."}
    )
    secagg_dropout_share: float = 0.2
    dp: str = field(default="off", metadata={"help": "Differential privacy: off, central, client."})
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    shared_a: str = field(
        default="auto",
        metadata={
            "help": "The cohort's frozen A: seeded, gradient (round 0 builds a shared A "
            "from the devices' summed gradient sketches) or auto (gradient; seeded with dp)."
        },
    )

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
        if self.rank < 1:
            raise SpecError(f"experiment: rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise SpecError("experiment: targets is empty; name at least one module, e.g. q_proj")
        # One order for one set (as the spec's), so results files compare as the same run.
        object.__setattr__(self, "targets", tuple(sorted(set(self.targets))))
        if self.max_train_notes != 0 and self.max_train_notes < 2:
            raise SpecError(
                f"experiment: max_train_notes must be >= 2 (or 0 for all), got "
                f"{self.max_train_notes}"
            )
        if not 0 < self.val_fraction < 1:
            raise SpecError(f"experiment: val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.engine not in ("ray", "local"):
            raise SpecError(f"experiment: engine must be ray or local, got {self.engine!r}")
        if (
            min(
                self.local_steps, self.personalize_steps, self.personal_steps, self.cold_start_steps
            )
            < 0
        ):
            raise SpecError(
                "experiment: local, personal, personalize and cold-start steps must be >= 0"
            )
        if self.prior_steps < 1:
            raise SpecError(f"experiment: prior steps must be >= 1, got {self.prior_steps}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise SpecError(f"experiment: server-lr must be > 0, got {self.server_lr}")
        if self.aggregator not in AGGREGATORS:
            raise SpecError(
                f"experiment: aggregator must be one of {', '.join(sorted(AGGREGATORS))}, "
                f"got {self.aggregator!r}"
            )
        if not (math.isfinite(self.prior_lr) and self.prior_lr >= 0):
            raise SpecError(f"experiment: prior-lr must be >= 0 (0: --lr), got {self.prior_lr}")
        if self.baselines_from is not None and not self.baselines:
            raise SpecError(
                "experiment: --baselines-from reads baselines for the table; drop "
                "--no-baselines, or drop --baselines-from"
            )
        if self.shared_a not in SHARED_A_MODES:
            raise SpecError(
                f"experiment: shared-a must be auto, seeded or gradient, got {self.shared_a!r}"
            )
        if self.shared_a == "gradient" and self.dp != "off":
            raise SpecError(
                "experiment: --shared-a gradient has no privacy accounting for its sketch "
                "round yet; use --shared-a seeded (or auto) with --dp"
            )

    @property
    def shared_a_mode(self) -> str:
        """The kind of A the cohort runs on (``auto`` resolved: gradient, seeded with dp)."""
        return resolve_shared_a(self.shared_a, self.dp)

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds the experiment repeats over."""
        return self.seeds or (self.seed,)

    @property
    def budget_local(self) -> int:
        """Steps of each local-only baseline (and of FedAvg's local fine-tuning)."""
        return self.local_steps or self.num_rounds * self.prior_steps

    @property
    def sketch_steps(self) -> int:
        """Round 0's sketch on each device, in steps: a forward and backward per pass and batch."""
        if self.shared_a_mode != "gradient":
            return 0
        return int(CoordinatorConfig.sketch_passes) * int(CoordinatorConfig.sketch_batches)

    @property
    def budget_bound(self) -> int:
        """Issue #12's bound on each user's steps: local-only plus FedAvg global."""
        return self.budget_local + self.num_rounds * self.prior_steps

    @property
    def budget_personalize(self) -> int:
        """At most this many steps of the final personalization on each device.

        ``personalize_steps``, else the local budget; with :attr:`step_bound`, no more than
        what :attr:`budget_bound` leaves after the prior's steps, round 0's sketch and the
        rounds' personal steps (at least one step, so that every device still personalizes;
        the table then names who passed the bound). The bound is on compute, so that a
        user with many notes, whom early stopping lets run on, does not buy its margin
        with steps the baselines did not get.
        """
        budget = self.personalize_steps or self.budget_local
        if not self.step_bound:
            return budget
        spent = self.num_rounds * (self.prior_steps + self.personal_steps) + self.sketch_steps
        return max(1, min(budget, self.budget_bound - spent))

    @property
    def budget_cold_start(self) -> int:
        """At most this many steps for a cold-start newcomer (from the prior or zero).

        A newcomer spent no prior steps, so the bound leaves it the whole budget.
        """
        return self.cold_start_steps or self.personalize_steps or self.budget_local


@dataclass(frozen=True)
class Split:
    """One user's three-way split (examples, not tokens)."""

    user_id: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    train_available: int | None = None
    """Training notes the split gave before :meth:`truncated` kept fewer; None: all kept."""

    def truncated(self, k: int) -> Split:
        """The same split with only the first ``k`` training notes (all when fewer).

        Validation and test are untouched, so runs at different ``k`` are scored on the
        same notes.
        """
        return replace(self, train=self.train[:k], train_available=len(self.train))

    def record(self) -> dict[str, Any]:
        """Short content hashes of each side, and the training notes kept, for results.json."""

        def ids(side: list[Example]) -> list[str]:
            return [hashlib.sha256(e.content_key()).hexdigest()[:12] for e in side]

        available = len(self.train) if self.train_available is None else self.train_available
        return {
            "train": ids(self.train),
            "val": ids(self.val),
            "test": ids(self.test),
            "train_kept": len(self.train),
            "train_available": available,
        }


def three_way_split(user: UserData, val_fraction: float) -> Split:
    """Test = the user's held-out side; validation split off the train side by hash.

    Both cuts come from :func:`lorafleet.client.data.split_examples` (by a hash of the
    content, not by position), so they are the same on every machine and seed.
    """
    try:
        train, val = split_examples(user.train, val_fraction, seed=1, min_train=2, min_heldout=1)
    except DataError as exc:
        raise DataError(f"user {user.user_id}: {exc}") from None
    return Split(user.user_id, train, val, list(user.heldout))


@dataclass
class UserResult:
    """One user in one seed: test/validation losses and compute per method."""

    id: str
    test: dict[str, float]
    test_notes: dict[str, float]
    val: dict[str, float]
    steps: dict[str, int]
    tokens: dict[str, int]
    personal_versions: int
    """Personal adapter versions the device saved (rounds with personal steps, the final
    personalization)."""


@dataclass
class SeedRun:
    """Everything one seed measured."""

    seed: int
    users: list[UserResult]
    rounds: list[dict[str, Any]]
    bytes_up_per_client: float
    cold_start: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    """Wall time of this seed's federation, baselines and cold start (0 in files older
    than the field): a seed reused from an earlier command keeps its own time."""


@dataclass
class ExperimentResult:
    """The whole experiment; ``to_json`` is the results file's content."""

    runs: list[SeedRun]
    split: dict[str, dict[str, Any]]
    seconds: float = 0.0
    """Wall time of every seed, those reused from an earlier command included."""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The methods every run scored, in table order."""
        have = set.intersection(*(set(u.test) for r in self.runs for u in r.users))
        return [m for m in METHODS if m in have]

    def per_user(self, metric: str = "test") -> dict[str, dict[str, tuple[float, float]]]:
        """``{user: {method: (mean over seeds, std over seeds)}}``."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for uid in [u.id for u in self.runs[0].users]:
            rows = [next(u for u in r.users if u.id == uid) for r in self.runs]
            out[uid] = {}
            for m in self.methods:
                values = np.array([getattr(row, metric)[m] for row in rows])
                out[uid][m] = (float(values.mean()), float(values.std()))
        return out

    def means(self, metric: str = "test") -> dict[str, tuple[float, float]]:
        """``{method: (mean over users and seeds, std over seeds of the user mean)}``."""
        out = {}
        for m in self.methods:
            per_seed = [np.mean([getattr(u, metric)[m] for u in r.users]) for r in self.runs]
            out[m] = (float(np.mean(per_seed)), float(np.std(per_seed)))
        return out

    def wins(self, metric: str = "test") -> dict[str, int]:
        """Users where personal <= min(local-only, FedAvg global), strictly and within spread.

        Local-only is the better of stock peft and lorafleet's B-only local adapter for
        that user; "within spread" allows the larger of the two methods' seed std.
        """
        strict = spread = 0
        for by_method in self.per_user(metric).values():
            candidates = [m for m in (*_LOCAL, "fedavg") if m in by_method]
            if not candidates or "personal" not in by_method:
                continue
            best = min(candidates, key=lambda m: by_method[m][0])
            p_mean, p_std = by_method["personal"]
            b_mean, b_std = by_method[best]
            strict += p_mean <= b_mean
            spread += p_mean <= b_mean + max(p_std, b_std)
        return {"strict": strict, "within_spread": spread, "users": len(self.per_user(metric))}

    def margin(self, metric: str = "test") -> float | None:
        """How far personal's mean is below min(mean local-only, mean FedAvg), as a fraction."""
        means = self.means(metric)
        ref = [means[m][0] for m in (*_LOCAL, "fedavg") if m in means]
        if "personal" not in means or not ref:
            return None
        return 1.0 - means["personal"][0] / min(ref)

    def steps_per_user(self) -> dict[str, float]:
        """``{method: device steps per user}``, the mean over users and seeds."""
        return {
            m: float(np.mean([u.steps[m] for r in self.runs for u in r.users]))
            for m in self.methods
        }

    def steps_most_per_user(self) -> dict[str, int]:
        """``{method: the most device steps any user spent}``, over users and seeds.

        The mean hides the large users: early stopping ends a small user's personal
        steps within a few, while a user with many notes may run on to the budget.
        """
        return {m: max(u.steps[m] for r in self.runs for u in r.users) for m in self.methods}

    def steps_over_budget(self) -> tuple[int | None, list[tuple[str, int, int]]]:
        """Issue #12's compute bound and the ``(user, seed, steps)`` of lorafleet over it.

        The bound is what a user would spend on local-only and FedAvg global training
        together: each user's own baseline steps where the run has them, else the
        config's local budget plus FedAvg's rounds times steps. lorafleet's personal
        figure counts the prior's steps (round 0's sketch included) and the final
        personalization's. ``(None, [])`` when the run has no personal adapter.
        """
        if "personal" not in self.methods:
            return None, []
        cfg = self.config
        # FedAvg counted as if the user joined every round, as lorafleet's prior steps are
        # (a user sampled in fewer rounds took fewer of both); its own steps without a config.
        fedavg = int(cfg.get("num_rounds", 0)) * int(cfg.get("prior_steps", 0))
        local_budget = int(cfg.get("local_steps") or 0) or fedavg
        bound: int | None = None
        over: list[tuple[str, int, int]] = []
        for r in self.runs:
            for u in r.users:
                local = max((u.steps[m] for m in _LOCAL if m in u.steps), default=local_budget)
                limit = local + (fedavg or u.steps.get("fedavg", 0))
                bound = limit if bound is None else max(bound, limit)
                if u.steps["personal"] > limit:
                    over.append((u.id, r.seed, u.steps["personal"]))
        return bound, over

    def to_json(self) -> str:
        """The results file: config, split, every seed's users and the summary."""
        summary: dict[str, Any] = {
            metric: {
                "mean": {m: v[0] for m, v in self.means(metric).items()},
                "std_over_seeds": {m: v[1] for m, v in self.means(metric).items()},
                "wins": self.wins(metric),
                "margin": self.margin(metric),
            }
            for metric in ("test", "test_notes", "val")
        }
        summary["steps_per_user"] = self.steps_per_user()
        summary["steps_most_per_user"] = self.steps_most_per_user()
        bound, over = self.steps_over_budget()
        summary["steps_budget"] = {
            "local_plus_fedavg": bound,
            "over": [{"user": u, "seed": seed, "steps": n} for u, seed, n in over],
        }
        record = {
            "config": self.config,
            "split": self.split,
            "runs": [asdict(r) for r in self.runs],
            "summary": summary,
            "seconds": self.seconds,
        }
        return json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"


# ------------------------------------------------------------------------- running
def _load_users(cfg: ExperimentConfig, out: Path) -> tuple[list[UserData], list[UserData]]:
    """The federation's users and the cold start's newcomers."""
    if cfg.users_dir is not None:
        users = load_user_folders(Path(cfg.users_dir))
        if cfg.newcomers_dir is not None:
            return users, load_user_folders(Path(cfg.newcomers_dir))
        if not cfg.cold_start_ks or len(users) < 3:  # no curve asked for: nobody sits out
            return users, []
        # No newcomer given: the user with the most notes sits the federation out.
        newcomer = max(users, key=lambda u: (len(u.train), u.user_id))
        log.warning("cold start: %s sits the federation out as the newcomer", newcomer.user_id)
        return [u for u in users if u is not newcomer], [newcomer]
    personas = generate_personas(
        PersonaConfig(num_users=cfg.num_users + 1, notes_per_user=cfg.notes_per_user, seed=cfg.seed)
    )
    users_dir = out / "users"
    if not users_dir.exists():
        write_user_folders(personas[: cfg.num_users], users_dir)
    newcomer = UserData(
        personas[-1].user_id,
        [Example(text=t) for t in personas[-1].train],
        [Example(text=t) for t in personas[-1].heldout],
    )
    return load_user_folders(users_dir), [newcomer]


def _write_devices(splits: Sequence[Split], root: Path) -> Path:
    """Each device's folder: train.jsonl and heldout.jsonl (= validation), never test."""
    for s in splits:
        for name, side in (("train", s.train), ("heldout", s.val)):
            lines = [json.dumps(_example_json(e), ensure_ascii=False) for e in side]
            atomic_write_text(root / s.user_id / f"{name}.jsonl", "\n".join(lines) + "\n")
    return root


def _example_json(example: Example) -> dict[str, Any]:
    if example.text is not None:
        return {"text": example.text}
    assert example.messages is not None
    return {"messages": [{"role": r, "content": c} for r, c in example.messages]}


class _Scorer:
    """Token blocks of every user, and the losses of a method's states on them."""

    def __init__(self, lab: Lab, base: LoadedBase, splits: Sequence[Split], seq_len: int):
        tok = base.tokenizer
        self.lab = lab
        self.users = [
            LabUser(
                s.user_id,
                encode_blocks(s.train, tok, seq_len=seq_len),
                encode_blocks(s.val, tok, seq_len=seq_len),
                len(s.train),
            )
            for s in splits
        ]
        self.test = {s.user_id: encode_blocks(s.test, tok, seq_len=seq_len) for s in splits}
        self.test_notes = {
            s.user_id: encode_notes(s.test, tok, max_len=2 * seq_len) for s in splits
        }

    def score(self, state: AdapterState | None, user: LabUser) -> tuple[float, float, float]:
        """(test packed, test note by note, validation packed)."""
        return (
            self.lab.loss(state, self.test[user.user_id]),
            self.lab.loss(state, self.test_notes[user.user_id]),
            self.lab.loss(state, user.val),
        )


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> ExperimentResult:
    """Run every seed's federation, baselines and measurements; writes the results.

    Writes ``results.json`` (config, split, every seed and the summary), ``table.txt``
    and ``plot.png`` into ``cfg.output``.
    """
    started = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    users, newcomers = _load_users(cfg, out)
    splits = [three_way_split(u, cfg.val_fraction) for u in users]
    if cfg.max_train_notes:
        splits = [s.truncated(cfg.max_train_notes) for s in splits]
    split = json.loads(json.dumps({s.user_id: s.record() for s in splits}, default=str))
    config = config_record(cfg)
    source = cfg.baselines_from  # None, or with baselines on (__post_init__ checks)
    # With borrowed baselines, a seed run before with --no-baselines is the same run: its
    # federation is reused and the borrowed baselines complete its table.
    done = _finished_seeds(
        out / "results.json",
        config,
        split,
        ignore=("baselines", "baselines_from") if source is not None else (),
    )
    borrowed: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
    if source is not None:
        # Checked before the base loads: a mismatch is found in a second, not after a run.
        wanted = [s for s in cfg.run_seeds if s not in done or not _has_baselines(done[s])]
        borrowed = read_baselines(Path(source), config, split, wanted)
    for seed, run in done.items():
        if seed in borrowed:
            _add_baselines(run.users, borrowed[seed])
            log.info("seed %d: baselines read from %s", seed, source)
    # Load the base here first: it converts the default GGUF once before the workers start.
    dev = resolve_device("auto")
    precision = resolve_precision(cfg.precision, dev)  # type: ignore[arg-type]
    base = load_base(cfg.base, dtype=base_dtype(precision, dev))
    coord_cfg = _coordinator_config(cfg, base, out / "seed-0", seed=0, num_users=len(users))
    lab = Lab(base, coord_cfg.spec, precision=precision, device=str(dev))
    scorer = _Scorer(lab, base, splits, cfg.seq_len)
    runs: list[SeedRun] = []
    # The run's wall time: this command's, plus what the seeds it reuses took in theirs.
    reused = sum(done[s].seconds for s in cfg.run_seeds if s in done)

    def elapsed() -> float:
        return time.perf_counter() - started + reused

    for seed in cfg.run_seeds:
        if seed in done:
            log.info(
                "seed %d: reused from %s (same options and splits)", seed, out / "results.json"
            )
            runs.append(done[seed])
        else:
            runs.append(
                _run_seed(
                    cfg,
                    seed,
                    base,
                    lab,
                    scorer,
                    splits,
                    newcomers,
                    progress=progress,
                    borrowed=borrowed.get(seed),
                )
            )
        if len(runs) < len(cfg.run_seeds):
            # Keep every finished seed on disk (the reusable ones not reached yet too), so
            # a stopped multi-seed run resumes here and loses nothing it had.
            later = [done[s] for s in cfg.run_seeds[len(runs) :] if s in done]
            partial = ExperimentResult(runs + later, split, elapsed(), config)
            atomic_write_text(out / "results.json", partial.to_json())
    result = ExperimentResult(runs=runs, split=split, seconds=elapsed(), config=config)
    atomic_write_text(out / "results.json", result.to_json())
    atomic_write_text(out / "table.txt", format_table(result))
    _plot(result, out / "plot.png")
    return result


_SEED_KEYS = ("seed", "seeds", "output")
"""Config keys that may differ between a finished results.json and a run that reuses it."""


def config_record(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as results.json stores it (paths as strings, tuples as lists)."""
    raw = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    loaded: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    return loaded


_LATER_OPTIONS: dict[str, Any] = {
    "step_bound": False,
    "baselines_from": None,
    "shared_a": "seeded",
    "targets": list(DEFAULT_TARGETS),
    "server_lr": 1.0,
    "prior_lr": 0.0,
    "aggregator": "fedavg",
}
"""Options newer than some results files, with the value those files' runs had."""


def changed_options(
    have: Mapping[str, Any], want: Mapping[str, Any], ignore: Collection[str]
) -> list[str]:
    """Config keys (of ``want``, as :func:`config_record` gives them) whose values differ.

    ``have`` may come from an older results file: options added since count at the value
    those runs had (:data:`_LATER_OPTIONS`; a gradient-A run before
    ``personal_lr_shared_a`` personalized at ``personal_lr``), and the shared A's rate
    is no difference on the seeded A, where nothing uses it.
    """
    old = {**_LATER_OPTIONS, **have}
    old.setdefault("personal_lr_shared_a", old.get("personal_lr"))
    new = dict(want)
    # ``auto`` is compared as what it ran on: a gradient-A run is the same run either way.
    for record in (old, new):
        if "shared_a" in record:
            record["shared_a"] = resolve_shared_a(record["shared_a"], record.get("dp", "off"))
    skip = set(ignore)
    if new.get("shared_a", "seeded") == "seeded":
        skip.add("personal_lr_shared_a")
    return sorted(k for k in new if k not in skip and old.get(k) != new[k])


def _finished_seeds(
    path: Path,
    config: dict[str, Any],
    split: dict[str, dict[str, Any]],
    *,
    ignore: Collection[str] = (),
) -> dict[int, SeedRun]:
    """Seeds a results.json already holds, if it was run with these options and splits.

    Seeds are independent runs, so on a small machine a user adds seeds one command at a
    time (``--seeds 0``, then ``--seeds 0,1`` into the same folder) and a stopped
    multi-seed run resumes after its last finished seed. A file from other options is
    not reused (and is replaced, as before); ``ignore`` names options that may differ
    too (``--baselines-from`` completes a ``--no-baselines`` run).
    """
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        # Options added later, absent from older files, which ran with their default.
        changed = changed_options(record.get("config", {}), config, {*_SEED_KEYS, *ignore})
        if changed or record.get("split") != split:
            what = ", ".join(changed) if changed else "the users' splits"
            log.warning("%s was run with other %s: not reusing its seeds", path, what)
            return {}
        return {int(r["seed"]): _seed_run(r) for r in record.get("runs", [])}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s is not a readable results file (%s): not reusing it", path, exc)
        return {}


BASELINE_METHODS: tuple[str, ...] = ("local_peft", "local_b", "fedavg", "fedavg_ft")
"""The reviewer's baselines: what ``--baselines-from`` reads instead of training."""

_RECIPE_ONLY = frozenset(
    {
        "baselines_from",
        "users_dir",  # the split's note hashes are the check, not where the folder lies
        "newcomers_dir",
        "cold_start_ks",
        "cold_start_steps",
        "personal_steps",
        "personalize_steps",
        "personalize_blend",
        "step_bound",
        "prior_lr",
        "personal_lr",
        "personal_lr_shared_a",
        "personal_a_lr",
        "prox_mu",
        "clip_norm",
        "server_lr",
        "aggregator",
        "packing",
        "engine",
        "cpus_per_client",
        "secure_aggregation",
        "secagg_dropout_share",
        "dp",
        "dp_noise_multiplier",
        "dp_delta",
        "shared_a",
    }
)
"""Options only lorafleet's own methods (prior, personal, cold start) depend on.

Every other option (the base, precision, rank, targets, ``lr`` of the B-only local
baseline, the rounds and steps FedAvg runs, the local budget, ``peft_lr``, the sequence
length, the validation share) shapes a baseline, so it must match to read one back.
"""


def read_baselines(
    source: Path,
    config: Mapping[str, Any],
    split: Mapping[str, Any],
    seeds: Sequence[int],
) -> dict[int, dict[str, dict[str, dict[str, Any]]]]:
    """Each seed's baseline figures from a finished experiment, checked to be comparable.

    A recipe change (the prior's aggregation, the personal rate, the blend) leaves the
    baselines as they were, and they are most of an experiment's time (about 27 of 38
    minutes a seed on fortunes on a 2-core CPU). Reading them back is only honest if they were
    trained on the same users, splits and seeds with every option they depend on
    unchanged; anything else raises :class:`SpecError` naming what differs. Returns
    ``{seed: {user: {"test" | "test_notes" | "val" | "steps" | "tokens": {method:
    value}}}}``.
    """
    path = source / "results.json" if source.is_dir() else source
    where = f"experiment: --baselines-from {source}"
    if not path.is_file():
        raise SpecError(f"{where}: no results.json there; name a finished experiment's folder")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        have = dict(record["config"])
        runs = {int(r["seed"]): r for r in record["runs"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{where}: not a readable results file ({exc})") from None
    if have.get("baselines") is False:
        raise SpecError(f"{where} ran with --no-baselines: it has none to read")
    changed = changed_options(have, config, {*_SEED_KEYS, *_RECIPE_ONLY, "baselines"})
    if changed:
        raise SpecError(
            f"{where} trained its baselines with other {', '.join(changed)}; "
            "use the same options, or drop --baselines-from to train them here"
        )
    if record.get("split") != split:
        raise SpecError(
            f"{where} has other users or splits (its results.json records each side's "
            "note hashes); point it at a run on the same users"
        )
    missing = [s for s in seeds if s not in runs]
    if missing:
        raise SpecError(
            f"{where} has no seed {', '.join(map(str, missing))} (it has "
            f"{', '.join(map(str, sorted(runs))) or 'none'}); run those seeds there first"
        )
    kinds = ("test", "test_notes", "val", "steps", "tokens")
    out: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
    for seed in seeds:
        users: dict[str, dict[str, dict[str, Any]]] = {}
        for user in runs[seed]["users"]:
            try:
                users[user["id"]] = {k: {m: user[k][m] for m in BASELINE_METHODS} for k in kinds}
            except (KeyError, TypeError):
                raise SpecError(
                    f"{where}: seed {seed} has no baselines for user {user.get('id')} "
                    "(it ran with --no-baselines)"
                ) from None
        out[seed] = users
    return out


def _has_baselines(run: SeedRun) -> bool:
    return all(m in u.test for u in run.users for m in BASELINE_METHODS)


def _add_baselines(
    users: Iterable[UserResult], borrowed: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> None:
    """Put :func:`read_baselines`'s figures for one seed into its users' results."""
    for res in users:
        for kind, by_method in borrowed[res.id].items():
            getattr(res, kind).update(by_method)


def _seed_run(raw: dict[str, Any]) -> SeedRun:
    """A seed's record from results.json, back as a :class:`SeedRun`."""
    return SeedRun(
        seed=int(raw["seed"]),
        users=[UserResult(**u) for u in raw["users"]],
        rounds=list(raw.get("rounds", [])),
        bytes_up_per_client=float(raw.get("bytes_up_per_client", 0.0)),
        cold_start=list(raw.get("cold_start", [])),
        privacy=dict(raw.get("privacy", {})),
        seconds=float(raw.get("seconds", 0.0)),
    )


def _coordinator_config(
    cfg: ExperimentConfig, base: LoadedBase, run_dir: Path, *, seed: int, num_users: int
) -> CoordinatorConfig:
    return CoordinatorConfig(
        num_rounds=cfg.num_rounds,
        fraction_train=cfg.fraction_train,
        min_train_nodes=min(2, num_users),
        min_available_nodes=num_users,
        personal_steps=cfg.personal_steps,
        prior_steps=cfg.prior_steps,
        personalize_steps=cfg.budget_personalize,
        personalize_blend=cfg.personalize_blend,
        # The coordinator's lr is the prior's; the personal rates' "0: lr" stays --lr's.
        lr=cfg.prior_lr or cfg.lr,
        personal_lr=cfg.personal_lr or cfg.lr,
        personal_lr_shared_a=cfg.personal_lr_shared_a or cfg.lr,
        personal_a_lr=cfg.personal_a_lr,
        prox_mu=cfg.prox_mu,
        clip_norm=cfg.clip_norm,
        server_lr=cfg.server_lr,
        aggregator=cfg.aggregator,
        seq_len=cfg.seq_len,
        packing=cfg.packing,
        rank=cfg.rank,
        target_modules=",".join(cfg.targets),
        base_model_id=base.model_id,
        base_sha256=base.sha256,
        data_dir=str(run_dir / "coordinator"),
        final_evaluation=False,
        seed=seed,
        # Each seed is its own cohort: another seeded A, and with it another batch order on
        # every device, so the spread covers lorafleet's randomness, not only the baselines'.
        cohort_seed=seed,
        secure_aggregation=cfg.secure_aggregation,
        secagg_dropout_share=cfg.secagg_dropout_share,
        dp=cfg.dp,
        dp_noise_multiplier=cfg.dp_noise_multiplier,
        dp_delta=cfg.dp_delta,
        shared_a=cfg.shared_a,
    )


def _run_seed(
    cfg: ExperimentConfig,
    seed: int,
    base: LoadedBase,
    lab: Lab,
    scorer: _Scorer,
    splits: Sequence[Split],
    newcomers: Sequence[UserData],
    *,
    progress: bool,
    borrowed: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> SeedRun:
    """One seed: the federation, lorafleet's scores, the baselines (or ``borrowed``'s)."""
    started = time.perf_counter()
    run_dir = Path(cfg.output) / f"seed-{seed}"
    devices = _write_devices(splits, run_dir / "devices")
    coord_cfg = _coordinator_config(cfg, base, run_dir, seed=seed, num_users=len(splits))
    lab.use_spec(coord_cfg.spec)
    fed = simulate(
        devices,
        run_dir,
        coord_cfg,
        base=cfg.base,
        precision=cfg.precision,
        resources=SimResources(cpus_per_client=cfg.cpus_per_client),
        engine=cfg.engine,
    )
    coord = CoordinatorState.open(coord_cfg)
    try:
        _, prior_b = coord.active_prior()
        shared = coord.shared_a()
    finally:
        coord.close()
    # A gradient-aligned shared A: the prior (B only) is scored on it; the baselines and
    # the cold start's "from zero" stay on the seeded A, which needs no federation.
    prior_a = decode_tensors(shared[1])[0] if shared is not None else None
    lab.use_a(prior_a)
    prior: AdapterState = prior_b or lab.zero_b
    # Prior steps are counted as if every user took part in every round: exact with
    # fraction 1.0, an upper bound (against lorafleet) otherwise.
    prior_steps = cfg.num_rounds * cfg.prior_steps + (cfg.sketch_steps if shared is not None else 0)
    tokens_per_step = 4 * cfg.seq_len  # batch size 4 of seq_len blocks (an upper bound)

    results: dict[str, UserResult] = {}
    for user in scorer.users:
        profile_dir = run_dir / "profiles" / user.user_id
        versions = (
            Profile.open(profile_dir).versions() if (profile_dir / "profile.json").is_file() else []
        )
        personal = prior
        if versions:
            _, b, a = Profile.open(profile_dir).read(versions[-1].version)
            # a personal A makes it a full LoRA, which the lab scores as such
            personal = (
                b
                if a is None
                else {
                    **{f"{k}:A": v for k, v in a.items()},
                    **{f"{k}:B": v for k, v in b.items()},
                }
            )
        res = UserResult(user.user_id, {}, {}, {}, {}, {}, len(versions))
        taken = prior_steps + sum(int(v.metrics.get("steps", 0)) for v in versions)
        for method, state, steps in (
            ("base", None, 0),
            ("prior", prior, prior_steps),
            ("personal", personal, taken),
        ):
            _record(res, method, scorer.score(state, user), steps, tokens_per_step)
        results[user.user_id] = res

    lab.use_a(None)
    if borrowed is not None:
        _add_baselines(results.values(), borrowed)
    elif cfg.baselines:
        _run_baselines(cfg, seed, lab, scorer, results, tokens_per_step, progress=progress)
    cold = (
        cold_start_curve(cfg, lab, base, prior, newcomers, progress=progress, prior_a=prior_a)
        if cfg.cold_start_ks and newcomers
        else []
    )
    return SeedRun(
        seed=seed,
        users=[results[u.user_id] for u in scorer.users],
        rounds=fed.get("rounds", []),
        bytes_up_per_client=float(fed.get("bytes_up_per_client", 0.0)),
        cold_start=cold,
        privacy={"secure_aggregation": cfg.secure_aggregation, **fed.get("privacy", {})},
        seconds=time.perf_counter() - started,
    )


def _record(
    res: UserResult,
    method: str,
    scores: tuple[float, float, float],
    steps: int,
    tokens_per_step: int,
) -> None:
    res.test[method], res.test_notes[method], res.val[method] = scores
    res.steps[method] = steps
    res.tokens[method] = steps * tokens_per_step


def _train_config(cfg: ExperimentConfig, seed: int, *, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(
        steps=max(1, steps),
        lr=lr,
        precision=resolve_precision(cfg.precision, resolve_device("auto")),  # type: ignore[arg-type]
        device="auto",
        warmup_steps=min(5, steps // 4),
        eval_every=max(1, steps // 8),
        patience=3,
        seed=seed,
    )


def _run_baselines(
    cfg: ExperimentConfig,
    seed: int,
    lab: Lab,
    scorer: _Scorer,
    results: dict[str, UserResult],
    tokens_per_step: int,
    *,
    progress: bool,
) -> None:
    """Local-only (stock peft and B-only), FedAvg global and FedAvg fine-tuned, per user."""
    steps = cfg.budget_local
    peft_cfg = replace(_train_config(cfg, seed, steps=steps, lr=cfg.peft_lr), eval_every=0)
    b_cfg = _train_config(cfg, seed, steps=steps, lr=cfg.lr)
    bar = tqdm(scorer.users, desc=f"baselines (seed {seed})", unit="user", disable=not progress)
    for user in bar:
        res = results[user.user_id]
        state, _ = lab.train(lab.peft_init(seed), user.train, peft_cfg)
        _record(res, "local_peft", scorer.score(state, user), steps, tokens_per_step)
        state, taken = lab.train(lab.zero_b, user.train, b_cfg, val=user.val)
        _record(res, "local_b", scorer.score(state, user), taken, tokens_per_step)
    global_state, spent = fedavg_global(
        lab,
        scorer.users,
        rounds=cfg.num_rounds,
        steps=cfg.prior_steps,
        fraction=cfg.fraction_train,
        lr=cfg.peft_lr,
        seed=seed,
        precision=lab.precision,
        device=str(lab.device),
    )
    for user in scorer.users:
        res = results[user.user_id]
        _record(
            res, "fedavg", scorer.score(global_state, user), spent[user.user_id], tokens_per_step
        )
        state, _ = lab.train(global_state, user.train, peft_cfg)
        total = spent[user.user_id] + steps
        _record(res, "fedavg_ft", scorer.score(state, user), total, tokens_per_step)


def cold_start_curve(
    cfg: ExperimentConfig,
    lab: Lab,
    base: LoadedBase,
    prior: AdapterState,
    newcomers: Sequence[UserData],
    *,
    progress: bool,
    prior_a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
) -> list[dict[str, Any]]:
    """A newcomer with k notes, trained from the prior and from zero; test loss, averaged.

    Early stopping on the newcomer's validation notes, test notes reported, as for the
    federation's users; k larger than a newcomer's training notes is skipped for them.
    Each row also holds the prior alone (no training) on the same newcomers, and
    ``per_newcomer`` the three figures of each newcomer, which
    :func:`cold_start_wins` compares across k. ``lab``
    must hold the cohort's seeded A (:meth:`Lab.use_spec`); ``prior`` was trained on it,
    or on ``prior_a`` (a shared A), which the prior's arm then starts from. Zero starts
    from the seeded A: a newcomer without the federation has nothing else.
    """
    tok = base.tokenizer
    rows = []
    # A newcomer personalizes exactly as the federation's devices do in their final round
    # (the same recipe, budget, early stopping and blend with the start): only the start
    # differs, the prior or zero (for zero the "blend" shrinks the trained B toward it).
    instr = RoundInstruction(
        round=cfg.num_rounds + 1,
        spec=lab.spec,
        prior_version="cold-start",
        mode="personalize",
        personal_steps=cfg.budget_cold_start,
        prior_steps=0,
        lr=cfg.lr,
        personal_lr=cfg.personal_lr,
        personal_a_lr=cfg.personal_a_lr,
        prox_mu=cfg.prox_mu,
        seq_len=cfg.seq_len,
        blend=cfg.personalize_blend,
    )
    # Each arm at the personal rate of the A it trains on (the prior's, or the seeded).
    prior_rate = cfg.personal_lr if prior_a is None else cfg.personal_lr_shared_a
    configs = [
        personal_train_config(
            replace(instr, personal_lr=rate), precision=lab.precision, device=str(lab.device)
        )
        for rate in (prior_rate, cfg.personal_lr)
    ]
    # Each newcomer's split, validation and test blocks and the prior's test loss do not
    # depend on k: once per newcomer.
    prepared = []
    for newcomer in newcomers:
        split = three_way_split(newcomer, cfg.val_fraction)
        val = encode_blocks(split.val, tok, seq_len=cfg.seq_len)
        test = encode_blocks(split.test, tok, seq_len=cfg.seq_len)
        lab.use_a(prior_a)
        prior_test = lab.loss(prior, test)
        lab.use_a(None)
        prepared.append((newcomer.user_id, split.train, val, test, prior_test))
    arms = ((prior, prior_a, configs[0], "from_prior"), (lab.zero_b, None, configs[1], "from_zero"))
    for k in tqdm(cfg.cold_start_ks, desc="cold start", unit="k", disable=not progress):
        per_newcomer: dict[str, dict[str, float]] = {}
        for name, notes, val, test, prior_loss in prepared:
            if len(notes) < k:
                continue
            train = encode_blocks(notes[:k], tok, seq_len=cfg.seq_len)
            figures = {"prior_alone": prior_loss}
            for start, a, config, arm in arms:
                lab.use_a(a)
                state, _, _ = lab.personalize(start, train, val, config, blend=instr.blend)
                figures[arm] = lab.loss(state, test)
            lab.use_a(None)
            per_newcomer[name] = figures
        if per_newcomer:
            means = {
                key: float(np.mean([f[key] for f in per_newcomer.values()]))
                for key in ("from_prior", "from_zero", "prior_alone")
            }
            rows.append(
                {
                    "k": float(k),
                    **means,
                    "newcomers": float(len(per_newcomer)),
                    "per_newcomer": per_newcomer,
                }
            )
    return rows


def cold_start_wins(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int, int, int] | None:
    """On how many newcomers the smallest k from the prior beats the largest from zero.

    The issue's "16 notes plus the prior beat 64 from zero", per newcomer rather than on
    the mean: (small k, large k, wins, newcomers counted). Only newcomers with both k count. None with fewer than two k, or for rows from
    older results files, which kept only the means.
    """
    if len(rows) < 2 or any("per_newcomer" not in row for row in rows):
        return None
    small = min(rows, key=lambda row: row["k"])
    large = max(rows, key=lambda row: row["k"])
    both = set(small["per_newcomer"]) & set(large["per_newcomer"])
    wins = sum(
        small["per_newcomer"][n]["from_prior"] < large["per_newcomer"][n]["from_zero"] for n in both
    )
    return int(small["k"]), int(large["k"]), wins, len(both)


# ------------------------------------------------------------------------- reporting
def _table(result: ExperimentResult, metric: str, title: str) -> list[str]:
    methods = result.methods
    per_user = result.per_user(metric)
    width = max(12, *(len(u) + 2 for u in per_user))
    head = f"{'user':<{width}}" + "".join(f"{LABELS[m]:>12}" for m in methods)
    lines = [title, head]
    for uid, by_method in per_user.items():
        lines.append(f"{uid:<{width}}" + "".join(f"{by_method[m][0]:12.4f}" for m in methods))
    means = result.means(metric)
    lines.append(f"{'mean':<{width}}" + "".join(f"{means[m][0]:12.4f}" for m in methods))
    if len(result.runs) > 1:
        lines.append(f"{'± seeds':<{width}}" + "".join(f"{means[m][1]:12.4f}" for m in methods))
    wins = result.wins(metric)
    margin = result.margin(metric)
    if "personal" in methods and margin is not None:
        lines.append(
            f"personal <= min(local-only, FedAvg global) on {wins['strict']}/{wins['users']} users "
            f"({wins['within_spread']}/{wins['users']} within the seeds' spread); "
            + (
                f"mean {100 * margin:.1f}% below (better than) the better of the two"
                if margin >= 0
                else f"mean {-100 * margin:.1f}% above (worse than) the better of the two"
            )
        )
    return lines


def cold_start_means(
    result: ExperimentResult,
) -> list[tuple[float, float, float, float | None]]:
    """Per k of the first seed's curve: (k, from prior, from zero, prior alone), seed means.

    The prior alone is None for older results files, whose rows do not have it.
    """
    out = []
    for k in [row["k"] for row in result.runs[0].cold_start]:
        rows = [row for r in result.runs for row in r.cold_start if row["k"] == k]
        alone = [row["prior_alone"] for row in rows if "prior_alone" in row]
        out.append(
            (
                k,
                float(np.mean([row["from_prior"] for row in rows])),
                float(np.mean([row["from_zero"] for row in rows])),
                float(np.mean(alone)) if alone else None,
            )
        )
    return out


def format_table(result: ExperimentResult) -> str:
    """Test-split tables (packed and note by note), compute per user, cold start."""
    seeds = ", ".join(str(r.seed) for r in result.runs)
    lines = _table(result, "test", f"test loss, packed chunks (lower is better; seeds {seeds})")
    lines.append("")
    lines.extend(_table(result, "test_notes", "test loss, note by note"))
    lines.append("")
    steps, most = result.steps_per_user(), result.steps_most_per_user()
    lines.append(
        "device steps per user (mean, most): "
        + ", ".join(
            f"{LABELS[m]} {steps[m]:.0f}" + (f" ({most[m]})" if most[m] != round(steps[m]) else "")
            for m in result.methods
            if m != "base"
        )
    )
    bound, over = result.steps_over_budget()
    if bound is not None:
        lines.append(
            f"lorafleet's steps against local-only plus FedAvg ({bound}): "
            + (
                "within it for every user"
                if not over
                else "over it for " + ", ".join(f"{uid} {n} (seed {seed})" for uid, seed, n in over)
            )
        )
    run = result.runs[0]
    lines.append(f"bytes uploaded per client per round: {run.bytes_up_per_client:,.0f}")
    if run.privacy.get("secure_aggregation"):
        lines.append("prior deltas summed with SecAgg+: the coordinator saw only their sum")
    if result.config.get("baselines_from"):
        lines.append(
            f"baselines read from {result.config['baselines_from']} (same users, splits, "
            "seeds and baseline options), not trained in this run"
        )
    if run.privacy.get("epsilon") is not None:
        lines.append(
            f"differential privacy ({run.privacy['dp']}): epsilon {run.privacy['epsilon']:.3g} "
            f"at delta {run.privacy['delta']:g}"
        )
    if run.cold_start:
        lines.append("")
        lines.append(
            f"{'cold start k':<18}{'from prior':>12}{'from zero':>12}{'prior alone':>13}"
            "   (test loss)"
        )
        for k, fp, fz, alone in cold_start_means(result):
            pa = f"{alone:13.4f}" if alone is not None else f"{'-':>13}"
            lines.append(f"{int(k):<18}{fp:12.4f}{fz:12.4f}{pa}")
        counted = [(r.seed, cold_start_wins(r.cold_start)) for r in result.runs]
        seen = [(seed, c) for seed, c in counted if c is not None]
        if seen:
            small, large = seen[0][1][0], seen[0][1][1]
            lines.append(
                f"{small} notes from the prior beat {large} from zero on "
                + ", ".join(f"{c[2]}/{c[3]} newcomers (seed {seed})" for seed, c in seen)
            )
    return "\n".join(lines) + "\n"


def _plot(result: ExperimentResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cold = result.runs[0].cold_start
    fig, axes = plt.subplots(1, 2 if cold else 1, figsize=(12 if cold else 7, 4))
    ax = axes[0] if cold else axes
    means = result.means("test")
    names = list(means)
    ax.bar(
        [LABELS[n] for n in names],
        [means[n][0] for n in names],
        yerr=[means[n][1] for n in names],
        color=[
            "#3c8d5a" if n == "personal" else "#6a9fd4" if n == "prior" else "#999" for n in names
        ],
    )
    ax.set_ylabel("test loss (mean over users)")
    ax.set_title("personalization (test split)")
    ax.tick_params(axis="x", rotation=30)
    values = [v[0] for v in means.values()]
    ax.set_ylim(min(values) * 0.95, max(values) * 1.02)
    if cold:
        curve = cold_start_means(result)  # over the seeds, as the table prints them
        ks = [m[0] for m in curve]
        axes[1].plot(ks, [m[1] for m in curve], "o-", label="from prior")
        axes[1].plot(ks, [m[2] for m in curve], "o-", label="from zero")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("notes of a new user (k)")
        axes[1].set_ylabel("test loss")
        axes[1].set_title("cold start")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
