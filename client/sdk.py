"""The SDK an app embeds: one user's personal model, kept in a profile directory.

A profile (:mod:`lorafleet.client.profile`) holds the adapter spec, the identity of the
base it belongs to, and immutable adapter versions; this class puts the frozen base and
the personal adapter on top of it. Nothing in a profile leaves the device through this
class except by :meth:`PersonalModel.backup`, which seals it first (``docs/backup.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from lorafleet.client.adapter import (
    ATensors,
    BTensors,
    adapter_disabled,
    get_a,
    get_b,
    has_seeded_a,
    lora_targets,
    materialize,
    set_a,
    set_b,
    set_weights,
)
from lorafleet.client.backup import (
    BACKUP_PACKING,
    BackupClient,
    BackupError,
    BackupRecord,
    ReportReceipt,
    backup_profile,
    obtain_keys,
    restore_profile,
)
from lorafleet.client.base import DEFAULT_BASE, DEFAULT_BASE_SHA256, LoadedBase, load_base
from lorafleet.client.data import (
    DataConfig,
    Example,
    TokenBlocks,
    encode_blocks,
    split_examples,
    to_examples,
)
from lorafleet.client.evaluate import (
    check_sampling,
    generate,
    heldout_loss,
    perplexity,
    prompt_text,
)
from lorafleet.client.export import (
    EXPORT_FORMATS,
    EXPORTERS,
    ExportFormat,
    ExportJob,
    base_ref,
    check_new_folder,
)
from lorafleet.client.keys import KeyStore, UnlockedKeys
from lorafleet.client.profile import PROFILE_FILE, Profile
from lorafleet.client.runtime import (
    Precision,
    base_dtype,
    base_quantization,
    place_on,
    resolve_device,
    resolve_precision,
)
from lorafleet.client.train import SIZED_STEPS_PER_BLOCK, TrainConfig, TrainResult, train_adapter
from lorafleet.protocols.crypto import KdfParams
from lorafleet.protocols.encoding import Packing
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.reports import AdapterReport, VersionReport
from lorafleet.protocols.spec import AdapterSpec

if TYPE_CHECKING:  # ONNX Runtime is only imported when an ONNX backend is first used
    from lorafleet.client.onnx_choice import OnnxChoice
    from lorafleet.client.onnx_export import ExportedBase, OnnxExportConfig
    from lorafleet.client.onnx_runtime import OnnxAdapter, OnnxLM

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "EXPORT_FORMATS",
    "PROFILE_FILE",
    "Backend",
    "EvalReport",
    "ExportFormat",
    "PersonalModel",
    "TrainReport",
    "TrainingData",
]

Backend = Literal["torch", "onnx", "onnx-int8", "onnx-auto"]
"""How :meth:`PersonalModel.generate` runs the model (see ``docs/sdk.md``)."""
BACKENDS: tuple[str, ...] = get_args(Backend)
TrainingData = str | os.PathLike[str] | Iterable[Any]
"""A path, or notes, examples and record dicts, or a ``datasets.Dataset``."""
# Registry of the ONNX Runtime backends: name -> quantization of the exported base.
# ("onnx-auto" is one of these two, chosen per machine: PersonalModel.onnx_graph_choice.)
_ONNX_BACKENDS: dict[str, Literal["none", "int8"]] = {"onnx": "none", "onnx-int8": "int8"}
_CHOICE_PROMPT = (
    "Walked the dog along the harbour this morning; the tide was out, the ferry was late, "
    "and the bakery on the corner had sold out of rye bread again, so"
)
_CHOICE_TOKENS = 24


@dataclass(eq=False)
class _OnnxSession:
    """The one ONNX Runtime session of a PersonalModel, and the adapter bound to it."""

    backend: str
    provider: str  # as asked: auto, cpu or cuda
    exported: ExportedBase
    lm: OnnxLM
    adapter: OnnxAdapter | None = None
    b_digest: str = ""  # digest of the B (and personal A) that ``adapter`` was bound from


def _b_digest(b: Mapping[str, npt.NDArray[np.floating[Any]]]) -> str:
    """Content digest of B (and personal A) matrices: tells whether a bound ONNX adapter is stale."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(b):
        value = np.ascontiguousarray(b[name], dtype=np.float32)
        h.update(f"{name}{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EvalReport:
    """Held-out loss of the base alone and with the personal adapter."""

    base_loss: float
    adapter_loss: float
    tokens: int

    @property
    def base_perplexity(self) -> float:
        """exp(base_loss)."""
        return perplexity(self.base_loss)

    @property
    def adapter_perplexity(self) -> float:
        """exp(adapter_loss)."""
        return perplexity(self.adapter_loss)


@dataclass(frozen=True)
class TrainReport:
    """A finished training run and the version it saved (None if not saved)."""

    result: TrainResult
    provenance: AdapterProvenance | None
    train_examples: int
    heldout_examples: int
    test_examples: int = 0
    test_loss_before: float | None = None
    """Loss on the test notes before training (``test_fraction > 0``); nothing was
    selected on them, unlike the held-out (validation) loss that early stopping used."""
    test_loss_after: float | None = None
    reported: ReportReceipt | None = None
    """What the coordinator recorded of the new version (``train(report_to=...)``);
    None when nothing was reported or the report failed (the version stays saved)."""


class PersonalModel:
    """A person's private model: frozen base + personal adapter, trained on this device.

    Examples
    --------
    >>> from lorafleet.client import PersonalModel
    >>> pm = PersonalModel.open("~/.myapp/profile")  # doctest: +SKIP
    >>> report = pm.train("notes.txt")  # doctest: +SKIP
    >>> report.result.heldout_loss_after < report.result.heldout_loss_before  # doctest: +SKIP
    True
    >>> pm.generate("What do I do on Tuesdays?")  # doctest: +SKIP
    'Climbing at the gym with Jonas.'
    """

    def __init__(
        self,
        profile: Profile,
        base: LoadedBase,
        *,
        precision: Precision = "auto",
        device: str = "auto",
        seq_len: int = 128,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Prefer :meth:`open`; this wires already-loaded parts together."""
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._onnx: _OnnxSession | None = None  # loaded by the first ONNX generation
        self._onnx_choices: dict[str, OnnxChoice] = {}  # onnx-auto's graph, per provider
        self._profile = profile
        self.profile = profile.root
        self.base = base
        self.spec = profile.spec
        self.seq_len = seq_len
        self._device = resolve_device(device)
        self.precision = resolve_precision(precision, self._device)
        self.model = materialize(base.model, self.spec, base_sha256=base.sha256)
        place_on(self.model, self._device)
        self._provenance: AdapterProvenance | None = None
        current = profile.current_version()
        if current is not None:
            self._load_version(current)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        profile: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        cohort_seed: int = 0,
        precision: Precision = "auto",
        device: str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        seq_len: int = 128,
    ) -> PersonalModel:
        """Open a profile directory, creating it (and its adapter spec) on first use.

        ``base`` defaults to the base the profile was made with (the default base for a
        new profile). The spec arguments (rank, alpha, targets, seed) only apply when the
        profile is new; an existing profile keeps its own spec and refuses a base whose
        manifest differs from the one it was made for.
        """
        root = Path(profile).expanduser()
        if root.exists() and not root.is_dir():
            raise LorafleetError(f"profile {root} is a file; pass a directory")
        stored = Profile.read_spec(root)
        if base is None:
            base = Profile.read_base_source(root) or DEFAULT_BASE
        dev = resolve_device(device)
        dtype = base_dtype(precision, dev)
        quantization = base_quantization(precision, dev)
        cache = Path(cache_dir) if cache_dir is not None else None
        if stored is not None:
            spec = stored
            try:  # refused from the manifest, before any weights are read
                loaded = load_base(
                    base,
                    cache_dir=cache,
                    dtype=dtype,
                    expected_sha256=spec.base_sha256,
                    quantization=quantization,
                )
            except IntegrityError as exc:
                raise IntegrityError(
                    f"profile {root} belongs to base {spec.base_model_id} ({spec.base_sha256[:12]}…), "
                    f"but {base} differs ({exc}); open it with the same base"
                ) from None
        else:
            loaded = load_base(base, cache_dir=cache, dtype=dtype, quantization=quantization)
            spec = AdapterSpec(
                base_model_id=loaded.model_id,
                base_sha256=loaded.sha256,
                rank=rank,
                alpha=alpha,
                target_modules=tuple(target_modules),
                cohort_seed=cohort_seed,
            )
            lora_targets(loaded.model, spec)  # a bad target fails before anything is written
            Profile.create(root, spec, base_source=str(base))
        return cls(
            Profile.open(root),
            loaded,
            precision=precision,
            device=device,
            seq_len=seq_len,
            cache_dir=cache,
        )

    # ---------------------------------------------------------------- versions
    def _load_version(self, version: int) -> None:
        provenance, b, a = self._profile.read(version)
        set_weights(self.model, self.spec, b, a)
        self._provenance = provenance

    def versions(self) -> list[AdapterProvenance]:
        """Every saved version of this profile's adapter, oldest first."""
        return self._profile.versions()

    @property
    def version(self) -> int | None:
        """The version in use, or None for a fresh (zero-B) adapter."""
        return self._provenance.version if self._provenance else None

    @property
    def provenance(self) -> AdapterProvenance | None:
        """Provenance of the version in use."""
        return self._provenance

    def adapter_b(self) -> BTensors:
        """A copy of the personal B matrices (private: never send them unencrypted)."""
        return get_b(self.model)

    def adapter_a(self) -> ATensors | None:
        """A copy of the personal A matrices, or None while A is the spec's seeded A.

        A personal A exists once training ran with ``TrainConfig.a_lr`` > 0; it is as
        private as B.
        """
        return None if has_seeded_a(self.model, self.spec) else get_a(self.model)

    def load_b(
        self,
        b: Mapping[str, npt.NDArray[np.floating[Any]]],
        a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
    ) -> None:
        """Replace the personal adapter in memory (for example with a shared prior).

        ``a`` is a personal A to go with ``b``; without it A goes back to the spec's
        seeded A, the one every B of the federation (a prior included) was trained on.
        """
        set_b(self.model, b)
        set_a(self.model, self.spec, a)

    def save(
        self,
        *,
        metrics: Mapping[str, float] | None = None,
        prior_version: str | None = None,
        round: int | None = None,
    ) -> AdapterProvenance:
        """Write the current adapter as a new immutable version and make it current.

        A trained personal A (``TrainConfig.a_lr``) is saved with B; a seeded A is not
        (every device rebuilds it from the spec).
        """
        provenance = self._profile.save(
            self.model,
            get_b(self.model),
            a=self.adapter_a(),
            metrics=metrics,
            prior_version=prior_version,
            round=round,
        )
        self._provenance = provenance
        return provenance

    def rollback(
        self, version: int, *, report_to: BackupClient | None = None, adapter: str = "default"
    ) -> ReportReceipt | None:
        """Make an earlier saved version current again (versions are never deleted).

        With ``report_to`` (an enrolled device's client) the coordinator's registry moves
        this adapter's pointer to ``version`` too: the rollback is reported as the pointer
        move it is (no version is rewritten). Returns what it recorded, or None when
        nothing was reported.
        """
        self._load_version(version)
        self._profile.set_current(version)
        return self._report(report_to, adapter, None) if report_to is not None else None

    def _report(
        self, client: BackupClient, adapter: str, saved: VersionReport | None
    ) -> ReportReceipt | None:
        """Send the version in use (and the one just saved) to the coordinator's registry.

        Reports that failed before go first, in order, so the registry's history has no
        gaps and its pointer ends on the version in use; recording is idempotent, so a
        report that did arrive before its reply was lost is skipped. A report that
        fails again is queued in the profile for the next one (or
        :meth:`send_pending_reports`).
        """
        current = self.version
        if current is None or not client.send_reports:
            return None
        report = AdapterReport(adapter=adapter, current=current, saved=saved)
        return self._send_reports(client, self._profile.pending_reports(), report)

    def send_pending_reports(self, report_to: BackupClient) -> ReportReceipt | None:
        """Send the reports queued after failures; None when there were none or it failed.

        :meth:`train` and :meth:`rollback` do this on their own with their next report;
        an app calls it when the device comes back online without training.
        """
        pending = self._profile.pending_reports()
        if not pending or not report_to.send_reports:
            return None
        return self._send_reports(report_to, pending, None)

    def _send_reports(
        self, client: BackupClient, pending: list[AdapterReport], new: AdapterReport | None
    ) -> ReportReceipt | None:
        """Send ``pending`` then ``new``; queue them all on failure, clear the queue after."""
        reports = pending if new is None else [*pending, new]
        try:
            receipt = client.report_versions(self.spec, reports)
        except BackupError as exc:  # the version is saved here; a report is not worth failing for
            with self._profile.writing():
                self._profile.queue_reports(reports)
            log.warning(
                "the coordinator did not take the report of version %d (%s); %d report(s) "
                "queued in the profile for the next try",
                reports[-1].current,
                exc,
                len(reports),
            )
            return None
        if pending:  # only a queue that existed is rewritten: no lock and I/O per report
            with self._profile.writing():
                self._profile.queue_reports([])
        return receipt

    # ------------------------------------------------------------------ exports
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        version: int | None = None,
        base_id: str | None = None,
    ) -> Path:
        """Write the current (or a given) version as a portable PEFT folder.

        The names follow transformers and peft: the folder is what
        ``peft.PeftModel.from_pretrained(base, folder)`` and
        ``AutoPeftModelForCausalLM.from_pretrained(folder)`` load, and what
        :meth:`from_pretrained` imports into a profile again. ``adapter_config.json``
        names the base by its hub id (and revision when known), never a cache path;
        lorafleet's base sha256, spec and provenance sit beside it in
        ``lorafleet_adapter.json``, and ``README.md`` is a filled-in model card. The
        adapter is written unencrypted: it is the user's to take elsewhere.

        Parameters
        ----------
        save_directory
            A folder that does not exist yet (exports never overwrite).
        version
            Which saved version; default the current one.
        base_id
            ``ORG/NAME`` or ``ORG/NAME@REVISION`` to name the base by, for a base that
            lorafleet loaded from a local file or folder.

        Returns
        -------
        Path
            The folder written.

        Raises
        ------
        LorafleetError
            The folder exists, or the profile has no saved version yet.

        Examples
        --------
        >>> folder = pm.save_pretrained("exports/nadia-adapter")  # doctest: +SKIP
        >>> from peft import AutoPeftModelForCausalLM  # doctest: +SKIP
        >>> model = AutoPeftModelForCausalLM.from_pretrained(folder)  # doctest: +SKIP
        """
        return self.export(save_directory, "peft", version=version, base_id=base_id)

    def export(
        self,
        out: str | os.PathLike[str],
        format: ExportFormat = "peft",
        *,
        version: int | None = None,
        base_id: str | None = None,
        progress: bool = True,
    ) -> Path:
        """Write a saved version in a format other tools load (``docs/sdk.md#exports``).

        Parameters
        ----------
        out
            A folder that does not exist yet.
        format
            ``"peft"`` (see :meth:`save_pretrained`), ``"merged"`` (the base with the
            adapter folded in: safetensors that ``AutoModelForCausalLM`` loads) or
            ``"onnx-genai"`` (an ONNX Runtime GenAI model folder with the adapter as an
            ``.onnx_adapter``; needs ``pip install 'lorafleet[genai]'``), ``"gguf-lora"``
            (``adapter.gguf``, llama.cpp's ``--lora`` file for the GGUF base the profile
            trained on) or ``"gguf"`` (that base with the adapter folded in: a float32
            ``model.gguf``). The GGUF formats need a GGUF base (the default one or a
            ``.gguf`` file).
        version, base_id
            As for :meth:`save_pretrained`.
        progress
            Show progress of the slower formats on stderr.

        Returns
        -------
        Path
            The folder written.

        Examples
        --------
        >>> pm.export("exports/nadia-merged", "merged")  # doctest: +SKIP
        PosixPath('exports/nadia-merged')
        """
        if format not in EXPORT_FORMATS:
            raise SpecError(
                f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}"
            )
        target = check_new_folder(Path(out))
        if version is None:
            version = self._profile.current_version()
            if version is None:
                raise LorafleetError(
                    f"profile {self.profile} has no saved adapter version yet; train first"
                )
        provenance, b, a = self._profile.read(version)
        job = ExportJob(
            version_dir=self._profile.version_dir(version),
            provenance=provenance,
            b=b,
            a=a,
            ref=base_ref(
                self.spec.base_sha256,
                self.spec.base_model_id,
                self.base.source,
                base_id=base_id,
                cache_dir=self._cache_dir,
            ),
            source=self.base.source,
            out=target,
            cache_dir=self._cache_dir,
            progress=progress,
        )
        if not job.ref.portable:
            log.warning(
                "base %s has no hub id; the export names it by that local name (pass "
                "base_id='ORG/NAME' to name it portably)",
                job.ref.name_or_path,
            )
        return EXPORTERS[format](job)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        profile: str | os.PathLike[str],
        base: str | os.PathLike[str] | None = None,
        precision: Precision = "auto",
        device: str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        seq_len: int = 128,
    ) -> PersonalModel:
        """Import a folder written by :meth:`save_pretrained` into ``profile`` and open it.

        The folder's A must be the one its spec's seed gives and its B must hash to its
        recorded content hash, or nothing is written. A new profile takes the folder's
        spec; an existing one must have the same spec, and gets the adapter as a new
        version (none when its current version already is that adapter).

        Parameters
        ----------
        pretrained_model_name_or_path
            A local folder from :meth:`save_pretrained` (lorafleet works offline: no
            hub download).
        profile
            The profile to import into (created if new).
        base
            The base source on this device; default the profile's own, else the default
            base when the adapter was made on it, else the folder's hub id.
        precision, device, cache_dir, seq_len
            As for :meth:`open`.

        Raises
        ------
        LorafleetError
            The folder is not a lorafleet export (a PEFT adapter trained elsewhere has
            a trained A that no seed rebuilds), or the profile holds another spec.
        IntegrityError
            The folder's tensors do not match its spec and content hash, or the base
            found is not the one the adapter was trained on.

        Examples
        --------
        >>> pm = PersonalModel.from_pretrained("nadia-adapter", profile="~/.app/profile")  # doctest: +SKIP
        """
        from lorafleet.client.adapter import read_adapter
        from lorafleet.client.layout import read_provenance

        folder = Path(pretrained_model_name_or_path).expanduser()
        if not folder.is_dir():
            raise LorafleetError(
                f"{folder} is not a folder; pass a folder written by save_pretrained"
            )
        provenance = read_provenance(folder)  # a folder without one is refused clearly
        b, a = read_adapter(folder, provenance)
        spec = provenance.spec
        root = Path(profile).expanduser()
        stored = Profile.read_spec(root)
        if stored is not None and stored != spec:
            raise LorafleetError(
                f"profile {root} holds another adapter spec than {folder}; import it into a "
                "new profile"
            )
        if base is None:
            base = Profile.read_base_source(root) or cls._base_for(folder, spec)
        new = stored is None
        try:
            if new:  # the base is checked against the spec's sha256 when open loads it
                Profile.create(root, spec, base_source=str(base))
            pm = cls.open(
                root,
                base=base,
                precision=precision,
                device=device,
                cache_dir=cache_dir,
                seq_len=seq_len,
            )
            current = pm.provenance
            if current is None or current.content_hash != provenance.content_hash:
                pm.load_b(b, a)
                pm.save(
                    metrics=provenance.metrics,
                    prior_version=provenance.prior_version,
                    round=provenance.round,
                )
        except BaseException:
            if new:
                Profile.remove_unused(root)
            raise
        return pm

    @staticmethod
    def _base_for(folder: Path, spec: AdapterSpec) -> str:
        """The base source an imported folder implies: the default base, or its hub id."""
        if spec.base_sha256 == DEFAULT_BASE_SHA256:
            return DEFAULT_BASE
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            name = str(config.get("base_model_name_or_path") or "")
        except (OSError, ValueError):
            name = ""
        if not name:
            raise LorafleetError(
                f"{folder} does not say which base it belongs to; pass base=... (a .gguf "
                "file, a model folder or a hub id)"
            )
        return name

    # ---------------------------------------------------------- backup/restore
    def backup(
        self,
        client: BackupClient,
        *,
        key_file: str | os.PathLike[str],
        passphrase: str | None = None,
        keys: UnlockedKeys | None = None,
        adapter: str = "default",
        version: int | None = None,
        upload_key_file: bool = True,
        packing: Packing = BACKUP_PACKING,
    ) -> BackupRecord:
        """Seal the current (or a given) version and store it on the coordinator.

        The adapter version (its B packed as ``packing``, plus the folder's small files;
        A is rebuilt from the seed on restore, see ``docs/backup.md``) is sealed on this
        device under the user's master key (see ``docs/envelope.md``), bound to the
        user, ``adapter`` name, version and base, and uploaded through ``client``;
        the coordinator never sees a key or the plaintext. With ``upload_key_file``
        the key file (its keys wrapped by the passphrase and recovery keys, never in
        the clear) is stored too, so :meth:`restore` works on a new device with the
        passphrase alone.

        Parameters
        ----------
        client
            An enrolled device's :class:`~lorafleet.client.backup.BackupClient`.
        key_file
            The device's key file (:class:`~lorafleet.client.keys.KeyStore`).
        passphrase
            Unlocks ``key_file``; not needed when ``keys`` are given.
        keys
            Master keys already unlocked (saves a passphrase KDF run).
        adapter
            Name of this profile's adapter on the server.
        version
            Which saved version; default the current one.
        upload_key_file
            Also store the key file (once per change).
        packing
            How B is stored: ``int8`` by default (a tenth of a whole-folder backup, no
            measurable held-out loss change; docs/benchmarks.md); ``fp32`` restores B
            bit for bit at 0.4 of the bytes.

        Returns
        -------
        BackupRecord
            The stored blob(s); ``uploaded`` is False if that version was already there.

        Examples
        --------
        >>> client = BackupClient.open("backup.example:7443", "~/.app/device.json")  # doctest: +SKIP
        >>> pm.backup(client, key_file="~/.app/keys.json", passphrase="...")  # doctest: +SKIP
        """
        path = Path(key_file).expanduser()
        if keys is None:
            if passphrase is None:
                raise SpecError("backup needs the key file's passphrase, or unlocked keys")
            keys = KeyStore.unlock(path, passphrase)
        return backup_profile(
            client,
            self.profile,
            keys,
            adapter=adapter,
            version=version,
            key_file=path if upload_key_file else None,
            packing=packing,
        )

    @classmethod
    def restore(
        cls,
        profile: str | os.PathLike[str],
        client: BackupClient,
        *,
        key_file: str | os.PathLike[str],
        passphrase: str | None = None,
        recovery_key: bytes | None = None,
        new_passphrase: str | None = None,
        kdf: KdfParams | None = None,
        adapter: str = "default",
        version: int | None = None,
        allow_downgrade: bool = False,
        base: str | os.PathLike[str] | None = None,
        precision: Precision = "auto",
        device: str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        seq_len: int = 128,
    ) -> PersonalModel:
        """Restore a backed-up adapter into ``profile`` (e.g. on a new device) and open it.

        The keys come from the device's key file at ``key_file``, or, when this device
        has none, from the key file the user backed up: unlocked with ``passphrase``,
        or rebuilt with ``recovery_key`` under ``new_passphrase``. The blob is fetched,
        checked and opened before anything is written, so a wrong passphrase, a
        damaged, truncated, swapped or replayed blob raises one clear error and leaves
        the profile (and the key file) as they were. The restored version's files are
        bit-identical to the backed-up ones, so the model generates the same text.

        Parameters
        ----------
        profile
            Profile folder: new, or one of the same adapter (then never moved back to an
            older version unless ``allow_downgrade``).
        client
            An enrolled device's backup client (enrol the new device first).
        key_file
            Where this device's key file is, or is to be written.
        passphrase, recovery_key, new_passphrase, kdf
            Exactly one of ``passphrase`` and ``recovery_key``; ``new_passphrase`` (and
            optionally ``kdf``) for the key file a recovery key rebuilds.
        adapter, version
            What to restore; default the newest backed-up version of ``adapter``.
        allow_downgrade
            Allow making an older version current than the profile's.
        base
            The base model on this device (default: the one recorded in the backup).
        precision, device, cache_dir, seq_len
            As for :meth:`open`.

        Examples
        --------
        >>> client = BackupClient.enroll(address, token, "~/.app/device.json")  # doctest: +SKIP
        >>> pm = PersonalModel.restore(  # doctest: +SKIP
        ...     "~/.app/profile", client, key_file="~/.app/keys.json", passphrase="..."
        ... )
        """
        keys, pending = obtain_keys(
            client,
            Path(key_file),
            passphrase=passphrase,
            recovery_key=recovery_key,
            new_passphrase=new_passphrase,
            kdf=kdf,
        )
        try:
            restore_profile(
                client,
                Path(profile).expanduser(),
                keys,
                adapter=adapter,
                version=version,
                allow_downgrade=allow_downgrade,
                base_source=None if base is None else str(base),
            )
            pending.install()
        finally:
            pending.discard()
        return cls.open(
            profile,
            base=base,
            precision=precision,
            device=device,
            cache_dir=cache_dir,
            seq_len=seq_len,
        )

    # -------------------------------------------------------------------- data
    @staticmethod
    def split_data(
        examples: Sequence[Example],
        *,
        heldout_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 0,
    ) -> tuple[list[Example], list[Example], list[Example]]:
        """The ``(train, held-out, test)`` sides :meth:`train` uses, without a model.

        An app (or the CLI) calls it to refuse too little data before it spends seconds
        loading the base; :meth:`train` splits the same way.
        """
        if not isinstance(test_fraction, int | float) or not 0 <= test_fraction < 0.5:
            raise SpecError(f"train: test_fraction must be in [0, 0.5), got {test_fraction!r}")
        test: list[Example] = []
        rest = list(examples)
        if test_fraction:
            rest, test = split_examples(
                rest, test_fraction, seed=seed + 1, min_train=6, min_heldout=1
            )
        train, held = split_examples(rest, heldout_fraction, seed=seed)
        return train, held, test

    def _blocks(self, examples: Sequence[Example], data: DataConfig) -> TokenBlocks:
        return encode_blocks(
            examples, self.base.tokenizer, seq_len=self.seq_len, train_on=data.train_on
        )

    # --------------------------------------------------------------- train/eval
    def train(
        self,
        data: TrainingData,
        config: TrainConfig | None = None,
        *,
        data_config: DataConfig | None = None,
        heldout_fraction: float = 0.2,
        test_fraction: float = 0.0,
        prior_b: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
        save: bool = True,
        progress: bool = True,
        report_to: BackupClient | None = None,
        adapter: str = "default",
    ) -> TrainReport:
        """Fine-tune the personal adapter on the user's text and save a new version.

        Part of the data (``heldout_fraction``) is held out to stop early; the best
        adapter seen on it is kept, so its loss after training is optimistic. With
        ``test_fraction > 0`` that share of the notes is set aside first, never trained
        or selected on, and the report's ``test_loss_before/after`` are the honest
        figures (the split is by a hash of each note, as for the held-out side).

        Without ``config`` the budget is sized by the data: about one step per training
        block (:data:`~lorafleet.client.train.SIZED_STEPS_PER_BLOCK`), at least 8 and at
        most ``TrainConfig.steps``, evaluated as densely. A ``config`` of your own trains
        its ``steps`` unless it sets ``steps_per_block``.

        ``data`` is a file or folder path, or notes, examples, record dicts or a
        Hugging Face ``datasets.Dataset`` (:func:`~lorafleet.client.data.to_examples`);
        ``data_config`` says how files are split into notes and whether prompts carry
        loss (by default only completions and assistant replies do, as in TRL).

        With ``report_to`` (an enrolled device's :class:`~lorafleet.client.backup.
        BackupClient`, as for :meth:`backup`) the saved version's metadata goes to the
        coordinator's registry under ``adapter``: version, parent, spec fingerprint, base
        sha256, the prior it started from, example count, validation and test loss,
        size; never the adapter itself or the notes (``docs/privacy.md``). A client with
        ``send_reports=False`` sends nothing; a failed report is logged and leaves the
        report's ``reported`` None.
        """
        if report_to is not None and not save:
            raise SpecError("train: report_to reports the saved version; pass save=True")
        # By default the budget is sized by the user's data (TrainConfig.steps_per_block).
        config = config or TrainConfig(steps_per_block=SIZED_STEPS_PER_BLOCK)
        # "auto" in a caller's config means: the precision and device this model runs on.
        config = dataclasses.replace(
            config,
            precision=self.precision if config.precision == "auto" else config.precision,
            device=str(self._device) if config.device == "auto" else config.device,
        )
        if prior_b is not None and config.prox_mu == 0:
            raise SpecError(
                "train: prior_b only acts through prox_mu > 0; to start from a prior, call load_b(prior) first"
            )
        data_config = data_config or DataConfig()
        train_ex, held_ex, test_ex = self.split_data(
            to_examples(data, data_config),
            heldout_fraction=heldout_fraction,
            test_fraction=test_fraction,
            seed=config.seed,
        )
        train_blocks = self._blocks(train_ex, data_config)
        config = config.sized(len(train_blocks))  # before the bar, so its total is right
        held_blocks = self._blocks(held_ex, data_config)
        test_blocks = self._blocks(test_ex, data_config) if test_ex else None
        test_before = self._loss(test_blocks) if test_blocks is not None else None
        with contextlib.ExitStack() as hold:
            if save:  # a profile that cannot be written (read-only) fails now, not after training
                hold.enter_context(self._profile.writing())
            bar = tqdm(
                total=config.steps, desc="training adapter", unit="step", disable=not progress
            )

            def tick(step: int, total: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            try:
                result = train_adapter(
                    self.model, train_blocks, held_blocks, config, prior_b=prior_b, progress=tick
                )
            finally:
                bar.close()
            provenance = None
            if save:
                provenance = self.save(
                    metrics={
                        "heldout_loss_before": result.heldout_loss_before,
                        "heldout_loss_after": result.heldout_loss_after,
                        "train_tokens": float(result.tokens),
                        "train_examples": float(len(train_ex)),
                        "heldout_examples": float(len(held_ex)),
                    }
                )
        test_after = self._loss(test_blocks) if test_blocks is not None else None
        reported = None
        if report_to is not None and provenance is not None:
            try:
                saved = self._profile.version_report(
                    provenance.version,
                    num_examples=len(train_ex),
                    val_loss=result.heldout_loss_after,
                    test_loss=test_after,
                )
            except SpecError as exc:  # e.g. a diverged (non-finite) loss: nothing to report
                log.warning("version %d is not reported: %s", provenance.version, exc)
            else:
                reported = self._report(report_to, adapter, saved)
        return TrainReport(
            result,
            provenance,
            len(train_ex),
            len(held_ex),
            len(test_ex),
            test_before,
            test_after,
            reported,
        )

    def _loss(self, blocks: TokenBlocks, *, progress: bool = False) -> float:
        return heldout_loss(
            self.model, blocks, precision=self.precision, device=self._device, progress=progress
        )

    def evaluate(self, data: TrainingData, data_config: DataConfig | None = None) -> EvalReport:
        """Loss of the base alone and with the adapter on all of ``data``.

        The loss is on the tokens training would learn (``data_config.train_on``).
        """
        data_config = data_config or DataConfig()
        blocks = self._blocks(to_examples(data, data_config), data_config)
        adapter_loss = self._loss(blocks, progress=True)
        with adapter_disabled(self.model):
            base_loss = self._loss(blocks, progress=True)
        return EvalReport(base_loss=base_loss, adapter_loss=adapter_loss, tokens=blocks.num_tokens)

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        use_adapter: bool = True,
        chat: bool = True,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int = 0,
        backend: Backend = "torch",
        provider: str | None = None,
    ) -> str:
        """Reply to ``prompt`` with the personal adapter (or the bare base).

        Greedy by default; with ``temperature > 0`` sampling is reproducible per ``seed``.

        Parameters
        ----------
        prompt
            The user's text; with ``chat`` it is sent as a user turn through the
            tokenizer's chat template, otherwise it is continued as plain text.
        max_new_tokens
            At most this many new tokens; generation stops earlier at end-of-sequence.
        use_adapter
            ``False`` answers with the bare base, for comparison.
        chat
            Use the chat template (instruction-tuned bases expect it).
        temperature, top_p, seed
            Sampling from the smallest set of tokens holding ``top_p`` of the
            probability, at ``temperature``, when ``temperature > 0`` (reproducible per
            ``seed``); the torch backend only.
        backend
            ``"torch"`` (PyTorch with the adapter in peft), ``"onnx"`` (the base exported
            to ONNX Runtime, float32: the same tokens as torch) or ``"onnx-int8"`` (int8
            base weights: faster, a quarter of the memory, within the export's quality
            gate). The first ONNX call exports the base once (cached for every profile
            on this base) and loads one session, kept for later calls; the current
            adapter version is applied to it on every call.
        provider
            ONNX Runtime execution provider: ``"cpu"``, ``"cuda"``, or ``None``/``"auto"``
            (CUDA when onnxruntime-gpu is installed, else the CPU; ``$LORAFLEET_ORT_PROVIDER``
            overrides). ONNX backends only.

        Returns
        -------
        str
            The new text, without the prompt and without special tokens.

        Raises
        ------
        SpecError
            An empty prompt, ``max_new_tokens < 1``, a negative temperature, ``top_p``
            outside (0, 1], an unknown backend, a provider with
            the torch backend, or sampling with an ONNX backend.
        LorafleetError
            The provider is not available, or the base cannot be exported (not a
            Llama-family base, or the int8 export fails its quality gate).

        Examples
        --------
        >>> pm.generate("Walked Turnip along the", chat=False, backend="onnx-int8")  # doctest: +SKIP
        'beach this morning.'
        """
        check_sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        quantization = self._check_backend(backend, provider)
        if quantization is None:
            return generate(
                self.model,
                self.base.tokenizer,
                prompt,
                max_new_tokens=max_new_tokens,
                use_adapter=use_adapter,
                chat=chat,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            )
        if temperature > 0:
            raise SpecError(
                f"generate: sampling (temperature={temperature}) runs on the torch backend only; "
                f"use temperature=0 with backend={backend!r}, or backend='torch'"
            )
        tokenizer = self.base.tokenizer
        text = prompt_text(tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens)
        ids = [int(t) for t in tokenizer(text, add_special_tokens=not chat)["input_ids"]]
        session = self._onnx_session(backend, provider, progress=True)
        adapter = self._onnx_adapter(session) if use_adapter else session.lm.zero_adapter()
        new = session.lm.generate([ids], adapter, max_new_tokens)[0]
        return str(tokenizer.decode(new, skip_special_tokens=True)).strip()

    def prepare_backend(
        self,
        backend: Backend = "onnx-int8",
        *,
        provider: str | None = None,
        progress: bool = True,
    ) -> ExportedBase | None:
        """Get an ONNX backend ready now instead of on the first :meth:`generate` call.

        Exports the base if no export is cached (about a minute for the default base,
        once per base and backend on this machine) and loads the ONNX Runtime session.
        Call it while the app starts, or off the UI thread, so that the first reply
        comes as fast as the others.

        Parameters
        ----------
        backend
            ``"onnx"`` or ``"onnx-int8"``; ``"torch"`` needs nothing and returns None.
        provider
            As for :meth:`generate`.
        progress
            Print the one-time export's progress line and bar on stderr.

        Returns
        -------
        ExportedBase or None
            The cached export in use (its ``quality`` holds the quality gate's numbers).

        Examples
        --------
        >>> exported = pm.prepare_backend("onnx-int8")  # doctest: +SKIP
        >>> print(exported.quality.summary())  # doctest: +SKIP
        quality gate (int8): cross-entropy 5.0890 vs float32 5.0865 (+0.05%) on 5112 tokens ...
        """
        if self._check_backend(backend, provider) is None:
            return None
        return self._onnx_session(backend, provider, progress=progress).exported

    def _check_backend(
        self, backend: str, provider: str | None
    ) -> Literal["none", "int8", "auto"] | None:
        """The export quantization of an ONNX backend, None for torch; refuses bad pairs."""
        if backend not in BACKENDS:
            raise SpecError(
                f"unknown generation backend {backend!r}; use one of {', '.join(BACKENDS)}"
            )
        if backend == "torch":
            if provider is not None and provider.strip().lower() != "auto":
                raise SpecError(
                    f"provider={provider!r} applies to the ONNX backends (onnx, onnx-int8, "
                    "onnx-auto); "
                    "the torch backend runs on the device the profile was opened with"
                )
            return None
        return "auto" if backend == "onnx-auto" else _ONNX_BACKENDS[backend]

    def _onnx_session(self, backend: str, provider: str | None, *, progress: bool) -> _OnnxSession:
        """The ONNX Runtime session for ``backend``: reused, or exported/loaded once."""
        if backend == "onnx-auto":
            backend = self.onnx_graph_choice(provider, progress=progress).backend
        from lorafleet.client.onnx_export import (
            OnnxExportConfig,
            QualityGateError,
            find_export,
        )
        from lorafleet.client.onnx_runtime import select_providers

        asked = (provider or "auto").strip().lower()
        current = self._onnx
        if current is not None and (current.backend, current.provider) == (backend, asked):
            return current
        config = OnnxExportConfig(
            quantization=_ONNX_BACKENDS[backend], target_modules=self.spec.target_modules
        )
        try:
            exported = find_export(self.spec.base_sha256, config, cache_dir=self._cache_dir)
            if exported is None:
                select_providers(provider)  # a bad provider fails now, not after the export
                exported = self._export(backend, config, progress=progress)
        except QualityGateError as exc:
            raise QualityGateError(
                f"backend {backend!r} is refused for this base: {exc}. Use backend='onnx' "
                "(float32) or 'torch'"
            ) from None
        if current is not None:
            log.info("replacing the %s ONNX session by %s", current.backend, backend)
            self._onnx = None  # release the old session before loading the new one
        self._onnx = _OnnxSession(backend, asked, exported, exported.load(provider=provider))
        return self._onnx

    def onnx_graph_choice(
        self, provider: str | None = None, *, progress: bool = True, refresh: bool = False
    ) -> OnnxChoice:
        """The ONNX graph ``backend="onnx-auto"`` uses on this machine, and why.

        Measured once per machine, base, ONNX Runtime and provider, then cached
        (:mod:`lorafleet.client.onnx_choice`): the first call exports both graphs (if
        they are not exported yet) and times greedy decoding on each. ``refresh``
        measures again.
        """
        from lorafleet.client.device import this_cpu
        from lorafleet.client.onnx_choice import choice_key, choose_graph, time_decoding
        from lorafleet.client.onnx_export import OnnxExportConfig, QualityGateError
        from lorafleet.client.onnx_runtime import ort_version, select_providers

        asked = (provider or "auto").strip().lower()
        if not refresh and asked in self._onnx_choices:
            return self._onnx_choices[asked]
        providers = select_providers(provider)
        cpu = this_cpu()
        targets = self.spec.target_modules
        keys = {
            b: OnnxExportConfig(quantization=q, target_modules=targets).export_key(
                self.spec.base_sha256
            )
            for b, q in _ONNX_BACKENDS.items()
        }
        key = choice_key(
            cpu_model=cpu.model,
            isa_class=cpu.isa_class,
            isa_restriction=cpu.isa_restriction,
            ort_version=ort_version(),
            providers=providers,
            export_keys=keys,
        )
        # The same short prompt on both graphs, greedy, the zero adapter: only the base's
        # matmuls differ between them, and they are what the choice is about.
        ids = [int(t) for t in self.base.tokenizer(_CHOICE_PROMPT)["input_ids"]][:64]

        def speed(backend: str) -> float:
            session = self._onnx_session(backend, provider, progress=progress)
            zero = session.lm.zero_adapter()
            return time_decoding(lambda: session.lm.generate([ids], zero, _CHOICE_TOKENS)[0])

        def measure() -> tuple[float, float | None, str]:
            line = "backend onnx-auto: timing the float32 and int8 graphs once on this machine"
            log.info("%s", line)
            if progress:
                tqdm.write(line, file=sys.stderr)
            fp32 = speed("onnx")
            try:
                int8: float | None = speed("onnx-int8")
            except QualityGateError as exc:
                return fp32, None, str(exc)
            return fp32, int8, ""

        choice = choose_graph(key, measure, cache_dir=self._cache_dir, refresh=refresh)
        self._onnx_choices[asked] = choice
        return choice

    def _export(self, backend: str, config: OnnxExportConfig, *, progress: bool) -> ExportedBase:
        """Export the base once, from a fresh float32 copy (this model carries the adapter)."""
        import torch

        from lorafleet.client.onnx_export import export_base, export_root

        line = (
            f"backend {backend}: exporting base {self.spec.base_model_id} to ONNX "
            f"({config.quantization}) once; it is cached in {export_root(self._cache_dir)} "
            "for every later run"
        )
        log.info("%s", line)
        if progress:
            tqdm.write(line, file=sys.stderr)
        # peft wrapped self.base.model in place, and its B may be trained: export and gate
        # the bare base's weights, read again in float32 from the verified source.
        fresh = load_base(
            self.base.source,
            cache_dir=self._cache_dir,
            expected_sha256=self.spec.base_sha256,
            dtype=torch.float32,
        )
        return export_base(fresh, config, cache_dir=self._cache_dir, progress=progress)

    def _onnx_adapter(self, session: _OnnxSession) -> OnnxAdapter:
        """The current adapter bound to the session, rebound whenever it changed in any way."""
        b = get_b(self.model)  # (out, r) each; small (0.74 MB for the default adapter)
        a = self.adapter_a()  # None while A is the seeded one
        digest = _b_digest(b if a is None else {**b, **{f"{k}:A": v for k, v in a.items()}})
        if session.adapter is None or session.b_digest != digest:
            session.adapter = session.lm.adapter(self.spec, b, a)
            session.b_digest = digest
            log.debug("bound adapter version %s to the ONNX session", self.version)
        return session.adapter

    def info(self) -> dict[str, Any]:
        """A summary for people and logs: no tensors, no text, nothing private."""
        return {
            "profile": str(self.profile),
            "base": self.spec.base_model_id,
            "base_sha256": self.spec.base_sha256,
            "spec": self.spec.to_dict(),
            "version": self.version,
            "versions": len(self.versions()),
            "device": str(self._device),
            "precision": self.precision,
            "trainable_parameters": sum(
                p.numel() for p in self.model.parameters() if p.requires_grad
            ),
            "onnx_session": None
            if self._onnx is None
            else {
                "backend": self._onnx.backend,
                "providers": list(self._onnx.lm.providers),
                "export": str(self._onnx.exported.folder),
            },
        }
