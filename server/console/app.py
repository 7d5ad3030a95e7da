"""The coordinator's admin console: a FastAPI app with server-rendered pages.

Everything it shows comes from the registry and the coordinator's data dir (round
totals, prior versions and their metrics, version provenance, blob sizes, devices): the
coordinator holds no plaintext adapter or user data, so the console has none to show.
Every page is one or a few index scans (listings page by keyset), so the users list
costs the same at a million adapters as at a hundred.

Security, in order of the request: static assets are public; every other page needs a
logged-in session (HTML pages redirect to ``/login``, actions answer 401); every POST
checks the session's CSRF token (403 without it) and, when the browser sends one, that
``Origin`` is this console; every action is written to the registry's audit log with
who, when and from where. Responses carry a strict Content-Security-Policy (scripts and
styles only from ``/static``), ``X-Frame-Options: DENY`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import Depends, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from lorafleet.protocols.errors import LorafleetError, SpecError
from lorafleet.server.blob_store import BlobStore
from lorafleet.server.console import charts
from lorafleet.server.console.api import (
    API_PREFIX,
    BadQuery,
    int_cursors,
    page_links,
    text_cursors,
    to_json,
)
from lorafleet.server.console.auth import (
    AdminStore,
    ConsoleAuthError,
    LoginThrottle,
    Session,
    SessionStore,
    SetupToken,
    check_password,
    check_username,
    csrf_ok,
)
from lorafleet.server.registry import (
    BlobRecord,
    DeviceId,
    DeviceKind,
    NotFoundError,
    PriorDecisionRecord,
    PriorRecord,
    Registry,
    RegistryError,
    RoundId,
    RoundRecord,
    UserRecord,
    VersionId,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "lorafleet_console"
PAUSED_KEY = "training.paused"
RESULTS_FILE = "results.json"
MAX_SCAN = 1000
"""Rounds and prior versions read for a chart: a cohort's whole history in practice."""

