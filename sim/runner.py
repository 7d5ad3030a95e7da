"""Run a whole federation on one machine with Flower's simulation engine (Ray).

One Ray actor per CPU serves the virtual devices in turn, each actor keeping one base
in memory and swapping users' B matrices (about 2 GB for SmolLM2-135M, instead of 1.6 GB
per simulated device). Everything a run writes (users' data and profiles, the
coordinator's state, Ray's temp files) stays inside its output folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from lorafleet.client.federated import make_client_app
from lorafleet.protocols.errors import LorafleetError
from lorafleet.server.coordinator import CoordinatorConfig
from lorafleet.server.flower_app import make_server_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimResources:
    """What each simulated device may use; Ray schedules actors by these numbers."""

    cpus_per_client: float = 1.0
    total_cpus: int | None = None  # default: every core of this machine
    gpus_per_client: float = 0.0


def simulate(
    users_dir: Path,
    out_dir: Path,
    config: CoordinatorConfig,
    *,
    base: str = "default",
    precision: str = "auto",
    device: str = "auto",
    cache_dir: Path | None = None,
    resources: SimResources | None = None,
    client_app: ClientApp | None = None,
    extra_settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Simulate one device per user folder in ``users_dir``; returns the results record.

    The coordinator's state lives in ``config.data_dir``; a second call with the same
    folder resumes after the last completed round.
    """
    from flwr.simulation import run_simulation

    users = [
        p for p in sorted(Path(users_dir).iterdir()) if p.is_dir() and not p.name.startswith(".")
    ]
    if not users:
        raise LorafleetError(
            f"no user folders in {users_dir}; generate personas or add folders first"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Ray and Flower write temp files and state; keep them inside the run (short path:
    # Ray's socket names must stay under 108 characters).
    ray_tmp = Path(os.environ.get("LORAFLEET_RAY_TMPDIR", f"/tmp/lorafleet-ray-{os.getpid()}"))
    os.environ.setdefault("RAY_TMPDIR", str(ray_tmp))
    os.environ.setdefault("FLWR_HOME", str(out_dir / "flwr-home"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    res = resources or SimResources()
    settings = {
        "sim-users-dir": str(Path(users_dir).resolve()),
        "sim-profiles-dir": str((out_dir / "profiles").resolve()),
        "base": base,
        "precision": precision,
        "device": device,
        **({"cache-dir": str(cache_dir)} if cache_dir is not None else {}),
        **dict(extra_settings or {}),
    }
    backend = {
        "client_resources": {"num_cpus": res.cpus_per_client, "num_gpus": res.gpus_per_client},
        "init_args": {
            "num_cpus": res.total_cpus or os.cpu_count() or 1,
            "include_dashboard": False,
        },
    }
    results: dict[str, Any] = {}

    def capture(record: dict[str, Any]) -> None:
        results.update(record)

    run_simulation(
        server_app=make_server_app(config, on_results=capture),
        client_app=client_app or make_client_app(settings),
        num_supernodes=len(users),
        backend_config=backend,  # type: ignore[arg-type]
    )
    if not results:
        raise LorafleetError(
            f"the federation did not finish; see the log above and {config.data_dir}"
        )
    return results
