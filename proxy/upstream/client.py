"""HTTP client for one upstream registry.

It owns what is specific to talking upstream: the token flow (401 challenge -> token
endpoint -> token cached per scope), Basic credentials, redirects to blob CDNs (followed by
hand so that ``Authorization`` never leaves the upstream's host), timeouts and the circuit
breaker. Callers get a plain response, or :class:`~proxy.errors.Unavailable` fast.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from yarl import URL

from proxy import metrics
from proxy.config import UpstreamConfig
from proxy.errors import BadGateway, RegistryError, TooManyRequests, Unavailable
from proxy.reference import Digest
from proxy.requestnotes import note_upstream
from proxy.sharedcache import SharedCache
from proxy.singleflight import SingleFlight
from proxy.upstream.auth import Challenge, parse_challenges
from proxy.upstream.breaker import BreakerState, CircuitBreaker
from proxy.upstream.egress import Egress
from proxy.upstream.urls import Endpoint, v2_url

log = logging.getLogger("regproxy.upstream")

UpstreamResponse = aiohttp.ClientResponse
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 5


def upstream_error(resp: UpstreamResponse, upstream: UpstreamClient, what: str,
                    not_found: type[RegistryError]) -> RegistryError:
    """Translate a non-success upstream status into the error our client should see.

    404/401/403 become 404s (clients then fall back to their next host), 429 keeps its
    status and Retry-After, and everything else is a 503.
    """
    if resp.status == 404:
        return not_found(f"{what} not found on upstream {upstream.name}")
    if resp.status in (401, 403):
        return not_found(f"upstream {upstream.name} denied access to {what} ({resp.status})")
    if resp.status == 429:
        return TooManyRequests(f"upstream {upstream.name} rate-limited the request",
                               headers={"Retry-After": resp.headers.get("Retry-After", "60")})
    return Unavailable(f"upstream {upstream.name} answered {resp.status} for {what}")


def describe_failure(exc: BaseException, timeout: aiohttp.ClientTimeout,
                     header_timeout: float | None = None) -> str:
    """What went wrong, for logs: the exception's class and message (which names the host
    and the OS error: ``ClientConnectorDNSError: Cannot connect to host ghcr.io:443 ssl:default
    [Name or service not known]``), or which timeouts applied when the message is empty."""
    message = str(exc).strip()
    if message:
        return f"{type(exc).__name__}: {message}"[:500]
    if isinstance(exc, TimeoutError):
        waited = (f"header timeout {header_timeout:g} s" if header_timeout
                  else f"read timeout {timeout.sock_read} s")
        return (f"{type(exc).__name__}: no answer in time (connect timeout {timeout.sock_connect} s, "
                f"{waited})")
    return type(exc).__name__


def _ratelimit(resp: UpstreamResponse) -> str:
    remaining = resp.headers.get("ratelimit-remaining")
    retry = resp.headers.get("Retry-After")
    return "".join([f", ratelimit-remaining {remaining}" if remaining else "",
                    f", Retry-After {retry}" if retry else ""])


async def read_capped(resp: UpstreamResponse, cap: int) -> bytes:
    """Read a small body (a manifest, a tag list) whole, refusing more than ``cap`` bytes."""
    if (resp.content_length or 0) > cap:
        raise BadGateway(f"upstream body exceeds {cap} bytes")
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > cap:
            raise BadGateway(f"upstream body exceeds {cap} bytes")
    return bytes(body)


class UpstreamClient:
    """One configured upstream: ``request()`` handles auth, redirects and failures."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        token_cache: SharedCache,
        breaker_cache: SharedCache | None = None,
        *,
        breaker_file: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.base = URL(config.url)
        self._session = session
        self._tokens = token_cache
        #: Shared with other replicas (Redis): an open circuit there makes us fail fast too.
        self._shared_breaker = breaker_cache
        self._token_flight: SingleFlight[str | None] = SingleFlight()
        self._challenge: Challenge | None = None
        #: ``breaker_file``: one breaker for every worker of the host (see the breaker)
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown,
                                      path=breaker_file, name=config.name)
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.connect_timeout,
            connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        #: Last ``ratelimit-remaining`` seen (Docker Hub), for metrics and logs.
        self.ratelimit_remaining: str | None = None
        #: the forward proxy of each request (the upstream's ``proxy``, or the environment)
        self.egress = Egress(config.proxy, os.environ if env is None else env)

    def remote_name(self, name: str) -> str:
        """The repository name on this upstream (Docker Hub puts official images in library/)."""
        if self.config.library_prefix and "/" not in name:
            return f"library/{name}"
        return name

    @asynccontextmanager
    async def request(
        self, method: str, repo: str, endpoint: Endpoint, reference: str | Digest | None = None,
        *, query: Mapping[str, str] | None = None, headers: dict[str, str] | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send ``METHOD /v2/<repo>/<endpoint>[/<reference>]`` upstream (the URL comes from
        :func:`~proxy.upstream.urls.v2_url`) and yield the final response.

        Raises :class:`Unavailable` when the upstream cannot be reached, times out, or the
        breaker is open. Any HTTP status is yielded; 5xx count as breaker failures. Only
        blob GETs may wait ``read_timeout`` for the response headers; everything else
        (manifests, tags, HEADs: small answers a hung upstream must not hold up) gets
        ``header_timeout``. What the caller's block raises is its own: a full disk while
        the body is stored is no upstream failure.
        """
        if not self.breaker.allow():
            metrics.child(metrics.UPSTREAM_ERRORS, self.name, "breaker_open").inc()
            raise Unavailable(f"upstream {self.name} is unavailable (circuit open)")
        if (self._shared_breaker is not None and self.breaker.state is BreakerState.CLOSED
                and await self._shared_breaker.get(self.name) is not None):
            metrics.child(metrics.UPSTREAM_ERRORS, self.name, "breaker_open").inc()
            raise Unavailable(f"upstream {self.name} is unavailable (circuit open on a replica)")
        url = v2_url(self.base, repo, endpoint, reference, query)
        scope = f"repository:{repo}:pull"
        base_headers = dict(headers or {})
        first_byte = (None if method == "GET" and endpoint is Endpoint.BLOBS
                      else self.config.header_timeout or None)
        started = time.monotonic()
        try:
            async with asyncio.timeout(first_byte):
                resp = await self._send_authorized(method, url, base_headers, scope)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = self._unavailable(method, url, exc, started, first_byte)  # (logged first)
            await self._failed()
            raise error from None
        except BaseException:
            self.breaker.abandon()  # (cancelled: a probe without an answer)
            raise
        try:
            latency = time.monotonic() - started
            metrics.child(metrics.UPSTREAM_LATENCY, self.name).observe(latency)
            metrics.child(metrics.UPSTREAM_REQUESTS, self.name, method, str(resp.status)).inc()
            note_upstream(resp.status, latency)  # (for the access line)
            if resp.status >= 500 or resp.status == 429:
                log.warning("upstream %s: %s %s%s answered %d%s", self.name, method, resp.url.host,
                            resp.url.path, resp.status, _ratelimit(resp))
            if resp.status >= 500:
                await self._failed()
            else:
                self.breaker.success()
                metrics.child(metrics.BREAKER_OPEN, self.name).set(0)
            remaining = resp.headers.get("ratelimit-remaining")
            if remaining is not None:
                self.ratelimit_remaining = remaining
                with contextlib.suppress(ValueError):
                    metrics.child(metrics.RATELIMIT_REMAINING, self.name).set(
                        int(remaining.split(";")[0]))
            yield resp
        except (TimeoutError, aiohttp.ClientError) as exc:  # reading the body failed
            raise self._unavailable(method, url, exc, started, None) from None
        finally:
            resp.release()

    def _unavailable(self, method: str, url: URL, exc: BaseException, started: float,
                     header_timeout: float | None) -> Unavailable:
        """Count and log a request that got no (complete) answer, saying what happened
        (also in the access line's notes); the error to raise (its class name only: the
        message may name internal hosts and addresses)."""
        metrics.child(metrics.UPSTREAM_ERRORS, self.name, type(exc).__name__).inc()
        what = describe_failure(exc, self.timeout, header_timeout)
        note_upstream(None, time.monotonic() - started, what)
        log.warning("upstream %s: %s %s%s failed: %s", self.name, method, url.host, url.path, what)
        return Unavailable(f"upstream {self.name} failed: {type(exc).__name__}")

    async def _failed(self) -> None:
        self.breaker.failure()
        is_open = self.breaker.state is BreakerState.OPEN
        metrics.child(metrics.BREAKER_OPEN, self.name).set(1 if is_open else 0)
        if is_open and self._shared_breaker is not None:
            await self._shared_breaker.set(self.name, "open", ttl=self.breaker.cooldown)

    async def _send_authorized(
        self, method: str, url: URL, headers: dict[str, str], scope: str
    ) -> aiohttp.ClientResponse:
        auth = await self._authorization(scope, refresh=False)
        resp = await self._send(method, url, headers, auth)
        if resp.status != 401 or resp.url.origin() != url.origin():
            return resp  # (a redirect target's challenge is never ours to answer)
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None or (chosen.scheme == "basic" and self._basic() in (None, auth)):
            return resp  # nothing more we can try: the caller maps the 401
        if chosen.scheme == "bearer" and not self._realm_allowed(chosen.params.get("realm", "")):
            log.warning("upstream %s: ignoring a token realm that is neither https nor on its "
                        "own host", self.name)
            return resp
        resp.release()
        self._challenge = chosen
        auth = await self._authorization(scope, refresh=True)
        return await self._send(method, url, headers, auth)

    async def _send(
        self, method: str, url: URL, headers: dict[str, str], auth: str | None
    ) -> aiohttp.ClientResponse:
        """Send, following redirects by hand; credentials only go to the upstream's origin."""
        origin = url.origin()
        for _ in range(_MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth is not None and url.origin() == origin:
                h["Authorization"] = auth
            resp = await self._session.request(
                method, url, headers=h, allow_redirects=False, timeout=self.timeout,
                **self.egress.request_args(url),
            )
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            url = url.join(URL(location))
            if method not in ("GET", "HEAD"):
                method = "GET"
        raise aiohttp.TooManyRedirects(resp.request_info, resp.history)

    async def _authorization(self, scope: str, *, refresh: bool) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        key = f"token:{self.name}:{scope}"
        if not refresh:
            cached = await self._tokens.get(key)
            if cached is not None:
                return f"Bearer {cached}"
        token, _ = await self._token_flight.do(key, lambda: self._fetch_token(challenge, scope, key))
        return f"Bearer {token}" if token else None

    def _realm_allowed(self, realm: str) -> bool:
        """Whether a token realm may receive this upstream's credentials: https (the
        registry's own auth service, e.g. auth.docker.io), or the upstream's own host."""
        try:
            url = URL(realm)
        except ValueError:
            return False
        if not url.absolute or url.user is not None:
            return False
        return url.scheme == "https" or (url.scheme == self.base.scheme
                                         and url.host == self.base.host)

    def _basic(self) -> str | None:
        if self.config.username is None or self.config.password is None:
            return None
        raw = f"{self.config.username}:{self.config.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _fetch_token(self, challenge: Challenge, scope: str, key: str) -> str | None:
        realm = URL(challenge.params["realm"])
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        headers = {}
        basic = self._basic()
        if basic is not None:
            headers["Authorization"] = basic
        started = time.monotonic()
        async with self._session.get(
            realm.update_query(query), headers=headers, timeout=self.timeout,
            allow_redirects=False, **self.egress.request_args(realm),
        ) as resp:
            if resp.status != 200:
                log.warning("upstream %s: token endpoint %s answered %d", self.name,
                            realm.with_query(None), resp.status)
                return None
            body = await resp.json(content_type=None)
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            return None
        try:
            expires_in = int(body.get("expires_in", 60))
        except (TypeError, ValueError):
            expires_in = 60
        ttl = max(expires_in - 15 - int(time.monotonic() - started), 5)
        await self._tokens.set(key, token, ttl=ttl)
        return token
