"""The console's admin login: a KDF-hashed password, server-side sessions, CSRF tokens.

- **One admin account** whose password is stored in ``<data-dir>/console-admin.json``
  (mode 0600) as an Argon2id hash (scrypt where this OpenSSL lacks Argon2id), through
  the crypto recipes in :mod:`lorafleet.protocols.crypto`; the file holds no secret
  that logs anyone in.
- **First start:** with no admin file the console prints a one-time setup token; whoever
  holds it chooses the admin name and password on ``/setup``. The token lives only in
  memory (its sha256, compared in constant time) and dies with the process.
- **Sessions** are random 256-bit ids kept server-side, sent as ``<id>.<HMAC>`` so a
  forged or truncated cookie is refused before any lookup. A session expires after
  idle time and absolute age; logging in replaces the pre-login session (no fixation).
- **CSRF:** every session, even before login, has its own random token; every POST
  must carry it (a hidden form field or the ``X-CSRF-Token`` header).
- **Throttling:** repeated failed logins for one account from one peer address are
  refused for a while, so the KDF is not an oracle an attacker can query at full speed;
  failures from one peer never lock the account out for another peer (the admin still
  logs in from elsewhere while an attacker hammers the form). The peer is the socket's
  address, unless the operator named a reverse proxy (``--forwarded-allow-ips``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorafleet.protocols.atomic import atomic_write_text
from lorafleet.protocols.crypto import (
    KdfParams,
    derive_from_passphrase,
    kdf_params_default,
    kdf_params_from_json,
)
from lorafleet.protocols.errors import LorafleetError, SpecError

log = logging.getLogger(__name__)

ADMIN_FILE = "console-admin.json"
MIN_PASSWORD_CHARS = 12
_USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}\Z")


class ConsoleAuthError(LorafleetError):
    """A login, setup or password change was refused; the message says why."""


def check_username(username: str) -> str:
    """Refuse an admin name outside 1-64 letters, digits and ``. _ @ -``."""
    if not isinstance(username, str) or not _USERNAME.match(username):
        raise ConsoleAuthError(
            f"admin name {username!r} is not valid: use 1-64 letters, digits and . _ @ -"
        )
    return username


def check_password(password: str) -> str:
    """Refuse a password shorter than :data:`MIN_PASSWORD_CHARS` characters."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise ConsoleAuthError(
            f"the admin password must be at least {MIN_PASSWORD_CHARS} characters; choose a longer one"
        )
    return password


