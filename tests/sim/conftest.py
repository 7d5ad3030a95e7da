"""Fixtures for whole-federation tests on the tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorafleet.client.adapter import get_a, materialize
from lorafleet.client.base import load_base
from lorafleet.protocols.encoding import encode_tensors
from lorafleet.protocols.shared_a import a_from_sketch
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.coordinator import CoordinatorConfig
from lorafleet.sim.personas import PersonaConfig, generate_personas, write_user_folders
from lorafleet.sim.runner import SimResources, simulate


def _setup_run(tmp: Path, tiny: Path, **overrides: Any) -> tuple[Path, CoordinatorConfig]:
    users = write_user_folders(
        generate_personas(PersonaConfig(num_users=3, notes_per_user=30)), tmp / "users"
    )
    args: dict[str, Any] = {
        "num_rounds": 2,
        "fraction_train": 1.0,
        "min_train_nodes": 2,
        "min_available_nodes": 3,
        "personal_steps": 4,
        "prior_steps": 4,
        "personalize_steps": 0,  # round tests; the final personalization has its own
        "lr": 0.05,
        "seq_len": 32,
        "rank": 4,
        "base_model_id": "tiny",
        "base_sha256": load_base(tiny).sha256,
        "data_dir": str(tmp / "coordinator"),
        "wait_for_nodes_s": 120,
        # Round tests run on the seeded A (no round 0); test_shared_a_federation and the
        # experiment's default run cover the gradient A.
        "shared_a": "seeded",
    }
    args.update(overrides)
    return users, CoordinatorConfig(**args)


@pytest.fixture
def setup_run() -> Callable[..., tuple[Path, CoordinatorConfig]]:
    """Three synthetic users on disk and a small, fast coordinator config for them."""
    return _setup_run


def simulate_tiny(
    tmp: Path,
    tiny: Path,
    users: Path,
    config: CoordinatorConfig,
    *,
    engine: str = "ray",
    **kwargs: Any,
) -> dict[str, Any]:
    """``simulate`` on the tiny model in fp32 on the CPU (two Ray CPUs with the Ray engine)."""
    return simulate(
        users,
        tmp,
        config,
        base=str(tiny),
        precision="fp32",
        device="cpu",
        resources=SimResources(cpus_per_client=1, total_cpus=2),
        engine=engine,
        **kwargs,
    )


def tiny_settings(users: Path, profiles: Path, tiny: Path) -> dict[str, str]:
    """ClientApp settings for simulated devices on the tiny model (fp32 on the CPU)."""
    return {
        "sim-users-dir": str(users),
        "sim-profiles-dir": str(profiles),
        "base": str(tiny),
        "precision": "fp32",
        "device": "cpu",
    }


def _shared_a(tiny: Path, path: Path, *, rank: int, scale: float = 1.0) -> Path:
    """A coordinator-style shared A for the tiny base: orthonormal rows at ROW_NORM."""
    base = load_base(tiny)
    spec = AdapterSpec(base_model_id=base.model_id, base_sha256=base.sha256, rank=rank)
    seeded = get_a(materialize(base.model, spec, base_sha256=base.sha256))
    rng = np.random.default_rng(3)
    a = a_from_sketch({k: rng.normal(size=(v.shape[1], 2 * rank)) for k, v in seeded.items()}, rank)
    path.write_bytes(encode_tensors({k: v * scale for k, v in a.items()}))
    return path


@pytest.fixture
def shared_a_file() -> Callable[..., Path]:
    """Writes a coordinator-style shared A for the tiny base (``scale`` != 1 spoils it)."""
    return _shared_a
