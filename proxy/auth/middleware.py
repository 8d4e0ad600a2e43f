"""The edge: authentication, per-repository authorization, the token endpoint, response
security headers. :func:`install` wires them into an application.

Order of a request under ``/v2``: credentials are checked first (``Authorization: Basic``
against htpasswd, or ``Bearer`` tokens issued by ``/auth/token``); a malformed or wrong one
is 401 even where anonymous pull would be enough, so a typo never silently downgrades a
client; failed logins are budgeted per address and per user (:mod:`proxy.auth.throttle`),
429 past the budget. Then the action (GET/HEAD pull, POST/PUT/PATCH push, DELETE delete;
cancelling an upload is push) is checked on the repository's local name. Anonymous clients without the
right get 401 with a challenge (so they retry with credentials), signed-in users 403 DENIED.
All of this happens before any handler runs, so a refused push never touches storage.

The operational pages (``/``, ``/status``, ``/status.json``, ``/metrics``) need the ``ops``
right: they name private repositories and upstreams. Their challenge is always ``Basic``
(browsers and Prometheus answer that, not a token flow). ``/healthz`` and ``/readyz`` stay open.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from multidict import MultiDict

from proxy.auth.access import ALL, NONE, AccessControl
from proxy.auth.htpasswd import PasswordChecker
from proxy.auth.throttle import LoginThrottle, Throttled
from proxy.auth.tokens import Claims, TokenAuthority, TokenError, load_or_create_key, parse_scopes
from proxy.errors import Denied, RegistryError, TooManyRequests, Unauthorized
from proxy.handlers import OPS_CANONICAL
from proxy.handlers.common import CATALOG_FILTER, ROUTER, USER, upstream_ns
from proxy.reference import validate_name
from proxy.settings.auth import AuthConfig

log = logging.getLogger("regproxy.auth")

TOKEN_PATH = "/auth/token"

_HOST_RE = re.compile(r"[A-Za-z0-9.\-:\[\]]{1,300}")


@dataclass(frozen=True)
class Identity:
    user: str | None
    claims: Claims | None = None  #: set when the client presented a bearer token

    @property
    def anonymous(self) -> bool:
        return self.user is None and self.claims is None


ANONYMOUS = Identity(None)


#: The route template of an upload session (``/v2/{name}/blobs/uploads/{uuid}``, with or
#: without the upstream prefix): deleting one cancels an upload, which is push.
_UPLOAD_SESSION = "/blobs/uploads/{uuid}"


def action_of(request: web.Request) -> str:
    """The action a request needs, from its method and the route it matched: the path text
    cannot decide it, since a repository name may contain ``/blobs/uploads/`` itself."""
    method = request.method
    if method in ("GET", "HEAD"):
        return "pull"
    if method == "DELETE":
        resource = request.match_info.route.resource
        upload = resource is not None and resource.canonical.endswith(_UPLOAD_SESSION)
        return "push" if upload else "delete"
    return "push"


def scope_actions(action: str) -> str:
    return "pull,push" if action == "push" else action


class AuthGate:
    """The edge's authentication and authorization state (users, access rules, login
    budgets, token authority): everything the middleware and the token endpoint need,
    built once per application."""

    def __init__(self, auth: AuthConfig, upstream_names: tuple[str, ...]) -> None:
        self.auth = auth
        self.acl = AccessControl(auth)
        self.passwords = PasswordChecker(auth.htpasswd, ttl=auth.cache_ttl) if auth.htpasswd else None
        self.throttle = LoginThrottle(auth.login_failures_per_address, auth.login_failures_per_user,
                                      auth.login_window)
        self.authority: TokenAuthority | None = None
        if auth.mode == "token":
            self.authority = TokenAuthority(load_or_create_key(auth.token_key), auth.service,
                                            auth.token_ttl)
        self.upstream_names = upstream_names

    # -- who is it ---------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> Identity:
        header = request.headers.get("Authorization")
        if header is None or not header.strip():
            return ANONYMOUS
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "basic":
            if value in ("", "Og=="):  # ":" -- podman/skopeo without credentials answer a
                return ANONYMOUS       # Basic challenge with an empty pair: anonymous
            user, password = self._basic(request, value)
            if not await self.login(request, user, password):
                raise self.challenge(request, message="invalid username or password")
            return Identity(user)
        if scheme == "bearer" and self.authority is not None:
            try:
                claims = self.authority.verify(value)
            except TokenError as exc:
                log.info("bearer token refused from %s: %s", request.remote, exc)
                raise self.challenge(request, message="invalid or expired token",
                                     error="invalid_token") from None
            if claims.subject is not None and self.passwords is not None:
                self.passwords.maybe_reload()
                if not self.passwords.knows(claims.subject):
                    raise self.challenge(request, message="invalid or expired token",
                                         error="invalid_token")
            return Identity(claims.subject, claims)
        raise self.challenge(request, message="unsupported authorization scheme")

    async def login(self, request: web.Request, user: str, password: str) -> bool:
        """Check a password within the failed-login budgets (429 past them, unchecked)."""
        try:
            attempt = self.throttle.begin(request.remote, user, password)
        except Throttled as exc:
            raise TooManyRequests(str(exc), headers={
                "Retry-After": str(exc.retry_after), "Cache-Control": "no-store"}) from None
        ok = False
        try:
            ok = self.passwords is not None and await self.passwords.check(user, password)
        finally:  # a client hanging up mid-check counts as a failure: it learnt nothing either
            attempt.done(ok)
        return ok

    def _basic(self, request: web.Request, value: str) -> tuple[str, str]:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise self.challenge(request, message="malformed basic credentials") from None
        user, sep, password = decoded.partition(":")
        if not sep or not user:
            raise self.challenge(request, message="malformed basic credentials")
        return user, password

    # -- what may it do ----------------------------------------------------------------

    def allowed(self, ident: Identity, requested: str, local: str, remote: str | None) -> frozenset[str]:
        """Actions on a repository (``requested`` as in the URL, ``local`` as routed)."""
        if ident.claims is None:
            return self.acl.actions(ident.user, local, remote)
        anonymous = self.acl.actions(None, local, remote)
        return anonymous | (ident.claims.access.get(requested, NONE)
                            & self.acl.actions(ident.user, local, remote))

    def local_name(self, request: web.Request, name: str) -> str:
        try:
            return request.app[ROUTER].route(name, upstream_ns(request)).name
        except (RegistryError, KeyError):
            return name

    def candidate_names(self, request: web.Request, name: str) -> set[str]:
        """Every local name ``name`` can stand for (with no ``ns`` and with each one):
        the token endpoint does not know which ``ns`` the client will send."""
        out = {name}
        router = request.app.get(ROUTER)
        if router is None:
            return out
        for ns in (None, *self.upstream_names):
            with contextlib.suppress(RegistryError):
                out.add(router.route(name, ns).name)
        return out

    async def check_operator(self, request: web.Request) -> None:
        """Let only callers with the ``ops`` right through: 401 (Basic challenge) to anonymous
        or wrongly signed-in clients, 403 DENIED to users without the right."""
        try:
            ident = await self.authenticate(request)
        except Unauthorized as exc:
            raise self.basic_challenge(exc.message) from None
        if ident.user is None:
            raise self.basic_challenge("the status pages and metrics need the ops right")
        if not self.acl.may_operate(ident.user):
            raise Denied(f"{ident.user} may not see the status pages and metrics (no ops right)")

    # -- refusals ----------------------------------------------------------------------

    def basic_challenge(self, message: str) -> Unauthorized:
        return Unauthorized(message, headers={
            "WWW-Authenticate": f'Basic realm="{self.auth.realm}", charset="UTF-8"',
            "Cache-Control": "no-store"})

    def realm_url(self, request: web.Request) -> str:
        if self.auth.token_realm:
            return self.auth.token_realm
        host = request.host if _HOST_RE.fullmatch(request.host or "") else "localhost"
        return f"{request.scheme}://{host}{TOKEN_PATH}"

    def challenge(self, request: web.Request, *, scope: str | None = None,
                  message: str | None = None, error: str | None = None) -> Unauthorized:
        value = self.challenge_value(request, scope=scope, error=error)
        return Unauthorized(message, headers={"WWW-Authenticate": value, "Cache-Control": "no-store"})

    def challenge_value(self, request: web.Request, *, scope: str | None = None,
                        error: str | None = None) -> str:
        if self.authority is not None:
            parts = [f'realm="{self.realm_url(request)}"', f'service="{self.auth.service}"']
            if scope:
                parts.append(f'scope="{scope}"')
            if error:
                parts.append(f'error="{error}"')
            value = "Bearer " + ",".join(parts)
        else:
            value = f'Basic realm="{self.auth.realm}", charset="UTF-8"'
        return value


AUTH_GATE = web.AppKey("auth_gate", AuthGate)


def _scope_name(name: str) -> str:
    return name.replace('"', "").replace("\\", "")[:300]


@web.middleware
async def edge_auth(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Authenticate and authorize every ``/v2`` request and the operational pages before
    their handlers run."""
    if request.match_info.http_exception is not None:
        return await handler(request)
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical in OPS_CANONICAL:
        await request.app[AUTH_GATE].check_operator(request)
        return await handler(request)
    api = request.path.startswith("/v2") or "prefix" in request.match_info  # /<upstream>/v2/...
    if not api:
        return await handler(request)
    gate = request.app[AUTH_GATE]
    remote = request.remote
    name = request.match_info.get("name")
    if name is not None:  # before any header is built from it (CR/LF, quotes: NAME_INVALID)
        validate_name(name)
    ident = await gate.authenticate(request)
    if ident.user is not None:
        request[USER] = ident.user
    if name is None:  # /v2/ and /v2/_catalog
        catalog = request.path.endswith("/v2/_catalog")
        if ident.anonymous and not gate.acl.anonymous_allowed_from(remote):
            raise gate.challenge(request, scope="registry:catalog:*" if catalog else None)
        if catalog:
            request[CATALOG_FILTER] = lambda local: "pull" in gate.acl.actions(ident.user, local, remote)
            return await handler(request)
        response = await handler(request)
        if ident.anonymous:
            # 200 because anonymous pull exists (dockerd mirrors must not be challenged,
            # moby#42022), but still announce the challenge: podman/skopeo read it from the
            # ping and then send their credentials
            response.headers["WWW-Authenticate"] = gate.challenge_value(request)
        return response

    action = action_of(request)
    local = gate.local_name(request, name)
    granted = gate.allowed(ident, name, local, remote)
    if action not in granted:
        scope = f"repository:{_scope_name(name)}:{scope_actions(action)}"
        if ident.user is None:  # anonymous, with or without an (anonymous) token
            raise gate.challenge(request, scope=scope)
        if ident.claims is not None and action in gate.acl.actions(ident.user, local, remote):
            # the user may, but this token does not say so: ask for a token with that scope
            raise gate.challenge(request, scope=scope, error="insufficient_scope",
                                 message="the token does not grant this access")
        raise Denied(f"{ident.user or 'anonymous'} may not {action} {local}")
    if request.method == "POST" and "from" in request.query and "mount" in request.query:
        source = request.query["from"]
        src_local = gate.local_name(request, source)
        if "pull" not in gate.allowed(ident, source, src_local, remote):
            # no right to read the source: a plain upload instead of a mount, as if absent
            query = MultiDict(request.query)
            query.popall("mount", None)
            query.popall("from", None)
            request = request.clone(rel_url=request.rel_url.with_query(query))
    return await handler(request)


