"""The federation as users deploy it: `flwr run .` against real Flower processes.

The slow tests start a SuperLink (TLS, SuperNode authentication), register and start
three SuperNodes, each with its own user's notes, and submit the lorafleet app with
`flwr run . CONNECTION`, exactly as docs/deployment.md tells an operator to; and they
run the same app on Flower's local simulation federation. Everything listens on
loopback, every wait is bounded, and every process started here (with its process
group and descendants) is stopped even when a test fails.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from lorafleet.client.base import load_base
from lorafleet.client.device_worker import worker_status
from lorafleet.client.profile import Profile
from lorafleet.server.coordinator import CoordinatorConfig
from lorafleet.server.registry import Registry
from lorafleet.sim import loopback
from lorafleet.sim.loopback import (
    BIN,
    Processes,
    command,
    flower_env,
    free_port,
    superlink,
    supernode,
    wait_until,
    write_connection,
)
from lorafleet.sim.personas import PersonaConfig, generate_personas, write_user_folders

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]
CREDENTIALS = REPO / "deploy" / "credentials.py"
CONNECTION = "lorafleet-test"
DEVICE_KEYS = (
    "sim-users-dir",
    "sim-profiles-dir",
    "base",
    "precision",
    "device",
    "cache-dir",
    "report-versions",
)


# ------------------------------------------------------------------ helpers
def credentials(*args: str) -> None:
    loopback.credentials(CREDENTIALS, *args)


def flwr(env: dict[str, str], *args: str, timeout: float = 120, cwd: Path = REPO) -> str:
    """The `flwr` CLI, from the repository root unless told otherwise."""
    return loopback.flwr(env, *args, cwd=cwd, timeout=timeout)


def flwr_json(env: dict[str, str], *args: str, timeout: float = 120, cwd: Path = REPO) -> Any:
    return loopback.flwr_json(env, *args, cwd=cwd, timeout=timeout)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop()


def tiny_run_config(tiny: Path, data_dir: Path | None, extra: dict[str, Any] | None = None) -> str:
    """`flwr run -c` overrides: two quick rounds on the tiny model, all three nodes.

    With ``data_dir`` None the run config's own (relative) ``data-dir`` stays.
    """
    values: dict[str, Any] = {
        "num-rounds": 2,
        "fraction-train": 1.0,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        "wait-for-nodes-s": 120.0,
        "round-timeout-s": 240.0,
        "max-round-retries": 0,
        "personal-steps": 2,
        "prior-steps": 2,
        "lr": 0.05,
        "seq-len": 32,
        "rank": 4,
        "base-model-id": "tiny",
        "base-sha256": load_base(tiny).sha256,
        **({} if data_dir is None else {"data-dir": str(data_dir)}),
        **(extra or {}),
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def profile_histories(profiles: Path) -> list[list[tuple[int, int | None, str]]]:
    """Each device's versions as (version, round, content hash), devices in sorted order."""
    return sorted(
        [(v.version, v.round, v.content_hash) for v in Profile.open(p).versions()]
        for p in profiles.iterdir()
    )


def registry_histories(data_dir: Path) -> list[list[tuple[int, int | None, str]]]:
    """The same, as the devices reported them to the coordinator's registry."""
    with Registry.open(f"sqlite:///{data_dir / 'registry.db'}") as reg:
        found = []
        for user in reg.search_users().items:
            assert user.pseudonym.startswith("node-")
            history = reg.user_history(user.pseudonym).items
            found.append(
                sorted((v.version, v.provenance.round, v.provenance.content_hash) for v in history)
            )
    return sorted(found)


def run_outcome(
    env: dict[str, str],
    connection: Sequence[str],
    run_id: str,
    timeout: float,
    logs: Callable[[], str],
    cwd: Path = REPO,
) -> tuple[str, str]:
    """Poll `flwr list` until the run has finished; its status and status details."""
    found = ("", "")

    def finished() -> bool:
        nonlocal found
        run = flwr_json(env, "list", *connection, "--run-id", run_id, cwd=cwd)["runs"][0]
        found = (str(run["status"]), str(run.get("status-details", "")))
        return found[0].startswith("finished")

    wait_until(finished, timeout, f"run {run_id} to finish", logs)
    return found


