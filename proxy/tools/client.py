"""A small Docker Registry V2 / OCI distribution client on aiohttp, for the ``regproxy`` tools.

It speaks to a running proxy (or any registry): manifests with full ``Accept`` negotiation,
streamed blob downloads and uploads (never a whole blob in memory), Basic or bearer-token
authentication on a 401 challenge, and image references mapped onto the proxy's paths.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from proxy.config import DOCKER_HUB, DOCKER_HUB_ALIASES
from proxy.errors import RegistryError
from proxy.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEXES,
    OCI_INDEX,
    OCI_MANIFEST,
    sniff_media_type,
)
from proxy.redact import redact_url
from proxy.reference import NAME_RE, SUPPORTED_ALGORITHMS, TAG_RE, Digest
from proxy.upstream.auth import parse_challenges
from proxy.upstream.urls import realm_may_get_credentials

#: Read and write blobs in pieces of this size.
CHUNK = 1 << 20
DEFAULT_PROXY = "http://127.0.0.1:5000"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
#: Manifests bigger than this are refused (the proxy's own default cap is 4 MiB).
MAX_MANIFEST = 16 << 20

T = TypeVar("T")


class ToolError(Exception):
    """A problem worth one line to the user; ``retryable`` when trying again may help."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


_LOGIN_HINT = "the registry requires a login: pass --username and --password-stdin"


class RegistryHTTPError(ToolError):
    """The registry answered with an unexpected status."""

    def __init__(self, what: str, status: int, body: str) -> None:
        detail = _oci_message(body)
        if status == 401:
            detail = (f"not authorized{' (' + detail + ')' if detail else ''}: log in with --username "
                      "and --password-stdin, or check the user's rights")
        super().__init__(f"{what}: HTTP {status}{': ' + detail if detail else ''}",
                         retryable=status in (401, 429) or status >= 500)  # 401: token expired
        self.status = status


def _oci_message(body: str) -> str:
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return body.strip()[:200]


def check_digest(value: Any) -> str:
    """A ``sha256:<hex>`` (or sha512) digest string, else :class:`ToolError`."""
    if isinstance(value, str):
        try:
            return str(Digest.parse(value))
        except RegistryError:
            pass
    raise ToolError(f"invalid digest {str(value)[:100]!r}")


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return str(Digest.of(data, algorithm))


# ---------------------------------------------------------------------------
# Image references
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """``alpine:3.20``, ``ghcr.io/org/img:tag``, ``name@sha256:...`` and how the proxy sees them."""

    original: str
    domain: str | None  #: explicit registry host (``docker.io`` for every Docker Hub alias)
    path: str  #: repository path below the host, as written
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        raw = text.strip()
        rest, digest = raw, None
        if "@" in raw:
            rest, digest = raw.split("@", 1)
            try:
                check_digest(digest)
            except ToolError:
                raise ToolError(f"{text!r}: invalid digest {digest[:100]!r}") from None
        tag = None
        colon, slash = rest.rfind(":"), rest.rfind("/")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1:]
            if not TAG_RE.fullmatch(tag):
                raise ToolError(f"{text!r}: invalid tag {tag!r}")
        domain = None
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            domain, rest = first.lower(), remainder
            if domain in DOCKER_HUB_ALIASES:
                domain = DOCKER_HUB
        if not rest or not NAME_RE.fullmatch(rest):
            raise ToolError(f"{text!r}: invalid repository name {rest!r} "
                            "(lower-case letters, digits, separators . _ - and /)")
        if tag is None and digest is None:
            tag = "latest"
        return cls(raw, domain, rest, tag, digest)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def proxy_name(self) -> str:
        """The repository path on the proxy: the host becomes a path prefix; an explicit
        ``docker.io`` is dropped (Docker Hub is the proxy's default upstream) with
        ``library/`` added to official images; a bare name goes to the default upstream."""
        if self.domain is None:
            return self.path
        if self.domain == DOCKER_HUB:
            return self.path if "/" in self.path else f"library/{self.path}"
        return f"{self.domain}/{self.path}"

    @property
    def familiar_name(self) -> str:
        """The short name docker prints: ``alpine``, ``org/img``, ``ghcr.io/org/img``."""
        if self.domain is None or self.domain == DOCKER_HUB:
            return self.path.removeprefix("library/")
        return f"{self.domain}/{self.path}"

    @property
    def full_name(self) -> str:
        """Fully qualified as containerd names images: ``docker.io/library/alpine``."""
        if self.domain is None or self.domain == DOCKER_HUB:
            path = self.path if "/" in self.path else f"library/{self.path}"
            return f"{DOCKER_HUB}/{path}"
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        return self.original


