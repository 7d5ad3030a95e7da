"""The warm device worker: rounds handed over a Unix socket match rounds run in-process.

A real ``lorafleet serve-device`` process serves the tiny model; the ClientApp (the same
``make_client_app`` a SuperNode loads) hands it rounds when ``device-worker`` is set.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorafleet.client import federated
from lorafleet.client.base import load_base
from lorafleet.client.cli import main as cli_main
from lorafleet.client.device_worker import listen, worker_status
from lorafleet.client.profile import Profile
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.federation import (
    INSTRUCTION_KEY,
    METRICS_KEY,
    PRIOR_KEY,
    REFUSAL_PREFIX,
    UPDATE_KEY,
    RoundInstruction,
)
from lorafleet.protocols.spec import AdapterSpec

LORAFLEET = Path(sys.executable).parent / "lorafleet"
NOTES = "\n\n".join(
    f"Note {i}: Maya climbs with Jonas on Tuesday {i} and feeds the cat Pixel." for i in range(16)
)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the running task's ids; this test is that task."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private folder with a short path: a Unix socket's path must fit in 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="lfw-", dir="/tmp"))
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def start_worker(sock: Path) -> subprocess.Popen[str]:
    """``lorafleet serve-device --socket sock``, returned once it says it is serving."""
    proc = subprocess.Popen(
        [str(LORAFLEET), "serve-device", "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "serving on" not in line:
        proc.kill()
        pytest.fail(f"the worker did not start: {line!r} {proc.communicate()[1][-2000:]}")
    return proc


def stop_worker(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def request(instr: RoundInstruction, prior: bytes | None) -> Message:
    content = RecordDict({INSTRUCTION_KEY: ConfigRecord(instr.to_config())})  # type: ignore[arg-type]
    if prior is not None:
        content[PRIOR_KEY] = ConfigRecord({"b": prior})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def answer(msg: Message, node_config: dict[str, Any]) -> Message:
    """What the real ClientApp replies, on a SuperNode with this node config."""
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )
    return federated.make_client_app()(msg, context)


def rounds(tiny: Path) -> list[RoundInstruction]:
    spec = AdapterSpec(base_model_id="tiny", base_sha256=load_base(tiny).sha256, rank=4)
    common: dict[str, Any] = {
        "spec": spec,
        "personal_steps": 2,
        "prior_steps": 2,
        "lr": 0.05,
        "seq_len": 32,
        "packing": "fp32",
    }
    return [
        RoundInstruction(round=1, prior_version="zero", **common),
        RoundInstruction(round=2, prior_version="p1", **common),
    ]


def two_rounds(tiny: Path, node_config: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """Round 1 from the zero prior, round 2 from a prior built from round 1's delta."""
    out: list[tuple[Any, dict[str, Any]]] = []
    prior: bytes | None = None
    for instr in rounds(tiny):
        reply = answer(request(instr, prior), node_config)
        assert not reply.has_error(), reply.error.reason
        delta = decode_tensors(reply.content.config_records[UPDATE_KEY]["delta"])[0]  # type: ignore[arg-type]
        metrics = dict(reply.content.metric_records[METRICS_KEY])
        out.append((delta, metrics))
        prior = encode_tensors({k: 0.5 * v for k, v in delta.items()}, packing="fp32")
    return out


def device(tmp: Path, name: str, tiny: Path) -> dict[str, Any]:
    (tmp / name).mkdir()
    (tmp / name / "notes.txt").write_text(NOTES)
    return {
        "data": str(tmp / name),
        "profile": str(tmp / f"{name}-profile"),
        "base": str(tiny),
        "precision": "fp32",
        "device": "cpu",
    }