# ------------------------------------------------------------------ fast: the config
def test_the_flower_app_in_pyproject_is_what_flwr_run_builds_and_the_apps_read() -> None:
    # Prepare
    from flwr.cli.config_utils import load_and_validate
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flwr_table = pyproject["tool"]["flwr"]
    run_config = flwr_table["app"]["config"]
    # Execute
    _, warnings = load_and_validate(REPO / "pyproject.toml")  # what `flwr run .` checks
    config = CoordinatorConfig.from_run_config(run_config)
    components = flwr_table["app"]["components"]
    server_app = load_app(components["serverapp"], ValueError, REPO)
    client_app = load_app(components["clientapp"], ValueError, REPO)
    # Assert: every typed field has its hyphenated key, at the typed default
    assert warnings == []
    assert {f.name.replace("_", "-") for f in fields(CoordinatorConfig)} | set(DEVICE_KEYS) == set(
        run_config
    )
    assert config == CoordinatorConfig()
    assert isinstance(server_app, ServerApp)
    assert isinstance(client_app, ClientApp)
    # flwr 1.41 moves a [tool.flwr.federations] table out of pyproject.toml (rewriting
    # the file) on every `flwr run`; connections belong in $FLWR_HOME/config.toml.
    assert "federations" not in flwr_table


def test_the_fab_carries_the_config_and_guide_not_the_source_tree() -> None:
    # Prepare
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    # Execute
    fab = build_fab_from_disk(REPO)
    # Assert: the apps come from the installed package on every host
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert names == {"pyproject.toml", "README.md", "docs/deployment.md", ".info/CONTENT"}