# ---------------------------------------------------------------------------
# Platforms and manifests
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
            raise ToolError(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT], e.g. linux/amd64)")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, plat: dict[str, Any] | None) -> bool:
        if not isinstance(plat, dict):
            return False
        if plat.get("os") != self.os or plat.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        variant = plat.get("variant") or ("v8" if self.architecture == "arm64" else None)
        return variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def platform_str(plat: dict[str, Any] | None) -> str:
    if not isinstance(plat, dict):
        return "?"
    return "/".join(str(plat[k]) for k in ("os", "architecture", "variant") if plat.get(k))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] | None = None

    @classmethod
    def from_dict(cls, value: Any, where: str) -> Descriptor:
        if not isinstance(value, dict):
            raise ToolError(f"{where}: a descriptor must be an object")
        size = value.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ToolError(f"{where}: invalid size {size!r}")
        try:
            digest = check_digest(value.get("digest"))
        except ToolError as exc:
            raise ToolError(f"{where}: {exc}") from None
        annotations = value.get("annotations")
        return cls(str(value.get("mediaType") or ""), digest, size,
                   value.get("platform") if isinstance(value.get("platform"), dict) else None,
                   annotations if isinstance(annotations, dict) else None)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]


@dataclass(frozen=True)
class Manifest:
    """A manifest as fetched: exact bytes, media type and digest."""

    body: bytes
    media_type: str
    digest: str
    doc: dict[str, Any] = field(repr=False, hash=False, compare=False, default_factory=dict)

    @classmethod
    def from_bytes(cls, body: bytes, media_type: str | None, digest: str | None = None) -> Manifest:
        try:
            doc = json.loads(body)
        except ValueError:
            raise ToolError("a manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ToolError("a manifest is not a JSON object")
        declared = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else None
        mt = declared or (media_type or "").split(";")[0].strip() or sniff_media_type(body) or ""
        if doc.get("schemaVersion") == 1:
            raise ToolError("schema 1 manifests are not supported")
        return cls(body, mt, digest or digest_of(body), doc)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEXES or ("manifests" in self.doc and "layers" not in self.doc)

    def children(self) -> list[Descriptor]:
        entries = self.doc.get("manifests")
        if not isinstance(entries, list):
            raise ToolError(f"index {self.digest} has no manifests list")
        return [Descriptor.from_dict(e, f"index {self.digest} entry {i}") for i, e in enumerate(entries)]

    @property
    def config(self) -> Descriptor:
        return Descriptor.from_dict(self.doc.get("config"), f"manifest {self.digest} config")

    @property
    def layers(self) -> list[Descriptor]:
        layers = self.doc.get("layers")
        if not isinstance(layers, list):
            raise ToolError(f"manifest {self.digest} has no layers list")
        return [Descriptor.from_dict(e, f"manifest {self.digest} layer {i}") for i, e in enumerate(layers)]

    def blobs(self) -> list[Descriptor]:
        """Config first, then layers."""
        return [self.config, *self.layers]

    def descriptor(self, platform: dict[str, Any] | None = None) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.body), platform)


def select_children(index: Manifest, platforms: list[Platform] | None) -> list[Descriptor]:
    """The entries of ``index`` for ``platforms`` (every entry for ``None``): the first match
    per wanted platform, in the order asked for."""
    children = index.children()
    if platforms is None:
        return children
    chosen: list[Descriptor] = []
    for want in platforms:
        match = next((c for c in children if want.matches(c.platform)), None)
        if match is None:
            have = ", ".join(platform_str(c.platform) for c in children) or "none"
            raise ToolError(f"no manifest for platform {want} in index {index.digest} (has: {have})")
        if match not in chosen:
            chosen.append(match)
    return chosen


