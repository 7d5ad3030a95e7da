"""Scale-down curves: quality against the LoRA rank and against notes per user.

``lorafleet-sim scale`` runs the real experiment (:func:`~lorafleet.sim.experiment.
run_experiment`) once per point of two sweeps, each point into its own folder:

- the **rank sweep** changes the cohort's rank (``--ranks 1,2,4,8,16``) with every user's
  training notes;
- the **notes sweep** keeps each user's first k training notes (``--notes
  8,16,32,64,all``) at one rank. The cut comes after the three-way split
  (:attr:`ExperimentConfig.max_train_notes`), so validation and test are the same notes at
  every k and the points are comparable; a user with fewer than k keeps all of them, and
  the point records who.

A point shared by both sweeps (the notes sweep's rank with all notes) runs once. A point
whose folder already holds ``results.json`` is read, not rerun, so a long sweep can be
stopped and started again; it must have been run with the same options.

The rank is picked on **validation**, never on test: the smallest rank whose personal and
prior mean validation losses are each within ``tolerance`` (0.5%) of their best rank's.
The cohort's rank serves both: the personal adapters, and the prior every newcomer starts
from. ``scale.json`` holds every point's summary means, wins, margin, device steps per
user and personal adapter size; ``scale.png`` plots test loss against rank and against
notes, one line per method.

Examples
--------
>>> from pathlib import Path
>>> from lorafleet.sim.experiment import ExperimentConfig
>>> cfg = ScaleConfig(ExperimentConfig(output=Path("runs/scale")), ranks=(2, 8), notes=(16, 0))
>>> [p.name for p in cfg.points()]
['rank-2_notes-all', 'rank-8_notes-all', 'rank-8_notes-16']
>>> run_scale(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorafleet.client.profile import Profile
from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.errors import SpecError
from lorafleet.sim.experiment import (
    LABELS,
    METHODS,
    ExperimentConfig,
    changed_options,
    config_record,
    run_experiment,
)

__all__ = [
    "RANK_METHODS",
    "ScaleConfig",
    "ScalePoint",
    "format_scale_table",
    "parse_notes",
    "parse_ranks",
    "recommend_rank",
    "run_scale",
]

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The weights file of a saved adapter version (stock PEFT's name)."""


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; empty: no rank sweep.

    Raises
    ------
    SpecError
        When an entry is not an integer >= 1.
    """
    ranks = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if not item.isdigit() or int(item) < 1:
            raise SpecError(
                f"scale: --ranks takes comma-separated integers >= 1 such as 1,2,4,8,16; "
                f"got {item!r} in {text!r}"
            )
        ranks.append(int(item))
    return tuple(sorted(set(ranks)))


def parse_notes(text: str) -> tuple[int, ...]:
    """``"8,16,all"`` -> ``(8, 16, 0)`` (0: all notes); empty: no notes sweep.

    Raises
    ------
    SpecError
        When an entry is neither ``all`` nor an integer >= 2.
    """
    notes = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        if item == "all":
            notes.append(0)
            continue
        if not item.isdigit() or int(item) < 2:
            raise SpecError(
                f"scale: --notes takes comma-separated note counts >= 2 or 'all', such as "
                f"8,16,32,64,all (a user needs 2 training notes); got {item!r} in {text!r}"
            )
        notes.append(int(item))
    # Ascending, "all" last.
    return tuple(sorted(set(notes), key=lambda k: (k == 0, k)))


def _notes_label(k: int) -> str:
    return "all" if k == 0 else str(k)


@dataclass(frozen=True)
class ScalePoint:
    """One experiment of a sweep: a rank and a cap on training notes (0: all)."""

    rank: int
    notes: int

    @property
    def name(self) -> str:
        """The point's folder name, e.g. ``rank-4_notes-all``."""
        return f"rank-{self.rank}_notes-{_notes_label(self.notes)}"


