"""A user's profile directory: the adapter spec and its immutable versions on disk.

Layout::

    profile/
      profile.json         spec + base source
      current              name of the version in use, e.g. "v0003"
      pending-reports.jsonl  version reports the coordinator has not taken yet (if any)
      .lorafleet-lock      held by a process while it writes (saves keep their temporaries)
      adapters/v0001/      adapter_config.json, adapter_model.safetensors,
                           lorafleet_adapter.json (spec + provenance)

Saving writes a new version folder atomically and then moves ``current``; a crash or a
full disk leaves the previous version in use. This class knows the layout only; the SDK
(:class:`lorafleet.client.sdk.PersonalModel`) and the federated client put a model on top.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.client.layout import read_provenance
from lorafleet.protocols.atomic import atomic_write_text, remove_stale_temporaries, writing
from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.reports import AdapterReport, VersionReport
from lorafleet.protocols.spec import AdapterSpec

if TYPE_CHECKING:  # reading a profile needs no torch (lorafleet info --json)
    import numpy as np
    import numpy.typing as npt
    from peft import PeftModel

    from lorafleet.client.adapter import ATensors, BTensors

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
CURRENT_FILE = "current"
PENDING_REPORTS_FILE = "pending-reports.jsonl"
"""Version reports that failed to send, oldest first; the next report carries them."""
MAX_PENDING_REPORTS = 1000
"""A device offline for longer keeps only its newest reports (each is a few hundred bytes)."""
ADAPTERS_DIR = "adapters"
LOCK_FILE = ".lorafleet-lock"
"""Held (``flock``) by a process writing to the profile; see :meth:`Profile.writing`."""
_VERSION_DIR = re.compile(r"^v(\d{4,})\Z")


def _version_name(version: int) -> str:
    return f"v{version:04d}"


class Profile:
    """One user's adapter spec and versions in a directory.

    Examples
    --------
    >>> profile = Profile.create(tmp / "nadia", spec, base_source="default")  # doctest: +SKIP
    >>> profile.current_version() is None  # doctest: +SKIP
    True
    """

    def __init__(self, root: Path, spec: AdapterSpec) -> None:
        """Prefer :meth:`open` or :meth:`create`."""
        self.root = root
        self.spec = spec
        self._writing = False

    @staticmethod
    def read_spec(root: Path) -> AdapterSpec | None:
        """The spec stored in ``root``, or None if ``root`` is not a profile yet."""
        path = Path(root) / PROFILE_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return AdapterSpec.from_dict(record["spec"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{path} is corrupt ({exc}); restore it from a backup") from None

    @staticmethod
    def read_base_source(root: Path) -> str | None:
        """The base source the profile was created with (what ``open`` loads by default)."""
        path = Path(root) / PROFILE_FILE
        if not path.is_file():
            return None
        try:
            source = json.loads(path.read_text(encoding="utf-8")).get("base_source")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise IntegrityError(f"{path} is corrupt ({exc}); restore it from a backup") from None
        return str(source) if source else None

    @classmethod
    def open(cls, root: Path) -> Profile:
        """An existing profile; leftovers of interrupted saves are removed.

        A save in progress in another process holds the profile's lock file, and its
        temporary folder is left alone; so is a read-only profile, which nothing can
        have been writing to.
        """
        root = Path(root)
        spec = cls.read_spec(root)
        if spec is None:
            raise LorafleetError(f"{root} is not a lorafleet profile (no {PROFILE_FILE})")
        profile = cls(root, spec)
        try:
            fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # read-only: there is nothing to clean up, and nobody is saving
            return profile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("another process is saving to %s; its temporary files are kept", root)
            os.close(fd)
            return profile
        try:
            remove_stale_temporaries(root)
            remove_stale_temporaries(root / ADAPTERS_DIR)
        finally:
            os.close(fd)  # closing the descriptor releases the lock
        return profile

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the profile's lock file while the block writes to the profile.

        Other processes' :meth:`open` then keep the block's temporary files instead of
        removing them as leftovers of a crash; a second writer waits for the first. The
        lock is re-entrant within this object (a training run holds it around its save).

        Raises
        ------
        StorageError
            The lock file cannot be created (a read-only profile, a full disk); nothing
            was written.
        """
        if self._writing:
            yield
            return
        with writing(self.root):
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._writing = True
            yield
        finally:
            self._writing = False
            os.close(fd)

    @classmethod
    def create(cls, root: Path, spec: AdapterSpec, *, base_source: str) -> Profile:
        """A new profile for ``spec``; refuses to overwrite an existing one."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise LorafleetError(f"profile {root} is a file; pass a directory")
        if (root / PROFILE_FILE).exists():
            raise LorafleetError(f"{root} is already a profile; open it instead")
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)
        record = {"format": 1, "base_source": base_source, "spec": spec.to_dict()}
        atomic_write_text(root / PROFILE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        return cls(root, spec)

    @staticmethod
    def remove_unused(root: Path) -> bool:
        """Remove a profile that never saved a version (a first run that failed).

        Only the files :meth:`create` and :meth:`open` write are removed, then the
        folder if that leaves it empty, so anything else a user keeps there stays.
        Returns whether the profile was removed; one with a saved version never is.
        """
        root = Path(root)
        if not (root / PROFILE_FILE).is_file() or (root / ADAPTERS_DIR).exists():
            return False
        for name in (PROFILE_FILE, LOCK_FILE, CURRENT_FILE):
            with contextlib.suppress(FileNotFoundError):
                (root / name).unlink()
        with contextlib.suppress(OSError):  # not empty: the user's own files stay
            root.rmdir()
        log.info("removed the unused new profile %s", root)
        return True

    # ---------------------------------------------------------------- versions
    def version_dir(self, version: int) -> Path:
        """Folder of one version (it may not exist)."""
        return self.root / ADAPTERS_DIR / _version_name(version)

    @staticmethod
    def version_numbers(root: Path) -> list[int]:
        """Saved version numbers in ``root``, ascending, from folder names alone.

        Nothing is read or verified, so a caller that only needs to know whether a
        version appeared (the federated client, around a round) pays one directory listing.
        """
        folder = Path(root) / ADAPTERS_DIR
        if not folder.is_dir():
            return []
        return sorted(
            int(m.group(1)) for c in folder.iterdir() if (m := _VERSION_DIR.match(c.name))
        )

    def current_version(self) -> int | None:
        """The version ``current`` points at, or None before the first save."""
        path = self.root / CURRENT_FILE
        if not path.is_file():
            return None
        match = _VERSION_DIR.match(path.read_text(encoding="utf-8").strip())
        if not match:
            raise IntegrityError(f"{path} is corrupt; it should name a version such as v0001")
        return int(match.group(1))

    def versions(self) -> list[AdapterProvenance]:
        """Every saved version, oldest first."""
        folder = self.root / ADAPTERS_DIR
        if not folder.is_dir():
            return []
        return [read_provenance(c) for c in sorted(folder.iterdir()) if _VERSION_DIR.match(c.name)]

    def read(self, version: int) -> tuple[AdapterProvenance, BTensors, ATensors | None]:
        """Provenance, verified B and personal A (None: the seeded A) of one version."""
        folder = self.version_dir(version)
        if not folder.is_dir():
            known = [p.version for p in self.versions()]
            raise LorafleetError(
                f"no adapter version {version} in {self.root}; saved versions: {known}"
            )
        from lorafleet.client.adapter import read_adapter

        provenance = read_provenance(folder)
        if provenance.spec != self.spec:
            raise IntegrityError(f"adapter {folder} was made with another spec than this profile's")
        return (provenance, *read_adapter(folder, provenance))

    def save(
        self,
        model: PeftModel,
        b: Mapping[str, npt.NDArray[np.floating[Any]]],
        *,
        a: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None,
        metrics: Mapping[str, float] | None = None,
        prior_version: str | None = None,
        round: int | None = None,
    ) -> AdapterProvenance:
        """Write ``model``'s adapter as a new version and make it current.

        ``b`` is the model's B; ``a`` its personal A when A was trained on the device
        (the version then records ``personal_a`` and hashes A with B), None when A is
        the spec's seeded A.
        """
        from lorafleet.client.adapter import b_content_hash, save_adapter

        with self.writing():
            versions = [p.version for p in self.versions()]
            version = max(versions, default=0) + 1
            provenance = AdapterProvenance(
                spec=self.spec,
                version=version,
                content_hash=b_content_hash(self.spec, b, a),
                parent=self.current_version(),
                prior_version=prior_version,
                round=round,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                metrics=dict(metrics or {}),
                personal_a=a is not None,
            )
            save_adapter(model, self.version_dir(version), provenance)
            self.set_current(version)
        log.info("saved adapter version %d to %s", version, self.version_dir(version))
        return provenance

    def version_report(
        self,
        version: int,
        *,
        num_examples: int,
        val_loss: float,
        test_loss: float | None = None,
    ) -> VersionReport:
        """What the coordinator may learn of a saved version: its metadata, never its B.

        Lineage from the version's provenance (parent, prior, round, content hash,
        creation time), the spec's fingerprint and base, the folder's size, and the
        scores given here (the example count and validation loss it was selected on, and
        a test loss if the caller measured one).
        """
        folder = self.version_dir(version)
        prov = read_provenance(folder)
        return VersionReport(
            version=prov.version,
            parent=prov.parent,
            spec_fingerprint=self.spec.fingerprint(),
            base_sha256=self.spec.base_sha256,
            content_hash=prov.content_hash,
            prior_version=prov.prior_version,
            round=prov.round,
            num_examples=num_examples,
            val_loss=val_loss,
            test_loss=test_loss,
            size_bytes=sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
            created_at=prov.created_at,
        )

    # ---------------------------------------------------------------- reports
    def pending_reports(self) -> list[AdapterReport]:
        """Reports queued by :meth:`queue_reports`, oldest first.

        A line that no longer parses (a torn write, an older format) is dropped with a
        warning rather than blocking every later report: a report is metadata the
        coordinator can live without, the versions themselves are safe on disk.
        """
        path = self.root / PENDING_REPORTS_FILE
        if not path.is_file():
            return []
        out: list[AdapterReport] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(AdapterReport.from_config(json.loads(line)))
            except (json.JSONDecodeError, SpecError, TypeError, AttributeError) as exc:
                log.warning("%s line %d is not a report (%s); dropped", path, number, exc)
        return out

    def queue_reports(self, reports: list[AdapterReport]) -> None:
        """Replace the queue with ``reports`` (the newest :data:`MAX_PENDING_REPORTS`).

        Written atomically, so a crash leaves either the old queue or the new one.
        An empty list removes the file.
        """
        path = self.root / PENDING_REPORTS_FILE
        if not reports:
            path.unlink(missing_ok=True)
            return
        kept = reports[-MAX_PENDING_REPORTS:]
        if len(kept) < len(reports):
            log.warning(
                "%d queued reports dropped (only the newest %d are kept)",
                len(reports) - len(kept),
                MAX_PENDING_REPORTS,
            )
        atomic_write_text(path, "".join(json.dumps(r.to_config()) + "\n" for r in kept))

    def set_current(self, version: int) -> None:
        """Point ``current`` at an existing version (a rollback when it is older)."""
        if not self.version_dir(version).is_dir():
            known = [p.version for p in self.versions()]
            raise LorafleetError(
                f"no adapter version {version} in {self.root}; saved versions: {known}"
            )
        atomic_write_text(self.root / CURRENT_FILE, _version_name(version) + "\n")