# ---------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------
RETRYABLE = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE) or (isinstance(exc, ToolError) and exc.retryable)


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    retries: int = 3,
    delay: float = 0.5,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Run ``attempt``; on a retryable failure try again up to ``retries`` more times,
    backing off ``delay``, 2*``delay``, 4*``delay`` seconds."""
    for n in range(retries + 1):
        try:
            return await attempt()
        except Exception as exc:
            if n == retries or not is_retryable(exc):
                raise
            if on_retry is not None:
                on_retry(n + 1, exc)
            await asyncio.sleep(delay * (2 ** n))
    raise AssertionError("unreachable")


def image_text(name: str, reference: str) -> str:
    """``name:tag``, or ``name@sha256:...`` for a digest (a digest always holds a ``:``)."""
    return f"{name}@{reference}" if ":" in reference else f"{name}:{reference}"


def describe(exc: BaseException) -> str:
    """One line for an exception: our own messages as they are, the others with their type."""
    if isinstance(exc, ToolError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (f"{type(exc).__name__}: {exc} (a proxy with a private CA: --ca-file FILE or "
                "SSL_CERT_FILE=FILE; --insecure skips the check)")
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ProxyTLS:
    """How the tools check an ``https://`` proxy's certificate: against the system's CAs
    (OpenSSL honours ``SSL_CERT_FILE``/``SSL_CERT_DIR`` there), against one CA file (such
    as ``certs/ca.crt`` from ``regproxy certs init``), or not at all (``insecure``)."""

    ca_file: Path | None = None
    insecure: bool = False

    def context(self) -> ssl.SSLContext | bool:
        """What aiohttp's connector takes: a context, or ``False`` for no verification."""
        if self.insecure:
            return False
        if self.ca_file is None:
            return ssl.create_default_context()
        try:
            return ssl.create_default_context(cafile=str(self.ca_file))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ToolError(f"--ca-file {self.ca_file}: {reason}") from None


def _basic(username: str, password: str | None) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode()


