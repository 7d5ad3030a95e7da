"""The coordinator's durable state: the cohort's prior versions and its rounds.

The registry is the source of truth. A prior version is first written as a file (fp32
B, content-hashed) and only then recorded in the registry, and a round counts as
completed when the registry says it finished; so a coordinator killed at any moment
restarts at the last completed round with nothing lost, and a half-written prior file
from a killed run is simply overwritten by the retried round.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from lorafleet.protocols.atomic import atomic_write_bytes
from lorafleet.protocols.encoding import Packing, content_hash, decode_tensors, encode_tensors
from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.protocols.federation import MAX_NUM_EXAMPLES, BTensors
from lorafleet.protocols.manifest import DEFAULT_BASE_MODEL_ID, DEFAULT_BASE_SHA256
from lorafleet.protocols.shared_a import shared_a_digest
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.aggregation import AGGREGATORS, Aggregator, make_aggregator
from lorafleet.server.dp import DP_MODES, PrivacyLedger
from lorafleet.server.promotion import DEFAULT_TOLERANCE, PriorScore, PromotionPolicy, Verdict
from lorafleet.server.registry import PriorRecord, Registry, RoundId, RoundRecord

log = logging.getLogger(__name__)

USER_PSEUDONYMS = ("node", "device")
PSEUDONYM_KEY_FILE = "pseudonym.key"
"""Secret (32 random bytes) in the data dir that keys node pseudonyms; keep it with the
registry: a new key makes every node a new user."""


DEFAULT_PERSONAL_LR = 1.6e-2
"""The personal fine-tuning's learning rate: 8x the prior's. The personal run starts from
a prior that is already good, keeps the best B its validation notes see, and after an
evaluation without progress goes back to that B at half the rate
(:data:`lorafleet.client.federated.PLATEAU_DECAY`), so it can start far harder than the
prior's plain local training (whose deltas are averaged): a user whose text wants less
gets there by halving. Chosen on the fortunes benchmark's validation split: mean 3.900,
3.885, 3.874 at {2e-3, 4e-3, 8e-3} without the halving, 3.866 and 3.854 at {8e-3,
1.6e-2} with it; see docs/personalization.md."""

DEFAULT_PERSONAL_LR_SHARED_A = 8e-3
"""The personal learning rate on a gradient-aligned shared A (``shared-a = gradient``):
half :data:`DEFAULT_PERSONAL_LR`. B's gradient is the output error times ``A x``; an A
whose rows follow the cohort's gradient makes ``A x`` large exactly where the loss moves,
so each step of B goes further than on a random A and the seeded A's rate overshoots.
Chosen on the fortunes benchmark's validation split, replaying the final
personalization from the gradient-A run's prior: mean validation 3.754, 3.754, 3.765 at
{4e-3, 8e-3, 1.6e-2} for the federation's users; for its newcomers with 16 notes 3.952,
3.944, 3.978 (8e-3 best); docs/personalization.md."""


DEFAULT_PERSONAL_A_LR = 4e-3
"""The personalize round's learning rate for A (a personal A, trained with B and kept on
the device; 0 keeps the seeded A). Chosen on the fortunes benchmark's validation split,
replaying the final personalization from the fortunes prior (fp32): mean 3.852 with the
seeded A, 3.816 at 1e-3, 3.788 at 4e-3 (docs/personalization.md, "A personal A")."""


SHARED_A_MODES = ("auto", "seeded", "gradient")
"""Where the cohort's frozen A comes from (``CoordinatorConfig.shared_a``)."""


