"""Devices' adapter reports, checked and recorded in the registry once per round.

A device's round reply may carry an :class:`~lorafleet.protocols.reports.AdapterReport`:
the personal version it saved this round (metadata only) and the version it uses. The
coordinator does not control devices, so every report is parsed strictly, then checked
against what the round itself fixed (the cohort's spec and base, the round number, the
prior that was sent); one that fails is refused with one log line naming the node, and
the round goes on. What passes becomes a :class:`~lorafleet.server.registry.DeviceReport`
under the node's pseudonym (:meth:`CoordinatorState.pseudonym`), and the round's reports
go to the registry in one transaction (:meth:`Registry.record_reports`), so a round of
thousands of devices costs a few statements, not thousands of commits.

An SDK ``train`` on a device enrolled for backup reports the same way through the backup
service (``ReportVersions``, :mod:`lorafleet.server.backup_service`): its reports go
through :func:`device_report` too, under the enrolled device's user, so the console shows
both alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lorafleet.protocols.errors import LorafleetError, SpecError
from lorafleet.protocols.federation import RoundMetrics
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.reports import REPORT_KEY, AdapterReport, VersionReport
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry import DeviceReport, ReportCounts

if TYPE_CHECKING:  # the backup service uses device_report without Flower or a coordinator
    from flwr.app import RecordDict

    from lorafleet.server.coordinator import CoordinatorState

log = logging.getLogger(__name__)


def report_in_reply(content: RecordDict) -> AdapterReport | None:
    """The report of a plain reply (None when the device sent none); SpecError if malformed."""
    if REPORT_KEY not in content.config_records:
        return None
    return AdapterReport.from_config(dict(content.config_records[REPORT_KEY]))


def _evaluation(saved: VersionReport) -> dict[str, float]:
    out = {"val_loss": saved.val_loss, "num_examples": float(saved.num_examples)}
    if saved.test_loss is not None:
        out["test_loss"] = saved.test_loss
    return out


def device_report(
    report: AdapterReport,
    *,
    pseudonym: str,
    spec: AdapterSpec,
    round: int | None = None,
    evaluation: Mapping[str, float] | None = None,
    evaluated: int | None = None,
) -> DeviceReport:
    """The registry's record of a parsed report from a device of user ``pseudonym``.

    One conversion for both ways a report arrives (a Flower round reply, and the backup
    service's ``ReportVersions`` after an SDK ``train``), so the registry and the console
    see them alike. A saved version must carry ``spec``'s fingerprint and base and be
    the version in use; it becomes an immutable version with provenance plus a
    ``device`` evaluation row (validation loss, example count, test loss if any).
    Without one, ``evaluation`` of version ``evaluated`` (a round's final scores) is
    recorded if given, and ``current`` moves the adapter's pointer (a rollback).
    Raises SpecError when the report contradicts ``spec``.
    """
    saved = report.saved
    provenance: AdapterProvenance | None = None
    if saved is not None:
        for what, got, want in (
            ("spec fingerprint", saved.spec_fingerprint, spec.fingerprint()),
            ("base sha256", saved.base_sha256, spec.base_sha256),
        ):
            if got != want:
                raise SpecError(f"{what} {got[:64]!r} is not the adapter's {want!r}")
        if report.current != saved.version:
            raise SpecError(f"a device that saved v{saved.version} must be using it")
        evaluation = _evaluation(saved)
        evaluated = saved.version
        provenance = AdapterProvenance(
            spec=spec,
            version=saved.version,
            content_hash=saved.content_hash,
            parent=saved.parent,
            prior_version=saved.prior_version,
            round=saved.round,
            created_at=saved.created_at,
            metrics=evaluation,
        )
    return DeviceReport(
        pseudonym=pseudonym,
        adapter=report.adapter,
        spec=spec,
        current=report.current,
        provenance=provenance,
        size_bytes=saved.size_bytes if saved is not None else 0,
        evaluation=evaluation,
        evaluated=evaluated,
        round=round,
    )


class RoundReports:
    """One round's accepted reports, recorded together by :meth:`record`.

    ``evaluate`` marks a round whose reply metrics score each device's current version
    (the final evaluation): they are recorded as that version's evaluation.
    """

    def __init__(
        self, coord: CoordinatorState, round: int, prior_version: str, *, evaluate: bool = False
    ) -> None:
        self.coord = coord
        self.round = round
        self.prior_version = prior_version
        self.evaluate = evaluate
        self.items: list[DeviceReport] = []
        self.refused: dict[int, str] = {}

    def add_reply(self, node: int, content: RecordDict, metrics: RoundMetrics | None) -> None:
        """Take the report of a plain reply, if it has one."""
        self._add(node, lambda: report_in_reply(content), metrics)

    def add_fields(
        self, node: int, fields: Mapping[str, Any], metrics: RoundMetrics | None
    ) -> None:
        """Take the report among a SecAgg+ reply's plaintext fields, if it has one."""
        self._add(node, lambda: AdapterReport.from_secure_fields(fields), metrics)

    def _add(self, node: int, read: Any, metrics: RoundMetrics | None) -> None:
        try:
            report = read()
            if report is None:
                return
            self.items.append(self._check(node, report, metrics))
        except (LorafleetError, TypeError, ValueError) as exc:  # untrusted input: refuse, go on
            reason = str(exc)[:200]
            self.refused[node] = reason
            log.warning("round %d: adapter report of node %d refused: %s", self.round, node, reason)

    def _check(
        self, node: int, report: AdapterReport, metrics: RoundMetrics | None
    ) -> DeviceReport:
        """The registry's record of a parsed report, or SpecError if the round contradicts it."""
        saved = report.saved
        evaluation: dict[str, float] | None = None
        evaluated: int | None = None
        if saved is not None:
            for what, got, want in (
                ("round", saved.round, self.round),
                ("prior version", saved.prior_version, self.prior_version),
            ):
                if got != want:
                    raise SpecError(f"{what} {str(got)[:64]!r} is not this round's {want!r}")
        elif self.evaluate and metrics is not None:
            evaluation = {
                "val_loss": metrics.personal_loss,
                "prior_val_loss": metrics.prior_loss,
                "base_val_loss": metrics.base_loss,
            }
            evaluated = report.current
        return device_report(
            report,
            pseudonym=self.coord.pseudonym(node, report.user),
            spec=self.coord.spec,
            round=self.round,
            evaluation=evaluation,
            evaluated=evaluated,
        )

    def record(self) -> ReportCounts:
        """Write the accepted reports in one registry transaction (a failure is logged)."""
        if not self.items:
            return ReportCounts(skipped=len(self.refused))
        try:
            counts = self.coord.registry.record_reports(self.items)
        except Exception as exc:  # the registry must not stop training: the prior is what matters
            log.warning(
                "round %d: %d adapter reports not recorded (%s)",
                self.round,
                len(self.items),
                exc,
            )
            return ReportCounts(skipped=len(self.items) + len(self.refused))
        if counts.versions or counts.pointers:
            log.info(
                "round %d: recorded %d personal adapter versions, %d evaluations, %d pointer moves",
                self.round,
                counts.versions,
                counts.evaluations,
                counts.pointers,
            )
        return counts
