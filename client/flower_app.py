"""The Flower ClientApp: a round's messages in and out, the training elsewhere.

The SuperNode starts a fresh ``flwr-clientapp`` process for every message it gets (each
round, and each stage of a SecAgg+ round), and that process imports this module. So it
imports no torch, transformers or peft: a message that only needs the protocol (SecAgg+'s
key and share stages, a round handed to a warm device worker by the node setting
``device-worker``) costs a fraction of a second and ~100 MiB instead of several seconds
and ~500 MiB. Only a round run in this process imports
:mod:`lorafleet.client.federated`, the training side, on first use.

With secure aggregation the coordinator drives Flower's SecAgg+ protocol: the ClientApp's
train handler runs behind Flower's ``secaggplus_mod`` (:func:`secure_aggregation_mod`),
which quantizes and masks the flat delta a round returns, so the coordinator only ever
learns the sum over the round's devices. A device can insist on it: with the node
setting ``require-secure-aggregation = true`` it refuses to send a delta in the clear.

Each reply also carries an :class:`~lorafleet.protocols.reports.AdapterReport`: the
personal version in use and, when the round saved one, that version's metadata (never
its weights), which the coordinator files in its registry. The node setting
``report-versions = false`` opts out (docs/privacy.md says what is learnt either way).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat

from lorafleet.client.device_worker import (
    DEFAULT_TIMEOUT_S,
    DeviceSettings,
    RoundJob,
    run_on_worker,
)
from lorafleet.client.layout import read_provenance, shared_a_path
from lorafleet.client.masked_upload import narrow_masked_reply
from lorafleet.client.profile import Profile
from lorafleet.protocols.atomic import atomic_write_bytes
from lorafleet.protocols.encoding import decode_tensors, encode_tensors
from lorafleet.protocols.errors import IntegrityError, LorafleetError
from lorafleet.protocols.federation import (
    DELTA_FIELD,
    INSTRUCTION_KEY,
    METRICS_KEY,
    PRIOR_FIELD,
    PRIOR_KEY,
    REFUSAL_PREFIX,
    SECURE_INSTRUCTION_KEY,
    SECURE_LAYOUT_FIELD,
    SECURE_PRIOR_FIELD,
    SECURE_SHARED_A_FIELD,
    SHARED_A_FIELD,
    UPDATE_KEY,
    ZERO_PRIOR,
    BTensors,
    RoundInstruction,
    RoundMetrics,
    clip_by_global_norm,
    flatten,
    layout_to_json,
)
from lorafleet.protocols.reports import REPORT_KEY, AdapterReport, VersionReport
from lorafleet.protocols.shared_a import shared_a_digest

log = logging.getLogger(__name__)


def _setting(context: Context, extra: Mapping[str, str], key: str, default: str = "") -> str:
    """A node setting (SuperNode --node-config), else a run setting, else ``extra``."""
    for source in (context.node_config, context.run_config, extra):
        value = source.get(key)
        if value is not None and str(value) != "":  # an empty value means "not set"
            return str(value)
    return default


def _locate_paths(context: Context, extra: Mapping[str, str]) -> tuple[Path, Path]:
    """Find the node's data and profile: node config on a device, a user folder in sim."""
    if "data" in context.node_config:
        data = Path(str(context.node_config["data"]))
        return data, Path(_setting(context, extra, "profile", str(data / ".lorafleet")))
    setting = _setting(context, extra, "sim-users-dir")
    if not setting:
        raise LorafleetError(
            "this node has no data: start the SuperNode with --node-config \"data='PATH'\", "
            "or (simulation) set sim-users-dir in the run config to a folder of user folders"
        )
    users_dir = Path(setting).expanduser()
    if not users_dir.is_dir():
        raise LorafleetError(_missing_users_dir(setting, users_dir))
    users = sorted(p for p in users_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not users:
        raise LorafleetError(
            f"sim-users-dir {str(users_dir.resolve())!r} holds no user folders; "
            f"`lorafleet-sim prepare --users N --out {setting}` writes synthetic ones"
        )
    index = int(context.node_config.get("partition-id", 0))
    if index >= len(users):
        raise LorafleetError(
            f"partition {index} has no user folder in {users_dir} ({len(users)} users)"
        )
    folder = users[index]
    profiles = Path(
        _setting(context, extra, "sim-profiles-dir", str(users_dir.parent / "profiles"))
    )
    return folder, profiles / folder.name


def _missing_users_dir(setting: str, users_dir: Path) -> str:
    """Why a simulated device finds no users: the path as given, as resolved, and the fix.

    A relative ``sim-users-dir`` is read from the working folder of the process that runs
    the ClientApp; on Flower's local simulation that is the folder in which the managed
    local SuperLink was started (where the first ``flwr`` command ran), which is not
    always where the user now is. Naming both makes that visible.
    """
    where = str(users_dir.resolve())
    if users_dir.is_absolute():
        found = f"sim-users-dir {where!r} does not exist"
    else:
        found = (
            f"sim-users-dir {setting!r} does not exist in {str(Path.cwd())!r} "
            f"(relative paths are read from the folder the SuperLink started in, so {where!r})"
        )
    return (
        f"{found}; write user folders there with `lorafleet-sim prepare --users N` "
        f"(run in that folder), or give an absolute path: "
        f"flwr run . -c \"sim-users-dir='/path/to/users'\""
    )


def read_instruction(msg: Message) -> tuple[RoundInstruction, bytes | None]:
    """The round's instruction and the prior's bytes (None when not sent).

    Reads both layouts: the plain one (:data:`INSTRUCTION_KEY`, :data:`PRIOR_KEY`) and
    the one Flower's SecAgg+ workflow delivers (:data:`SECURE_INSTRUCTION_KEY`).
    """
    records = msg.content.config_records
    if SECURE_INSTRUCTION_KEY in records:
        config = dict(records[SECURE_INSTRUCTION_KEY])
        payload = config.pop(SECURE_PRIOR_FIELD, None)
    else:
        if INSTRUCTION_KEY not in records:
            raise LorafleetError(
                "the message carries no round instruction; is the coordinator lorafleet's?"
            )
        config = dict(records[INSTRUCTION_KEY])
        # The record may hold the shared A alone (round 1, the zero prior, is never sent).
        payload = records[PRIOR_KEY].get(PRIOR_FIELD) if PRIOR_KEY in records else None
    if payload is not None and not isinstance(payload, bytes):
        raise LorafleetError("the prior in the message is not bytes")
    return RoundInstruction.from_config(config), payload


def read_shared_a_bytes(msg: Message) -> bytes | None:
    """The shared A's bytes when the message carries them (either layout), else None."""
    records = msg.content.config_records
    if SECURE_INSTRUCTION_KEY in records:
        payload = records[SECURE_INSTRUCTION_KEY].get(SECURE_SHARED_A_FIELD)
    else:
        payload = records[PRIOR_KEY].get(SHARED_A_FIELD) if PRIOR_KEY in records else None
    if payload is not None and not isinstance(payload, bytes):
        raise LorafleetError("the shared A in the message is not bytes")
    return payload


def store_shared_a(payload: bytes | None, instr: RoundInstruction, profile_root: Path) -> None:
    """Cache the shared A the round names, if sent, refusing bytes of another digest.

    The device checks the A itself (shape, norm, orthogonality) when it loads it for the
    round (:func:`lorafleet.client.federated.read_shared_a`); here it only makes sure the
    coordinator sent the A its own instruction names.
    """
    if payload is None or not instr.shared_a:
        return
    path = shared_a_path(profile_root, instr.shared_a)
    if path.is_file():
        return
    pinned = sorted(p.stem for p in path.parent.glob("*.safetensors"))
    if pinned:
        # A cohort's A is built once, in round 0; a coordinator that hands this profile
        # another one mid-life is refused (a new cohort has a new spec, so a new profile).
        raise IntegrityError(
            f"the coordinator sent another shared A ({instr.shared_a[:12]}…) than this "
            f"profile's ({pinned[0][:12]}…); a cohort's A never changes"
        )
    tensors, _ = decode_tensors(payload)
    if shared_a_digest(tensors) != instr.shared_a:
        raise IntegrityError("the shared A sent does not match the digest the round names")
    atomic_write_bytes(path, payload)


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a SecAgg+ round's training request."""
    return SECURE_INSTRUCTION_KEY in msg.content.config_records


def _prior(payload: bytes | None, instr: RoundInstruction, profile_root: Path) -> BTensors | None:
    """The prior's B: from the message when sent, else from this device's cache."""
    if instr.prior_version == ZERO_PRIOR:
        return None
    cache = profile_root / "priors" / f"{instr.prior_version.replace('/', '_')}.safetensors"
    if payload is not None:
        tensors, _ = decode_tensors(payload)
        atomic_write_bytes(cache, payload)
        return tensors
    if cache.is_file():
        return decode_tensors(cache.read_bytes())[0]
    raise LorafleetError(
        f"prior {instr.prior_version} is not cached on this device; the coordinator must send it"
    )


def secure_weight(num_examples: int, cap: int) -> int:
    """The weight a device sends into a SecAgg+ sum: its examples, at most ``cap``.

    The mod divides it by ``cap`` (the round's ``max_weight``); a weight above it would
    scale the delta beyond SecAgg+'s clipping range and could wrap the masked sum, so it
    is capped here, on the device. ``cap`` 0 means equal weights (1 each).

    Examples
    --------
    >>> secure_weight(12, 40), secure_weight(300, 40), secure_weight(12, 0), secure_weight(0, 40)
    (12, 40, 1, 1)
    """
    if cap <= 0:
        return 1
    return max(1, min(num_examples, cap))


def update_reply(
    msg: Message,
    instr: RoundInstruction,
    delta: BTensors | None,
    metrics: RoundMetrics,
    *,
    rng: np.random.Generator | None = None,
    report: AdapterReport | None = None,
) -> Message:
    """The reply to a round's request: the clipped delta (if any), metrics and report.

    A plain request gets the delta encoded in the round's packing. A SecAgg+ request gets
    it as one flat vector (float64) in Flower's ``fitres`` layout, with the device's
    weight as ``num_examples``: ``min(examples, instr.secure_weight_cap)``, which
    ``secaggplus_mod`` divides by the same cap (the round's ``max_weight``) and
    multiplies into the vector before masking, so the coordinator's secure mean is
    example-weighted like a plain round's; weight 1 when the cap is 0 (equal weights,
    as DP needs). The mod masks the vector and removes the clear values before the
    reply leaves.
    With ``instr.noise_std`` the device first adds its share of the DP noise, from an
    OS-seeded generator.

    The delta is clipped to ``instr.clip_norm`` here, on the reply path itself, whoever
    computed it: under SecAgg+ the coordinator cannot check one device's delta, so a
    delta beyond the clip norm must never reach the masked sum (docs/privacy.md).

    ``report`` (:func:`adapter_report`) travels in plaintext in both layouts: it is
    metadata the coordinator records in its registry, never part of the masked sum.
    """
    if delta is not None:
        delta = clip_by_global_norm(delta, instr.clip_norm)[0]
    if delta is not None and instr.noise_std > 0:
        gen = rng if rng is not None else np.random.default_rng()
        delta = {
            k: (v + gen.normal(0.0, instr.noise_std, v.shape)).astype(np.float32)
            for k, v in delta.items()
        }
    if is_secure(msg):
        if delta is None:
            raise LorafleetError("a secure-aggregation round needs a prior delta (prior-steps > 0)")
        flat, layout = flatten(delta)
        # float64: Flower quantizes in the array's precision, and float32 would round
        # (x + C) * q / 2C to 24 bits, far coarser than SecAgg+'s quantization step.
        flat64 = flat.astype(np.float64)
        fields = {
            **metrics.to_metrics(),
            SECURE_LAYOUT_FIELD: layout_to_json(layout),
            **(report.to_secure_fields() if report is not None else {}),
        }
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([flat64]),
            num_examples=secure_weight(metrics.num_examples, instr.secure_weight_cap),
            metrics=fields,  # type: ignore[arg-type]
        )
        content = recorddict_compat.fitres_to_recorddict(fitres, keep_input=False)
        content[METRICS_KEY] = MetricRecord(metrics.to_metrics())  # type: ignore[arg-type]
        return Message(content=content, reply_to=msg)
    content = RecordDict()
    if delta is not None:
        payload = encode_tensors(
            delta, packing=instr.packing, metadata={"prior_version": instr.prior_version}
        )
        metrics = RoundMetrics(**{**metrics.__dict__, "bytes_up": len(payload)})
        content[UPDATE_KEY] = ConfigRecord({DELTA_FIELD: payload})
    content[METRICS_KEY] = MetricRecord(metrics.to_metrics())  # type: ignore[arg-type]
    if report is not None:
        content[REPORT_KEY] = ConfigRecord(report.to_config())  # type: ignore[arg-type]
    return Message(content=content, reply_to=msg)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def adapter_report(
    profile_root: Path,
    instr: RoundInstruction,
    metrics: RoundMetrics,
    *,
    versions_before: Sequence[int],
    adapter: str = "default",
    user: str = "",
) -> AdapterReport | None:
    """What this device tells the coordinator about its personal adapter after a round.

    The version in use, and the version this round saved if it saved one (any version
    number not in ``versions_before`` whose provenance names this round and prior): its
    lineage, the round's example count and validation loss (``personal_loss``, the
    held-out score the device selected it on), a test loss if the device recorded one,
    and the folder's size. Read from the profile after the round, so the training code
    needs no part in it. None before the device has any version.
    """
    spec = Profile.read_spec(profile_root)
    if spec is None:
        return None
    profile = Profile(profile_root, spec)
    current = profile.current_version()
    if current is None:
        return None
    saved: VersionReport | None = None
    new = sorted(set(Profile.version_numbers(profile_root)) - set(versions_before))
    if new:
        prov = read_provenance(profile.version_dir(new[-1]))
        if prov.round == instr.round and prov.prior_version == instr.prior_version:
            saved = profile.version_report(
                new[-1],
                num_examples=metrics.num_examples,
                val_loss=metrics.personal_loss,
                test_loss=prov.metrics.get("test_loss"),
            )
    return AdapterReport(adapter=adapter, current=current, saved=saved, user=user)