class RegistryClient:
    """V2 API calls against one registry base URL (e.g. ``http://127.0.0.1:5000``)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, *,
                 username: str | None = None, password: str | None = None) -> None:
        url = base_url.strip().rstrip("/")
        if "://" not in url:
            url = f"http://{url}"
        self.base = URL(url)
        if self.base.scheme not in ("http", "https") or not self.base.host:
            raise ToolError(f"invalid proxy URL {redact_url(base_url)!r}")
        self.session = session
        self.username = username
        self.password = password
        self._basic = False
        self._tokens: dict[str, str] = {}

    @classmethod
    @asynccontextmanager
    async def connect(cls, base_url: str, *, username: str | None = None, password: str | None = None,
                      connections: int = 16, tls: ProxyTLS | None = None
                      ) -> AsyncIterator[RegistryClient]:
        """A client with its own session: short connect timeout, no overall deadline (blobs
        can be large), two minutes of silence at most; ``tls`` says how to check an https
        proxy's certificate."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        connector = aiohttp.TCPConnector(limit=connections, ssl=(tls or ProxyTLS()).context())
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False,
                                         auto_decompress=False) as session:
            yield cls(base_url, session, username=username, password=password)

    def url(self, path: str) -> URL:
        """``path`` (``/v2/...``, query allowed; names and digests need no escaping) on the base."""
        return URL(str(self.base).rstrip("/") + path, encoded=True)

    # -- authentication ------------------------------------------------------
    @staticmethod
    def _scope(repo: str | None, push: bool) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}" if repo else ""

    def _auth_header(self, repo: str | None, push: bool) -> str | None:
        token = self._tokens.get(self._scope(repo, push))
        if token:
            return f"Bearer {token}"
        if self._basic and self.username is not None:
            return _basic(self.username, self.password)
        return None

    async def _authenticate(self, challenge: str, repo: str | None, push: bool,
                            sent: str | None) -> None:
        """Answer a 401 challenge; ``sent`` is the Authorization the refused request carried."""
        first = next(iter(parse_challenges(challenge)), None)
        scheme, params = (first.scheme, first.params) if first is not None else ("", {})
        if scheme == "basic":
            if self.username is None:
                raise ToolError(_LOGIN_HINT)
            if sent is not None and sent.startswith("Basic "):
                raise ToolError("the registry refused the credentials (HTTP 401)")
            self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise ToolError(f"unsupported authentication challenge {challenge[:100]!r}")
        try:
            realm = URL(params["realm"])
        except ValueError:
            realm = URL()
        if not realm.absolute or realm.scheme not in ("http", "https"):
            raise ToolError(f"the registry named an invalid token realm "
                            f"{redact_url(params['realm'])[:100]!r}")
        if self.username and not realm_may_get_credentials(realm, self.base):
            raise ToolError(f"refusing to send credentials to the token realm "
                            f"{redact_url(params['realm'])[:100]!r}: it is neither https nor "
                            f"on the registry's own origin")  # (anonymous tokens: any realm)
        query = {"service": params["service"]} if "service" in params else {}
        scope = self._scope(repo, push) or params.get("scope", "")
        if scope:
            query["scope"] = scope
        headers = {"Authorization": _basic(self.username, self.password)} if self.username else {}
        async with self.session.get(realm, params=query, headers=headers,
                                    allow_redirects=False) as resp:
            if resp.status in (401, 403):
                raise ToolError(f"the token endpoint refused the credentials (HTTP {resp.status})")
            if resp.status != 200:
                raise RegistryHTTPError("token request", resp.status, await resp.text(errors="replace"))
            doc = await resp.json(content_type=None)
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ToolError("the token endpoint answered without a token")
        self._tokens[self._scope(repo, push)] = token

    @asynccontextmanager
    async def request(self, method: str, path: str | URL, *, repo: str | None = None,
                      push: bool = False, headers: dict[str, str] | None = None,
                      data: Any = None, replayable: bool = True) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request; on a 401 challenge, log in and repeat it once (when its body can be
        sent again: ``replayable``)."""
        url = path if isinstance(path, URL) else self.url(path)
        for attempt in range(2):
            hdrs = dict(headers or {})
            auth = self._auth_header(repo, push)
            if auth:
                hdrs["Authorization"] = auth
            resp = await self.session.request(method, url, headers=hdrs, data=data)
            if resp.status == 401:
                self._tokens.pop(self._scope(repo, push), None)  # expired: the next try logs in
                if attempt == 0 and replayable:
                    challenge = resp.headers.get("WWW-Authenticate", "")
                    resp.release()
                    await self._authenticate(challenge, repo, push, auth)
                    continue
            try:
                yield resp
            finally:
                resp.release()
            return

    # -- pulling -------------------------------------------------------------
    async def get_manifest(self, name: str, reference: str) -> Manifest:
        """GET a manifest; its digest is verified when asked for by digest, and checked
        against ``Docker-Content-Digest``."""
        what = f"manifest {image_text(name, reference)}"
        async with self.request("GET", f"/v2/{name}/manifests/{reference}", repo=name,
                                headers={"Accept": MANIFEST_ACCEPT}) as resp:
            if resp.status != 200:
                raise RegistryHTTPError(f"GET {what}", resp.status, await resp.text(errors="replace"))
            if (resp.content_length or 0) > MAX_MANIFEST:
                raise ToolError(f"{what}: manifest larger than {MAX_MANIFEST} bytes")
            body = await resp.read()
            header_digest = resp.headers.get("Docker-Content-Digest")
            content_type = resp.headers.get("Content-Type")
        expected = reference if ":" in reference else header_digest
        algorithm = expected.split(":", 1)[0] if expected and ":" in expected else "sha256"
        if algorithm not in SUPPORTED_ALGORITHMS:
            algorithm = "sha256"
        actual = digest_of(body, algorithm)
        if expected and actual != expected:
            raise ToolError(f"{what}: body digest {actual} does not match {expected}", retryable=True)
        return Manifest.from_bytes(body, content_type, actual)

    @asynccontextmanager
    async def blob(self, name: str, digest: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET a blob; the response is handed over unread (iterate ``resp.content``)."""
        async with self.request("GET", f"/v2/{name}/blobs/{digest}", repo=name) as resp:
            if resp.status != 200:
                raise RegistryHTTPError(f"GET blob {name}@{digest}", resp.status,
                                        await resp.text(errors="replace"))
            yield resp

    async def blob_size(self, name: str, digest: str) -> int | None:
        """HEAD a blob: its size, or ``None`` when the repository does not have it."""
        async with self.request("HEAD", f"/v2/{name}/blobs/{digest}", repo=name, push=True) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise RegistryHTTPError(f"HEAD blob {name}@{digest}", resp.status, "")
            return resp.content_length

    # -- pushing -------------------------------------------------------------
    async def start_upload(self, name: str) -> URL:
        async with self.request("POST", f"/v2/{name}/blobs/uploads/", repo=name, push=True,
                                headers={"Content-Length": "0"}) as resp:
            if resp.status != 202:
                raise RegistryHTTPError(f"start upload to {name}", resp.status,
                                        await resp.text(errors="replace"))
            location = resp.headers.get("Location")
        if not location:
            raise ToolError(f"start upload to {name}: no Location in the answer")
        return self.url("/").join(URL(location, encoded=True))

    async def upload_chunk(self, name: str, location: URL, chunks: AsyncIterator[bytes],
                           size: int) -> URL:
        """PATCH the whole body as one streamed chunk; returns the next upload location."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if size:
            headers["Content-Range"] = f"0-{size - 1}"
        async with self.request("PATCH", location, repo=name, push=True, headers=headers,
                                data=chunks, replayable=False) as resp:
            if resp.status != 202:
                raise RegistryHTTPError(f"upload to {name}", resp.status,
                                        await resp.text(errors="replace"))
            nxt = resp.headers.get("Location")
        return self.url("/").join(URL(nxt, encoded=True)) if nxt else location

    async def finish_upload(self, name: str, location: URL, digest: str) -> None:
        url = location.update_query({"digest": digest})
        async with self.request("PUT", url, repo=name, push=True,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": "0"}) as resp:
            if resp.status != 201:
                raise RegistryHTTPError(f"complete upload of {digest} to {name}", resp.status,
                                        await resp.text(errors="replace"))

    async def cancel_upload(self, name: str, location: URL) -> None:
        try:
            async with self.request("DELETE", location, repo=name, push=True):
                pass
        except RETRYABLE:
            pass

    async def put_manifest(self, name: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest; returns its digest (checked against the registry's answer)."""
        digest = digest_of(body)
        async with self.request("PUT", f"/v2/{name}/manifests/{reference}", repo=name, push=True,
                                headers={"Content-Type": media_type}, data=body) as resp:
            if resp.status != 201:
                raise RegistryHTTPError(f"PUT manifest {image_text(name, reference)}", resp.status,
                                        await resp.text(errors="replace"))
            returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise ToolError(f"PUT manifest {image_text(name, reference)}: registry reports {returned}, "
                            f"expected {digest}")
        return digest