@dataclass(frozen=True)
class ScaleConfig:
    """Two sweeps around one experiment: its ``output`` is the sweep's folder."""

    experiment: ExperimentConfig = field(
        metadata={"help": "Every option of each point; rank and max_train_notes are swept."}
    )
    ranks: tuple[int, ...] = field(
        default=(1, 2, 4, 8, 16),
        metadata={"help": "Ranks of the rank sweep, at the experiment's max_train_notes."},
    )
    notes: tuple[int, ...] = field(
        default=(8, 16, 32, 64, 0),
        metadata={"help": "Training notes per user of the notes sweep (0: all), at its rank."},
    )
    tolerance: float = field(
        default=0.005,
        metadata={"help": "The picked rank's validation losses are within this share of the best."},
    )

    def __post_init__(self) -> None:
        if not self.ranks and not self.notes:
            raise SpecError("scale: nothing to sweep; give --ranks, --notes or both")
        if any(r < 1 for r in self.ranks):
            raise SpecError(f"scale: ranks must be >= 1, got {self.ranks}")
        if any(k != 0 and k < 2 for k in self.notes):
            raise SpecError(f"scale: notes per user must be >= 2 (or 0 for all), got {self.notes}")
        if not 0 <= self.tolerance < 1:
            raise SpecError(f"scale: tolerance must be in [0, 1), got {self.tolerance}")

    @property
    def rank_sweep(self) -> list[ScalePoint]:
        """The rank sweep's points, ascending."""
        return [ScalePoint(r, self.experiment.max_train_notes) for r in self.ranks]

    @property
    def notes_sweep(self) -> list[ScalePoint]:
        """The notes sweep's points, ascending, all notes last."""
        return [ScalePoint(self.experiment.rank, k) for k in self.notes]

    def points(self) -> list[ScalePoint]:
        """Every point to run, each once (the sweeps may share one)."""
        return list(dict.fromkeys([*self.rank_sweep, *self.notes_sweep]))

    def point_config(self, point: ScalePoint) -> ExperimentConfig:
        """The experiment of one point, in its own subfolder."""
        return replace(
            self.experiment,
            output=Path(self.experiment.output) / point.name,
            rank=point.rank,
            max_train_notes=point.notes,
        )


def _read_finished(cfg: ExperimentConfig, point: ScalePoint) -> dict[str, Any]:
    """A finished point's results.json, after checking it was run with these options."""
    path = Path(cfg.output) / "results.json"
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    want, have = config_record(cfg), record.get("config", {})
    changed = changed_options(have, want, ("output",))
    if changed:
        what = ", ".join(f"{k} {have.get(k)!r} -> {want[k]!r}" for k in changed)
        raise SpecError(
            f"scale: {path} was run with other options ({what}); give another --output "
            f"or remove {cfg.output} to rerun point {point.name}"
        )
    return record


def _personal_bytes(cfg: ExperimentConfig, record: dict[str, Any]) -> float | None:
    """Mean size of the users' current personal adapter weights (first seed), in bytes."""
    seed = record["runs"][0]["seed"]
    sizes = []
    for uid in record["split"]:
        root = Path(cfg.output) / f"seed-{seed}" / "profiles" / uid
        if not (root / "profile.json").is_file():
            continue
        profile = Profile.open(root)
        version = profile.current_version()
        if version is None:
            continue
        weights = profile.version_dir(version) / ADAPTER_WEIGHTS
        if weights.is_file():
            sizes.append(weights.stat().st_size)
    return sum(sizes) / len(sizes) if sizes else None