async def token_endpoint(request: web.Request) -> web.Response:
    """``GET /auth/token?service=...&scope=repository:NAME:pull,push``: an ES256 token whose
    access is the requested scope intersected with what the client may do."""
    gate = request.app[AUTH_GATE]
    authority = gate.authority
    if authority is None:
        raise web.HTTPNotFound()
    service = request.query.get("service")
    if service is not None and service != authority.service:
        raise Denied(f"this token service is {authority.service!r}, not {service[:100]!r}")
    ident = ANONYMOUS
    header = request.headers.get("Authorization", "")
    if header.strip():
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            raise Unauthorized("the token endpoint accepts Basic credentials only", headers={
                "WWW-Authenticate": f'Basic realm="{gate.auth.realm}", charset="UTF-8"'})
        user, password = gate._basic(request, value.strip())
        if not await gate.login(request, user, password):
            raise Unauthorized("invalid username or password", headers={
                "WWW-Authenticate": f'Basic realm="{gate.auth.realm}", charset="UTF-8"'})
        ident = Identity(user)
    remote = request.remote
    access: dict[str, frozenset[str]] = {}
    for typ, name, actions in parse_scopes(request.query.getall("scope", []))[:32]:
        if typ != "repository" or len(name) > 512:
            continue
        wanted = ALL if "*" in actions else actions & ALL
        allowed = frozenset().union(*(gate.acl.actions(ident.user, local, remote)
                                      for local in gate.candidate_names(request, name)))
        access[name] = access.get(name, NONE) | (wanted & allowed)
    token, expires_in, issued = authority.issue(ident.user, access)
    body = {"token": token, "access_token": token, "expires_in": expires_in,
            "issued_at": datetime.fromtimestamp(issued, UTC).isoformat().replace("+00:00", "Z")}
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def install(app: web.Application, auth: AuthConfig | None, upstream_names: tuple[str, ...] = ()) -> None:
    """With ``auth``: the auth middleware and the token endpoint.

    Call before the application starts (middlewares and routes freeze then)."""
    if auth is None:
        return
    gate = AuthGate(auth, upstream_names)
    app[AUTH_GATE] = gate
    app.middlewares.append(edge_auth)
    if gate.authority is not None:
        app.router.add_get(TOKEN_PATH, token_endpoint)

    async def _close(_app: web.Application) -> None:
        if gate.passwords is not None:
            gate.passwords.close()

    app.on_cleanup.append(_close)
