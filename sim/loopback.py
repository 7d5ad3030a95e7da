"""A Flower deployment on this machine's loopback, as docs/deployment.md sets one up.

The deployment tests (tests/deploy/test_superlink.py) and the warm-device benchmark
(bench/warm_device.py) both start real Flower processes: a SuperLink with TLS and
SuperNode authentication, SuperNodes with their node config, optionally one
``lorafleet serve-device`` worker per device, and the ``flwr`` CLI submitting the app.
This module is what they share: the process environment, the commands, and a process
set that stops everything it started, descendants included, even when a run fails.
Every address is 127.0.0.1; nothing here talks to another machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "BIN",
    "Processes",
    "command",
    "credentials",
    "flower_env",
    "flwr",
    "flwr_json",
    "free_port",
    "superlink",
    "supernode",
    "wait_until",
    "write_connection",
]

BIN = Path(sys.executable).parent
"""The environment's scripts: flwr, flower-superlink, flower-supernode, lorafleet."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of one Flower process: its own FLWR_HOME, nothing off-machine."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        # SuperLink would otherwise `uv sync` the app's dependencies from an index.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def credentials(script: Path, *args: str) -> None:
    """Run deploy/credentials.py (``script``) as an operator does: certificates, node keys.

    Raises
    ------
        RuntimeError: it failed; the message holds its stderr.
    """
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"credentials.py {' '.join(args)} failed: {proc.stderr[-2000:]}")


def flwr(env: Mapping[str, str], *args: str, cwd: Path, timeout: float = 120) -> str:
    """Run the ``flwr`` CLI in ``cwd`` (the app's folder); its stdout.

    Raises
    ------
        RuntimeError: it failed; the message holds its output.
    """
    proc = subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def flwr_json(env: Mapping[str, str], *args: str, cwd: Path, timeout: float = 120) -> Any:
    """``flwr ... --format json``, parsed; a reply without ``success`` is an error."""
    out = flwr(env, *args, "--format", "json", cwd=cwd, timeout=timeout)
    reply = json.loads(out[out.index("{") :])
    if not reply.get("success"):
        raise RuntimeError(f"flwr {' '.join(args)}: {reply}")
    return reply


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str] = str
) -> None:
    """Poll ``check`` each second until it is true.

    Raises
    ------
        TimeoutError: after ``timeout`` seconds, naming ``what`` and the processes' logs.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs()}")


def command(binary: str, *flags: str, **options: object) -> list[str]:
    """``binary --flag --key value ...`` from keywords (``_`` in a key becomes ``-``)."""
    argv = [str(BIN / binary), *(f"--{flag}" for flag in flags)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def superlink(port: int, certs: Path, database: Path, **options: object) -> list[str]:
    """A SuperLink on TLS (``certs`` from deploy/credentials.py) with node authentication."""
    return command(
        "flower-superlink",
        "enable-supernode-auth",
        "disable-runtime-dependency-installation",
        ssl_ca_certfile=certs / "ca.crt",
        ssl_certfile=certs / "server.pem",
        ssl_keyfile=certs / "server.key",
        host="127.0.0.1",
        port=port,
        database=database,
        **options,
    )


def supernode(port: int, certs: Path, key: Path, node_config: str, **options: object) -> list[str]:
    """A SuperNode on TLS, authenticating with ``key``, its runtime API on a free port."""
    return command(
        "flower-supernode",
        superlink=f"127.0.0.1:{port}",
        root_certificates=certs / "ca.crt",
        auth_supernode_private_key=key,
        port=free_port(),
        node_config=node_config,
        **options,
    )


def write_connection(cli_home: Path, name: str, port: int, ca: Path) -> None:
    """The ``flwr`` CLI's config.toml naming one SuperLink connection (TLS, loopback)."""
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n'
    )


class Processes:
    """Processes started in sessions of their own, their output in ``logs/NAME.log``.

    Flower detaches some children (SuperExec, ServerApp, ClientApp) into sessions of
    their own, so :meth:`stop` collects each process's descendants before stopping it
    and stops them by pid as well.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.extra: list[psutil.Process] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        """Start ``argv`` as ``name``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as log:
            self.started[name] = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def adopt(self, proc: psutil.Process) -> None:
        """Also stop a process Flower detached (found by a path unique to the caller)."""
        self.extra.append(proc)

    def wait(self, name: str, timeout: float) -> int:
        """The exit status of a process expected to end by itself within ``timeout``.

        Raises
        ------
            TimeoutError: it is still running; the message holds every log's tail.
        """
        try:
            return self.started[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{name} still running after {timeout:.0f}s\n{self.tail()}"
            ) from None

    def log(self, name: str) -> str:
        """What process ``name`` has written so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def tail(self) -> str:
        """The last lines of every log, for an error message."""
        return "\n".join(f"----- {n} -----\n{self.log(n)[-3000:]}" for n in sorted(self.started))

    def rss_mib(self, include: Callable[[str, psutil.Process], bool]) -> float:
        """Summed RSS of the started processes and descendants that ``include`` accepts.

        ``include(name, proc)`` sees the name a process (or its ancestor) was started
        under; processes that end while being read count as zero.
        """
        total = 0
        for name, popen in self.started.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(popen.pid)
                for proc in (root, *root.children(recursive=True)):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if include(name, proc):
                            total += proc.memory_info().rss
        return total / 2**20

    def stop(self) -> None:
        """Stop everything started or adopted, descendants included (TERM, then KILL)."""
        roots = list(self.extra)
        for popen in self.started.values():
            if popen.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    roots.append(psutil.Process(popen.pid))
        targets: list[psutil.Process] = []
        for proc in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                targets += [proc, *proc.children(recursive=True)]
        for popen in self.started.values():  # the group outlives a leader that exited
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
        for proc in targets:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(targets, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for popen in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)  # anything left in the group
            popen.wait(timeout=5)
