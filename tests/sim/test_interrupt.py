"""Ctrl-C during a simulation: the process ends within seconds, quietly, and resumes.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group (the driver and,
with Ray, its workers), so the test starts the simulation in a session of its own and
signals the group, in the middle of a round.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


def _command(tiny: Path, out: Path, engine: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lorafleet.sim.cli",
        "experiment",
        "--users",
        "3",
        "--notes",
        "20",
        "--rounds",
        "3",
        "--fraction",
        "1.0",
        "--steps",
        "2",
        "--personalize-steps",
        "2",
        "--base",
        str(tiny),
        "--precision",
        "fp32",
        "--no-baselines",
        "--cold-start",
        "",
        "--engine",
        engine,
        "--output",
        str(out),
    ]


def _wait_for(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read the child's stderr until ``needle`` shows up; returns what was read."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while needle not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise AssertionError(f"never saw {needle!r}; stderr so far:\n{seen[-3000:]}")
            if sel.select(timeout=min(left, 1.0)):
                line = proc.stderr.readline()
                seen += line
    return seen


def _session(sid: int) -> list[str]:
    """Pids of the processes still in session ``sid``."""
    found = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True, check=False)
    return found.stdout.split()


# Ray is where Ctrl-C used to hang (Flower's ServerApp thread blocked in
# send_and_receive); the in-process engine has no such thread and runs as a slow test.
@pytest.mark.parametrize("engine", [pytest.param("local", marks=pytest.mark.slow), "ray"])
def test_ctrl_c_ends_a_simulation_within_seconds_and_the_run_resumes(
    tiny_model_dir: Path, tmp_path: Path, engine: str
) -> None:
    # Prepare: a tiny federation, started as a terminal would start it
    out = tmp_path / "run"
    env = {**os.environ, "LORAFLEET_RAY_TMPDIR": f"/tmp/lf-int-{os.getpid()}"}
    proc = subprocess.Popen(
        _command(tiny_model_dir, out, engine),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        before = _wait_for(proc, "round 2/3", timeout=240)
        # Execute: Ctrl-C while round 2 is in flight
        time.sleep(0.5)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Assert: gone within seconds, exit 130, one line saying how to resume, no traceback
    assert proc.returncode == 130, (before + err)[-3000:]
    assert took < 20, f"took {took:.1f} s to stop"
    assert "Traceback" not in before + err
    assert "run the same command again to resume" in err
    # Nothing of the group outlives it for long (Ray's helpers share its session and
    # stop once they see the driver gone)
    leftover = _session(proc.pid)
    deadline = time.monotonic() + 20
    while leftover and time.monotonic() < deadline:
        time.sleep(0.5)
        leftover = _session(proc.pid)
    assert not leftover, f"processes left in the session: {leftover}"
    # And the same command resumes after the last finished round and completes
    again = subprocess.run(
        _command(tiny_model_dir, out, engine),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    # round 1 was committed before the signal; round 2 may have finished in the seconds
    # the process took to leave (Ray's shutdown), and is then not run again
    assert re.search(r"resuming after round [12] ", again.stderr), again.stderr[-3000:]
    assert "results:" in again.stdout


def test_after_ctrl_c_the_log_drops_flowers_dead_actor_errors() -> None:
    """Ray stops the actors on Ctrl-C and Flower logs each as an ERROR with a traceback;
    the quiet filter keeps real errors before the interrupt and drops those after it."""
    # Prepare: the filter the CLI puts on Flower's logger, and two ERROR records
    import logging

    from lorafleet.sim import cli

    keep = cli._OnlyWarnings()
    real = logging.LogRecord("flwr", logging.ERROR, __file__, 1, "ClientApp raised", None, None)
    dead = logging.LogRecord(
        "flwr",
        logging.ERROR,
        __file__,
        1,
        "Traceback ... ActorDiedError ... Worker exit type: INTENDED_USER_EXIT",
        None,
        None,
    )
    try:
        # Execute / Assert: before the interrupt real errors pass, dead-actor ones never do
        assert keep.filter(real)
        assert not keep.filter(dead)
        cli._INTERRUPTED.set()
        assert not keep.filter(real)
    finally:
        cli._INTERRUPTED.clear()
