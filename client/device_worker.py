"""A long-lived device worker, so the base loads once per device and not once per round.

On a real SuperNode, Flower 1.41 starts a fresh ``flwr-clientapp`` process for every
message (``flwr/supernode/runtime/run_clientapp.py`` runs one task, then exits), so the
ClientApp's per-process cache of the loaded base (``federated._WORKERS``) is empty every
round: 15-20 s of loading for SmolLM2-135M, minutes for a 1-3B base. ``lorafleet
serve-device --socket PATH`` is one process that keeps the base warm; with the node
setting ``device-worker = PATH`` the ClientApp hands each round to it over a Unix socket
and only does the Flower side itself (reading the message, the prior's cache, SecAgg+,
the report, refusals).

The wire format is length-prefixed frames: ``b"LFW1"``, a 4-byte header length and an
8-byte body length (big-endian), a UTF-8 JSON header, then the body: B tensors as
lorafleet's safetensors (:func:`~lorafleet.protocols.encoding.encode_tensors`, fp32, so
nothing is rounded on the way) or nothing. Nothing is ever pickled. The worker checks
every field it receives as the ClientApp would (paths absolute and present, settings
known), although its only peer is a process of the same user: the socket is 0600 in a
directory nobody else may write, and the peer's uid is checked where the OS says it.

One round runs at a time (a lock); a second ClientApp that connects meanwhile waits, up
to its ``device-worker-timeout``, instead of failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any

from lorafleet.protocols.cli import package_version
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.errors import (
    DataError,
    IntegrityError,
    LorafleetError,
    SpecError,
    StorageError,
)
from lorafleet.protocols.federation import BTensors, RoundInstruction, RoundMetrics

log = logging.getLogger(__name__)

WIRE_VERSION = 1
"""Version of the frame layout and header fields; a worker refuses any other."""

DEFAULT_TIMEOUT_S = 3600.0
"""How long a ClientApp waits for the worker's reply: its queue plus the round itself."""

_MAGIC = b"LFW1"
_PREFIX = struct.Struct(">4sIQ")  # magic, header length, body length
_MAX_HEADER_BYTES = 1 << 20  # a header is a few kB: instruction, paths, metrics
_MAX_BODY_BYTES = 1 << 32  # B of a 3B base at rank 64 is ~100 MB in fp32
_MAX_TEXT = 4096
_CONNECT_TIMEOUT_S = 10.0
_IO_TIMEOUT_S = 60.0  # reading a request, writing a reply: local, so seconds at most
_SUN_PATH_MAX = 107  # sockaddr_un's sun_path is 108 bytes on Linux, NUL included
# Errors a worker may name in a refusal: the ClientApp raises the same class.
_ERRORS: dict[str, type[LorafleetError]] = {
    cls.__name__: cls
    for cls in (LorafleetError, SpecError, IntegrityError, DataError, StorageError)
}


class DeviceWorkerError(LorafleetError):
    """The device worker is unreachable, refused to start, or broke the protocol."""


def start_command(path: Path) -> str:
    """The shell command that starts a worker on ``path`` (quoted for copy and paste)."""
    return f"lorafleet serve-device --socket {shlex.quote(str(path))}"


