"""Registry area: cohort priors, their promotion (evaluations, decisions), and rounds.

The :class:`PriorsMixin` part of :class:`~lorafleet.server.registry.store.Registry`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import fields as dataclass_fields
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Select, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry._base import (
    RegistryBase,
    SpecRef,
    _bulk_insert,
    _chunks,
    _keyset_page,
    _now,
)
from lorafleet.server.registry.errors import ConflictError, NotFoundError, RegistryValueError
from lorafleet.server.registry.models import (
    active_priors,
    prior_decisions,
    prior_evaluations,
    prior_versions,
    rounds,
)
from lorafleet.server.registry.records import (
    DecidedBy,
    Page,
    PriorDecision,
    PriorDecisionRecord,
    PriorEvaluationId,
    PriorEvaluationRecord,
    PriorId,
    PriorRecord,
    RoundId,
    RoundRecord,
    RoundStatus,
    check_count,
    check_label,
    check_limit,
    check_sha256,
    check_size,
    metrics_from_json,
    metrics_to_json,
)

log = logging.getLogger(__name__)


def prior_ref(spec_fingerprint: str, version: int) -> str:
    """The string a prior version is known by in provenance: ``<fingerprint[:16]>/v<n>``.

    Examples
    --------
    >>> prior_ref("ab" * 32, 3)
    'abababababababab/v3'
    """
    return f"{spec_fingerprint[:16]}/v{version}"


class PriorsMixin(RegistryBase):
    """Prior versions per cohort, the pointer to the active one, promotion records, rounds."""

    # ------------------------------------------------------------------ priors

    def _prior_query(self) -> Select[Any]:
        pv, ap = prior_versions, active_priors
        return select(pv, (ap.c.prior_id.is_not(None)).label("active")).join_from(
            pv,
            ap,
            and_(ap.c.spec_fingerprint == pv.c.spec_fingerprint, ap.c.prior_id == pv.c.id),
            isouter=True,
        )

    @staticmethod
    def _prior_record(row: Row[Any]) -> PriorRecord:
        return PriorRecord(
            id=PriorId(int(row.id)),
            ref=row.ref,
            spec_fingerprint=row.spec_fingerprint,
            version=int(row.version),
            round=row.round,
            content_hash=row.content_hash,
            size_bytes=int(row.size_bytes),
            metrics=metrics_from_json(row.metrics_json),
            created_at=row.created_at,
            active=bool(row.active),
        )

    def add_prior_version(
        self,
        spec: AdapterSpec,
        version: int,
        *,
        content_hash: str,
        size_bytes: int,
        round: int | None = None,
        metrics: Mapping[str, float] | None = None,
        activate: bool = True,
    ) -> PriorRecord:
        """Store a new immutable version of the cohort's shared prior B̄.

        ``activate`` points the cohort at it (new users warm-start from the active one);
        its ``ref`` is what devices record as ``prior_version`` in provenance.

        Raises
        ------
        ConflictError
            The cohort already has a prior with this version number.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistryValueError(f"prior version must be an integer >= 1, got {version!r}")
        check_sha256("content_hash", content_hash)
        check_size("size_bytes", size_bytes)
        payload = metrics_to_json(metrics or {})
        fp = self._fingerprint(spec)
        ref = prior_ref(fp, version)
        now = _now()
        try:
            with self._write() as conn:
                self._ensure_specs(conn, [spec])
                new_id = conn.execute(
                    insert(prior_versions).returning(prior_versions.c.id),
                    {
                        "ref": ref,
                        "spec_fingerprint": fp,
                        "version": version,
                        "round": round,
                        "content_hash": content_hash,
                        "size_bytes": size_bytes,
                        "metrics_json": payload,
                        "created_at": now,
                    },
                ).scalar_one()
                if activate:
                    self._point_prior(conn, fp, int(new_id))
        except IntegrityError:
            raise ConflictError(
                f"cohort {fp[:12]}… already has prior version {version}; prior versions are "
                "immutable: store it as a new version"
            ) from None
        return self.get_prior(ref)

    def _point_prior(self, conn: Connection, fp: str, prior_id: int) -> None:
        stmt = self._insert(active_priors).values(
            spec_fingerprint=fp, prior_id=prior_id, updated_at=_now()
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["spec_fingerprint"],
                set_={"prior_id": stmt.excluded.prior_id, "updated_at": stmt.excluded.updated_at},
            )
        )

    def get_prior(self, ref: str) -> PriorRecord:
        """A prior version by the ``ref`` provenance records."""
        with self._read() as conn:
            row = conn.execute(self._prior_query().where(prior_versions.c.ref == ref)).first()
        if row is None:
            raise NotFoundError(f"no prior version {ref!r}")
        return self._prior_record(row)

    def list_prior_versions(
        self,
        spec: SpecRef,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> Page[PriorRecord, int]:
        """A cohort's prior versions, newest first, each marked whether it is active."""
        fp = self._spec_fp(spec)
        query = self._prior_query().where(prior_versions.c.spec_fingerprint == fp)
        with self._read() as conn:
            return _keyset_page(
                conn,
                query,
                prior_versions.c.version,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=self._prior_record,
                key_of=lambda p: p.version,
            )

    def set_active_prior(self, spec: SpecRef, version: int) -> PriorRecord:
        """Point the cohort at one of its prior versions (an operator's rollback or pick).

        The operator overrides the promotion rule, and the decision trail says so: a
        version still awaiting its evaluation is recorded as promoted by the operator if
        it is the one picked, and as held by the operator otherwise (the coordinator
        then trains on from the picked version, not from the abandoned candidate).
        """
        fp = self._spec_fp(spec)
        pv = prior_versions
        with self._write() as conn:
            prior_id = conn.execute(
                select(pv.c.id).where(pv.c.spec_fingerprint == fp, pv.c.version == version)
            ).scalar()
            if prior_id is None:
                raise NotFoundError(f"cohort {fp[:12]}… has no prior version {version}")
            target = int(prior_id)
            pending = self._pending_prior_id(conn, fp)
            ref = prior_ref(fp, version)
            if pending is not None:
                picked = pending == target
                self._append_decision(
                    conn,
                    fp,
                    pending,
                    "promoted" if picked else "held",
                    decided_by="operator",
                    reason="made active by an operator before its evaluation"
                    if picked
                    else f"an operator made {ref} active while it awaited its evaluation",
                )
            self._point_prior(conn, fp, target)
        return self.get_prior(ref)

    # ------------------------------------------------------------------ prior promotion

    def _prior_id_of(self, conn: Connection, ref: str) -> tuple[int, str]:
        row = conn.execute(
            select(prior_versions.c.id, prior_versions.c.spec_fingerprint).where(
                prior_versions.c.ref == ref
            )
        ).first()
        if row is None:
            raise NotFoundError(f"no prior version {ref!r}")
        return int(row.id), row.spec_fingerprint

    def _pending_prior_id(self, conn: Connection, fp: str) -> int | None:
        """The cohort's newest version if it is neither active nor decided, else None."""
        pv, ap, pd = prior_versions, active_priors, prior_decisions
        newest = conn.execute(
            select(pv.c.id)
            .where(pv.c.spec_fingerprint == fp)
            .order_by(pv.c.version.desc())
            .limit(1)
        ).scalar()
        if newest is None:
            return None
        active = conn.execute(select(ap.c.prior_id).where(ap.c.spec_fingerprint == fp)).scalar()
        decided = conn.execute(select(pd.c.id).where(pd.c.prior_id == newest).limit(1)).first()
        return None if newest == active or decided is not None else int(newest)

    def pending_prior(self, spec: SpecRef) -> PriorRecord | None:
        """The candidate awaiting its evaluation: the newest version, not active, undecided.

        The coordinator trains the next round from it (its devices' validation losses
        score it on the way) and then promotes or holds it; None when there is none.
        """
        fp = self._spec_fp(spec)
        with self._read() as conn:
            pending = self._pending_prior_id(conn, fp)
            if pending is None:
                return None
            row = conn.execute(self._prior_query().where(prior_versions.c.id == pending)).one()
        return self._prior_record(row)

    def add_prior_evaluation(
        self,
        ref: str,
        metrics: Mapping[str, float],
        *,
        devices: int,
        round: int | None = None,
        source: str = "devices",
    ) -> PriorEvaluationRecord:
        """Record how ``devices`` devices scored a prior version (aggregates only).

        ``metrics`` are the aggregates the coordinator computed from the round's
        replies (mean, spread); no device's own number is stored.
        """
        check_label("evaluation source", source)
        check_size("devices", devices)
        if not metrics:
            raise RegistryValueError("a prior evaluation needs at least one metric")
        row = {"round": round, "source": source, "devices": devices}
        row["metrics_json"] = metrics_to_json(metrics)
        with self._write() as conn:
            row["prior_id"] = self._prior_id_of(conn, ref)[0]
            _bulk_insert(conn, prior_evaluations, [row], created_at=_now())
        return self.list_prior_evaluations(ref)[-1]

    @staticmethod
    def _prior_evaluation_record(row: Row[Any], ref: str) -> PriorEvaluationRecord:
        return PriorEvaluationRecord(
            id=PriorEvaluationId(int(row.id)),
            prior_id=PriorId(int(row.prior_id)),
            ref=ref,
            round=row.round,
            source=row.source,
            devices=int(row.devices),
            metrics=metrics_from_json(row.metrics_json),
            created_at=row.created_at,
        )

    def list_prior_evaluations(self, ref: str) -> list[PriorEvaluationRecord]:
        """Every evaluation of a prior version, oldest first (a few per version)."""
        pe = prior_evaluations
        with self._read() as conn:
            prior_id, _ = self._prior_id_of(conn, ref)
            rows = conn.execute(select(pe).where(pe.c.prior_id == prior_id).order_by(pe.c.id)).all()
        return [self._prior_evaluation_record(r, ref) for r in rows]

    def latest_prior_evaluations(self, refs: Iterable[str]) -> dict[str, PriorEvaluationRecord]:
        """The newest evaluation of each of these prior versions (unscored ones are absent)."""
        pv, pe = prior_versions, prior_evaluations
        out: dict[str, PriorEvaluationRecord] = {}
        with self._read() as conn:
            for chunk in _chunks(sorted(set(refs))):
                rows = conn.execute(
                    select(pe, pv.c.ref)
                    .join_from(pe, pv, pv.c.id == pe.c.prior_id)
                    .where(pv.c.ref.in_(chunk))
                    .order_by(pe.c.id)
                )
                for r in rows:  # later rows win
                    out[r.ref] = self._prior_evaluation_record(r, r.ref)
        return out

    def _append_decision(
        self,
        conn: Connection,
        fp: str,
        prior_id: int,
        decision: PriorDecision,
        *,
        decided_by: DecidedBy,
        reason: str,
        against_id: int | None = None,
        round: int | None = None,
        scores: tuple[float | None, float | None, float | None] = (None, None, None),
    ) -> int:
        candidate_score, active_score, tolerance = scores
        for name, value in zip(("candidate", "active", "tolerance"), scores, strict=True):
            if value is not None and not math.isfinite(value):
                raise RegistryValueError(f"{name} score must be finite, got {value!r}")
        return int(
            conn.execute(
                insert(prior_decisions).returning(prior_decisions.c.id),
                {
                    "spec_fingerprint": fp,
                    "prior_id": prior_id,
                    "against_id": against_id,
                    "round": round,
                    "decision": decision,
                    "decided_by": decided_by,
                    "reason": reason,
                    "candidate_score": candidate_score,
                    "active_score": active_score,
                    "tolerance": tolerance,
                    "created_at": _now(),
                },
            ).scalar_one()
        )

    def decide_prior(
        self, ref: str, decision: PriorDecision, *, reason: str, **context: Any
    ) -> PriorDecisionRecord:
        """Record the promotion rule's verdict on a prior version, and act on it.

        ``promoted`` makes the version active in the same transaction, so the pointer
        never moves without its recorded reason; ``held`` leaves the active one where it
        is. ``context`` may give ``against`` (the ref of the active version it was
        compared with), ``round``, and ``scores`` (candidate score, active score,
        tolerance).

        Raises
        ------
        ConflictError
            The version was already decided (verdicts are appended once per candidate;
            an operator overrides through :meth:`set_active_prior`).
        """
        if decision not in ("promoted", "held"):
            raise RegistryValueError(f"decision must be promoted or held, got {decision!r}")
        if not isinstance(reason, str) or not reason.strip():
            raise RegistryValueError("a decision needs a reason")
        unknown = set(context) - {"against", "round", "scores"}
        if unknown:
            raise RegistryValueError(f"decide_prior got unknown arguments {sorted(unknown)}")
        against = context.get("against")
        with self._write() as conn:
            prior_id, fp = self._prior_id_of(conn, ref)
            if conn.execute(
                select(prior_decisions.c.id).where(prior_decisions.c.prior_id == prior_id)
            ).first():
                raise ConflictError(f"prior {ref} was already decided; see its decision history")
            new_id = self._append_decision(
                conn,
                fp,
                prior_id,
                decision,
                decided_by="policy",
                reason=reason,
                against_id=None if against is None else self._prior_id_of(conn, against)[0],
                round=context.get("round"),
                scores=context.get("scores", (None, None, None)),
            )
            if decision == "promoted":
                self._point_prior(conn, fp, prior_id)
            row = conn.execute(self._decision_query().where(prior_decisions.c.id == new_id)).one()
        log.info("prior %s %s: %s", ref, decision, reason)
        return self._decision_record(row)

    @staticmethod
    def _decision_query() -> Select[Any]:
        pd = prior_decisions
        candidate, against = prior_versions.alias("candidate"), prior_versions.alias("against")
        return (
            select(pd, candidate.c.ref.label("ref"), against.c.ref.label("against_ref"))
            .join_from(pd, candidate, candidate.c.id == pd.c.prior_id)
            .outerjoin(against, against.c.id == pd.c.against_id)
        )

    @staticmethod
    def _decision_record(row: Row[Any]) -> PriorDecisionRecord:
        # Every field is the column of the same name, but ``against`` (the joined ref).
        values = dict(row._mapping)
        values["against"] = values.pop("against_ref")
        names = {f.name for f in dataclass_fields(PriorDecisionRecord)}
        return PriorDecisionRecord(**{k: v for k, v in values.items() if k in names})

    def list_prior_decisions(
        self, spec: SpecRef, *, limit: int = 1000
    ) -> list[PriorDecisionRecord]:
        """A cohort's last ``limit`` promotion decisions (one per round at most), oldest first."""
        fp = self._spec_fp(spec)
        check_limit(limit)
        newest = (
            self._decision_query()
            .where(prior_decisions.c.spec_fingerprint == fp)
            .order_by(prior_decisions.c.id.desc())
            .limit(limit)
        )
        with self._read() as conn:
            return [self._decision_record(r) for r in reversed(conn.execute(newest).all())]

    def prior_decisions_for(self, refs: Iterable[str]) -> dict[str, PriorDecisionRecord]:
        """The latest decision of each of these prior versions (undecided ones are absent)."""
        wanted = sorted(set(refs))
        out: dict[str, PriorDecisionRecord] = {}
        with self._read() as conn:
            for chunk in _chunks(wanted):
                query = self._decision_query().where(
                    prior_decisions.c.prior_id.in_(
                        select(prior_versions.c.id).where(prior_versions.c.ref.in_(chunk))
                    )
                )
                for row in conn.execute(query.order_by(prior_decisions.c.id)):
                    out[row.ref] = self._decision_record(row)  # later rows win
        return out

    def list_cohorts(self) -> list[str]:
        """Spec fingerprints of the cohorts that ran a round or hold a prior, latest first.

        A grouped scan of the rounds' and priors' cohort indexes: a deployment has a handful
        of cohorts however many users and versions it holds.
        """
        latest: dict[str, datetime] = {}
        with self._read() as conn:
            for table, column in (
                (rounds, rounds.c.started_at),
                (prior_versions, prior_versions.c.created_at),
            ):
                rows = conn.execute(
                    select(table.c.spec_fingerprint, func.max(column).label("at")).group_by(
                        table.c.spec_fingerprint
                    )
                ).all()
                for row in rows:
                    seen = latest.get(row.spec_fingerprint)
                    if seen is None or row.at > seen:
                        latest[row.spec_fingerprint] = row.at
        return sorted(latest, key=lambda fp: (latest[fp], fp), reverse=True)

    def active_prior(self, spec: SpecRef) -> PriorRecord | None:
        """The prior version new users of this cohort start from, or None (start from zero)."""
        fp = self._spec_fp(spec)
        with self._read() as conn:
            row = conn.execute(
                self._prior_query().where(
                    prior_versions.c.spec_fingerprint == fp, active_priors.c.prior_id.is_not(None)
                )
            ).first()
        return None if row is None else self._prior_record(row)

    # ------------------------------------------------------------------ rounds

    @staticmethod
    def _round_record(row: Row[Any]) -> RoundRecord:
        return RoundRecord(
            id=RoundId(int(row.id)),
            spec_fingerprint=row.spec_fingerprint,
            number=int(row.number),
            status=row.status,
            config=json.loads(row.config_json),
            started_at=row.started_at,
            finished_at=row.finished_at,
            participants=row.participants,
            dropouts=row.dropouts,
            refused=row.refused,
            bytes_up=row.bytes_up,
            bytes_down=row.bytes_down,
            prior_ref=row.prior_ref,
            dp_epsilon=row.dp_epsilon,
            dp_delta=row.dp_delta,
        )

    def start_round(
        self,
        spec: AdapterSpec,
        number: int,
        *,
        config: Mapping[str, Any] | None = None,
        retry: bool = False,
    ) -> RoundRecord:
        """Record that round ``number`` of the cohort started now, with its run config.

        With ``retry`` a round that *failed* (too few updates, or a coordinator killed
        mid-round) is reopened under the same number, counting its attempts; a finished
        round is never reopened.

        Raises
        ------
        ConflictError
            The cohort already has a round with this number (that is not a failed one
            being retried).
        """
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise RegistryValueError(f"round number must be an integer >= 0, got {number!r}")
        try:
            config_json = json.dumps(dict(config or {}), sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise RegistryValueError(f"round config must be JSON-serializable ({exc})") from None
        fp = self._fingerprint(spec)
        reopened: int | None = None
        if retry:
            with self._write() as conn:
                self._ensure_specs(conn, [spec])
                row = conn.execute(
                    select(rounds.c.id, rounds.c.status, rounds.c.config_json).where(
                        rounds.c.spec_fingerprint == fp, rounds.c.number == number
                    )
                ).first()
                if row is not None:
                    if row.status != "failed":
                        raise ConflictError(
                            f"cohort {fp[:12]}… round {number} is {row.status}; only a failed round is retried"
                        )
                    previous = json.loads(row.config_json or "{}")
                    merged = {
                        **dict(config or {}),
                        "attempts": int(previous.get("attempts", 1)) + 1,
                    }
                    conn.execute(
                        update(rounds)
                        .where(rounds.c.id == row.id)
                        .values(
                            status="running",
                            config_json=json.dumps(merged, sort_keys=True, separators=(",", ":")),
                            started_at=_now(),
                            finished_at=None,
                            participants=None,
                            dropouts=None,
                            refused=None,
                            bytes_up=None,
                            bytes_down=None,
                            prior_ref=None,
                            dp_epsilon=None,
                            dp_delta=None,
                        )
                    )
                    reopened = int(row.id)
        if reopened is not None:  # read after the write transaction committed
            return self.get_round(RoundId(reopened))
        try:
            with self._write() as conn:
                self._ensure_specs(conn, [spec])
                new_id = conn.execute(
                    insert(rounds).returning(rounds.c.id),
                    {
                        "spec_fingerprint": fp,
                        "number": number,
                        "status": "running",
                        "config_json": config_json,
                        "started_at": _now(),
                    },
                ).scalar_one()
        except IntegrityError:
            raise ConflictError(
                f"cohort {fp[:12]}… already has a round {number}; round numbers are not reused"
            ) from None
        return self.get_round(RoundId(int(new_id)))

    def finish_round(
        self,
        round_id: RoundId,
        *,
        participants: int,
        dropouts: int = 0,
        refused: int = 0,
        bytes_up: int = 0,
        bytes_down: int = 0,
        prior_ref: str | None = None,
        status: RoundStatus = "finished",
        dp_epsilon: float | None = None,
        dp_delta: float | None = None,
    ) -> RoundRecord:
        """Close a running round with its totals (failed rounds too: ``status="failed"``).

        ``dp_epsilon`` is the privacy spent by the prior up to and including this round,
        at ``dp_delta``, when the federation runs with differential privacy.

        Raises
        ------
        ConflictError
            The round was already closed.
        """
        if status not in ("finished", "failed"):
            raise RegistryValueError(f"a round finishes as 'finished' or 'failed', not {status!r}")
        for what, value in (("dp_epsilon", dp_epsilon), ("dp_delta", dp_delta)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise RegistryValueError(f"{what} must be a finite number >= 0, got {value!r}")
        if dp_delta is not None and not dp_delta < 1:
            raise RegistryValueError(f"dp_delta must be below 1, got {dp_delta!r}")
        values: dict[str, Any] = {
            "dp_epsilon": None if dp_epsilon is None else float(dp_epsilon),
            "dp_delta": None if dp_delta is None else float(dp_delta),
            "participants": check_count("participants", participants),
            "dropouts": check_count("dropouts", dropouts),
            "refused": check_count("refused", refused),
            "bytes_up": check_count("bytes_up", bytes_up),
            "bytes_down": check_count("bytes_down", bytes_down),
        }
        with self._write() as conn:
            done = conn.execute(
                update(rounds)
                .where(rounds.c.id == round_id, rounds.c.status == "running")
                .values(status=status, finished_at=_now(), prior_ref=prior_ref, **values)
            ).rowcount
            if not done:
                exists = conn.execute(
                    select(rounds.c.status).where(rounds.c.id == round_id)
                ).scalar()
                if exists is None:
                    raise NotFoundError(f"no round with id {round_id}")
                raise ConflictError(f"round {round_id} is already {exists}; it cannot finish twice")
        return self.get_round(round_id)

    def get_round(self, round_id: RoundId) -> RoundRecord:
        """A round by id."""
        with self._read() as conn:
            row = conn.execute(select(rounds).where(rounds.c.id == round_id)).first()
        if row is None:
            raise NotFoundError(f"no round with id {round_id}")
        return self._round_record(row)

    def list_rounds(
        self,
        spec: SpecRef | None = None,
        *,
        after: RoundId | None = None,
        before: RoundId | None = None,
        limit: int = 50,
    ) -> Page[RoundRecord, int]:
        """Rounds, newest first (of one cohort when ``spec`` is given), by keyset on the id."""
        query = select(rounds)
        if spec is not None:
            query = query.where(rounds.c.spec_fingerprint == self._spec_fp(spec))
        with self._read() as conn:
            return _keyset_page(
                conn,
                query,
                rounds.c.id,
                after=after,
                before=before,
                limit=limit,
                ascending=False,
                record=self._round_record,
                key_of=lambda r: int(r.id),
            )
