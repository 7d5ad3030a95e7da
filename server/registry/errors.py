"""The registry's errors: each names the bad value and what to do about it.

All of them are :class:`~lorafleet.protocols.errors.LorafleetError`, so the CLI and the
console print the message alone. Database driver exceptions never escape the registry
for a mistake a user can fix: an unknown id, a duplicate version, a bad URL or a server
that cannot be reached each become one of these, without the database password.
"""

from __future__ import annotations

from lorafleet.protocols.errors import LorafleetError


class RegistryError(LorafleetError):
    """A registry operation cannot be done as asked; the message says why and how to fix it."""


class RegistryValueError(RegistryError, ValueError):
    """An argument is out of range or malformed (a pseudonym, a size, a page limit)."""


class NotFoundError(RegistryError, LookupError):
    """A user, adapter, version, prior, round or blob that the registry does not hold."""


class ConflictError(RegistryError):
    """The write would change history: a duplicate version number, name or blob id.

    Versions are immutable, so a conflicting write is refused rather than merged; the
    caller picks a new version number (or name) instead.
    """


class UnavailableError(RegistryError):
    """The database cannot be reached or opened (server down, wrong port, bad password)."""


class AuthorizationError(RegistryError):
    """A credential the registry checks is not valid: an unknown, used or expired token.

    The message never contains the credential itself.
    """