# ---------------------------------------------------------------------------
# Resolving an image to the manifests and blobs to fetch
# ---------------------------------------------------------------------------
@dataclass
class ResolvedImage:
    """One image reference resolved through the proxy."""

    ref: ImageRef
    name: str  #: repository path on the proxy
    top: Manifest
    #: image manifests chosen (one per platform), with the platform the index gave them
    images: list[tuple[Manifest, dict[str, Any] | None]] = field(default_factory=list)

    def blobs(self) -> list[Descriptor]:
        seen: dict[str, Descriptor] = {}
        for manifest, _ in self.images:
            for desc in manifest.blobs():
                seen.setdefault(desc.digest, desc)
        return list(seen.values())


async def resolve(client: RegistryClient, ref: ImageRef, platforms: list[Platform] | None,
                  *, retries: int = 3) -> ResolvedImage:
    """Fetch ``ref``'s manifest and, for an index, the children for ``platforms`` (all of
    them for ``None``; nested indexes are followed one level)."""
    name = ref.proxy_name

    async def fetch(reference: str) -> Manifest:
        return await with_retries(lambda: client.get_manifest(name, reference), retries=retries)

    top = await fetch(ref.reference)
    result = ResolvedImage(ref, name, top)
    if not top.is_index:
        result.images.append((top, None))
        return result
    for child in select_children(top, platforms):
        manifest = await fetch(child.digest)
        if manifest.is_index:
            for grandchild in select_children(manifest, platforms):
                leaf = await fetch(grandchild.digest)
                if leaf.is_index:
                    raise ToolError(f"{ref}: indexes nested more than two levels deep")
                result.images.append((leaf, grandchild.platform))
        else:
            result.images.append((manifest, child.platform))
    return result
