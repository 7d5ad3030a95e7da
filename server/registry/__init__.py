"""The coordinator's registry: users, versions with provenance, priors, rounds, devices, audit.

One :class:`Registry` (``store.py``) composes the areas: ``users.py`` (users, adapters,
versions), ``priors.py`` (priors, promotion, rounds), ``devices.py`` (blobs, devices, audit).
"""

from lorafleet.server.registry.database import parse_url as parse_url
from lorafleet.server.registry.errors import AuthorizationError as AuthorizationError
from lorafleet.server.registry.errors import ConflictError as ConflictError
from lorafleet.server.registry.errors import NotFoundError as NotFoundError
from lorafleet.server.registry.errors import RegistryError as RegistryError
from lorafleet.server.registry.errors import RegistryValueError as RegistryValueError
from lorafleet.server.registry.errors import UnavailableError as UnavailableError
from lorafleet.server.registry.records import AdapterId as AdapterId
from lorafleet.server.registry.records import AdapterRecord as AdapterRecord
from lorafleet.server.registry.records import AuditRecord as AuditRecord
from lorafleet.server.registry.records import BlobRecord as BlobRecord
from lorafleet.server.registry.records import Counts as Counts
from lorafleet.server.registry.records import DeviceId as DeviceId
from lorafleet.server.registry.records import DeviceKind as DeviceKind
from lorafleet.server.registry.records import DeviceRecord as DeviceRecord
from lorafleet.server.registry.records import DeviceReport as DeviceReport
from lorafleet.server.registry.records import ErasureCounts as ErasureCounts
from lorafleet.server.registry.records import EvaluationId as EvaluationId
from lorafleet.server.registry.records import EvaluationRecord as EvaluationRecord
from lorafleet.server.registry.records import NewVersion as NewVersion
from lorafleet.server.registry.records import Page as Page
from lorafleet.server.registry.records import PriorDecision as PriorDecision
from lorafleet.server.registry.records import PriorDecisionRecord as PriorDecisionRecord
from lorafleet.server.registry.records import PriorEvaluationId as PriorEvaluationId
from lorafleet.server.registry.records import PriorEvaluationRecord as PriorEvaluationRecord
from lorafleet.server.registry.records import PriorId as PriorId
from lorafleet.server.registry.records import PriorRecord as PriorRecord
from lorafleet.server.registry.records import ReportCounts as ReportCounts
from lorafleet.server.registry.records import RoundId as RoundId
from lorafleet.server.registry.records import RoundRecord as RoundRecord
from lorafleet.server.registry.records import UserId as UserId
from lorafleet.server.registry.records import UserRecord as UserRecord
from lorafleet.server.registry.records import VersionId as VersionId
from lorafleet.server.registry.records import VersionRecord as VersionRecord
from lorafleet.server.registry.store import Registry as Registry
from lorafleet.server.registry.store import prior_ref as prior_ref

__all__ = [
    "AdapterId",
    "AdapterRecord",
    "AuditRecord",
    "AuthorizationError",
    "BlobRecord",
    "ConflictError",
    "Counts",
    "DeviceId",
    "DeviceKind",
    "DeviceRecord",
    "DeviceReport",
    "ErasureCounts",
    "EvaluationId",
    "EvaluationRecord",
    "NewVersion",
    "NotFoundError",
    "Page",
    "PriorDecision",
    "PriorDecisionRecord",
    "PriorEvaluationId",
    "PriorEvaluationRecord",
    "PriorId",
    "PriorRecord",
    "Registry",
    "RegistryError",
    "RegistryValueError",
    "ReportCounts",
    "RoundId",
    "RoundRecord",
    "UnavailableError",
    "UserId",
    "UserRecord",
    "VersionId",
    "VersionRecord",
    "parse_url",
    "prior_ref",
]
