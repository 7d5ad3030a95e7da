"""``lorafleet-sim``: run federated experiments and the federated demo from a shell."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lorafleet.client.cli import PRECISION_CHOICES
from lorafleet.protocols.cli import DefaultsHelpFormatter, add_version_flag
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.spec import DEFAULT_TARGETS
from lorafleet.server.aggregation import AGGREGATORS
from lorafleet.server.coordinator import (
    DEFAULT_PERSONAL_A_LR,
    DEFAULT_PERSONAL_LR,
    DEFAULT_PERSONAL_LR_SHARED_A,
)

if TYPE_CHECKING:
    from lorafleet.server.console.app import ConsoleServer
    from lorafleet.sim.experiment import ExperimentConfig


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are one line on stderr and exit 2, like the rest."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: MESSAGE (see PROG --help)`` and exit 2."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lorafleet-sim",
        description="Federated personalization on one machine.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_version_flag(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("demo", "8 synthetic users, 3 rounds on the default base, then the baselines"),
        ("experiment", "a configurable experiment with the cold-start curve"),
        ("scale", "scale-down curves: the experiment at each rank and notes per user"),
    ):
        p = sub.add_parser(name, help=help_text, formatter_class=DefaultsHelpFormatter)
        _add_run_options(p, name)
    prep = sub.add_parser(
        "prepare",
        help="write synthetic user folders for `flwr run .` on the local simulation",
        formatter_class=DefaultsHelpFormatter,
        description="Write one folder per synthetic user where the run config's "
        "sim-users-dir looks (runs/sim/users, read from the folder where the local "
        "SuperLink started), then run `flwr run .` from this folder.",
    )
    prep.add_argument("--users", type=int, default=8, help="synthetic users (one per SuperNode)")
    prep.add_argument("--notes", type=int, default=60, help="notes per synthetic user")
    prep.add_argument("--seed", type=int, default=0, help="seed of the synthetic personas")
    prep.add_argument(
        "--out",
        type=Path,
        default=Path(SIM_USERS_DIR),
        help="where to write the user folders (the run config's sim-users-dir)",
    )
    return parser


def _add_run_options(p: argparse.ArgumentParser, name: str) -> None:
    """The options of one federated run, shared by demo, experiment and scale."""
    p.add_argument("--output", type=Path, default=Path("runs") / name, help="run folder")
    p.add_argument("--users", type=int, default=8, help="synthetic users")
    p.add_argument("--users-dir", type=Path, default=None, help="real per-user folders instead")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--fraction", type=float, default=0.5, help="share of users per round")
    # In scale, --notes is the sweep; the synthetic users' size has its own name there.
    p.add_argument(
        "--synthetic-notes" if name == "scale" else "--notes",
        dest="notes_per_user",
        type=int,
        default=60,
        help="notes per synthetic user",
    )
    p.add_argument(
        "--steps", type=int, default=6, help="prior steps per device and round (FedAvg's too)"
    )
    p.add_argument(
        "--personal-steps",
        type=int,
        default=0,
        help="personal steps inside each round (0: personalize once, after the last round)",
    )
    p.add_argument(
        "--personalize-steps",
        type=int,
        default=0,
        help="at most this many steps of personal fine-tuning from the final prior, "
        "early-stopped on validation (0: the local-only budget)",
    )
    p.add_argument(
        "--step-bound",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cap the final personalization so that no user spends more device steps (prior, "
        "round 0's sketch, personal) than local-only plus FedAvg global",
    )
    p.add_argument(
        "--blend",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after personal fine-tuning, also keep a blend with the prior (weights "
        ".25/.5/.75) if it validates best",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="device learning rate of B: the prior's steps (unless --prior-lr) and local B's",
    )
    p.add_argument(
        "--prior-lr",
        type=float,
        default=0.0,
        help="learning rate of the prior's steps alone, so the baselines keep --lr's (0: --lr)",
    )
    p.add_argument(
        "--personal-lr",
        type=float,
        default=DEFAULT_PERSONAL_LR,
        help="learning rate of the personal fine-tuning and of newcomers on the seeded A (0: --lr)",
    )
    p.add_argument(
        "--personal-lr-shared-a",
        type=float,
        default=DEFAULT_PERSONAL_LR_SHARED_A,
        help="the same on a gradient-aligned shared A (--shared-a gradient; 0: --lr)",
    )
    p.add_argument(
        "--personal-a-lr",
        type=float,
        default=DEFAULT_PERSONAL_A_LR,
        help="learning rate of A in the final personalization, a personal A kept on the "
        "device (0: the seeded A)",
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        default=10.0,
        help="max L2 norm of a device's prior delta (DP noise scales with it)",
    )
    p.add_argument(
        "--prox-mu", type=float, default=0.0, help="pull of the personal B toward the prior"
    )
    p.add_argument(
        "--server-lr",
        type=float,
        default=1.0,
        help="the coordinator's step along the mean prior delta (1.0: plain FedAvg), or "
        "FedAdam's per-entry step size (about 1e-3)",
    )
    p.add_argument(
        "--aggregator",
        choices=sorted(AGGREGATORS),
        default="fedavg",
        help="how the coordinator moves the prior: fedavg (server-lr along the mean delta) "
        "or fedadam (Adam on the coordinator over the rounds)",
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=0,
        help="steps of the local-only baselines (0: rounds x steps)",
    )
    p.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds to repeat the run with (the spread); seeds already in "
        "the output's results.json from the same options are reused",
    )
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run local-only (stock peft, B-only) and FedAvg global (+FT) baselines",
    )
    p.add_argument(
        "--engine",
        default="ray",
        choices=["ray", "local"],
        help="Flower's Ray simulation, or the same apps in this process (no Ray)",
    )
    p.add_argument(
        "--packing",
        default="fp16",
        choices=["fp32", "fp16", "int8"],
        help="delta upload packing",
    )
    p.add_argument("--base", default="default", help="base model: default or a folder")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="devices' training precision (auto: by the device profile)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and training")
    p.add_argument(
        "--secure-aggregation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sum the prior deltas with SecAgg+ so the coordinator sees only the sum "
        "(--no-secure-aggregation sends clipped deltas in the clear)",
    )
    p.add_argument(
        "--dp",
        default="off",
        choices=["off", "central", "client"],
        help="differential privacy of the prior (client needs --secure-aggregation)",
    )
    p.add_argument("--dp-noise-multiplier", type=float, default=1.0, help="noise std / clip")
    p.add_argument(
        "--shared-a",
        default="auto",
        choices=["auto", "seeded", "gradient"],
        help="the cohort's frozen A: seeded from the cohort seed, gradient (round 0 sums the "
        "devices' gradient sketches, under SecAgg+ when on, and keeps their top directions), "
        "or auto: gradient, and seeded with --dp (the sketch has no privacy accounting)",
    )
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated modules the cohort adapts, for every method of the run "
        "(e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj for all of a "
        "Llama block's Linears)",
    )
    if name != "scale":  # a console serves one run's coordinator
        p.add_argument(
            "--console",
            type=int,
            default=None,
            metavar="PORT",
            help="serve the admin console on 127.0.0.1:PORT during the run and after it",
        )
    if name == "experiment":
        p.add_argument(
            "--max-train-notes",
            type=int,
            default=0,
            help="keep each user's first k training notes, cut after the split (0: all)",
        )
        p.add_argument(
            "--baselines-from",
            type=Path,
            default=None,
            metavar="RUN",
            help="read each seed's baselines from this finished experiment instead of "
            "training them (refused unless its users, splits, seeds and every option the "
            "baselines depend on match)",
        )
    if name in ("experiment", "scale"):
        p.add_argument(
            "--cold-start",
            default="4,16,64" if name == "experiment" else "",
            help="k values; empty to skip",
        )
        p.add_argument(
            "--newcomers-dir",
            type=Path,
            default=None,
            help="real users who never take part, for the cold-start curve",
        )
        p.add_argument(
            "--cold-start-steps",
            type=int,
            default=0,
            help="at most this many steps per newcomer, from the prior and from zero "
            "(0: the devices' personalize budget)",
        )
    if name == "scale":
        p.add_argument(
            "--ranks",
            default="1,2,4,8,16",
            help="ranks of the rank sweep (with all training notes); empty to skip",
        )
        p.add_argument(
            "--notes",
            default="8,16,32,64,all",
            help="training notes per user of the notes sweep: each user's first k after "
            "the split, or all; empty to skip",
        )
        p.add_argument("--rank", type=int, default=8, help="the notes sweep's rank")


SIM_USERS_DIR = "runs/sim/users"
"""The default ``sim-users-dir`` of ``[tool.flwr.app.config]``, relative on purpose."""


def prepare(out: Path, *, users: int, notes: int, seed: int) -> str:
    """Write the user folders and return what to run next, for people to read.

    The folders are the ones :func:`~lorafleet.sim.personas.write_user_folders` writes
    (a regenerated seed overwrites its own users and refuses to mix with others). The
    text names the exact ``flwr run`` command: the local simulation federation must have
    one virtual SuperNode per user folder, and a path other than the default must be
    passed as an override, absolute, since relative ones are read from the folder the
    local SuperLink started in.
    """
    from lorafleet.sim.personas import PersonaConfig, generate_personas, write_user_folders

    config = PersonaConfig(num_users=users, notes_per_user=notes, seed=seed)
    root = write_user_folders(generate_personas(config), out)
    overrides = "" if str(out) == SIM_USERS_DIR else f" -c \"sim-users-dir='{root.resolve()}'\""
    return (
        f"wrote {users} synthetic users to {root} ({root.resolve()})\n"
        "next, from this folder (the managed local SuperLink reads relative paths from the "
        "folder where it started):\n"
        f'  flwr run . --federation-config "num-supernodes={users}"{overrides} --stream\n'
        "then `flwr list` shows the run's status (finished:completed, or finished:failed "
        "with the reason)"
    )


# Set by the SIGINT handler main() installs, before KeyboardInterrupt is raised.
_INTERRUPTED = threading.Event()


class _OnlyWarnings(logging.Filter):
    """Flower re-levels its logger at DEBUG inside run_simulation; keep its chatter out.

    After Ctrl-C, Ray stops the ClientApp actors (they share the terminal's process
    group) and Flower's backend threads log each dead actor as an ERROR with a traceback.
    That is the interruption the user asked for, not a fault, so it is dropped too: the
    one line saying how to resume is all the user should see.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        if "DEPRECATED" in message:
            return False
        return not (_INTERRUPTED.is_set() or "INTENDED_USER_EXIT" in message)


