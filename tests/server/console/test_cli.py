"""``lorafleet-server console``: starts alone on loopback and prints the setup token."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import State


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_console_command_serves_the_setup_page_and_prints_a_one_time_token(
    state: State,
) -> None:
    # Prepare
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lorafleet.server.cli",
        "console",
        "--data-dir",
        str(state.data_dir),
        "--port",
        str(port),
    ]

    # Execute
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "setup token" in line or not line:
                break
        token = re.search(r"setup token: (\S+)", "".join(lines))
        setup = httpx.get(f"http://127.0.0.1:{port}/setup")
        users = httpx.get(f"http://127.0.0.1:{port}/users")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)

    # Assert
    assert f"console on http://127.0.0.1:{port}" in "".join(lines), err
    assert token is not None
    assert setup.status_code == 200 and "Setup token" in setup.text
    assert users.status_code == 303
    assert proc.returncode == 0
    assert "Traceback" not in err


def run_console(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``lorafleet-server console --data-dir DATA_DIR ARGS...`` to its end."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet.server.cli",
            "console",
            "--data-dir",
            str(data_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_public_address_without_tls_is_one_clear_line(tmp_path: Path) -> None:
    # Execute
    proc = run_console(tmp_path, "--host", "0.0.0.0")

    # Assert
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: console: refusing plain HTTP on 0.0.0.0")
    assert "Traceback" not in proc.stderr


def test_a_forwarded_allow_ips_that_names_no_proxy_is_one_clear_line(tmp_path: Path) -> None:
    # Execute
    proc = run_console(tmp_path, "--forwarded-allow-ips", "*")

    # Assert: trusting every peer's X-Forwarded-For is what the flag exists to avoid
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: console: --forwarded-allow-ips item '*'")
    assert "Traceback" not in proc.stderr