# ------------------------------------------------------------------ what a round carries
@dataclass(frozen=True)
class DeviceSettings:
    """The device settings :func:`~lorafleet.client.federated.run_round` takes."""

    base: str = "default"
    precision: str = "auto"
    device: str = "auto"
    cache_dir: str = ""
    base_service: str = ""
    base_service_ca: str = ""

    def __post_init__(self) -> None:
        from lorafleet.client.runtime import PRECISIONS

        for f in fields(self):
            _check_text(getattr(self, f.name), f.name.replace("_", "-"), empty=f.default == "")
        if self.precision not in PRECISIONS:
            raise SpecError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")

    @classmethod
    def from_header(cls, value: object) -> DeviceSettings:
        """Parse the ``settings`` object of a request, naming any unknown key."""
        if not isinstance(value, dict):
            raise SpecError("device worker: settings must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SpecError(f"device worker: unknown settings {unknown}")
        return cls(**value)


@dataclass(frozen=True)
class RoundJob:
    """One round handed to the worker: what the ClientApp would pass to ``run_round``.

    Paths are absolute: the worker runs in another folder than the ClientApp.
    """

    instruction: RoundInstruction
    prior: BTensors | None
    data: Path
    profile: Path
    settings: DeviceSettings

    def __post_init__(self) -> None:
        for name in ("data", "profile"):
            _check_text(str(getattr(self, name)), name, empty=False)
            if not getattr(self, name).is_absolute():
                raise SpecError(
                    f"device worker: {name} {str(getattr(self, name))!r} is not absolute"
                )


@dataclass(frozen=True)
class WorkerStatus:
    """What a running worker says about itself."""

    pid: int
    version: str
    rounds: int
    base_loads: int
    busy: bool


def _check_text(value: object, what: str, *, empty: bool) -> None:
    if not isinstance(value, str):
        raise SpecError(f"setting {what} must be a string, got {type(value).__name__}")
    if (not value and not empty) or len(value) > _MAX_TEXT or "\0" in value:
        raise SpecError(f"setting {what} {value[:80]!r} is not a usable value")


# ------------------------------------------------------------------ frames
def write_frame(sock: socket.socket, header: Mapping[str, Any], body: bytes = b"") -> None:
    """Send one frame: the prefix, the JSON header, the body."""
    head = json.dumps(dict(header), sort_keys=True).encode("utf-8")
    sock.sendall(_PREFIX.pack(_MAGIC, len(head), len(body)) + head)
    if body:
        sock.sendall(body)


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Receive one frame; a malformed one raises :class:`DeviceWorkerError`."""
    magic, head_len, body_len = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != _MAGIC:
        raise DeviceWorkerError("device worker: the peer does not speak lorafleet's protocol")
    if head_len > _MAX_HEADER_BYTES or body_len > _MAX_BODY_BYTES:
        raise DeviceWorkerError(f"device worker: frame too large ({head_len} + {body_len} bytes)")
    try:
        header = json.loads(_recv_exact(sock, head_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeviceWorkerError(f"device worker: the frame's header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise DeviceWorkerError("device worker: the frame's header has no kind")
    return header, _recv_exact(sock, body_len)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if k == 0:
            raise ConnectionResetError("the peer closed the connection")
        got += k
    return bytes(buf)


def _encode(tensors: BTensors | None) -> bytes:
    return b"" if tensors is None else encode_tensors(tensors, packing="fp32")


def _decode(body: bytes, present: object) -> BTensors | None:
    if present is not True:
        return None
    return decode_tensors(body)[0]


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux ``SO_PEERCRED``), None elsewhere."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    return int(uid)


def _trusted_uid(uid: int | None) -> bool:
    return uid is None or uid in (os.getuid(), 0)


# ------------------------------------------------------------------ the ClientApp's side
def _connect(path: Path, timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(_CONNECT_TIMEOUT_S)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or type(exc).__name__
        raise DeviceWorkerError(
            f"no device worker answers on {path} ({reason}); start one with "
            f"`{start_command(path)}` (it keeps the base loaded between rounds), or remove "
            "device-worker from this node's config to load the base in every round's process"
        ) from None
    uid = _peer_uid(sock)
    if not _trusted_uid(uid):
        sock.close()
        raise DeviceWorkerError(
            f"the socket {path} is served by uid {uid}, not by this user; refusing to hand it "
            "this device's data"
        )
    sock.settimeout(timeout_s)
    return sock


def _exchange(
    path: Path, header: Mapping[str, Any], body: bytes, timeout_s: float
) -> tuple[dict[str, Any], bytes]:
    with _connect(path, timeout_s) as sock:
        try:
            write_frame(sock, {"v": WIRE_VERSION, "version": package_version(), **header}, body)
            reply, data = read_frame(sock)
        except TimeoutError:
            raise DeviceWorkerError(
                f"the device worker on {path} sent no reply within {timeout_s:g} s "
                "(device-worker-timeout); it may be busy with another long round"
            ) from None
        except OSError as exc:
            raise DeviceWorkerError(
                f"the device worker on {path} dropped the connection ({exc}); was it stopped? "
                f"Its log says why; restart it with `{start_command(path)}`"
            ) from None
    if reply["kind"] == "refused":
        cls = _ERRORS.get(str(reply.get("error")), LorafleetError)
        raise cls(str(reply.get("message", "the device worker refused the round")))
    if reply["kind"] == "failed":
        raise RuntimeError(
            f"the device worker on {path} failed: {reply.get('message')} (its log has the traceback)"
        )
    return reply, data


def run_on_worker(
    path: Path, job: RoundJob, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[BTensors | None, RoundMetrics]:
    """Run ``job`` on the worker listening on ``path``; what ``run_round`` would return.

    Raises
    ------
    DeviceWorkerError
        Nobody listens on ``path``, or the worker dropped the connection or timed out.
    LorafleetError
        The worker refused the round (the same class and message ``run_round`` raises).

    Examples
    --------
    >>> run_on_worker(Path("/nonexistent/w.sock"), job)  # doctest: +SKIP
    Traceback (most recent call last):
    DeviceWorkerError: no device worker answers on /nonexistent/w.sock (No such file ...
    """
    header = {
        "kind": "round",
        "instruction": job.instruction.to_config(),
        "prior": job.prior is not None,
        "data": str(job.data),
        "profile": str(job.profile),
        "settings": asdict(job.settings),
        "wait_s": timeout_s,
    }
    reply, body = _exchange(path, header, _encode(job.prior), timeout_s)
    if reply["kind"] != "result" or not isinstance(reply.get("metrics"), dict):
        raise DeviceWorkerError(f"the device worker on {path} sent a {reply['kind']!r} reply")
    return _decode(body, reply.get("delta")), RoundMetrics.from_metrics(reply["metrics"])


def worker_status(path: Path, *, timeout_s: float = 10.0) -> WorkerStatus:
    """Ask the worker on ``path`` how many rounds it ran and bases it loaded."""
    reply, _ = _exchange(path, {"kind": "status"}, b"", timeout_s)
    return WorkerStatus(
        pid=int(reply["pid"]),
        version=str(reply["version"]),
        rounds=int(reply["rounds"]),
        base_loads=int(reply["base_loads"]),
        busy=bool(reply["busy"]),
    )


# ------------------------------------------------------------------ the worker's side
def _run_in_process(job: RoundJob) -> tuple[BTensors | None, RoundMetrics]:
    """The ClientApp's own path, in this process: ``run_round``, whose cache stays warm."""
    from lorafleet.client.federated import DeviceData, run_round

    s = job.settings
    data = DeviceData.from_path(job.data, heldout_fraction=job.instruction.heldout_fraction)
    return run_round(
        job.instruction,
        job.prior,
        data,
        job.profile,
        base_source=s.base,
        precision=s.precision,  # type: ignore[arg-type]  # checked against PRECISIONS
        device=s.device,
        cache_dir=Path(s.cache_dir) if s.cache_dir else None,
        base_service=s.base_service,
        base_service_ca=s.base_service_ca,
    )


def job_from_frame(header: Mapping[str, Any], body: bytes) -> RoundJob:
    """The round a request asks for, every field checked as the ClientApp checks it."""
    data, profile = (Path(str(header.get(k, ""))) for k in ("data", "profile"))
    instruction = header.get("instruction")
    if not isinstance(instruction, dict):
        raise SpecError("device worker: the request carries no round instruction")
    job = RoundJob(
        instruction=RoundInstruction.from_config(instruction),
        prior=_decode(body, header.get("prior")),
        data=data,
        profile=profile,
        settings=DeviceSettings.from_header(header.get("settings")),
    )
    for name in ("cache_dir", "base_service_ca"):
        value = getattr(job.settings, name)
        if value and not Path(value).is_absolute():
            raise SpecError(f"device worker: {name.replace('_', '-')} {value!r} is not absolute")
    if not data.exists():
        raise DataError(
            f"data {str(data)!r} does not exist on this device; fix the node's data setting"
        )
    if profile.exists() and not profile.is_dir():
        raise LorafleetError(f"profile {profile} is a file; pass a directory")
    return job


class DeviceWorker:
    """Answers requests: one round at a time (``run_round`` here), status at any time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rounds = 0
        self.base_loads = 0

    def answer(self, header: Mapping[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """The reply frame to one request frame."""
        try:
            if header.get("v") != WIRE_VERSION or header.get("version") != package_version():
                raise LorafleetError(
                    f"the device worker runs lorafleet {package_version()} (protocol {WIRE_VERSION}) "
                    f"and this ClientApp {header.get('version')} (protocol {header.get('v')}); "
                    "restart the worker after upgrading lorafleet"
                )
            if header["kind"] == "status":
                return self._status(), b""
            if header["kind"] != "round":
                raise SpecError(f"device worker: unknown request {header['kind']!r}")
            job = job_from_frame(header, body)
            return self._round(job, float(header.get("wait_s", DEFAULT_TIMEOUT_S)))
        except LorafleetError as exc:
            log.warning("refused: %s", exc)
            return {"kind": "refused", "error": type(exc).__name__, "message": str(exc)}, b""
        except Exception as exc:  # a bug: the traceback belongs in the worker's log
            log.exception("round failed")
            return {"kind": "failed", "message": f"{type(exc).__name__}: {exc}"}, b""

    def _round(self, job: RoundJob, wait_s: float) -> tuple[dict[str, Any], bytes]:
        waited = time.perf_counter()
        if not self._lock.acquire(timeout=max(0.0, min(wait_s, 86400.0))):
            raise LorafleetError(
                f"the device worker stayed busy with another round for {wait_s:g} s; raise "
                "device-worker-timeout, or run one worker per SuperNode"
            )
        try:
            before, started = _loaded_bases(), time.perf_counter()
            delta, metrics = _run_in_process(job)
            loads = _loaded_bases() - before
            self.rounds += 1
            self.base_loads += loads
        finally:
            self._lock.release()
        log.info(
            "round %d (%s) for %s: %.1f s%s%s",
            job.instruction.round,
            job.instruction.mode,
            job.data.name,
            time.perf_counter() - started,
            f", waited {started - waited:.1f} s" if started - waited > 0.5 else "",
            ", base loaded" if loads else ", base warm",
        )
        reply = {"kind": "result", "metrics": metrics.to_metrics(), "delta": delta is not None}
        return reply, _encode(delta)

    def _status(self) -> dict[str, Any]:
        busy = self._lock.locked()
        return {
            "kind": "status",
            "pid": os.getpid(),
            "version": package_version(),
            "rounds": self.rounds,
            "base_loads": self.base_loads,
            "busy": busy,
        }

    def serve_connection(self, conn: socket.socket) -> None:
        """Read one request from ``conn``, answer it, close it."""
        with conn:
            try:
                if not _trusted_uid(_peer_uid(conn)):
                    log.warning("refused a connection from uid %s", _peer_uid(conn))
                    return
                conn.settimeout(_IO_TIMEOUT_S)
                header, body = read_frame(conn)
                reply, data = self.answer(header, body)
                conn.settimeout(_IO_TIMEOUT_S)
                write_frame(conn, reply, data)
            except (OSError, DeviceWorkerError) as exc:
                log.warning("a connection ended early: %s", exc)


def _loaded_bases() -> int:
    from lorafleet.client.federated import warm_models

    return len(warm_models())


@dataclass
class _Listener:
    sock: socket.socket
    path: Path
    lock_fd: int

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.lock_fd)  # releases the lock; the .lock file stays, empty of meaning


def listen(path: Path) -> _Listener:
    """Bind ``path``: a 0600 socket in a directory only this user may write.

    Creates the directory (0700) if missing. Refuses a group- or world-writable directory
    (another user could swap the socket), a path that is not a socket, and a socket
    another live worker serves (an exclusive lock on ``PATH.lock``); removes a stale one.
    """
    path = Path(path).expanduser().absolute()
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise DeviceWorkerError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow "
            f"{_SUN_PATH_MAX}: choose a shorter one, e.g. ~/.lorafleet/worker.sock"
        )
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    st = folder.stat()
    if st.st_mode & 0o022 or st.st_uid not in (os.getuid(), 0):
        raise DeviceWorkerError(
            f"the socket's directory {folder} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}), so one of them could replace "
            f"the socket; use a private directory: `{start_command(Path('~/.lorafleet/worker.sock'))}`"
        )
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(lock_fd, 32).decode(errors="replace").strip() or "?"
        os.close(lock_fd)
        raise DeviceWorkerError(
            f"another device worker (pid {holder}) is serving on {path}; stop it first, or "
            "choose another --socket"
        ) from None
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    try:
        if path.is_symlink() or path.exists():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise DeviceWorkerError(
                    f"{path} exists and is not a socket; choose another --socket"
                )
            path.unlink()  # ours to take: the lock says no live worker serves it
            log.info("removed a stale socket at %s", path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600, never briefly wider
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        os.close(lock_fd)
        raise
    return _Listener(sock, path, lock_fd)


def serve(path: Path, *, on_ready: Callable[[Path], None] | None = None) -> int:
    """Serve rounds on ``path`` until SIGINT or SIGTERM; the exit status (130 or 0).

    Must run in the main thread (it installs the signal handlers). Connections are
    answered on their own threads, so a status request is answered during a round and a
    second round waits on the worker's lock. A round in progress at shutdown is
    abandoned: its ClientApp reports the dropped connection; the profile's last saved
    version is untouched (versions are written atomically).
    """
    listener = listen(path)
    worker = DeviceWorker()
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    listener.sock.settimeout(0.5)
    try:
        # torch, transformers and peft load now, not in the first round (seconds); a
        # signal meanwhile still ends in the clean shutdown below.
        import lorafleet.client.federated  # noqa: F401

        if on_ready is not None:
            on_ready(listener.path)
        while not stop.is_set():
            try:
                conn, _ = listener.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=worker.serve_connection, args=(conn,), daemon=True).start()
    finally:
        listener.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    signum = caught[0] if caught else signal.SIGTERM
    print(
        f"device worker on {listener.path} stopped ({signal.Signals(signum).name}); socket removed",
        file=sys.stderr,
        flush=True,
    )
    return 130 if signum == signal.SIGINT else 0