def _absolute_job(
    instr: RoundInstruction,
    prior: BTensors | None,
    data: Path,
    profile: Path,
    settings: DeviceSettings,
) -> RoundJob:
    """The round for a device worker, its paths made absolute: it runs in another folder.

    ``absolute()``, not ``resolve()``: a user folder's name (its user id) stays as given.
    """
    base = Path(settings.base).expanduser()
    if settings.base != "default" and base.exists():
        settings = replace(settings, base=str(base.absolute()))
    for name in ("cache_dir", "base_service_ca"):
        value = getattr(settings, name)
        if value:
            settings = replace(settings, **{name: str(Path(value).expanduser().absolute())})
    return RoundJob(
        instr, prior, data.expanduser().absolute(), profile.expanduser().absolute(), settings
    )


def _worker_timeout(value: str) -> float:
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise LorafleetError(
            f"device-worker-timeout must be a number of seconds above 0, got {value!r}"
        )
    return seconds


def _handle(msg: Message, context: Context, extra: Mapping[str, str]) -> Message:
    instr, payload = read_instruction(msg)
    if (
        instr.mode in ("train", "sketch")
        and not is_secure(msg)
        and _setting(context, extra, "require-secure-aggregation").lower() in ("1", "true", "yes")
    ):
        raise LorafleetError(
            "this device requires secure aggregation and the coordinator asked for a delta in "
            "the clear; set secure-aggregation = true on the coordinator"
        )
    data_path, profile_root = _locate_paths(context, extra)
    prior = _prior(payload, instr, profile_root)
    store_shared_a(read_shared_a_bytes(msg), instr, profile_root)
    versions_before = Profile.version_numbers(profile_root)
    cache_dir = _setting(context, extra, "cache-dir")
    settings = DeviceSettings(
        base=_setting(context, extra, "base", "default"),
        precision=_setting(context, extra, "precision", "auto"),
        device=_setting(context, extra, "device", "auto"),
        cache_dir=cache_dir,
        base_service=_setting(context, extra, "base-service"),
        base_service_ca=_setting(context, extra, "base-service-ca"),
    )
    socket_path = _setting(context, extra, "device-worker")
    if socket_path:
        # No fallback to loading the base here: a worker that is down would otherwise
        # turn every round into a silent 20 s (or minutes) regression (docs/deployment.md).
        delta, metrics = run_on_worker(
            Path(socket_path).expanduser(),
            _absolute_job(instr, prior, data_path, profile_root, settings),
            timeout_s=_worker_timeout(_setting(context, extra, "device-worker-timeout")),
        )
    else:
        # Only here does the ClientApp process need torch and the base: the module is
        # imported on first use, so SecAgg+'s other stages and a device-worker round never
        # pay for it (several seconds and ~400 MiB per message, each a fresh process).
        from lorafleet.client import federated

        delta, metrics = federated.run_round(
            instr,
            prior,
            federated.DeviceData.from_path(data_path, heldout_fraction=instr.heldout_fraction),
            profile_root,
            base_source=settings.base,
            precision=settings.precision,  # type: ignore[arg-type]
            device=settings.device,
            cache_dir=Path(cache_dir) if cache_dir else None,
            base_service=settings.base_service,
            base_service_ca=settings.base_service_ca,
        )
    report: AdapterReport | None = None
    if _truthy(_setting(context, extra, "report-versions", "true")):
        # A simulated device is known by its user folder; a real one only by a label its
        # owner set (node setting "user"), never by its paths.
        simulated = "data" not in context.node_config
        user = str(context.node_config.get("user", "")) or (data_path.name if simulated else "")
        try:
            report = adapter_report(
                profile_root, instr, metrics, versions_before=versions_before, user=user
            )
        except LorafleetError as exc:  # never lose the round's delta over its report
            log.warning("round %d: no adapter report sent (%s)", instr.round, exc)
    return update_reply(msg, instr, delta, metrics, report=report)