def _on_sigint(signum: int, frame: object) -> None:
    """Mark the run interrupted first (so the log filter knows), then interrupt as usual."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _quiet() -> None:
    """Round progress only: no library chatter, here or in the Ray workers."""
    # Ray workers inherit this process's environment when the cluster starts.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("lorafleet").setLevel(logging.INFO)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(_OnlyWarnings())
    for handler in flwr_logger.handlers:
        handler.addFilter(_OnlyWarnings())
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet()
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace) -> int:
    """The command itself, once logging and Ctrl-C handling are set up."""
    if args.command == "prepare":
        try:
            print(prepare(args.out, users=args.users, notes=args.notes, seed=args.seed))
        except LorafleetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        from lorafleet.sim.experiment import format_table, run_experiment

        cfg = _experiment_config(args)
        if args.command == "scale":
            return _scale(args, cfg)
        console = (
            None
            if args.console is None
            else start_console(cfg.output / "coordinator", args.console)
        )
        print(
            f"federating {cfg.num_users if cfg.users_dir is None else 'the'} users for {cfg.num_rounds} rounds; run folder {cfg.output}"
        )
        result = run_experiment(cfg)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # argparse-level mistakes such as a bad --cold-start list
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume the federation", file=sys.stderr)
        _leave_after_interrupt()
        return 130
    print()
    print(format_table(result), end="")
    print(f"plot: {(cfg.output / 'plot.png').resolve()}")
    print(f"results: {(cfg.output / 'results.json').resolve()}")
    if console is not None:
        print(f"console still on {console.url}; Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            console.stop()
    return 0


def _experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment the options describe (each point's template, for scale)."""
    from lorafleet.sim.experiment import ExperimentConfig

    cold: tuple[int, ...] = ()
    if args.command in ("experiment", "scale") and args.cold_start.strip():
        cold = tuple(int(k) for k in args.cold_start.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds.strip() else ()
    return ExperimentConfig(
        output=args.output,
        num_users=args.users,
        users_dir=args.users_dir,
        notes_per_user=args.notes_per_user,
        num_rounds=args.rounds,
        fraction_train=args.fraction,
        personal_steps=args.personal_steps,
        prior_steps=args.steps,
        personalize_steps=args.personalize_steps,
        personalize_blend=args.blend,
        step_bound=args.step_bound,
        packing=args.packing,
        base=args.base,
        precision=args.precision,
        seed=args.seed,
        seeds=seeds,
        lr=args.lr,
        prior_lr=args.prior_lr,
        personal_lr=args.personal_lr,
        personal_lr_shared_a=args.personal_lr_shared_a,
        personal_a_lr=args.personal_a_lr,
        clip_norm=args.clip_norm,
        prox_mu=args.prox_mu,
        server_lr=args.server_lr,
        aggregator=args.aggregator,
        local_steps=args.local_steps,
        baselines=args.baselines,
        engine=args.engine,
        newcomers_dir=getattr(args, "newcomers_dir", None),
        cold_start_ks=cold,
        cold_start_steps=getattr(args, "cold_start_steps", 0),
        secure_aggregation=args.secure_aggregation,
        dp=args.dp,
        dp_noise_multiplier=args.dp_noise_multiplier,
        shared_a=args.shared_a,
        # Only experiment cuts the notes and only scale sets the rank (of its notes sweep).
        max_train_notes=getattr(args, "max_train_notes", 0),
        baselines_from=getattr(args, "baselines_from", None),
        rank=getattr(args, "rank", ExperimentConfig.rank),
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
    )


def _scale(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """``lorafleet-sim scale``: every point, then the table, the curves and the pick.

    Raises what the caller turns into one line (a user's mistake) or a resume hint (Ctrl-C).
    """
    from lorafleet.sim.scale import (
        ScaleConfig,
        format_scale_table,
        parse_notes,
        parse_ranks,
        run_scale,
    )

    scale = ScaleConfig(cfg, ranks=parse_ranks(args.ranks), notes=parse_notes(args.notes))
    points = scale.points()
    print(f"{len(points)} experiments ({', '.join(p.name for p in points)}); folder {cfg.output}")
    record = run_scale(scale, say=print)
    print()
    print(format_scale_table(record), end="")
    print(f"plot: {(cfg.output / 'scale.png').resolve()}")
    print(f"results: {(cfg.output / 'scale.json').resolve()}")
    return 0


def _leave_after_interrupt(code: int = 130) -> None:
    """After Ctrl-C, end the process now if anything would keep it alive.

    Flower runs the ServerApp in a non-daemon thread that may sit in ``send_and_receive``
    for up to the round timeout (30 minutes by default), so a plain return would leave
    the interpreter waiting on it at exit. Nothing needs that thread: the coordinator
    commits each round to its registry as it finishes (an unfinished one is marked failed
    when the run resumes) and devices write their profiles atomically. So Ray is given a
    few seconds to stop its workers, and the process leaves with ``os._exit``. A second
    Ctrl-C during those seconds leaves at once. Returns only when no other thread is alive
    (the in-process engine), so the caller's normal exit path runs.
    """
    blocking = [
        t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
    ]
    if not blocking:
        return
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        stopper = threading.Thread(target=ray.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=5.0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_console(data_dir: Path, port: int) -> ConsoleServer:
    """Serve the admin console over the simulation's coordinator state, on loopback.

    The console opens (and, on a fresh run, creates) the coordinator's registry, so an
    operator can watch rounds arrive, pause the run or roll the prior back while it goes.
    On a first start it prints the one-time setup token that sets the admin password.
    """
    from lorafleet.server.console.app import ConsoleConfig, ConsoleServer, create_app

    data_dir.mkdir(parents=True, exist_ok=True)
    config = ConsoleConfig(data_dir=str(data_dir), host="127.0.0.1", port=port)
    app = create_app(config)
    server = ConsoleServer(app, config)
    url = server.start()
    print(f"console on {url}", flush=True)
    if app.state.setup_token is not None:
        print(f"no admin yet: open {url}/setup with the one-time token {app.state.setup_token}")
    return server


if __name__ == "__main__":
    sys.exit(main())