def resolve_shared_a(mode: str, dp: str) -> str:
    """The kind of A a cohort runs on: ``seeded`` or ``gradient``.

    ``auto`` (the default) is the gradient-aligned A, which beat the seeded one on both
    benchmarks of docs/personalization.md (personal and prior, fortunes and held-out
    users), except under differential privacy: round 0's sketch has no noise or
    accounting of its own, so with ``dp`` on the cohort keeps the seeded A, which costs
    no privacy. An explicit ``seeded`` or ``gradient`` is kept as given.
    """
    if mode == "auto":
        return "gradient" if dp == "off" else "seeded"
    return mode


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the ServerApp reads from Flower's run config, once, typed.

    Keys in ``[tool.flwr.app.config]`` are these field names with ``-`` for ``_``.
    """

    num_rounds: int = field(default=3, metadata={"help": "Training rounds to complete."})
    fraction_train: float = field(
        default=0.5, metadata={"help": "Share of nodes sampled per round."}
    )
    min_train_nodes: int = field(default=2, metadata={"help": "Accepted updates a round needs."})
    min_available_nodes: int = field(
        default=2, metadata={"help": "Nodes to wait for before round 1."}
    )
    wait_for_nodes_s: float = field(default=300.0, metadata={"help": "How long to wait for them."})
    round_timeout_s: float = field(
        default=1800.0, metadata={"help": "Replies later than this are dropouts."}
    )
    max_round_retries: int = field(default=2, metadata={"help": "Retries of a round that failed."})
    personal_steps: int = field(
        default=0,
        metadata={
            "help": "Personal training steps in each training round (0: personalize once, "
            "after the last round, from the final prior; docs/personalization.md)."
        },
    )
    prior_steps: int = field(default=8, metadata={"help": "Prior-step training steps per round."})
    personalize_steps: int = field(
        default=32,
        metadata={
            "help": "After the last round every device fine-tunes its personal adapter from "
            "the final prior for at most this many steps, early-stopped on its validation "
            "notes, and keeps the best of prior, previous personal and fine-tuned; 0: skip."
        },
    )
    personalize_blend: bool = field(
        default=True,
        metadata={
            "help": "In the personalize round, also score blends of the prior and the "
            "fine-tuned B (weights .25, .5, .75) on validation and keep the best."
        },
    )
    lr: float = field(default=2e-3, metadata={"help": "Device learning rate (B only)."})
    personal_lr: float = field(
        default=DEFAULT_PERSONAL_LR,
        metadata={
            "help": "Learning rate of the personal steps (the personalize round's too) on "
            "the seeded A; 0: lr. The personal run starts from a good prior and stops "
            "early on validation, so it steps harder than the prior's "
            "(docs/personalization.md)."
        },
    )
    personal_lr_shared_a: float = field(
        default=DEFAULT_PERSONAL_LR_SHARED_A,
        metadata={
            "help": "The same on a gradient-aligned shared A (shared-a = gradient), where "
            "each step of B goes further; 0: lr."
        },
    )
    personal_a_lr: float = field(
        default=DEFAULT_PERSONAL_A_LR,
        metadata={
            "help": "Learning rate of A in the personalize round: each device also trains "
            "its own A (kept on the device, never sent); 0: A stays the seeded one."
        },
    )
    prox_mu: float = field(
        default=0.0,
        metadata={
            "help": "Pull of the personal B toward the prior (Ditto); 0: none, the device "
            "instead keeps the better of prior and personal on its validation notes."
        },
    )
    clip_norm: float = field(
        default=10.0,
        metadata={
            "help": "Max L2 norm of a device's prior delta. Deltas of 10-15 steps on the "
            "default adapter measure 3-8; 1.0 clipped them all and slowed the prior "
            "(docs/personalization.md). DP noise scales with it."
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Device batch size."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per block."})
    heldout_fraction: float = field(default=0.2, metadata={"help": "Device held-out share."})
    packing: str = field(default="fp16", metadata={"help": "Upload packing: fp32, fp16 or int8."})
    aggregator: str = field(default="fedavg", metadata={"help": "fedavg or fedadam."})
    server_lr: float = field(default=1.0, metadata={"help": "Server learning rate."})
    rank: int = field(default=8, metadata={"help": "LoRA rank of the cohort."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated targets."}
    )
    cohort_seed: int = field(default=0, metadata={"help": "Seed of the cohort's frozen A."})
    base_model_id: str = field(default=DEFAULT_BASE_MODEL_ID, metadata={"help": "Base model name."})
    base_sha256: str = field(
        default=DEFAULT_BASE_SHA256, metadata={"help": "Base manifest digest."}
    )
    data_dir: str = field(
        default="runs/coordinator", metadata={"help": "Coordinator state folder."}
    )
    registry_url: str = field(
        default="", metadata={"help": "Database URL; empty: SQLite in data-dir."}
    )
    final_evaluation: bool = field(
        default=True, metadata={"help": "Evaluate every node at the end."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of node sampling."})
    secure_aggregation: bool = field(
        default=False,
        metadata={"help": "Sum prior deltas with SecAgg+: the coordinator sees only the sum."},
    )
    secagg_dropout_share: float = field(
        default=0.2,
        metadata={"help": "Share of a round's devices that may drop out under SecAgg+ (< 0.5)."},
    )
    secagg_num_shares: int = field(
        default=0,
        metadata={
            "help": "SecAgg+ neighbours per device: 0 (auto, about 3 log2 n), -1 (every "
            "sampled device) or a count >= 3."
        },
    )
    max_example_weight: int = field(
        default=0,
        metadata={
            "help": "Cap on a device's aggregation weight (its num-examples); "
            "0: prior-steps x batch-size, the examples one round's prior step can use."
        },
    )
    dp: str = field(
        default="off", metadata={"help": "Differential privacy: off, central or client."}
    )
    dp_noise_multiplier: float = field(
        default=1.0, metadata={"help": "DP noise std divided by the clip norm."}
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "Delta the spent epsilon is at."})
    promotion_tolerance: float = field(
        default=DEFAULT_TOLERANCE,
        metadata={
            "help": "A new prior version becomes active only if its devices' validation loss "
            "(relative to the base) is at most this much worse than the active one's "
            "(0.01: 1%); otherwise the active one stays and the reason is recorded."
        },
    )
    shared_a: str = field(
        default="auto",
        metadata={
            "help": "The cohort's frozen A: seeded (rebuilt from the cohort seed), gradient "
            "(round 0 sums the devices' gradient sketches and keeps their top directions; "
            "docs/personalization.md) or auto (gradient, but seeded with dp: the sketch "
            "has no privacy accounting)."
        },
    )
    sketch_passes: int = field(
        default=4,
        metadata={"help": "Gradient-A sketch: sign matrices per module (columns = x rank)."},
    )
    sketch_batches: int = field(
        default=2,
        metadata={"help": "Gradient-A sketch: training batches each device sums its gradient on."},
    )
    user_pseudonym: str = field(
        default="node",
        metadata={
            "help": "Who a device's adapter versions are recorded under: node (a keyed hash "
            "of its Flower node id) or device (the label it reports: its user folder in a "
            "simulation; trust your devices before choosing it)."
        },
    )

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SpecError(f"run config: {what}")

        need(self.num_rounds >= 1, f"num-rounds must be >= 1, got {self.num_rounds}")
        need(
            0 < self.fraction_train <= 1,
            f"fraction-train must be in (0, 1], got {self.fraction_train}",
        )
        need(self.min_train_nodes >= 1, f"min-train-nodes must be >= 1, got {self.min_train_nodes}")
        need(
            self.min_available_nodes >= self.min_train_nodes,
            "min-available-nodes must be >= min-train-nodes",
        )
        need(self.max_round_retries >= 0, "max-round-retries must be >= 0")
        need(
            min(self.personal_steps, self.prior_steps, self.personalize_steps) >= 0,
            "personal-steps, prior-steps and personalize-steps must be >= 0",
        )
        need(
            self.clip_norm > 0 and math.isfinite(self.clip_norm),
            f"clip-norm must be positive, got {self.clip_norm}",
        )
        need(
            self.packing in get_args(Packing),
            f"packing must be fp32, fp16 or int8, got {self.packing!r}",
        )
        need(
            self.aggregator in AGGREGATORS,
            f"aggregator must be one of {sorted(AGGREGATORS)}, got {self.aggregator!r}",
        )
        need(
            0 <= self.secagg_dropout_share < 0.5,
            f"secagg-dropout-share must be in [0, 0.5), got {self.secagg_dropout_share}",
        )
        need(
            self.secagg_num_shares in (0, -1) or self.secagg_num_shares >= 3,
            "secagg-num-shares must be 0 (auto), -1 (every sampled device) or >= 3, "
            f"got {self.secagg_num_shares}",
        )
        need(
            not self.secure_aggregation or self.min_train_nodes >= 2,
            "secure aggregation needs min-train-nodes >= 2 (a sum of one is that device's delta)",
        )
        need(
            self.dp in DP_MODES,
            f"dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}",
        )
        need(
            self.dp != "client" or self.secure_aggregation,
            "dp = client needs secure-aggregation = true (in the clear the coordinator sees each "
            "delta with a 1/sqrt(n) share of the noise); use dp = central or turn SecAgg+ on",
        )
        need(
            self.dp == "off"
            or (self.dp_noise_multiplier > 0 and math.isfinite(self.dp_noise_multiplier)),
            f"dp-noise-multiplier must be positive, got {self.dp_noise_multiplier}",
        )
        need(
            0 <= self.max_example_weight <= MAX_NUM_EXAMPLES,
            f"max-example-weight must be in [0, {MAX_NUM_EXAMPLES}] (0: prior-steps x "
            f"batch-size), got {self.max_example_weight}",
        )
        need(0 < self.dp_delta < 1, f"dp-delta must be in (0, 1), got {self.dp_delta}")
        need(
            self.user_pseudonym in USER_PSEUDONYMS,
            f"user-pseudonym must be node or device, got {self.user_pseudonym!r}",
        )
        for key, rate in (
            ("personal-lr", self.personal_lr),
            ("personal-lr-shared-a", self.personal_lr_shared_a),
        ):
            need(
                rate >= 0 and math.isfinite(rate),
                f"{key} must be >= 0 (0: the same as lr), got {rate}",
            )
        need(
            0 <= self.personal_a_lr < 1,
            f"personal-a-lr must be in [0, 1) (0: A stays seeded), got {self.personal_a_lr}",
        )
        need(
            0 <= self.promotion_tolerance < 1,
            f"promotion-tolerance must be in [0, 1) (0.01 = 1%), got {self.promotion_tolerance}",
        )
        need(
            self.shared_a in SHARED_A_MODES,
            f"shared-a must be auto, seeded or gradient, got {self.shared_a!r}",
        )
        need(
            self.shared_a != "gradient" or self.dp == "off",
            "shared-a = gradient has no differential-privacy accounting for its sketch round "
            "yet; use shared-a = seeded (or auto) with dp",
        )
        for name in ("sketch_passes", "sketch_batches"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and 1 <= value <= 64,
                f"{name.replace('_', '-')} must be an integer in 1..64, got {value!r}",
            )
        self.spec  # noqa: B018  # validates rank, alpha, targets, seed and base hash now

    @property
    def spec(self) -> AdapterSpec:
        """The cohort's adapter spec."""
        return AdapterSpec(
            base_model_id=self.base_model_id,
            base_sha256=self.base_sha256,
            rank=self.rank,
            alpha=self.alpha,
            target_modules=tuple(t.strip() for t in self.target_modules.split(",") if t.strip()),
            cohort_seed=self.cohort_seed,
        )

    @property
    def example_weight_cap(self) -> int:
        """The most a device's num-examples counts for in a round's weighted mean.

        Plain rounds cap it on the coordinator; SecAgg+ rounds without DP send it as the
        instruction's ``secure_weight_cap`` and the device caps the weight it masks.

        A device that reports more examples than its prior step can use in one round
        (``prior-steps x batch-size``, unless ``max-example-weight`` says otherwise)
        weighs no more than one that used them all, so no single device of a round
        carries more than a fair share.
        """
        return self.max_example_weight or max(1, self.prior_steps * self.batch_size)

    @property
    def shared_a_mode(self) -> str:
        """The kind of A this cohort runs on, ``auto`` resolved (:func:`resolve_shared_a`)."""
        return resolve_shared_a(self.shared_a, self.dp)

    @property
    def personal_learning_rate(self) -> float:
        """The personal rate for this cohort's kind of A (what the instructions carry)."""
        if self.shared_a_mode == "gradient":
            return self.personal_lr_shared_a
        return self.personal_lr

    @property
    def registry(self) -> str:
        """The registry URL (SQLite inside data-dir unless one is given)."""
        return self.registry_url or f"sqlite:///{Path(self.data_dir).resolve() / 'registry.db'}"

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> CoordinatorConfig:
        """Read hyphenated run-config keys; unknown ``lorafleet`` keys are an error."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            f = known.get(key)
            if f is None:
                continue  # other apps' keys and the device-side sim-* keys pass through
            try:
                kwargs[f.name] = _coerce(value, f.type)
            except (TypeError, ValueError):
                raise SpecError(f"run config: {key} = {value!r} is not a valid {f.type}") from None
        return cls(**kwargs)


def _coerce(value: Any, type_name: Any) -> Any:
    kind = str(type_name)
    if kind == "bool":
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind == "float":
        return float(value)
    return str(value)


PRIOR_STATE_PREFIX = "__state__/"
"""Prefix of the server optimizer's state kept beside B in a prior file (not adapter)."""