def _point_summary(
    cfg: ExperimentConfig, point: ScalePoint, record: dict[str, Any], *, resumed: bool
) -> dict[str, Any]:
    """What scale.json keeps of one point: the experiment's own summary, and the notes."""
    summary = record["summary"]
    split = record["split"]
    kept = {uid: s.get("train_kept", len(s["train"])) for uid, s in split.items()}
    available = {uid: s.get("train_available", len(s["train"])) for uid, s in split.items()}
    return {
        "name": point.name,
        "rank": point.rank,
        "notes": _notes_label(point.notes),
        "max_train_notes": point.notes,
        "folder": str(cfg.output),
        "resumed": resumed,
        **{metric: summary[metric]["mean"] for metric in ("test", "test_notes", "val")},
        "std_over_seeds": {m: summary[m]["std_over_seeds"] for m in ("test", "test_notes", "val")},
        "wins": {m: summary[m]["wins"] for m in ("test", "test_notes")},
        "margin": {m: summary[m]["margin"] for m in ("test", "test_notes")},
        "steps_per_user": summary["steps_per_user"],
        "personal_adapter_bytes": _personal_bytes(cfg, record),
        "train_notes": {
            "kept": kept,
            "available": available,
            "short_users": sorted(u for u in kept if point.notes and available[u] < point.notes),
        },
    }


RANK_METHODS: tuple[str, ...] = ("personal", "prior")
"""What the rank is chosen on: the personal adapters and the prior newcomers start from."""


def recommend_rank(
    points: Sequence[dict[str, Any]], tolerance: float = 0.005
) -> tuple[int, dict[str, tuple[float, float]]] | None:
    """The smallest rank whose validation losses are each within ``tolerance`` of the best.

    Each of :data:`RANK_METHODS` that every point scored must be within ``tolerance`` of
    its own best rank's mean validation loss: a rank that keeps the personal adapters
    but loses the prior would shortchange every newcomer. Selection uses validation
    only. Returns ``(rank, {method: (its loss, the best rank's loss)})``, or None
    without rank points.
    """
    if not points:
        return None
    methods = [m for m in RANK_METHODS if all(m in p["val"] for p in points)]
    if not methods:
        return None
    by_rank = {p["rank"]: {m: p["val"][m] for m in methods} for p in points}
    best = {m: min(v[m] for v in by_rank.values()) for m in methods}
    pick = min(
        r for r, v in by_rank.items() if all(v[m] <= best[m] * (1 + tolerance) for m in methods)
    )
    return pick, {m: (by_rank[pick][m], best[m]) for m in methods}


