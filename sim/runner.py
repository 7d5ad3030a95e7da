"""Run a whole federation on one machine with Flower's simulation engine (Ray).

One Ray actor per CPU serves the virtual devices in turn, each actor keeping one base
in memory and swapping users' B matrices (about 2 GB for SmolLM2-135M, instead of 1.6 GB
per simulated device). Everything a run writes (users' data and profiles, the
coordinator's state, Ray's temp files) stays inside its output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from lorafleet.client.federated import make_client_app
from lorafleet.protocols.errors import LorafleetError
from lorafleet.server.coordinator import CoordinatorConfig
from lorafleet.server.flower_app import make_server_app, run_federation

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
    engine: str = "ray",
) -> dict[str, Any]:
    """Simulate one device per user folder in ``users_dir``; returns the results record.

    The coordinator's state lives in ``config.data_dir``; a second call with the same
    folder resumes after the last completed round. ``engine="ray"`` runs Flower's
    simulation engine (one Ray actor per CPU); ``engine="local"`` runs the same
    ServerApp and ClientApp code in this process through :class:`LocalGrid`, one device
    after another (no Ray start-up, one base in memory: what experiments on a small
    machine want).

    Users are recorded in the registry under their folder names (``user-pseudonym =
    device``): every simulated device is this process's own code, and the folder name
    is what the person running the simulation knows each user by.
    """
    from flwr.simulation import run_simulation

    config = dataclasses.replace(config, user_pseudonym="device")

    if engine not in ("ray", "local"):
        raise LorafleetError(f"unknown simulation engine {engine!r}; use ray or local")
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
    if engine == "local":
        grid = LocalGrid(client_app or make_client_app(settings), len(users))
        return run_federation(grid, config)
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


# ------------------------------------------------------------------ in-process grid
Dropout = Callable[[int, Message], bool]
"""``(partition id, message) -> True`` to make that node fail that message."""


class LocalGrid(Grid):
    """A Flower Grid that hands each message straight to a ClientApp in this process.

    One persistent :class:`flwr.app.Context` per node (SecAgg+ keeps its state there),
    messages and replies deep-copied as a transport would, and a failing node answers
    with an error reply, as Flower's runtimes do. No Ray, no threads: protocol tests and
    benchmarks of the coordinator's rounds run in milliseconds per message. ``dropout``
    lets a test fail chosen messages (a dropout at a chosen SecAgg+ stage).

    Building one sets Flower's process-wide task identity, which Flower's own server
    runtime sets before it runs a ServerApp; messages cannot be created without it.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: Mapping[str, Any] | None = None,
        dropout: Dropout | None = None,
        first_node_id: int = 1001,
    ) -> None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 1  # the SuperLink's node id in Flower's runtimes
        self.client_app = client_app
        self.dropout = dropout
        self.partition = {first_node_id + i: i for i in range(num_nodes)}
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node, i in self.partition.items()
        }
        self.delivered = 0
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        """Flower's hook; the local grid has one run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The (single) run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message from the coordinator to ``dst_node_id``."""
        return Message(
            content=content,
            message_type=message_type,
            dst_node_id=dst_node_id,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        """The simulated nodes."""
        return list(self.partition)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not supported: use :meth:`send_and_receive`."""
        raise NotImplementedError("LocalGrid delivers synchronously; use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not supported: use :meth:`send_and_receive`."""
        raise NotImplementedError("LocalGrid delivers synchronously; use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message, in order, and return the replies."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                continue  # an unknown node never answers
            received = copy.deepcopy(msg)
            self.delivered += 1
            try:
                if self.dropout is not None and self.dropout(self.partition[node], received):
                    raise ConnectionError(f"simulated dropout of node {node}")
                reply = self.client_app(received, self.contexts[node])
            except Exception as exc:  # a device's failure is an error reply, not ours
                reply = Message(
                    Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received
                )
            replies.append(copy.deepcopy(reply))
        return replies


def synthetic_delta(
    shapes: Mapping[str, tuple[int, ...]], norm: float, seed: int | tuple[int, ...]
) -> dict[str, Any]:
    """A reproducible random delta with global L2 ``norm`` (float32), for protocol runs."""
    import numpy as np

    rng = np.random.default_rng(seed if isinstance(seed, int) else list(seed))
    raw = {k: rng.standard_normal(s).astype(np.float64) for k, s in sorted(shapes.items())}
    total = float(np.sqrt(sum(float(np.square(v).sum()) for v in raw.values()))) or 1.0
    return {k: (v * (norm / total)).astype(np.float32) for k, v in raw.items()}


def make_synthetic_client_app(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    norm_fraction: float = 0.9,
    num_examples: int = 20,
) -> ClientApp:
    """A ClientApp whose devices skip training and send synthetic deltas.

    Device ``i`` in round ``r`` sends :func:`synthetic_delta` seeded ``(i, r)`` with norm
    ``norm_fraction * clip_norm``, through the real reply path
    (:func:`lorafleet.client.federated.update_reply`, behind SecAgg+'s mod): the
    coordinator's rounds, plain or secure, can be measured and checked exactly without a
    model. Evaluation replies carry fixed losses. They send no gradient sketch, so the
    cohort must run on the seeded A (``shared_a="seeded"``).
    """
    from lorafleet.client import federated
    from lorafleet.protocols.federation import RoundMetrics

    app = ClientApp()

    def metrics() -> RoundMetrics:
        return RoundMetrics(
            num_examples=num_examples, base_loss=2.0, prior_loss=1.8, personal_loss=1.5
        )

    @app.train(mods=[federated.secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        """A synthetic training reply."""
        instr, _ = federated.read_instruction(msg)
        node = int(context.node_config["partition-id"])
        delta = synthetic_delta(shapes, norm_fraction * instr.clip_norm, (node, instr.round))
        return federated.update_reply(msg, instr, delta, metrics())

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """A synthetic evaluation reply."""
        instr, _ = federated.read_instruction(msg)
        return federated.update_reply(msg, instr, None, metrics())

    return app