# ------------------------------------------------------------------ fast: credentials
def test_the_credentials_script_writes_a_server_certificate_for_loopback_and_node_keys(
    tmp_path: Path,
) -> None:
    # Prepare
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    # Execute
    credentials("tls", str(tmp_path / "certs"))
    credentials("node-keys", str(tmp_path / "keys"), "sn-1", "sn-2")
    # Assert: the certificate chains to the CA and names 127.0.0.1 and localhost
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    for secret in ("certs/ca.key", "certs/server.key", "keys/sn-1", "keys/sn-2"):
        assert (tmp_path / secret).stat().st_mode & 0o077 == 0, secret
    # Flower reads the pair: the private key as the SuperNode does, the public as `register`
    load_ssh_private_key((tmp_path / "keys" / "sn-1").read_bytes(), None)
    assert try_load_public_key(tmp_path / "keys" / "sn-1.pub")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tls", "{out}"], "exists; pass --force"),
        (["node-keys", "{out}", "bad/name"], "must be letters"),
        (["tls", "{out}/new", "--host", "not a host!"], "neither an IP address nor a DNS"),
    ],
)
def test_the_credentials_script_refuses_mistakes_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    # Prepare: certificates already there
    credentials("tls", str(tmp_path))
    before = (tmp_path / "ca.crt").read_bytes()
    # Execute
    proc = subprocess.run(
        [sys.executable, str(CREDENTIALS), *(a.format(out=tmp_path) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Assert
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "ca.crt").read_bytes() == before


# ------------------------------------------------------------------ slow: a real SuperLink
@pytest.mark.slow
@pytest.mark.parametrize("device_worker", [False, True], ids=["fresh-process", "device-worker"])
def test_three_authenticated_supernodes_train_the_app_that_flwr_run_submits(
    tiny_model_dir: Path, tmp_path: Path, processes: Processes, device_worker: bool
) -> None:
    # Prepare: users, credentials, a SuperLink with TLS and SuperNode authentication
    users = write_user_folders(
        generate_personas(PersonaConfig(num_users=3, notes_per_user=30)), tmp_path / "users"
    )
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    credentials("tls", str(certs))
    credentials("node-keys", str(keys), "sn-1", "sn-2", "sn-3", "intruder")
    port = free_port()
    processes.start(
        "superlink",
        superlink(port, certs, tmp_path / "superlink.db"),
        flower_env(tmp_path / "home" / "superlink"),
        tmp_path,
    )
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def healthy() -> bool:
        try:
            return httpx.get(f"https://127.0.0.1:{port}/health", verify=tls, timeout=2).is_success
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, "the SuperLink", processes.tail)
    with pytest.raises(httpx.HTTPError):  # no plain HTTP next to TLS
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    cli = flower_env(tmp_path / "home" / "cli")
    write_connection(tmp_path / "home" / "cli", CONNECTION, port, certs / "ca.crt")
    node_ids = []
    for i in (1, 2, 3):
        registered = flwr_json(cli, "supernode", "register", str(keys / f"sn-{i}.pub"), CONNECTION)
        node_ids.append(str(registered["node-id"]))
    # With device_worker, each device runs `lorafleet serve-device` (the base stays
    # loaded) and its SuperNode's ClientApps hand their rounds to it; a socket's path
    # must fit in 107 bytes, so the sockets live in a short private folder.
    sockets = Path(tempfile.mkdtemp(prefix="lfsn-", dir="/tmp"))
    for i, user in enumerate(sorted(users.iterdir()), start=1):
        node_config = (
            f"data='{user}' profile='{tmp_path / 'profiles' / user.name}' "
            f"base='{tiny_model_dir}' precision='fp32' device='cpu'"
        )
        if device_worker:
            sock = sockets / f"sn-{i}" / "w.sock"
            processes.start(
                f"worker-{i}",
                [str(BIN / "lorafleet"), "serve-device", "--socket", str(sock)],
                flower_env(tmp_path / "home" / f"worker-{i}"),
                tmp_path,
            )
            name = f"worker-{i}"
            wait_until(
                lambda name=name: "serving on" in processes.log(name),
                120,
                name,
                processes.tail,
            )
            node_config += f" device-worker='{sock}'"
        processes.start(
            f"sn-{i}",
            supernode(port, certs, keys / f"sn-{i}", node_config, max_wait_time=120),
            flower_env(tmp_path / "home" / f"sn-{i}"),
            tmp_path,
        )

    def online() -> list[str]:
        nodes = flwr_json(cli, "supernode", "list", CONNECTION)["nodes"]
        return sorted(str(n["node-id"]) for n in nodes if n["status"] == "online")

    wait_until(lambda: online() == sorted(node_ids), 90, "3 SuperNodes online", processes.tail)

    # Execute: a SuperNode with an unregistered key, then the app, as a user submits it
    processes.start(
        "intruder",
        supernode(
            port,
            certs,
            keys / "intruder",
            f"data='{sorted(users.iterdir())[0]}'",
            max_retries=1,
            max_wait_time=20,
        ),
        flower_env(tmp_path / "home" / "intruder"),
        tmp_path,
    )
    intruder_status = processes.wait("intruder", timeout=90)
    data_dir = tmp_path / "coordinator"
    started = flwr_json(
        cli, "run", ".", CONNECTION, "-c", tiny_run_config(tiny_model_dir, data_dir)
    )
    status, _ = run_outcome(cli, [CONNECTION], started["run-id"], 420, processes.tail)

    # Assert: the intruder was refused and never joined
    assert intruder_status != 0
    assert "Failed to activate SuperNode" in processes.log("intruder")
    assert "No SuperNode found with the given public key" in processes.log("superlink")
    assert online() == sorted(node_ids)
    # The run completed round 0 (the default gradient A's sketch) and two rounds, each
    # with all three registered nodes' replies
    assert status == "finished:completed", processes.tail()
    results = json.loads((data_dir / "results.json").read_text())
    assert [(r["round"], r["accepted"], r["refused"]) for r in results["rounds"]] == [
        (0, 3, {}),
        (1, 3, {}),
        (2, 3, {}),
    ]
    assert sorted(results["evaluation"]) == sorted(node_ids)
    # Each device kept its personal adapter in its own profile: one version per round,
    # and the final personalization's from the last prior (it carries the last round)
    for user in users.iterdir():
        versions = Profile.open(tmp_path / "profiles" / user.name).versions()
        assert [v.round for v in versions] == [1, 2, 2]
        assert versions[-1].metrics["steps"] > 0  # the personalize round trained
    # and the registry knows every node's versions, under keyed node pseudonyms
    assert registry_histories(data_dir) == profile_histories(tmp_path / "profiles")
    if device_worker:  # every message ran on its device's worker, which loaded the base once
        for i in (1, 2, 3):
            status = worker_status(sockets / f"sn-{i}" / "w.sock")
            # two training rounds at least (the final personalization and evaluation too)
            assert status.base_loads == 1 and status.rounds >= 2, status
    shutil.rmtree(sockets, ignore_errors=True)


# ------------------------------------------------------------------ slow: local simulation
@pytest.mark.slow
def test_flwr_run_on_the_local_simulation_federation_trains_every_user(
    tiny_model_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    # Prepare: a private FLWR_HOME and local SuperLink port; Ray's socket paths must stay
    # under 108 characters, so its temp folder is a short one, removed afterwards.
    users = write_user_folders(
        generate_personas(PersonaConfig(num_users=3, notes_per_user=30)), tmp_path / "users"
    )
    home = tmp_path / "home"
    with tempfile.TemporaryDirectory(prefix="lfray-") as ray_tmp:
        env = flower_env(
            home,
            RAY_TMPDIR=ray_tmp,
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        )
        try:
            sim = ("--num-supernodes", "3", "--init-args-num-cpus", "2")
            flwr(env, "federation", "simulation-config", *sim, "--client-resources-num-cpus", "1")
            data_dir = tmp_path / "coordinator"
            overrides = tiny_run_config(
                tiny_model_dir,
                data_dir,
                {
                    "sim-users-dir": str(users),
                    "sim-profiles-dir": str(tmp_path / "profiles"),
                    "base": str(tiny_model_dir),
                    "precision": "fp32",
                    "device": "cpu",
                },
            )
            # Execute
            started = flwr_json(env, "run", ".", "-c", overrides)
            status, _ = run_outcome(
                env, [], started["run-id"], 300, lambda: _local_superlink_log(home)
            )
        finally:
            # `flwr` started the managed SuperLink detached; it is ours by its FLWR_HOME.
            for proc in _local_superlinks(home):
                processes.adopt(proc)
            processes.stop()
    # Assert
    assert status == "finished:completed", _local_superlink_log(home)
    results = json.loads((data_dir / "results.json").read_text())
    assert [r["accepted"] for r in results["rounds"]] == [3, 3, 3]  # round 0 and two
    assert len(results["evaluation"]) == 3
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == sorted(
        u.name for u in users.iterdir()
    )
    assert registry_histories(data_dir) == profile_histories(tmp_path / "profiles")


@pytest.mark.slow
def test_the_two_command_path_fails_the_flower_way_without_users_then_trains_them(
    tiny_model_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    # Prepare: a user's own project folder holding what the FAB carries (the apps come
    # from the installed package), and nothing else: no users yet.
    project = tmp_path / "project"
    (project / "docs").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "docs/deployment.md"):
        (project / name).write_bytes((REPO / name).read_bytes())
    home = tmp_path / "home"
    # Only the tiny model and short rounds are overridden; sim-users-dir, sim-profiles-dir
    # and data-dir stay the run config's relative defaults.
    overrides = tiny_run_config(
        tiny_model_dir,
        None,
        {"base": str(tiny_model_dir), "precision": "fp32", "device": "cpu"},
    )
    federation = "num-supernodes=3 init-args-num-cpus=2 client-resources-num-cpus=1"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lfray-") as ray_tmp:
        env = flower_env(home, RAY_TMPDIR=ray_tmp, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port))
        try:
            # The local SuperLink runs in the project folder, as when the user's first
            # `flwr` command there starts it (relative paths are read from there).
            start_local_superlink(processes, env, project, port, tmp_path / "state.db")
            # Execute 1: `flwr run .` before `lorafleet-sim prepare`
            failed = flwr_json(
                env,
                "run",
                ".",
                "--federation-config",
                federation,
                "-c",
                overrides,  # with max-round-retries=0: one failed round fails the run
                cwd=project,
            )
            failure = run_outcome(env, [], failed["run-id"], 600, processes.tail, project)
            # Execute 2: the two documented commands
            prepared = subprocess.run(
                [str(BIN / "lorafleet-sim"), "prepare", "--users", "3", "--notes", "30"],
                cwd=project,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            started = flwr_json(
                env, "run", ".", "--federation-config", federation, "-c", overrides, cwd=project
            )
            success = run_outcome(env, [], started["run-id"], 600, processes.tail, project)
        finally:
            for proc in _local_superlinks(home):
                processes.adopt(proc)
            processes.stop()
    # Assert: the first run failed as Flower reports failures, naming the cause and fix
    status, details = failure
    assert status == "finished:failed", processes.tail()
    assert "sim-users-dir 'runs/sim/users' does not exist" in details, details
    assert "lorafleet-sim prepare" in details, details
    # prepare wrote the users where the default run config looks, and said what to run
    assert prepared.returncode == 0, prepared.stderr
    assert 'flwr run . --federation-config "num-supernodes=3"' in prepared.stdout
    users = sorted(p.name for p in (project / "runs" / "sim" / "users").iterdir())
    assert len(users) == 3
    # and the second run trained every user with the relative defaults
    assert success[0] == "finished:completed", processes.tail()
    results = json.loads((project / "runs" / "coordinator" / "results.json").read_text())
    assert [r["accepted"] for r in results["rounds"]] == [3, 3, 3]  # round 0 and two
    assert sorted(p.name for p in (project / "runs" / "sim" / "profiles").iterdir()) == users


def start_local_superlink(
    processes: Processes, env: dict[str, str], cwd: Path, port: int, database: Path
) -> None:
    """Start what `flwr` starts as its managed local SuperLink, from ``cwd``, and wait.

    The same command line as ``flwr.cli.local_superlink`` (simulation mode, subprocess
    isolation) on the port the ``local`` connection probes, so `flwr run .` finds it and
    uses it. flwr itself allows the SuperLink 15 s to come up, which a loaded 2-core
    machine misses; here it gets minutes.
    """
    processes.start(
        "local-superlink",
        command(
            "flower-superlink",
            "insecure",
            "simulation",
            isolation="subprocess",
            control_api_address=f"127.0.0.1:{free_port()}",
            host="127.0.0.1",
            port=port,
            database=database,
        ),
        env,
        cwd,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success
        except httpx.HTTPError:
            return False

    wait_until(healthy, 240, "the local SuperLink", processes.tail)


def _local_superlinks(home: Path) -> list[psutil.Process]:
    marker = str(home / "local-superlink")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(marker in part for part in cmdline):
            found.append(proc)
    return found


def _local_superlink_log(home: Path) -> str:
    path = home / "local-superlink" / "superlink.log"
    return path.read_text(errors="replace")[-5000:] if path.is_file() else ""