def _handle_or_refuse(msg: Message, context: Context, extra: Mapping[str, str]) -> Message:
    """:func:`_handle`, with a device-side mistake answered as one line, not a traceback.

    A :class:`LorafleetError` (no data, a missing prior, a refused setting) becomes a
    Flower error reply whose reason is the error's message, so the coordinator can name
    the cause in the run's failure (``flwr list`` shows it) instead of Flower's repr of a
    wrapped exception. Anything else still raises: that is a bug, and its traceback is
    what the node's log should show. In a SecAgg+ round ``secaggplus_mod`` cannot pass an
    error reply on, so there the exception is raised as before.
    """
    try:
        return _handle(msg, context, extra)
    except LorafleetError as exc:
        if is_secure(msg):
            raise
        log.error("%s", exc)
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{REFUSAL_PREFIX}{exc}"),
            reply_to=msg,
        )


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ stages; every other message passes through.

    The coordinator chooses per run whether rounds are secure, so the same ClientApp
    serves both: only messages carrying SecAgg+'s stage record enter the protocol. The
    masked vector leaves in the smallest integer type its modulus needs
    (:func:`~lorafleet.client.masked_upload.narrow_masked_reply`), not Flower's int64.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return narrow_masked_reply(secaggplus_mod(msg, context, call_next), context)


def make_client_app(
    settings: Mapping[str, str] | None = None, *, mods: Sequence[Mod] = ()
) -> ClientApp:
    """A ClientApp; ``settings`` fill in run-config keys (used by in-process simulations).

    Node config (SuperNode ``--node-config``) still wins over both, so a real device's
    own data and profile paths are never overridden. ``mods`` are further Flower mods
    around the train handler, inside SecAgg+'s (they see the reply before masking).
    """
    extra = dict(settings or {})
    client_app = ClientApp()

    @client_app.train(mods=[secure_aggregation_mod, *mods])
    def train(msg: Message, context: Context) -> Message:
        """A training round: prior delta out, personal adapter kept."""
        return _handle_or_refuse(msg, context, extra)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """An evaluation round: held-out losses of base, prior and personal adapter."""
        return _handle_or_refuse(msg, context, extra)

    return client_app


app = make_client_app()
"""The ClientApp ``flwr run`` and SuperNodes load (``[tool.flwr.app.components]``)."""
