"""kill -9 the coordinator mid-federation; a restart resumes at the last completed round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from lorafleet.server.registry import Registry
from lorafleet.sim.runner import SimResources, simulate

pytestmark = pytest.mark.filterwarnings("ignore")


def _finished_rounds(url: str, spec: object) -> list[int]:
    if not Path(url.removeprefix("sqlite:///")).exists():
        return []
    reg = Registry.open(url)
    try:
        return sorted(r.number for r in reg.list_rounds(spec).items if r.status == "finished")  # type: ignore[arg-type]
    finally:
        reg.close()


def test_a_killed_coordinator_resumes_without_losing_a_round(
    tiny_model_dir: Path, tmp_path: Path, setup_run: Any
) -> None:
    # Prepare: a 3-round federation in a child process (with its own Ray cluster)
    users, config = setup_run(tmp_path, tiny_model_dir, num_rounds=3)
    ray_tmp = f"/tmp/lf-resume-{os.getpid()}"
    script = textwrap.dedent(
        f"""
        import warnings; warnings.filterwarnings("ignore")
        from pathlib import Path
        from lorafleet.server.coordinator import CoordinatorConfig
        from lorafleet.sim.runner import SimResources, simulate
        config = CoordinatorConfig(**{config.__dict__!r})
        simulate(Path({str(users)!r}), Path({str(tmp_path)!r}), config, base={str(tiny_model_dir)!r},
                 precision="fp32", device="cpu", resources=SimResources(total_cpus=2))
        """
    )
    env = {**os.environ, "LORAFLEET_RAY_TMPDIR": ray_tmp, "RAY_TMPDIR": ray_tmp}
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Execute: wait for round 1 to finish, then kill everything of that run at once
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not _finished_rounds(config.registry, config.spec):
            assert child.poll() is None, "the federation stopped before round 1 finished"
            time.sleep(0.5)
        assert _finished_rounds(config.registry, config.spec), "round 1 never finished"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    done_before = _finished_rounds(config.registry, config.spec)
    prior_files = {
        p.name: p.read_bytes() for p in (Path(config.data_dir) / "priors").rglob("*.safetensors")
    }
    # A restart with the same data dir
    results = simulate(
        users,
        tmp_path,
        config,
        base=str(tiny_model_dir),
        precision="fp32",
        device="cpu",
        resources=SimResources(total_cpus=2),
    )
    # Assert: it ran only the missing rounds, and every earlier prior is untouched
    assert [r["round"] for r in results["rounds"] if r["prior_version"]] == list(
        range(done_before[-1] + 1, 4)
    )
    assert _finished_rounds(config.registry, config.spec) == [1, 2, 3]
    for name, data in prior_files.items():
        if int(name[1:5]) <= done_before[-1]:
            assert next((Path(config.data_dir) / "priors").rglob(name)).read_bytes() == data
    assert results["prior_version"].endswith("/v3")