SHARED_A_FILE = "shared-a.safetensors"
"""File name of a cohort's gradient-aligned shared A, beside its prior versions."""


def priors_dir(data_dir: str | Path, spec_fingerprint: str) -> Path:
    """The folder of one cohort's prior versions and shared A inside a data dir.

    Module-level, as :func:`shared_a_control`, so that read-only tools (the cold-start
    replay) find the files where the coordinator wrote them.
    """
    return Path(data_dir) / "priors" / spec_fingerprint[:16]


def prior_file_name(version: int) -> str:
    """File name of prior version ``version`` (``v0003.safetensors``)."""
    return f"v{version:04d}.safetensors"


def split_prior_tensors(
    tensors: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A prior file's tensors as (B, server optimizer state), the state's prefix removed."""
    b = {k: v for k, v in tensors.items() if not k.startswith(PRIOR_STATE_PREFIX)}
    state = {
        k[len(PRIOR_STATE_PREFIX) :]: v
        for k, v in tensors.items()
        if k.startswith(PRIOR_STATE_PREFIX)
    }
    return b, state


def shared_a_control(spec_fingerprint: str) -> str:
    """The registry control holding a cohort's shared-A digest (set once round 0 built it).

    Module-level so that tools reading a finished data dir (the cold-start replay) find
    the same key without opening the coordinator's state, which would write to it.
    """
    return f"shared-a.{spec_fingerprint[:16]}"


class CoordinatorState:
    """The cohort's priors and rounds, on disk and in the registry."""

    def __init__(self, config: CoordinatorConfig, registry: Registry) -> None:
        self.config = config
        self.spec = config.spec
        self.registry = registry
        self.root = Path(config.data_dir)
        self.priors_dir = priors_dir(self.root, self.spec.fingerprint())
        self.ledger_path = self.root / "privacy" / f"{self.spec.fingerprint()[:16]}.json"
        self.aggregator: Aggregator = make_aggregator(config.aggregator, config.server_lr)
        self._pseudonym_key: bytes | None = None

    @classmethod
    def open(cls, config: CoordinatorConfig) -> CoordinatorState:
        """Open (or start) the coordinator's state."""
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        coord = cls(config, Registry.open(config.registry))
        coord._fail_interrupted_rounds()
        return coord

    def close(self) -> None:
        """Release the database."""
        self.registry.close()

    # ------------------------------------------------------------- shared A
    @property
    def _shared_a_control(self) -> str:
        return shared_a_control(self.spec.fingerprint())

    def save_shared_a(self, a: Mapping[str, Any]) -> str:
        """Keep the cohort's gradient-aligned A (file first, its digest in the registry)."""
        digest = shared_a_digest(a)
        atomic_write_bytes(self.priors_dir / SHARED_A_FILE, encode_tensors(dict(a)))
        self.registry.set_control(self._shared_a_control, digest)
        return digest

    def has_shared_a(self) -> bool:
        """Whether round 0 built this cohort's gradient-aligned A (a registry read)."""
        return self.registry.get_control(self._shared_a_control) is not None

    def shared_a(self) -> tuple[str, bytes] | None:
        """The cohort's shared A as (digest, encoded bytes), None before round 0 built it."""
        digest = self.registry.get_control(self._shared_a_control)
        if digest is None:
            return None
        path = self.priors_dir / SHARED_A_FILE
        if not path.is_file():
            raise IntegrityError(f"shared A file {path} is missing; restore the data dir")
        payload = path.read_bytes()
        if shared_a_digest(decode_tensors(payload)[0]) != digest:
            raise IntegrityError(f"shared A file {path} does not match the registry's digest")
        return str(digest), payload

    # ---------------------------------------------------------------- priors
    def _prior_path(self, version: int) -> Path:
        return self.priors_dir / prior_file_name(version)

    def save_prior(
        self,
        version: int,
        b: BTensors,
        *,
        round: int,
        metrics: Mapping[str, float],
        activate: bool = False,
    ) -> PriorRecord:
        """Write a prior version (file first, registry second), as a candidate by default.

        A candidate becomes active when the promotion rule has scored it
        (:meth:`judge`); ``activate`` skips the rule (imports, tools).
        """
        state = self.aggregator.state()
        payload = encode_tensors(
            {**b, **{f"{PRIOR_STATE_PREFIX}{k}": v for k, v in state.items()}}, packing="fp32"
        )
        atomic_write_bytes(self._prior_path(version), payload)
        return self.registry.add_prior_version(
            self.spec,
            version,
            content_hash=content_hash(b, spec_fingerprint=self.spec.fingerprint()),
            size_bytes=len(payload),
            round=round,
            metrics=metrics,
            activate=activate,
        )

    def load_prior(self, record: PriorRecord) -> BTensors:
        """A prior version's B, verified against the registry's content hash."""
        path = self._prior_path(record.version)
        if not path.is_file():
            raise IntegrityError(
                f"prior file {path} is missing; restore the coordinator's data dir"
            )
        tensors, _ = decode_tensors(path.read_bytes())
        b, state = split_prior_tensors(tensors)
        if content_hash(b, spec_fingerprint=self.spec.fingerprint()) != record.content_hash:
            raise IntegrityError(f"prior file {path} does not match the registry's content hash")
        self.aggregator.load_state(state)
        return b

    def active_prior(self) -> tuple[PriorRecord | None, BTensors | None]:
        """The active prior (None before the first round: the zero prior)."""
        record = self.registry.active_prior(self.spec)
        if record is None:
            return None, None
        return record, self.load_prior(record)

    def training_prior(self) -> tuple[PriorRecord | None, BTensors | None]:
        """The prior the next round trains from: the candidate awaiting its score, else the active.

        Training from the candidate is what scores it (each device measures the prior
        it receives); after a held candidate it is the active version again.
        """
        pending = self.registry.pending_prior(self.spec)
        if pending is None:
            return self.active_prior()
        return pending, self.load_prior(pending)

    def training_prior_ref(self) -> str | None:
        """The ref of :meth:`training_prior` without reading its file (None: the zero prior)."""
        pending = self.registry.pending_prior(self.spec)
        if pending is not None:
            return pending.ref
        active = self.registry.active_prior(self.spec)
        return None if active is None else active.ref

    @property
    def promotion(self) -> PromotionPolicy:
        """The promotion rule: the run's tolerance; as many scores as a round needs updates."""
        return PromotionPolicy(
            tolerance=self.config.promotion_tolerance, min_devices=self.config.min_train_nodes
        )

    def score_prior(
        self,
        ref: str,
        rows: Iterable[Mapping[str, float]],
        *,
        round: int,
        source: str = "devices",
    ) -> PriorScore | None:
        """Record devices' validation losses of prior ``ref`` (mean and spread) as its evaluation."""
        score = PriorScore.from_metrics(rows)
        if score is None:
            return None
        self.registry.add_prior_evaluation(
            ref, score.to_metrics(), devices=score.devices, round=round, source=source
        )
        return score

    def judge(self, candidate: PriorRecord, score: PriorScore, *, round: int) -> Verdict | None:
        """Apply the promotion rule to a scored candidate and record the decision.

        The active version's score pools every evaluation it has had; the zero prior's
        is 1.0 by definition (it is the base). An active version never scored (set by an
        operator, or from before promotion existed) is held to the base's 1.0 as well.
        Returns None, deciding nothing, while fewer than ``min_devices`` scored it.
        """
        policy = self.promotion
        if score.devices < policy.min_devices:
            return None
        active = self.registry.active_prior(self.spec)
        active_score, name = 1.0, "the zero prior"
        if active is not None:
            evaluations = self.registry.list_prior_evaluations(active.ref)
            pooled = PriorScore.pooled_rel_mean((e.devices, e.metrics) for e in evaluations)
            if pooled is None:
                name = f"{active.ref} (never scored; held to the base)"
            else:
                active_score, name = pooled, active.ref
        verdict = policy.decide(score, active_score, name)
        self.registry.decide_prior(
            candidate.ref,
            "promoted" if verdict.promote else "held",
            reason=verdict.reason,
            against=None if active is None else active.ref,
            round=round,
            scores=(verdict.candidate_score, verdict.active_score, verdict.tolerance),
        )
        return verdict

    def next_prior_version(self) -> int:
        """1 + the highest prior version of the cohort."""
        page = self.registry.list_prior_versions(self.spec, limit=1)
        return page.items[0].version + 1 if page.items else 1

    # ---------------------------------------------------------------- users
    def pseudonym(self, node_id: int, label: str = "") -> str:
        """The registry user a node's adapter versions belong to.

        With ``user-pseudonym = device`` that is the label the device reported (if it
        reported one); otherwise ``node-`` and a keyed hash (HMAC-SHA256 under the data
        dir's :data:`PSEUDONYM_KEY_FILE`) of the Flower node id: stable for as long as the
        node keeps its id, unguessable from the id without the key, and chosen by the
        coordinator, so no device can write into another user's history.
        """
        if self.config.user_pseudonym == "device" and label:
            return label
        if self._pseudonym_key is None:
            path = self.root / PSEUDONYM_KEY_FILE
            if not path.is_file():
                atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)
            self._pseudonym_key = path.read_bytes()
        digest = hmac.new(self._pseudonym_key, str(node_id).encode(), hashlib.sha256)
        return f"node-{digest.hexdigest()[:24]}"

    # ---------------------------------------------------------------- rounds
    def completed_round(self) -> int:
        """The highest finished round number (0 when none)."""
        done = 0
        after = None
        while True:
            page = self.registry.list_rounds(self.spec, after=after, limit=200)
            done = max([done, *(r.number for r in page.items if r.status == "finished")])
            if page.next_after is None:
                return done
            after = RoundId(page.next_after)

    def _fail_interrupted_rounds(self) -> None:
        """Rounds left 'running' by a killed coordinator are closed as failed."""
        page = self.registry.list_rounds(self.spec, limit=200)
        for r in page.items:
            if r.status == "running":
                log.warning("round %d was interrupted; it will be run again", r.number)
                self.registry.finish_round(r.id, participants=0, status="failed")

    def start_round(self, number: int, attempt: int) -> RoundRecord:
        """Record the start of a round attempt."""
        c = self.config
        return self.registry.start_round(
            self.spec,
            number,
            config={
                "aggregator": c.aggregator,
                "secure_aggregation": c.secure_aggregation,
                "dp": c.dp,
                **({"dp_noise_multiplier": c.dp_noise_multiplier} if c.dp != "off" else {}),
            },
            retry=True,
        )

    # ---------------------------------------------------------------- privacy
    def privacy_ledger(self) -> PrivacyLedger:
        """The cohort's DP releases so far, checked against the registry.

        A ledger that accounts less than the registry's latest round says was spent has
        been lost or rolled back; going on would under-report epsilon, so it stops.
        """
        ledger = PrivacyLedger.load(self.ledger_path)
        spent, at = 0.0, self.config.dp_delta
        page = self.registry.list_rounds(self.spec, limit=200)  # newest first
        for r in page.items:
            if r.status == "finished" and r.dp_epsilon is not None and r.dp_epsilon > spent:
                spent, at = r.dp_epsilon, r.dp_delta or at
        if spent > 0 and ledger.epsilon(at) < spent * (1 - 1e-9):
            raise IntegrityError(
                f"privacy ledger {self.ledger_path} accounts less than the {spent:.4g} epsilon the "
                "registry records; restore the coordinator's data dir from its backup"
            )
        return ledger

    def record_release(self, ledger: PrivacyLedger, round: int, q: float, sigma: float) -> float:
        """Add one noisy release to the ledger (written before the prior is) -> epsilon."""
        ledger.add(round, q, sigma)
        ledger.save(self.ledger_path)
        return ledger.epsilon(self.config.dp_delta)


if not TYPE_CHECKING:
    # ``Coordinator`` was renamed ``CoordinatorState`` (#15): it is the coordinator's saved
    # state, not the coordinator. The old name still imports, with a DeprecationWarning,
    # for one release so that code outside this repository has time to follow; it is
    # hidden from type checkers so that mypy flags any use left here.
    def __getattr__(name: str) -> Any:
        """Deprecated aliases: ``Coordinator`` -> :class:`CoordinatorState`."""
        if name == "Coordinator":
            warnings.warn(
                "lorafleet.server.coordinator.Coordinator is deprecated; use CoordinatorState",
                DeprecationWarning,
                stacklevel=2,
            )
            return CoordinatorState
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