# ------------------------------------------------------------------ a real worker process
def test_rounds_handed_to_the_worker_match_rounds_in_process_and_load_the_base_once(
    tiny_model_dir: Path, tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a worker, and two devices with the same notes
    sock = short_dir / "run" / "w.sock"
    worker = start_worker(sock)
    monkeypatch.setattr(federated, "_WORKERS", {})
    warm = device(tmp_path, "alice", tiny_model_dir) | {"device-worker": str(sock)}
    local = device(tmp_path, "bob", tiny_model_dir)
    try:
        # Execute
        via_worker = two_rounds(tiny_model_dir, warm)
        in_process = two_rounds(tiny_model_dir, local)
        status = worker_status(sock)
    finally:
        code, err = stop_worker(worker)

    # Assert: the same deltas and metrics (but time), and the same adapter versions saved
    for (delta_w, metrics_w), (delta_p, metrics_p) in zip(via_worker, in_process, strict=True):
        assert delta_w.keys() == delta_p.keys()
        for key in delta_w:
            np.testing.assert_array_equal(delta_w[key], delta_p[key])
        metrics_w.pop("train-seconds"), metrics_p.pop("train-seconds")
        assert metrics_w == metrics_p
    saved = [
        [(v.round, v.content_hash) for v in Profile.open(Path(c["profile"])).versions()]
        for c in (warm, local)
    ]
    assert saved[0] == saved[1] and [r for r, _ in saved[0]] == [1, 2]
    # the worker did both rounds on one loaded base, and stopped cleanly
    assert (status.rounds, status.base_loads, status.busy) == (2, 1, False)
    assert status.pid == worker.pid
    assert code == 0 and not sock.exists(), err


def test_sigterm_stops_the_worker_with_one_line_and_removes_its_socket(short_dir: Path) -> None:
    # Prepare: the directory is created 0700, the socket 0600
    sock = short_dir / "new" / "w.sock"
    worker = start_worker(sock)
    modes = (stat.S_IMODE(sock.parent.stat().st_mode), stat.S_IMODE(sock.stat().st_mode))

    # Execute
    code, err = stop_worker(worker, signal.SIGTERM)

    # Assert
    assert modes == (0o700, 0o600)
    assert code == 0
    assert err.strip().splitlines() == [
        f"device worker on {sock} stopped (SIGTERM); socket removed"
    ]
    assert not sock.exists()


# ------------------------------------------------------------------ no worker
@pytest.mark.parametrize("leftover", ["none", "stale socket"])
def test_an_unreachable_worker_is_one_line_naming_the_socket_and_the_command(
    tiny_model_dir: Path, tmp_path: Path, short_dir: Path, leftover: str
) -> None:
    # Prepare: nothing at the path, or the socket file a killed worker left
    sock = short_dir / "w.sock"
    if leftover == "stale socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(sock))
    config = device(tmp_path, "alice", tiny_model_dir) | {"device-worker": str(sock)}

    # Execute
    reply = answer(request(rounds(tiny_model_dir)[0], None), config)

    # Assert: a refusal the coordinator shows, not a round silently run in this process
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith(f"{REFUSAL_PREFIX}no device worker answers on {sock} (")
    assert f"lorafleet serve-device --socket {sock}" in reason
    assert "\n" not in reason
    assert not (tmp_path / "alice-profile").exists()


# ------------------------------------------------------------------ refusing to start
@pytest.mark.parametrize(
    ("mode", "expected"),
    [(0o777, "writable by other users (mode 777"), (0o770, "writable by other users (mode 770")],
)
def test_a_socket_directory_others_may_write_is_refused_in_one_line(
    short_dir: Path, capsys: pytest.CaptureFixture[str], mode: int, expected: str
) -> None:
    # Prepare
    os.chmod(short_dir, mode)

    # Execute
    code = cli_main(["serve-device", "--socket", str(short_dir / "w.sock")])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (short_dir / "w.sock").exists()


def test_a_second_worker_on_a_live_socket_is_refused_and_a_stale_one_replaced(
    short_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a stale socket file, as a killed worker leaves it
    caplog.set_level(logging.INFO, logger="lorafleet.client.device_worker")
    sock = short_dir / "w.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))

    # Execute: one worker takes the path over; a second finds it live
    first = listen(sock)
    try:
        code = cli_main(["serve-device", "--socket", str(sock)])
        mode = stat.S_IMODE(sock.stat().st_mode)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock))  # the first one's, listening
    finally:
        first.close()

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert f"another device worker (pid {os.getpid()}) is serving on {sock}" in err, err
    assert f"removed a stale socket at {sock}" in caplog.text
    assert mode == 0o600
    assert not sock.exists()


def test_a_path_that_is_not_a_socket_is_never_removed(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (short_dir / "notes.txt").write_text("mine")
    started = time.perf_counter()
    code = cli_main(["serve-device", "--socket", str(short_dir / "notes.txt")])
    assert code == 2
    assert "exists and is not a socket" in capsys.readouterr().err
    assert (short_dir / "notes.txt").read_text() == "mine"
    assert time.perf_counter() - started < 10
