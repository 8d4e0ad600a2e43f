"""HTTP client for one upstream registry.

It owns what is specific to talking upstream: the token flow (401 challenge -> token
endpoint -> token cached per scope), Basic credentials, redirects to blob CDNs (followed by
hand so that ``Authorization`` never leaves the upstream's origin), timeouts, the circuit
breakers and the caps. Callers get a plain response, or :class:`~proxy.errors.Unavailable` fast.

An upstream may have several URLs (a regional mirror, then the origin), tried in order:
each is an :class:`_Origin` with its own breaker, credentials, challenge and tokens, so
nothing one URL's origin was given ever goes to another's. What any of them serves is
verified by digest by the caller, as always.
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
from proxy.config import UpstreamConfig, UpstreamURL
from proxy.errors import BadGateway, RegistryError, TooManyRequests, Unavailable
from proxy.policy.limits import ByteBucket, RequestLimiter, UpstreamBusy
from proxy.redact import redact_url
from proxy.reference import Digest
from proxy.requestnotes import note_upstream
from proxy.sharedcache import SharedCache
from proxy.singleflight import SingleFlight
from proxy.upstream.auth import Challenge, parse_challenges
from proxy.upstream.breaker import BreakerState, CircuitBreaker
from proxy.upstream.egress import Egress
from proxy.upstream.urls import Endpoint, realm_may_get_credentials, same_origin, v2_url

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


_STATE_ORDER = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class _Origin:
    """One URL of an upstream: the credentials, challenge, tokens and breaker that belong
    to it alone."""

    def __init__(self, name: str, index: int, entry: UpstreamURL, breaker: CircuitBreaker) -> None:
        self.base = URL(entry.url)
        self.shown = redact_url(entry.url)  #: for logs, status and metric labels
        self.username = entry.username
        self.password = entry.password
        self.breaker = breaker
        #: its key in the shared (replica) breaker cache and in the token cache: the first
        #: URL keeps the upstream's name, so a one-URL upstream's keys are what they were
        self.key = name if index == 0 else f"{name}#{index}"
        self.challenge: Challenge | None = None


class UpstreamClient:
    """One configured upstream: ``request()`` handles auth, redirects, failures and caps."""

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
        self._session = session
        self._tokens = token_cache
        #: Shared with other replicas (Redis): an open circuit there makes us fail fast too.
        self._shared_breaker = breaker_cache
        self._token_flight: SingleFlight[str | None] = SingleFlight()
        entries = config.urls
        #: ``breaker_file``: one breaker for every worker of the host (see the breaker); a
        #: URL with another after it opens on its first failure, so an outage of a mirror
        #: costs one timeout, then requests go straight to the next URL
        self.origins = [
            _Origin(config.name, i, entry, CircuitBreaker(
                config.breaker_threshold if i == len(entries) - 1 else 1,
                config.breaker_cooldown,
                path=(breaker_file if breaker_file is None or i == 0
                      else breaker_file.with_name(f"{breaker_file.name}.{i}")),
                name=config.name if len(entries) == 1 else f"{config.name} ({redact_url(entry.url)})"))
            for i, entry in enumerate(entries)]
        caps = config.limits
        #: the concurrency and rate caps (``None``: none set), shared by the upstream's URLs
        self.limiter = (RequestLimiter(config.name, caps,
                                       on_wait=self._waited)
                        if caps.max_concurrent or caps.rate else None)
        #: the fills' bandwidth cap (``None``: none)
        self.bandwidth = ByteBucket(caps.bandwidth) if caps.bandwidth else None
        #: The last token fetched: (when, until when, its scope), epoch seconds (the console).
        self._last_token: tuple[float, float, str] | None = None
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

    @property
    def base(self) -> URL:
        """The first URL (``url``; ``urls`` tried after it)."""
        return self.origins[0].base

    @property
    def breaker(self) -> CircuitBreaker:
        """The breaker that stands for the whole upstream: its most available URL's, so
        the upstream is "open" (fails fast, serves stale) only when every URL is."""
        return min((o.breaker for o in self.origins), key=lambda b: _STATE_ORDER[b.state])

    def url_states(self) -> list[tuple[str, BreakerState]]:
        """Each URL (credentials redacted) and its breaker's state, in the order tried."""
        return [(o.shown, o.breaker.state) for o in self.origins]

    async def read_chunk(self, resp: UpstreamResponse) -> tuple[bytes, bool]:
        """The next chunk of a fill's body (``readchunk``), within the bandwidth cap."""
        chunk, end_of_http_chunk = await resp.content.readchunk()
        if self.bandwidth is not None and chunk:
            await self.bandwidth.take(len(chunk))
        return chunk, end_of_http_chunk

    async def read_any(self, resp: UpstreamResponse) -> bytes:
        """What of a fill's body has arrived (``readany``), within the bandwidth cap."""
        chunk = await resp.content.readany()
        if self.bandwidth is not None and chunk:
            await self.bandwidth.take(len(chunk))
        return chunk

    def remote_name(self, name: str) -> str:
        """The repository name on this upstream (Docker Hub puts official images in library/)."""
        if self.config.library_prefix and "/" not in name:
            return f"library/{name}"
        return name

    @asynccontextmanager
    async def request(
        self, method: str, repo: str, endpoint: Endpoint, reference: str | Digest | None = None,
        *, query: Mapping[str, str] | None = None, headers: dict[str, str] | None = None,
        slot_held: bool = False,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send ``METHOD /v2/<repo>/<endpoint>[/<reference>]`` upstream (the URL comes from
        :func:`~proxy.upstream.urls.v2_url`) and yield the final response.

        Raises :class:`Unavailable` when the upstream cannot be reached, times out, or the
        breaker is open. Any HTTP status is yielded; 5xx count as breaker failures. Only
        blob GETs may wait ``read_timeout`` for the response headers; everything else
        (manifests, tags, HEADs: small answers a hung upstream must not hold up) gets
        ``header_timeout``. What the caller's block raises is its own: a full disk while
        the body is stored is no upstream failure. ``slot_held``: the caller holds a slot
        under the caps for this request (:meth:`acquire_slot`, :meth:`try_acquire_slots`)
        and gives it back itself; else the request takes one and gives it back.
        """
        if all(o.breaker.state is BreakerState.OPEN for o in self.origins):
            metrics.child(metrics.UPSTREAM_ERRORS, self.name, "breaker_open").inc()
            raise Unavailable(f"upstream {self.name} is unavailable (circuit open)")
        if not slot_held:
            await self.acquire_slot()  # (UpstreamBusy: our cap, no failure of the upstream)
        try:
            resp, url, started = await self._first_answer(
                method, repo, endpoint, reference, query, dict(headers or {}))
            try:
                yield resp
            except (TimeoutError, aiohttp.ClientError) as exc:  # reading the body failed
                raise self._unavailable(method, url, exc, started, None) from None
            finally:
                resp.release()
        finally:
            if not slot_held:
                self.release_slot()

    def redirect_target(self, resp: UpstreamResponse) -> URL | None:
        """Where a response of :meth:`request` came from when the upstream redirected it
        off its own origins (a blob CDN's signed URL), else ``None``: the URL that
        :meth:`request_redirected` may ask again, taken only from the upstream's redirect."""
        url = resp.url
        if not url.absolute or any(same_origin(url, o.base) for o in self.origins):
            return None
        return url

    @asynccontextmanager
    async def request_redirected(self, url: URL, headers: dict[str, str] | None = None, *,
                                 slot_held: bool = False) -> AsyncIterator[UpstreamResponse]:
        """GET ``url`` (a :meth:`redirect_target`) again, e.g. with another ``Range``,
        instead of asking the registry for a new redirect: one WAN round trip less.

        It is sent as following the redirect sends it: no credentials (``url`` is not the
        upstream's origin), further redirects followed the same way, and through the same
        egress, caps, timeouts and request metrics. It is not the registry, so its
        answers and failures do not move the breakers; any status is yielded (a signed
        URL that expired answers 403: the caller asks the registry again). Raises
        :class:`Unavailable` when there is no answer, or reading the body fails.
        ``slot_held`` as for :meth:`request`.
        """
        if not slot_held:
            await self.acquire_slot()
        try:
            started = time.monotonic()
            try:
                resp = await self._send("GET", url, dict(headers or {}), None)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise self._unavailable("GET", url, exc, started, None) from None
            self._count("GET", resp, started)
            try:
                yield resp
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise self._unavailable("GET", url, exc, started, None) from None
            finally:
                resp.release()
        finally:
            if not slot_held:
                self.release_slot()

    def _waited(self, seconds: float) -> None:
        metrics.child(metrics.UPSTREAM_QUEUE_WAIT, self.name).observe(seconds)

    async def acquire_slot(self) -> None:
        """Wait for a slot under the caps (none set: at once); counted as queued meanwhile.
        Give it back with :meth:`release_slot`."""
        if self.limiter is None:
            return
        queued = metrics.child(metrics.UPSTREAM_QUEUE, self.name)
        queued.inc()
        try:
            await self.limiter.acquire()
        except UpstreamBusy as exc:
            metrics.child(metrics.UPSTREAM_BUSY, self.name).inc()
            log.warning("upstream %s: %s", self.name, exc.message)
            raise
        finally:
            queued.dec()

    def try_acquire_slots(self, n: int) -> int:
        """Up to ``n`` slots free right now, never waiting (no caps: all ``n``); see
        :meth:`RequestLimiter.try_acquire`. Give each back with :meth:`release_slot`."""
        return n if self.limiter is None else self.limiter.try_acquire(n)

    def release_slot(self) -> None:
        """Give back a slot of :meth:`acquire_slot` or :meth:`try_acquire_slots`."""
        if self.limiter is not None:
            self.limiter.release()

    async def _first_answer(
        self, method: str, repo: str, endpoint: Endpoint, reference: str | Digest | None,
        query: Mapping[str, str] | None, headers: dict[str, str],
    ) -> tuple[UpstreamResponse, URL, float]:
        """The answer of the first URL that gives one, in order, skipping those whose
        circuit is open; a URL with another after it is passed over on no answer, a 5xx
        or a 429. The last URL's answer is returned whatever its status."""
        scope = f"repository:{repo}:pull"
        first_byte = (None if method == "GET" and endpoint is Endpoint.BLOBS
                      else self.config.header_timeout or None)
        error = Unavailable(f"upstream {self.name} is unavailable (circuit open)")
        for origin in self.origins:
            last = origin is self.origins[-1]
            if not origin.breaker.allow():
                metrics.child(metrics.UPSTREAM_ERRORS, self.name, "breaker_open").inc()
                continue
            if (self._shared_breaker is not None and origin.breaker.state is BreakerState.CLOSED
                    and await self._shared_breaker.get(origin.key) is not None):
                metrics.child(metrics.UPSTREAM_ERRORS, self.name, "breaker_open").inc()
                error = Unavailable(f"upstream {self.name} is unavailable (circuit open on a replica)")
                continue
            url = v2_url(origin.base, repo, endpoint, reference, query)
            started = time.monotonic()
            try:
                async with asyncio.timeout(first_byte):
                    resp = await self._send_authorized(origin, method, url, headers, scope)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = self._unavailable(method, url, exc, started, first_byte)  # (logged first)
                await self._failed(origin)
                continue
            except BaseException:
                origin.breaker.abandon()  # (cancelled: a probe without an answer)
                raise
            await self._answered(origin, method, resp, started)
            if last or (resp.status < 500 and resp.status != 429):
                return resp, url, started
            resp.release()
            error = Unavailable(f"upstream {self.name} answered {resp.status}")
        raise error

    async def _answered(self, origin: _Origin, method: str, resp: UpstreamResponse,
                        started: float) -> None:
        """Count, log and note an answer; 5xx are breaker failures, the rest successes."""
        self._count(method, resp, started)
        if resp.status >= 500:
            await self._failed(origin)
        else:
            origin.breaker.success()  # (closed now: so is the upstream, which has this URL;
            # set without reading the breakers, a stat of their files each, per request)
            metrics.child(metrics.URL_BREAKER_OPEN, self.name, origin.shown).set(0)
            metrics.child(metrics.BREAKER_OPEN, self.name).set(0)
        remaining = resp.headers.get("ratelimit-remaining")
        if remaining is not None:
            self.ratelimit_remaining = remaining
            with contextlib.suppress(ValueError):
                metrics.child(metrics.RATELIMIT_REMAINING, self.name).set(
                    int(remaining.split(";")[0]))
            if self.limiter is not None:  # near zero: slow down (a rate cap halves)
                self.limiter.observe_ratelimit(remaining, resp.headers.get("ratelimit-limit"))

    def _count(self, method: str, resp: UpstreamResponse, started: float) -> None:
        """Count and log an answer (any URL's: the registry's or a redirect target's); the
        breakers and the rate-limit headers are :meth:`_answered`'s."""
        latency = time.monotonic() - started
        metrics.child(metrics.UPSTREAM_LATENCY, self.name).observe(latency)
        metrics.child(metrics.UPSTREAM_REQUESTS, self.name, method, str(resp.status)).inc()
        note_upstream(resp.status, latency)  # (for the access line)
        if resp.status >= 500 or resp.status == 429:
            log.warning("upstream %s: %s %s%s answered %d%s", self.name, method, resp.url.host,
                        resp.url.path, resp.status, _ratelimit(resp))

    def _breaker_metrics(self, origin: _Origin) -> None:
        is_open = origin.breaker.state is BreakerState.OPEN
        metrics.child(metrics.URL_BREAKER_OPEN, self.name, origin.shown).set(1 if is_open else 0)
        metrics.child(metrics.BREAKER_OPEN, self.name).set(
            1 if self.breaker.state is BreakerState.OPEN else 0)

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

    async def _failed(self, origin: _Origin) -> None:
        origin.breaker.failure()
        self._breaker_metrics(origin)
        if origin.breaker.state is BreakerState.OPEN and self._shared_breaker is not None:
            await self._shared_breaker.set(origin.key, "open", ttl=origin.breaker.cooldown)

    async def _send_authorized(
        self, origin: _Origin, method: str, url: URL, headers: dict[str, str], scope: str
    ) -> aiohttp.ClientResponse:
        auth = await self._authorization(origin, scope, refresh=False)
        resp = await self._send(method, url, headers, auth)
        if resp.status != 401 or not same_origin(resp.url, url):
            return resp  # (a redirect target's challenge is never ours to answer)
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None or (chosen.scheme == "basic" and self._basic(origin) in (None, auth)):
            return resp  # nothing more we can try: the caller maps the 401
        if chosen.scheme == "bearer" and not self._realm_allowed(origin,
                                                                 chosen.params.get("realm", "")):
            log.warning("upstream %s: ignoring a token realm that is neither https nor on its "
                        "own origin", self.name)
            return resp
        resp.release()
        origin.challenge = chosen
        auth = await self._authorization(origin, scope, refresh=True)
        return await self._send(method, url, headers, auth)

    async def _send(
        self, method: str, url: URL, headers: dict[str, str], auth: str | None
    ) -> aiohttp.ClientResponse:
        """Send, following redirects by hand; credentials only go to the upstream's origin
        (a CDN on another port of the same host is another origin and gets none)."""
        first = url
        for _ in range(_MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth is not None and same_origin(url, first):
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

    @property
    def auth_status(self) -> dict[str, object]:
        """This process's view of the upstream's auth, for the console (never a token or
        a credential): the scheme of the first challenge its URLs sent, and the last token
        fetched, with when it stops being used (tokens are kept 15 s less than granted)."""
        last = self._last_token
        challenge = next((o.challenge for o in self.origins if o.challenge is not None), None)
        return {"scheme": None if challenge is None else challenge.scheme,
                "token_fetched_at": None if last is None else last[0],
                "token_expires_at": None if last is None else last[1],
                "token_scope": None if last is None else last[2]}

    async def _authorization(self, origin: _Origin, scope: str, *, refresh: bool) -> str | None:
        """What this URL's origin asked for (its own challenge, credentials and tokens)."""
        challenge = origin.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic(origin)
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        key = f"token:{origin.key}:{scope}"
        if not refresh:
            cached = await self._tokens.get(key)
            if cached is not None:
                return f"Bearer {cached}"
        token, _ = await self._token_flight.do(key, lambda: self._fetch_token(origin, challenge, scope, key))
        return f"Bearer {token}" if token else None

    def _realm_allowed(self, origin: _Origin, realm: str) -> bool:
        """Whether a token realm may receive this URL's credentials: https (the registry's
        own auth service, e.g. auth.docker.io), or this URL's own origin, port included (an
        http realm on the same host but another port is another service, and would get
        the credentials in cleartext)."""
        try:
            url = URL(realm)
        except ValueError:
            return False
        if not url.absolute or url.user is not None:
            return False
        return realm_may_get_credentials(url, origin.base)

    @staticmethod
    def _basic(origin: _Origin) -> str | None:
        if origin.username is None or origin.password is None:
            return None
        raw = f"{origin.username}:{origin.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _fetch_token(self, origin: _Origin, challenge: Challenge, scope: str,
                           key: str) -> str | None:
        realm = URL(challenge.params["realm"])
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        headers = {}
        basic = self._basic(origin)
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
        self._last_token = (time.time(), time.time() + ttl, scope)
        return token