@dataclass(frozen=True)
class AdminCredentials:
    """What ``console-admin.json`` holds: the name, the KDF and the derived hash."""

    username: str
    kdf: KdfParams
    password_hash: bytes
    created_at: str

    def to_json(self) -> str:
        """The file's content (sorted keys, hash as hex)."""
        return json.dumps(
            {
                "username": self.username,
                "kdf": self.kdf.to_json(),
                "hash": self.password_hash.hex(),
                "created_at": self.created_at,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, *, source: Path) -> AdminCredentials:
        """Parse :meth:`to_json`; a damaged file is one clear error naming it."""
        try:
            obj = json.loads(text)
            return cls(
                username=check_username(obj["username"]),
                kdf=kdf_params_from_json(obj["kdf"]),
                password_hash=bytes.fromhex(obj["hash"]),
                created_at=str(obj.get("created_at", "")),
            )
        except (ValueError, KeyError, TypeError, SpecError, ConsoleAuthError) as exc:
            raise ConsoleAuthError(
                f"{source} is damaged ({exc}); delete it and restart the console to set a new admin password"
            ) from None


class AdminStore:
    """The admin account in ``<data-dir>/console-admin.json``.

    Examples
    --------
    >>> import tempfile
    >>> from lorafleet.protocols.crypto import ScryptParams
    >>> store = AdminStore(tempfile.mkdtemp())
    >>> store.configured
    False
    >>> store.set_password("admin", "correct horse battery", params=ScryptParams(log2_n=4))
    >>> store.verify("admin", "correct horse battery"), store.verify("admin", "wrong password!")
    (True, False)
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / ADMIN_FILE
        self._cached: tuple[float, AdminCredentials] | None = None
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        """Whether an admin password has been set."""
        return self.path.is_file()

    def credentials(self) -> AdminCredentials | None:
        """The stored credentials, re-read when the file changes; None before setup."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        with self._lock:
            if self._cached is not None and self._cached[0] == stat.st_mtime:
                return self._cached[1]
            if stat.st_mode & 0o077:
                log.warning("%s is readable by others; run chmod 600 on it", self.path)
            creds = AdminCredentials.from_json(
                self.path.read_text(encoding="utf-8"), source=self.path
            )
            self._cached = (stat.st_mtime, creds)
            return creds

    def set_password(
        self, username: str, password: str, *, params: KdfParams | None = None
    ) -> None:
        """Store (or replace) the admin name and password hash, mode 0600.

        ``params`` defaults to production-strength Argon2id (scrypt without it); tests
        pass cheap parameters. The parameters are stored, so verification always uses
        the cost the hash was made with.
        """
        check_username(username)
        check_password(password)
        kdf = params or kdf_params_default()
        creds = AdminCredentials(
            username=username,
            kdf=kdf,
            password_hash=derive_from_passphrase(password, kdf),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        atomic_write_text(self.path, creds.to_json() + "\n", mode=0o600)
        with self._lock:
            self._cached = None
        log.info("console admin %r set in %s", username, self.path)

    def verify(self, username: str, password: str) -> bool:
        """Whether name and password match (constant-time compare of the derived hash)."""
        creds = self.credentials()
        if creds is None or not isinstance(password, str) or not password:
            return False
        derived = derive_from_passphrase(password, creds.kdf)
        name_ok = hmac.compare_digest(username.encode(), creds.username.encode())
        return hmac.compare_digest(derived, creds.password_hash) and name_ok


class SetupToken:
    """A one-time token that lets whoever reads the console's output set the password."""

    def __init__(self) -> None:
        self._digest: bytes | None = None
        self._lock = threading.Lock()

    def issue(self) -> str:
        """A fresh token (the previous one stops working); only its hash is kept."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._digest = hashlib.sha256(token.encode()).digest()
        return token

    def redeem(self, token: str) -> bool:
        """True once for the current token; it is spent after a successful redeem."""
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            if self._digest is None or not hmac.compare_digest(digest, self._digest):
                return False
            self._digest = None
            return True

    @property
    def pending(self) -> bool:
        """Whether a token was issued and not yet redeemed."""
        return self._digest is not None


@dataclass
class Session:
    """One browser's session: who (None before login), its CSRF token, flash messages."""

    sid: str
    csrf: str
    created: float
    last_seen: float
    user: str | None = None
    flashes: list[tuple[str, str]] = field(default_factory=list)

    def flash(self, kind: str, message: str) -> None:
        """Queue a message for the next page (``kind``: ok or error)."""
        self.flashes.append((kind, message))

    def take_flashes(self) -> list[tuple[str, str]]:
        """The queued messages, emptied."""
        out, self.flashes = self.flashes, []
        return out


class SessionStore:
    """Server-side sessions behind signed cookies; in memory, so a restart logs out."""

    def __init__(
        self,
        *,
        idle_s: float = 30 * 60,
        max_age_s: float = 12 * 3600,
        max_sessions: int = 10_000,
        clock: Any = time.monotonic,
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self.max_sessions = max_sessions
        self._clock = clock

    def _sign(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def cookie_value(self, session: Session) -> str:
        """``<id>.<hmac>``: what the browser holds."""
        return f"{session.sid}.{self._sign(session.sid)}"

    def new(self, *, user: str | None = None) -> Session:
        """A fresh session with its own CSRF token."""
        now = self._clock()
        session = Session(
            sid=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            created=now,
            last_seen=now,
            user=user,
        )
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                self._evict(now)
            self._sessions[session.sid] = session
        return session

    def _evict(self, now: float) -> None:
        for sid in [s.sid for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[sid]
        if len(self._sessions) >= self.max_sessions:  # oldest anonymous ones go first
            for s in sorted(
                self._sessions.values(), key=lambda s: (s.user is not None, s.last_seen)
            )[: len(self._sessions) // 10 + 1]:
                del self._sessions[s.sid]

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen > self.idle_s or now - session.created > self.max_age_s

    def get(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None (missing, forged, expired)."""
        if not cookie or "." not in cookie:
            return None
        sid, _, mac = cookie.partition(".")
        if not hmac.compare_digest(mac.encode(), self._sign(sid).encode()):
            return None
        now = self._clock()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[sid]
                return None
            session.last_seen = now
            return session

    def login(self, old: Session | None, user: str) -> Session:
        """Replace ``old`` (the pre-login session) by a new logged-in one."""
        self.drop(old)
        fresh = self.new(user=user)
        if old is not None:
            fresh.flashes = old.flashes
        return fresh

    def drop(self, session: Session | None) -> None:
        """End a session (logout)."""
        if session is not None:
            with self._lock:
                self._sessions.pop(session.sid, None)


def csrf_ok(session: Session | None, token: str | None) -> bool:
    """Whether ``token`` is this session's CSRF token (constant-time)."""
    if session is None or not token:
        return False
    return hmac.compare_digest(token.encode(), session.csrf.encode())


class LoginThrottle:
    """At most ``max_failures`` failed logins per (account, peer) in ``window_s`` seconds.

    Keyed by both, so a peer that guesses passwords is slowed down without locking the
    account for anyone else: a global or per-account lock would let an attacker lock
    the admin out from anywhere.

    Examples
    --------
    >>> throttle = LoginThrottle(max_failures=1)
    >>> throttle.failed("admin", "203.0.113.7")
    >>> throttle.blocked("admin", "203.0.113.7"), throttle.blocked("admin", "192.0.2.1")
    (True, False)
    """

    def __init__(
        self, *, max_failures: int = 5, window_s: float = 300.0, clock: Any = time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def blocked(self, account: str, peer: str) -> bool:
        """Whether ``peer`` must wait before trying ``account`` again."""
        with self._lock:
            return len(self._recent((account, peer), self._clock())) >= self.max_failures

    def failed(self, account: str, peer: str) -> None:
        """Count one failed attempt of ``peer`` at ``account``."""
        with self._lock:
            now = self._clock()
            self._recent((account, peer), now).append(now)
            if len(self._failures) > 10_000:  # forget idle pairs
                for key in [k for k, q in self._failures.items() if not q]:
                    del self._failures[key]

    def succeeded(self, account: str, peer: str) -> None:
        """Forget ``peer``'s failures at ``account``."""
        with self._lock:
            self._failures.pop((account, peer), None)