EraseBlobs = Callable[[UserRecord, Sequence[BlobRecord]], int]
"""``on_erase(user, blobs) -> deleted``: delete a user's encrypted blobs (and unfinished
uploads) from the blob store, before their registry rows go; returns the blob files
deleted. It must be idempotent, so a retried erasure whose first attempt died half way
finishes the job. :func:`blob_store_eraser` makes one for a
:class:`~lorafleet.server.blob_store.BlobStore`."""


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the coordinator's state is and how the console serves it.

    Examples
    --------
    >>> ConsoleConfig(data_dir="runs/coordinator").registry.endswith("registry.db")
    True
    """

    data_dir: str
    registry_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8600
    page_size: int = 50
    session_idle_s: float = 30 * 60
    session_max_age_s: float = 12 * 3600
    secure_cookies: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    forwarded_allow_ips: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated addresses or networks of the reverse proxy whose "
            "X-Forwarded-For/-Proto the console believes; None (the default): no proxy "
            "headers are believed from anyone, the socket's peer is the client"
        },
    )

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise SpecError("console: data-dir is empty; pass the coordinator's --data-dir")
        if not 0 <= self.port <= 65535:
            raise SpecError(f"console: port must be in 0..65535, got {self.port}")
        if not 1 <= self.page_size <= 500:
            raise SpecError(f"console: page size must be in 1..500, got {self.page_size}")
        if self.session_idle_s <= 0 or self.session_max_age_s <= 0:
            raise SpecError("console: session lifetimes must be positive")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SpecError("console: give both --tls-cert and --tls-key, or neither")
        if self.forwarded_allow_ips is not None:
            _check_proxies(self.forwarded_allow_ips)
        if self.tls_cert is None and not is_loopback(self.host):
            raise SpecError(
                f"console: refusing plain HTTP on {self.host}: pass --tls-cert and --tls-key, "
                "or bind to 127.0.0.1 (and tunnel over SSH)"
            )

    @property
    def registry(self) -> str:
        """The registry URL (the coordinator's SQLite file in data-dir unless one is given)."""
        return self.registry_url or f"sqlite:///{Path(self.data_dir).resolve() / 'registry.db'}"

    @property
    def tls(self) -> bool:
        """Whether the console serves HTTPS itself."""
        return self.tls_cert is not None


def _check_proxies(value: str) -> None:
    """Each comma-separated item is an IP address or network (never ``*``)."""
    items = [item.strip() for item in value.split(",")]
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SpecError(
                f"console: --forwarded-allow-ips item {item!r} is not an IP address or "
                "network; name the reverse proxy's address (e.g. 127.0.0.1 or 10.0.0.0/24)"
            ) from None


SETUP_ACCOUNT = "\x00setup"
"""The throttle's account name for wrong setup tokens (no real account can be named so)."""


def peer_of(request: Request) -> str:
    """The client's address: the socket's peer, or what a named proxy forwarded.

    uvicorn rewrites ``request.client`` from ``X-Forwarded-For`` only when the peer is
    one of ``ConsoleConfig.forwarded_allow_ips`` (none by default), so a client cannot
    choose the address that the login throttle and the audit log see.
    """
    return request.client.host if request.client else "unknown"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- state


class _NotLoggedIn(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


class Console:
    """The console's state: registry, admin account, sessions, cached figures."""

    def __init__(
        self,
        config: ConsoleConfig,
        registry: Registry,
        *,
        on_erase: EraseBlobs | None,
        owns_registry: bool,
    ) -> None:
        self.config = config
        self.registry = registry
        self.on_erase = on_erase
        self.owns_registry = owns_registry
        self.admin = AdminStore(config.data_dir)
        self.setup = SetupToken()
        self.sessions = SessionStore(
            idle_s=config.session_idle_s, max_age_s=config.session_max_age_s
        )
        self.throttle = LoginThrottle()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str, ttl_s: float, make: Callable[[], Any]) -> Any:
        """``make()``, reused for ``ttl_s`` seconds (full counts are not per-page work)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < ttl_s:
            return hit[1]
        value = make()
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def results(self) -> dict[str, Any] | None:
        """The last federation's ``results.json``, re-read when it changes."""
        path = Path(self.config.data_dir) / RESULTS_FILE
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        with self._lock:
            hit = self._cache.get("results")
        if hit is not None and hit[0] == mtime:
            return dict(hit[1])
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", path, exc)
            return None
        if not isinstance(data, dict):
            return None
        with self._lock:
            self._cache["results"] = (mtime, data)
        return data

    def paused(self) -> bool:
        """Whether the operator paused training."""
        return bool(self.registry.get_control(PAUSED_KEY, False))

    def audit(self, request: Request, actor: str, action: str, target: str, **detail: Any) -> None:
        """Write one audit entry, with the client's address (:func:`peer_of`)."""
        self.registry.record_audit(actor, action, target, {"address": peer_of(request), **detail})

    def cohorts(self) -> list[str]:
        """Spec fingerprints of the cohorts that ran rounds or hold a prior, latest first."""
        return self.registry.list_cohorts()

    def all_rounds(self, spec: str) -> list[RoundRecord]:
        """Up to :data:`MAX_SCAN` rounds of one cohort, oldest first."""
        return list(
            reversed(_scan(lambda after: self.registry.list_rounds(spec, after=after, limit=200)))
        )

    def all_priors(self, spec: str) -> list[PriorRecord]:
        """Up to :data:`MAX_SCAN` prior versions of one cohort, oldest first."""
        return list(
            reversed(
                _scan(lambda after: self.registry.list_prior_versions(spec, after=after, limit=200))
            )
        )


def _scan(fetch: Callable[[Any], Any]) -> list[Any]:
    items: list[Any] = []
    after = None
    while len(items) < MAX_SCAN:
        page = fetch(after)
        items += page.items
        if page.next_after is None:
            break
        after = page.next_after
    return items


# ---------------------------------------------------------------------------- views


def _loss_series(
    priors: Sequence[PriorRecord], results: Mapping[str, Any] | None
) -> dict[str, list[tuple[float, float]]]:
    """Mean held-out loss per round: from each prior version's metrics, else results.json."""
    by_round: dict[float, dict[str, float]] = {}
    for p in priors:
        if p.round is not None and p.metrics:
            by_round[float(p.round)] = dict(p.metrics)
    for outcome in (results or {}).get("rounds", []) if isinstance(results, Mapping) else []:
        if not isinstance(outcome, Mapping) or outcome.get("prior_version") is None:
            continue
        number = float(outcome.get("round", math.nan))
        metrics = [m for m in dict(outcome.get("metrics") or {}).values() if isinstance(m, Mapping)]
        if number in by_round or not metrics:
            continue
        by_round[number] = {
            key: sum(float(m.get(key, math.nan)) for m in metrics) / len(metrics)
            for key in ("base_loss", "prior_loss", "personal_loss")
        }
    series: dict[str, list[tuple[float, float]]] = {"base": [], "prior": [], "personal": []}
    for number in sorted(by_round):
        for name in series:
            value = by_round[number].get(f"{name}_loss")
            if value is not None:
                series[name].append((number, float(value)))
    return series


def _promotion_context(registry: Registry, priors: Sequence[PriorRecord]) -> dict[str, Any]:
    """Each shown prior's latest devices' score and promotion decision, and decisions by round.

    Two batched queries, so the tables say why a version is (not) active without a
    query per row.
    """
    refs = [p.ref for p in priors]
    decisions = registry.prior_decisions_for(refs)
    decided_in: dict[int, list[PriorDecisionRecord]] = {}
    for d in sorted(decisions.values(), key=lambda d: d.id):
        if d.round is not None:  # the last round's number also names the run's final scoring
            decided_in.setdefault(d.round, []).append(d)
    return {
        "scores": registry.latest_prior_evaluations(refs),
        "decisions": decisions,
        "decided_in": decided_in,
    }


def _bytes_groups(rounds: Sequence[RoundRecord]) -> list[tuple[float, dict[str, float]]]:
    """Bytes up and down per round number, summed over its attempts (retries cost too)."""
    totals: dict[int, dict[str, float]] = {}
    for r in rounds:
        slot = totals.setdefault(r.number, {"up": 0.0, "down": 0.0})
        slot["up"] += r.bytes_up or 0
        slot["down"] += r.bytes_down or 0
    return [(float(n), totals[n]) for n in sorted(totals)]


def _final_evaluation(results: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Mean final held-out losses over the nodes results.json lists."""
    if not isinstance(results, Mapping):
        return None
    evaluation = results.get("evaluation")
    if not isinstance(evaluation, Mapping) or not evaluation:
        return None
    rows = [m for m in evaluation.values() if isinstance(m, Mapping)]
    out: dict[str, Any] = {"nodes": len(rows), "prior_version": results.get("prior_version")}
    for key in ("base_loss", "prior_loss", "personal_loss"):
        values = [float(m[key]) for m in rows if isinstance(m.get(key), int | float)]
        out[key] = sum(values) / len(values) if values else None
    return out


def _safe_next(target: str | None) -> str:
    """Only same-site paths: ``/users``, never ``//evil.example`` or ``https://...``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def _key_fingerprint(public_key: bytes | None) -> str:
    return "" if not public_key else hashlib.sha256(public_key).hexdigest()[:16]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["bytes"] = lambda v: "" if v is None else charts.format_bytes(float(v))
    env.filters["when"] = lambda d: "" if d is None else d.strftime("%Y-%m-%d %H:%M:%S")
    env.filters["num"] = lambda v, digits=4: "" if v is None else f"{float(v):.{digits}g}"
    env.filters["short"] = lambda s, n=12: "" if s is None else (s if len(s) <= n else s[:n] + "…")
    env.filters["keyfp"] = _key_fingerprint
    env.filters["seconds"] = lambda v: "" if v is None else f"{float(v):.1f} s"
    env.filters["urlq"] = lambda s: quote(str(s), safe="")
    return env


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# ---------------------------------------------------------------------------- guards


def _session_of(request: Request) -> Session | None:
    console: Console = request.app.state.console
    return console.sessions.get(request.cookies.get(COOKIE))


def _page_user(request: Request) -> Session:
    """Dependency of every page: a logged-in session, else a redirect to /login."""
    session = _session_of(request)
    if session is None or session.user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise _NotLoggedIn(target)
    return session


def _check_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is None:  # not a browser, or a same-origin GET-like request
        return
    expected = f"{request.url.scheme}://{request.url.netloc}"
    if origin != expected:
        raise _Refused(403, f"cross-origin request from {origin} refused")


async def _post_session(request: Request) -> Session:
    """The session of a POST whose CSRF token (form field or header) matches."""
    _check_origin(request)
    session = _session_of(request)
    token = request.headers.get("x-csrf-token")
    if token is None:
        form = await request.form()
        value = form.get("csrf_token")
        token = value if isinstance(value, str) else None
    if session is None or not csrf_ok(session, token):
        raise _Refused(403, "missing or wrong CSRF token: reload the page and try again")
    return session


async def _action_user(request: Request) -> Session:
    """Dependency of every action: logged in (401) and a valid CSRF token (403)."""
    session = _session_of(request)
    if session is None or session.user is None:
        raise _Refused(401, "log in first")
    return await _post_session(request)


def _view_user(request: Request) -> Session:
    """Dependency of every page and its JSON twin: a logged-in session.

    Without one, a page redirects to ``/login`` and the API answers 401 (a script has
    no use for a login form).
    """
    if not request.url.path.startswith(API_PREFIX + "/"):
        return _page_user(request)
    session = _session_of(request)
    if session is None or session.user is None:
        raise _Refused(
            401, f"log in first: POST /login with the CSRF token from GET {API_PREFIX}/session"
        )
    return session


def _twin(request: Request, path: str) -> str:
    """``path`` as a page, or as its JSON twin when ``request`` came to the API."""
    return API_PREFIX + path if request.url.path.startswith(API_PREFIX + "/") else path


def _paging(
    request: Request, next_after: int | str | None, prev_before: int | str | None
) -> dict[str, Any]:
    """A listing's cursors and the links to its neighbouring pages."""
    return {
        "next_after": next_after,
        "prev_before": prev_before,
        "links": page_links(request.url, next_after, prev_before),
    }


def _round_id(value: int | None) -> RoundId | None:
    return None if value is None else RoundId(value)


ViewSession = Annotated[Session, Depends(_view_user)]
PostSession = Annotated[Session, Depends(_post_session)]
ActionSession = Annotated[Session, Depends(_action_user)]


# ---------------------------------------------------------------------------- app


def create_app(
    config: ConsoleConfig,
    *,
    registry: Registry | None = None,
    on_erase: EraseBlobs | None = None,
) -> FastAPI:
    """Build the console app for ``config``.

    Parameters
    ----------
    config
        Data dir, registry URL and session settings.
    registry
        An open registry to use (the coordinator's own, when the console runs inside
        it); by default the app opens ``config.registry`` and closes it on shutdown.
    on_erase
        Deletes a user's encrypted blobs from the blob store when the operator erases
        the user (see :data:`EraseBlobs`). Without it, erasing a user who has blobs is
        refused, since their ciphertexts would stay on disk.

    Returns
    -------
    FastAPI
        The app; ``app.state.console`` is its :class:`Console`. When no admin password
        is set yet, ``app.state.setup_token`` holds the one-time setup token to show
        the operator (and nothing else does).

    Examples
    --------
    >>> import tempfile
    >>> app = create_app(ConsoleConfig(data_dir=tempfile.mkdtemp()))
    >>> isinstance(app.state.setup_token, str)
    True
    """
    owns = registry is None
    reg = registry if registry is not None else Registry.open(config.registry)
    console = Console(config, reg, on_erase=on_erase, owns_registry=owns)
    env = _environment()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        try:
            yield
        finally:
            if console.owns_registry:
                console.registry.close()

    app = FastAPI(
        title="lorafleet console",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.console = console
    app.state.setup_token = None if console.admin.configured else console.setup.issue()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    # ------------------------------------------------------------ plumbing

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if config.tls:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    @app.exception_handler(_NotLoggedIn)
    async def not_logged_in(request: Request, exc: _NotLoggedIn) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.path, safe='/')}", status_code=303)

    def refuse(request: Request, status: int, message: str) -> Response:
        """One message: JSON for the API and scripts, a page for a browser's GET."""
        if request.url.path.startswith(API_PREFIX + "/") or _wants_json(request):
            return JSONResponse({"error": message}, status_code=status)
        session = session_of(request)
        if request.method == "GET" and session is not None and session.user is not None:
            return render(
                request,
                "error.html",
                session,
                status_code=status,
                heading="Not found" if status == 404 else "Bad request",
                message=message,
            )
        return PlainTextResponse(message, status_code=status)

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> Response:
        return refuse(request, exc.status, exc.message)

    @app.exception_handler(BadQuery)
    async def bad_query(request: Request, exc: BadQuery) -> Response:
        return refuse(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's default is a 422 with a list of pydantic errors; one line says more.
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return refuse(request, 400, "bad request: " + "; ".join(problems))

    session_of = _session_of

    def secure(request: Request) -> bool:
        return config.secure_cookies or request.url.scheme == "https"

    def set_cookie(response: Response, request: Request, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            console.sessions.cookie_value(session),
            httponly=True,
            samesite="strict",
            secure=secure(request),
            path="/",
        )

    def render(
        request: Request,
        name: str,
        session: Session | None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        template = env.get_template(name)
        paused = False
        if session is not None and session.user is not None:
            paused = console.paused()
        html = template.render(
            request=request,
            user=None if session is None else session.user,
            csrf=None if session is None else session.csrf,
            flashes=[] if session is None else session.take_flashes(),
            paused=paused,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status_code)

    def back(to: str) -> RedirectResponse:
        return RedirectResponse(_safe_next(to), status_code=303)

    # ------------------------------------------------------------ login

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> Response:
        if not console.admin.configured:
            return RedirectResponse("/setup", status_code=303)
        session = session_of(request)
        if session is not None and session.user is not None:
            return back(next)
        fresh = session is None
        session = session or console.sessions.new()
        response = render(request, "login.html", session, next=_safe_next(next))
        if fresh:
            set_cookie(response, request, session)
        return response

    @app.post("/login")
    async def login(
        request: Request,
        session: PostSession,
        username: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        address = peer_of(request)
        if console.throttle.blocked(username, address):
            session.flash("error", "too many failed logins from this address; wait a few minutes")
            return render(request, "login.html", session, status_code=429, next=_safe_next(next))
        ok = await _run_sync(lambda: console.admin.verify(username, password))
        if not ok:
            console.throttle.failed(username, address)
            log.warning("console: failed login from %s", address)
            session.flash("error", "wrong name or password")
            return render(request, "login.html", session, status_code=401, next=_safe_next(next))
        console.throttle.succeeded(username, address)
        fresh = console.sessions.login(session, username)
        console.audit(request, username, "login", "console")
        response = back(next)
        set_cookie(response, request, fresh)
        return response

    @app.post("/logout")
    async def logout(request: Request, session: ActionSession) -> Response:
        assert session.user is not None
        console.audit(request, session.user, "logout", "console")
        console.sessions.drop(session)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/setup", response_class=HTMLResponse)
    def setup_page(request: Request) -> Response:
        if console.admin.configured:
            return RedirectResponse("/login", status_code=303)
        session = session_of(request)
        fresh = session is None
        session = session or console.sessions.new()
        response = render(request, "setup.html", session)
        if fresh:
            set_cookie(response, request, session)
        return response

    @app.post("/setup")
    async def setup(
        request: Request,
        session: PostSession,
        token: Annotated[str, Form()] = "",
        username: Annotated[str, Form()] = "admin",
        password: Annotated[str, Form()] = "",
        password2: Annotated[str, Form()] = "",
    ) -> Response:
        if console.admin.configured:
            return RedirectResponse("/login", status_code=303)
        address = peer_of(request)
        try:
            if console.throttle.blocked(SETUP_ACCOUNT, address):
                raise ConsoleAuthError(
                    "too many failed attempts from this address; wait a few minutes"
                )
            check_username(username)
            check_password(password)
            if password != password2:
                raise ConsoleAuthError("the two passwords differ; type the same one twice")
            if not console.setup.redeem(token.strip()):
                console.throttle.failed(SETUP_ACCOUNT, address)
                raise ConsoleAuthError(
                    "wrong setup token: use the one the console printed when it started"
                )
        except ConsoleAuthError as exc:
            session.flash("error", str(exc))
            return render(request, "setup.html", session, status_code=400)
        await _run_sync(lambda: console.admin.set_password(username, password))
        app.state.setup_token = None
        console.audit(request, username, "admin.setup", "console")
        fresh = console.sessions.login(session, username)
        fresh.flash("ok", f"admin {username} created; you are logged in")
        response = back("/")
        set_cookie(response, request, fresh)
        return response

    # ------------------------------------------------------------ pages
    # Each page is a view (the data, from the registry) rendered two ways: as HTML at its
    # path and as JSON under /api/v1 at the same path, so the two never show different
    # things. Views read only; the API has no write methods, so CSRF is not involved.

    def cohort_of(spec: str | None) -> tuple[list[str], str | None]:
        cohorts: list[str] = console.cached("cohorts", 10.0, console.cohorts)
        return cohorts, spec if spec in cohorts else (cohorts[0] if cohorts else None)

    def overview_view(request: Request, spec: str | None) -> dict[str, Any]:
        cohorts, current = cohort_of(spec)
        rounds_page = console.registry.list_rounds(current, limit=config.page_size)
        results = console.results()
        active: PriorRecord | None = None
        priors: list[PriorRecord] = []
        loss: dict[str, list[tuple[float, float]]] = {}
        moved: list[tuple[float, dict[str, float]]] = []
        if current is not None:
            priors = console.all_priors(current)
            active = console.registry.active_prior(current)
            loss = _loss_series(priors, results)
            moved = _bytes_groups(console.all_rounds(current))
        rounds_url = request.url.replace(path=_twin(request, "/rounds"), query="")
        running = [r for r in rounds_page.items if r.status == "running"]
        return {
            "cohorts": cohorts,
            "current": current,
            "paused": console.paused(),
            "running": running,
            "active": active,
            "counts": console.cached("counts", 30.0, console.registry.counts),
            "rounds": rounds_page.items,
            "older_rounds": page_links(
                rounds_url.include_query_params(**({"spec": current} if current else {})),
                rounds_page.next_after,
                None,
            )["next"],
            "priors": list(reversed(priors))[:5],
            "loss_per_round": {
                name: [{"round": x, "loss": y} for x, y in points] for name, points in loss.items()
            },
            "bytes_per_round": [{"round": x, **values} for x, values in moved],
            "final": _final_evaluation(results),
            **_promotion_context(console.registry, priors),
        }

    def rounds_view(
        request: Request, spec: str | None, after: str | None, before: str | None
    ) -> dict[str, Any]:
        cohorts, current = cohort_of(spec)
        cursors = int_cursors(after, before)
        page = console.registry.list_rounds(
            current,
            after=_round_id(cursors[0]),
            before=_round_id(cursors[1]),
            limit=config.page_size,
        )
        shown = {r.prior_ref for r in page.items if r.prior_ref}
        priors = [p for p in console.all_priors(current) if p.ref in shown] if current else []
        return {
            "cohorts": cohorts,
            "current": current,
            "rounds": page.items,
            **_paging(request, page.next_after, page.prev_before),
            **_promotion_context(console.registry, priors),
        }

    def users_view(
        request: Request, q: str, after: str | None, before: str | None
    ) -> dict[str, Any]:
        q = q.strip()
        cursors = text_cursors(after, before)
        try:
            page = console.registry.search_users(
                q, after=cursors[0], before=cursors[1], limit=config.page_size
            )
        except RegistryError as exc:
            raise BadQuery(str(exc)) from None
        latest = {u.pseudonym: console.registry.latest_user_version(u.id) for u in page.items}
        return {
            "q": q,
            "users": page.items,
            "latest": latest,
            **_paging(request, page.next_after, page.prev_before),
        }

    def user_view(
        request: Request,
        pseudonym: str,
        after: str | None,
        before: str | None,
        blobs_after: str | None,
        blobs_before: str | None,
    ) -> dict[str, Any]:
        reg = console.registry
        cursors = (
            *int_cursors(after, before),
            *int_cursors(blobs_after, blobs_before, prefix="blobs_"),
        )
        try:
            user = reg.get_user(pseudonym)
        except (NotFoundError, RegistryError) as exc:
            raise _Refused(404, str(exc)) from None
        history = reg.user_history(
            user.id,
            after=None if cursors[0] is None else VersionId(cursors[0]),
            before=None if cursors[1] is None else VersionId(cursors[1]),
            limit=config.page_size,
        )
        blobs = reg.list_blobs(user.id, after=cursors[2], before=cursors[3], limit=config.page_size)
        blob_links = page_links(
            request.url,
            blobs.next_after,
            blobs.prev_before,
            after="blobs_after",
            before="blobs_before",
        )
        return {
            "u": user,
            "adapters": reg.list_adapters(user.id),
            "history": history.items,
            "evaluations": {v.id: reg.list_evaluations(v.id) for v in history.items},
            **_paging(request, history.next_after, history.prev_before),
            "blobs": blobs.items,
            "blobs_next_after": blobs.next_after,
            "blobs_prev_before": blobs.prev_before,
            "blobs_links": blob_links,
            "devices": reg.list_devices(kind="device", user=user.id, limit=100).items,
        }

    def priors_view(
        request: Request, spec: str | None, after: str | None, before: str | None
    ) -> dict[str, Any]:
        cohorts, current = cohort_of(spec)
        cursors = int_cursors(after, before)
        items: Sequence[PriorRecord] = ()
        next_after = prev_before = None
        if current is not None:
            page = console.registry.list_prior_versions(
                current, after=cursors[0], before=cursors[1], limit=config.page_size
            )
            items, next_after, prev_before = page.items, page.next_after, page.prev_before
        return {
            "cohorts": cohorts,
            "current": current,
            "priors": items,
            **_paging(request, next_after, prev_before),
            **_promotion_context(console.registry, items),
        }

    def nodes_view(
        request: Request, kind: str, after: str | None, before: str | None
    ) -> dict[str, Any]:
        chosen: DeviceKind | None = (
            "device" if kind == "device" else "supernode" if kind == "supernode" else None
        )
        cursors = int_cursors(after, before)
        page = console.registry.list_devices(
            kind=chosen,
            after=None if cursors[0] is None else DeviceId(cursors[0]),
            before=None if cursors[1] is None else DeviceId(cursors[1]),
            limit=config.page_size,
        )
        return {
            "kind": chosen or "",
            "nodes": page.items,
            "pseudonyms": {d.user_id: d.pseudonym for d in page.items},
            **_paging(request, page.next_after, page.prev_before),
        }

    def audit_view(request: Request, after: str | None, before: str | None) -> dict[str, Any]:
        cursors = int_cursors(after, before)
        page = console.registry.list_audit(
            after=cursors[0], before=cursors[1], limit=config.page_size
        )
        return {"entries": page.items, **_paging(request, page.next_after, page.prev_before)}

    def show(
        request: Request, session: Session, page: str, data: dict[str, Any], **extra: Any
    ) -> Response:
        """The view's data as JSON on the API path, else as the page's HTML."""
        if request.url.path.startswith(API_PREFIX + "/"):
            return JSONResponse({"page": page, **to_json(data)})
        data = {k: v for k, v in data.items() if k != "paused"}  # render() reads it itself
        return render(request, f"{page}.html", session, **data, **extra)

    # Each handler serves the page and its JSON twin; ViewSession redirects a browser to
    # /login and answers 401 on the API.

    @app.get("/", response_class=HTMLResponse)
    @app.get(f"{API_PREFIX}/overview")
    def overview(request: Request, session: ViewSession, spec: str | None = None) -> Response:
        data = overview_view(request, spec)
        if request.url.path.startswith(API_PREFIX + "/") or data["current"] is None:
            return show(request, session, "overview", data, loss_chart=None, bytes_chart=None)
        loss_chart = charts.line_chart(
            {
                name: [(p["round"], p["loss"]) for p in points]
                for name, points in data["loss_per_round"].items()
            },
            title="Held-out loss per round",
            x_label="round",
            y_label="loss",
        )
        bytes_chart = charts.bar_chart(
            [(p["round"], {"up": p["up"], "down": p["down"]}) for p in data["bytes_per_round"]],
            title="Bytes moved per round",
            x_label="round",
            y_label="bytes",
        )
        return show(
            request, session, "overview", data, loss_chart=loss_chart, bytes_chart=bytes_chart
        )

    @app.get("/rounds", response_class=HTMLResponse)
    @app.get(f"{API_PREFIX}/rounds")
    def rounds_page(
        request: Request,
        session: ViewSession,
        spec: str | None = None,
        after: str | None = None,
        before: str | None = None,
    ) -> Response:
        return show(request, session, "rounds", rounds_view(request, spec, after, before))

    @app.get("/users", response_class=HTMLResponse)
    @app.get(f"{API_PREFIX}/users")
    def users_page(
        request: Request,
        session: ViewSession,
        q: str = "",
        after: str | None = None,
        before: str | None = None,
    ) -> Response:
        try:
            data = users_view(request, q, after, before)
        except BadQuery as exc:
            if request.url.path.startswith(API_PREFIX + "/"):
                raise
            # The search form stays on screen, with the message above it.
            session.flash("error", str(exc))
            empty = {"q": q.strip(), "users": [], "latest": {}, **_paging(request, None, None)}
            return render(request, "users.html", session, status_code=400, **empty)
        return show(request, session, "users", data)

    @app.get("/users/{pseudonym}", response_class=HTMLResponse)
    @app.get(f"{API_PREFIX}/users/{{pseudonym}}")
    def user_page(
        request: Request,
        pseudonym: str,
        session: ViewSession,
        after: str | None = None,
        before: str | None = None,
        blobs_after: str | None = None,
        blobs_before: str | None = None,
    ) -> Response:
        data = user_view(request, pseudonym, after, before, blobs_after, blobs_before)
        return show(request, session, "user", data)

    @app.get("/priors", response_class=HTMLResponse)
    @app.get(f"{API_PREFIX}/priors")
    def priors_page(
        request: Request,
        session: ViewSession,
        spec: str | None = None,
        after: str | None = None,
        before: str | None = None,
    ) -> Response:
        return show(request, session, "priors", priors_view(request, spec, after, before))

    @app.get("/nodes", response_class=HTMLResponse)
    @app.get(f"{API_PREFIX}/nodes")
    def nodes_page(
        request: Request,
        session: ViewSession,
        kind: str = "",
        after: str | None = None,
        before: str | None = None,
    ) -> Response:
        return show(request, session, "nodes", nodes_view(request, kind, after, before))

    @app.get("/audit", response_class=HTMLResponse)
    @app.get(f"{API_PREFIX}/audit")
    def audit_page(
        request: Request,
        session: ViewSession,
        after: str | None = None,
        before: str | None = None,
    ) -> Response:
        return show(request, session, "audit", audit_view(request, after, before))

    @app.get(f"{API_PREFIX}/session")
    def session_api(request: Request) -> Response:
        """Who is logged in, and the CSRF token a script sends with ``POST /login``.

        Like ``GET /login``, it starts a (not yet logged-in) session when the caller has
        none, so a script can log in without reading the login form's HTML.
        """
        session = session_of(request)
        fresh = session is None
        session = session or console.sessions.new()
        response = JSONResponse(
            {"page": "session", "user": session.user, "csrf_token": session.csrf}
        )
        if fresh:
            set_cookie(response, request, session)
        return response

    # ------------------------------------------------------------ actions

    @app.post("/actions/pause")
    async def pause(request: Request, session: ActionSession) -> Response:
        return _set_paused(request, session, True)

    @app.post("/actions/resume")
    async def resume(request: Request, session: ActionSession) -> Response:
        return _set_paused(request, session, False)

    def _set_paused(request: Request, session: Session, value: bool) -> Response:
        assert session.user is not None
        console.registry.set_control(PAUSED_KEY, value)
        action = "training.pause" if value else "training.resume"
        console.audit(request, session.user, action, PAUSED_KEY, value=value)
        session.flash(
            "ok",
            "training paused: the coordinator waits before its next round"
            if value
            else "training resumed",
        )
        return back("/")

    @app.post("/actions/rollback")
    async def rollback(
        request: Request,
        session: ActionSession,
        spec: Annotated[str, Form()],
        version: Annotated[int, Form()],
    ) -> Response:
        assert session.user is not None
        try:
            before = console.registry.active_prior(spec)
            record = console.registry.set_active_prior(spec, version)
        except RegistryError as exc:
            session.flash("error", str(exc))
            return back(f"/priors?spec={quote(spec)}")
        console.audit(
            request,
            session.user,
            "prior.rollback",
            record.ref,
            spec=spec,
            version=version,
            previous=None if before is None else before.ref,
        )
        session.flash("ok", f"active prior is now {record.ref}")
        return back(f"/priors?spec={quote(spec)}")

    @app.post("/actions/revoke")
    async def revoke(
        request: Request,
        session: ActionSession,
        device_id: Annotated[int, Form()],
    ) -> Response:
        assert session.user is not None
        try:
            record = console.registry.revoke_device(DeviceId(device_id))
        except RegistryError as exc:
            session.flash("error", str(exc))
            return back("/nodes")
        console.audit(
            request,
            session.user,
            "node.revoke",
            f"{record.kind}:{record.id}",
            name=record.name,
            node_id=record.node_id,
        )
        session.flash("ok", f"{record.kind} {record.name} (id {record.id}) revoked")
        return back("/nodes")

    @app.post("/actions/erase")
    async def erase(
        request: Request,
        session: ActionSession,
        pseudonym: Annotated[str, Form()],
        confirm: Annotated[str, Form()] = "",
    ) -> Response:
        assert session.user is not None
        here = f"/users/{quote(pseudonym, safe='')}"
        if confirm != pseudonym:
            session.flash("error", "type the user's pseudonym to confirm the erasure")
            return back(here)
        try:
            try:
                user = console.registry.get_user(pseudonym)
            except NotFoundError:
                session.flash("ok", f"{pseudonym} holds nothing here (already erased)")
                return back("/users")
            blobs = list(_all_blobs(console.registry, user))
            if blobs and console.on_erase is None:
                raise LorafleetError(
                    f"user {pseudonym} has {len(blobs)} backup blob(s) and this console has no "
                    "blob store to delete them from; start it with --blob-store"
                )
            deleted = console.on_erase(user, blobs) if console.on_erase is not None else 0
            counts = console.registry.erase_user(user.id)
        except LorafleetError as exc:
            session.flash("error", str(exc))
            return back(here)
        detail = {k: v for k, v in vars(counts).items() if isinstance(v, int)}
        console.audit(
            request, session.user, "user.erase", f"user:{pseudonym}", blob_files=deleted, **detail
        )
        session.flash(
            "ok",
            f"erased {pseudonym}: {counts.total} registry rows and {deleted} blob file(s)",
        )
        return back("/users")

    return app


def blob_store_eraser(store: BlobStore) -> EraseBlobs:
    """An :data:`EraseBlobs` that deletes from a content-addressed :class:`BlobStore`.

    It deletes each blob's object by sha256 and the user's unfinished uploads (the
    store files those under the registry's user id).
    """

    def erase(user: UserRecord, blobs: Sequence[BlobRecord]) -> int:
        deleted = 0
        for sha in sorted({b.sha256 for b in blobs}):
            if store.delete(sha) or not store.exists(sha):
                deleted += 1
        store.erase_owner_uploads(str(int(user.id)))
        return deleted

    return erase


def _all_blobs(registry: Registry, user: UserRecord) -> Iterator[BlobRecord]:
    after: int | None = None
    while True:
        page = registry.list_blobs(user.id, after=after, limit=1000)
        yield from page.items
        if page.next_after is None:
            return
        after = page.next_after


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


async def _run_sync(fn: Callable[[], Any]) -> Any:
    """Run a slow synchronous call (a KDF) off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn)


class ConsoleServer:
    """The console served by uvicorn on a background thread (inside the coordinator, tests).

    Examples
    --------
    >>> import tempfile
    >>> config = ConsoleConfig(data_dir=tempfile.mkdtemp(), port=0)
    >>> with ConsoleServer(create_app(config), config) as server:
    ...     server.url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(self, app: FastAPI, config: ConsoleConfig) -> None:
        self.app = app
        self.config = config
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout_s: float = 15.0) -> str:
        """Bind, start serving, and return the base URL (``http(s)://host:port``)."""
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise LorafleetError(
                f"console: cannot listen on {self.config.host}:{self.config.port} ({exc.strerror}); "
                "choose another --port"
            ) from None
        port = sock.getsockname()[1]
        proxies = self.config.forwarded_allow_ips
        uv_config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            # Proxy headers only from the proxy the operator named; uvicorn's own default
            # (believe X-Forwarded-For from 127.0.0.1, or $FORWARDED_ALLOW_IPS) would let
            # any local process, or an SSH tunnel's user, pick the address the login
            # throttle and the audit log see.
            proxy_headers=proxies is not None,
            forwarded_allow_ips=[p.strip() for p in proxies.split(",")] if proxies else [],
            ssl_certfile=self.config.tls_cert,
            ssl_keyfile=self.config.tls_key,
            timeout_graceful_shutdown=2,
            ws="none",
        )
        self._server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="console", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise LorafleetError("console: the web server did not start; see the log above")
            time.sleep(0.02)
        scheme = "https" if self.config.tls else "http"
        host = f"[{self.config.host}]" if family == socket.AF_INET6 else self.config.host
        self.url = f"{scheme}://{host}:{port}"
        return self.url

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> ConsoleServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