def run_scale(
    cfg: ScaleConfig, *, progress: bool = True, say: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Run (or read back) every point, then write ``scale.json`` and ``scale.png``.

    ``say`` receives one line per point (run, or read back from its folder). Returns the
    scale.json record.
    """
    out = Path(cfg.experiment.output)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    points = cfg.points()
    for n, point in enumerate(points, 1):
        pcfg = cfg.point_config(point)
        if (Path(pcfg.output) / "results.json").is_file():
            say(f"point {n}/{len(points)} {point.name}: finished in {pcfg.output}; read, not rerun")
            record, resumed = _read_finished(pcfg, point), True
        else:
            say(f"point {n}/{len(points)} {point.name}: running into {pcfg.output}")
            result = run_experiment(pcfg, progress=progress)
            record, resumed = json.loads(result.to_json()), False
        summaries[point.name] = _point_summary(pcfg, point, record, resumed=resumed)
    rank_points = [summaries[p.name] for p in cfg.rank_sweep]
    picked = recommend_rank(rank_points, cfg.tolerance)
    scale = {
        "rank_sweep": [p.name for p in cfg.rank_sweep],
        "notes_sweep": [p.name for p in cfg.notes_sweep],
        "points": summaries,
        "recommended_rank": None if picked is None else picked[0],
        "selection": (
            f"smallest rank whose {' and '.join(RANK_METHODS)} mean validation losses are "
            f"each within {100 * cfg.tolerance:g}% of their best rank's (validation only, "
            "never test)"
        ),
        "recommended_by": None if picked is None else picked[1],
        "tolerance": cfg.tolerance,
        "config": config_record(cfg.experiment),
    }
    atomic_write_text(out / "scale.json", json.dumps(scale, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "scale.txt", format_scale_table(scale))
    _plot_scale(scale, out / "scale.png")
    return scale


# ------------------------------------------------------------------------- reporting
def _methods(points: Sequence[dict[str, Any]]) -> list[str]:
    have = set.intersection(*(set(p["test"]) for p in points)) if points else set()
    return [m for m in METHODS if m in have]


def _loss_rows(scale: dict[str, Any], metric: str, title: str) -> list[str]:
    points = list(scale["points"].values())
    methods = _methods(points)
    head = f"{'point':<24}" + "".join(f"{LABELS[m]:>12}" for m in methods)
    lines = [title, head]
    for p in points:
        lines.append(f"{p['name']:<24}" + "".join(f"{p[metric][m]:12.4f}" for m in methods))
    return lines


def format_scale_table(scale: dict[str, Any]) -> str:
    """Test loss per point and method (packed, note by note), then selection figures."""
    lines = _loss_rows(scale, "test", "test loss, packed chunks (lower is better)")
    lines.append("")
    lines.extend(_loss_rows(scale, "test_notes", "test loss, note by note"))
    lines.append("")
    head = ("point", "personal val", "wins", "margin", "steps/user", "adapter bytes")
    lines.append(f"{head[0]:<24}" + "".join(f"{h:>14}" for h in head[1:]))
    for p in scale["points"].values():
        wins = p["wins"]["test"]
        margin = p["margin"]["test"]
        size = p["personal_adapter_bytes"]
        # Without baselines there is nothing to win against: a dash, not "0/8".
        compared = margin is not None
        lines.append(
            f"{p['name']:<24}"
            f"{p['val'].get('personal', float('nan')):14.4f}"
            + (f"{wins['strict']:>9}/{wins['users']:<4}" if compared else f"{'-':>14}")
            + (f"{100 * margin:13.1f}%" if compared else f"{'-':>14}")
            + f"{p['steps_per_user'].get('personal', 0.0):14.0f}"
            + (f"{size:14,.0f}" if size is not None else f"{'-':>14}")
        )
        if p["train_notes"]["short_users"]:
            lines.append(
                f"  {p['name']}: fewer than {p['notes']} training notes, all kept: "
                + ", ".join(p["train_notes"]["short_users"])
            )
    lines.append("wins: personal <= min(local-only, FedAvg) on test; margin: mean below it")
    rank = scale["recommended_rank"]
    if rank is not None:
        losses = ", ".join(
            f"{m} {loss:.4f} (best {best:.4f})"
            for m, (loss, best) in scale["recommended_by"].items()
        )
        lines.append(
            f"recommended rank: {rank}: validation loss {losses}, each within "
            f"{100 * scale['tolerance']:g}% of its best; chosen on validation, never test"
        )
    return "\n".join(lines) + "\n"


def _sweep(scale: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [scale["points"][name] for name in scale[key]]


def _plot_scale(scale: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, _sweep(scale, k)) for k in ("rank_sweep", "notes_sweep") if scale[k]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, points) in zip(axes[0], panels, strict=True):
        if key == "rank_sweep":
            xs: list[float] = [p["rank"] for p in points]
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(p["rank"]) for p in points])
            ax.set_xlabel("LoRA rank")
            ax.set_title(f"test loss against rank (notes: {points[0]['notes']})")
        else:
            xs = list(range(len(points)))
            ax.set_xticks(xs, [p["notes"] for p in points])
            ax.set_xlabel("training notes per user")
            ax.set_title(f"test loss against notes per user (rank {points[0]['rank']})")
        for m in _methods(points):
            ax.plot(
                xs,
                [p["test"][m] for p in points],
                "o-",
                label=LABELS[m],
                linewidth=2.5 if m == "personal" else 1.2,
            )
        ax.set_ylabel("test loss, packed (mean over users)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
