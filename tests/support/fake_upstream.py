"""An in-process fake upstream registry for fault injection.

It serves manifests and blobs from dicts and can misbehave on demand: die mid-blob, lie
about a digest, be slow, answer 429/5xx, demand a bearer token, or redirect blob GETs to
another host (optionally to signed URLs that expire). Every request is recorded so tests
can count upstream traffic.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass
class FakeUpstream:
    """State and knobs of the fake; build its app with :meth:`app`."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    die_after: int | None = None          # close the connection after N body bytes
    corrupt: bool = False                 # flip a byte of every blob body
    chunk_delay: float = 0.0              # seconds between 64 KiB chunks of a blob
    manifest_delay: float = 0.0           # seconds before answering a manifest request
    chunked_blobs: bool = False           # blob bodies without Content-Length (chunked)
    stall_after: int | None = None        # after N body bytes, wait until ``resume`` is set
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    answer_gate: asyncio.Event | None = None  # blob GETs wait for it before answering
    status: int | None = None             # answer every /v2/<name>/... request with this
    require_token: str | None = None      # bearer token that must be presented
    require_basic: str | None = None      # "user:password" that must be presented (Basic)
    redirect_to: str | None = None        # base URL that blob GETs are redirected to
    sign_redirects: bool = False          # each redirect names a new ``?sig=<n>`` (signed URL)
    signed_url_uses: int | None = None    # (as the CDN) a ``sig`` answers this many GETs, then
    expired_status: int = 403             # this status (S3 and CloudFront say 403 when expired;
                                          # 0: the connection is closed unanswered)
    omit_digest_header: bool = False
    ranges: bool = False                  # announce Accept-Ranges and answer Range with 206
    ignore_ranges: bool = False           # announce Accept-Ranges, but answer Range with 200
    fail_ranges: int = 0                  # the first N ranged GETs die after half their bytes
    corrupt_ranges: bool = False          # flip a byte of every ranged answer
    token_requests: int = 0
    signatures: int = 0                   # signed redirects issued
    signature_uses: dict[str, int] = field(default_factory=dict)  # (as the CDN) GETs per sig
    sent_all: set[str] = field(default_factory=set)  # digests whose body was sent in full
    #: when set, a blob exists only in the repositories listed for it (a real registry's
    #: scoping; by default every blob is in every repository)
    blob_repos: dict[str, set[str]] | None = None
    #: serve the OCI 1.1 referrers API (else a 404, as distribution 2.8 answers); it lists
    #: the repository's manifests whose ``subject`` is the digest, plus ``extra_referrers``
    referrers_api: bool = False
    extra_referrers: list[dict[str, object]] = field(default_factory=list)

    # -- content -----------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        d = digest_of(data)
        self.blobs[d] = data
        return d

    def add_image(self, repo: str, tag: str, layers: list[bytes],
                  media_type: str = "application/vnd.oci.image.manifest.v1+json", *,
                  size_error: int = 0) -> str:
        """Store config + layers + manifest under repo:tag; returns the manifest digest.
        ``size_error``: added to each layer descriptor's size (a manifest that lies)."""
        layer_descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": self.add_blob(data), "size": len(data) + size_error}
                       for data in layers]
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers",
                                        "diff_ids": [d["digest"] for d in layer_descs]}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": media_type,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.add_blob(config), "size": len(config)},
            "layers": layer_descs,
        }).encode()
        return self.add_manifest(repo, tag, manifest, media_type)

    def add_manifest(self, repo: str, tag: str | None, data: bytes, media_type: str) -> str:
        d = digest_of(data)
        self.manifests[(repo, d)] = (data, media_type)
        if tag is not None:
            self.manifests[(repo, tag)] = (data, media_type)
        return d

    def count(self, method: str, fragment: str) -> int:
        """How many recorded requests had this method and a path containing ``fragment``."""
        return sum(1 for r in self.requests if r.method == method and fragment in r.path)

    def blob_ranges(self, digest: str) -> list[str]:
        """The Range headers of the GETs of ``digest`` in order (``""``: a full GET), to
        tell a fill's parts and a cold range's own GET apart."""
        return [r.headers.get("Range", "") for r in self.requests
                if r.method == "GET" and digest in r.path]

    # -- HTTP --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        app.router.add_route("*", "/v2/", self._ping)
        app.router.add_route("*", "/v2/{name:.+?}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{name:.+?}/blobs/{digest}", self._blob)
        app.router.add_route("*", "/v2/{name:.+?}/tags/list", self._tags)
        app.router.add_route("GET", "/v2/{name:.+?}/referrers/{digest}", self._referrers)
        app.router.add_route("*", "/cdn/{digest}", self._cdn)
        app.middlewares.append(self._record)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.requests.append(Recorded(request.method, request.path, request.query_string,
                                      dict(request.headers)))
        if request.path.startswith("/v2/") and request.path != "/v2/" and self.status:
            return web.json_response({"errors": [{"code": "X", "message": "injected"}]},
                                     status=self.status, headers={"Retry-After": "7"})
        if self.require_basic and request.path.startswith("/v2"):
            expected = "Basic " + base64.b64encode(self.require_basic.encode()).decode()
            if request.headers.get("Authorization") != expected:
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "basic"}]}, status=401,
                    headers={"WWW-Authenticate": 'Basic realm="fake"'})
        authorized = request.headers.get("Authorization") == f"Bearer {self.require_token}"
        if self.require_token and request.path.startswith("/v2") and not authorized:
            realm = f"http://{request.host}/token"
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token"}]}, status=401,
                headers={"WWW-Authenticate":
                         f'Bearer realm="{realm}",service="fake",scope="repository:x:pull"'})
        return await handler(request)

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        return web.json_response({"token": self.require_token, "expires_in": 300})

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        if self.manifest_delay:
            await asyncio.sleep(self.manifest_delay)
        item = self.manifests.get((request.match_info["name"], request.match_info["ref"]))
        if item is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "x"}]},
                                     status=404)
        data, media_type = item
        headers = {"Content-Type": media_type}
        if not self.omit_digest_header:
            headers["Docker-Content-Digest"] = digest_of(data)
        if request.method == "HEAD":
            resp = web.StreamResponse(headers=headers)
            resp.content_length = len(data)
            return resp
        return web.Response(body=data, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        if not self.referrers_api:
            return web.Response(status=404, text="404 page not found")
        name, subject = request.match_info["name"], request.match_info["digest"]
        listed: list[dict[str, object]] = []
        for (repo, ref), (data, media_type) in self.manifests.items():
            if repo != name or not ref.startswith("sha256:"):
                continue
            doc = json.loads(data)
            if (doc.get("subject") or {}).get("digest") == subject:
                listed.append({"mediaType": media_type, "digest": ref, "size": len(data),
                               "artifactType": doc.get("artifactType", "")})
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": listed + self.extra_referrers}
        return web.json_response(index, content_type="application/vnd.oci.image.index.v1+json")

    async def _tags(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tags = sorted(ref for (repo, ref) in self.manifests if repo == name and ":" not in ref)
        return web.json_response({"name": name, "tags": tags})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = self.blobs.get(digest)
        if self.blob_repos is not None and request.match_info["name"] not in self.blob_repos.get(
                digest, ()):
            data = None
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "x"}]},
                                     status=404)
        if self.answer_gate is not None and request.method == "GET":
            await self.answer_gate.wait()
        if self.redirect_to and request.method == "GET":
            signed = ""
            if self.sign_redirects:
                self.signatures += 1
                signed = f"?sig={self.signatures}"
            raise web.HTTPTemporaryRedirect(f"{self.redirect_to}/cdn/{digest}{signed}")
        return await self._send_blob(request, data)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            raise web.HTTPNotFound()
        if self.signed_url_uses is not None:  # a signed URL that expires after a few GETs
            sig = request.query.get("sig", "")
            self.signature_uses[sig] = self.signature_uses.get(sig, 0) + 1
            if not sig or self.signature_uses[sig] > self.signed_url_uses:
                if self.expired_status == 0:
                    assert request.transport is not None
                    request.transport.close()
                return web.Response(status=self.expired_status or 500, text="Request has expired")
        return await self._send_blob(request, data)

    async def _send_blob(self, request: web.Request, data: bytes) -> web.StreamResponse:
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"Content-Type": "application/octet-stream"}
        if self.ranges or self.ignore_ranges:
            headers["Accept-Ranges"] = "bytes"
        wanted = request.headers.get("Range")
        if wanted and self.ranges and request.method == "GET":
            return await self._send_range(request, data, wanted, headers)
        resp = web.StreamResponse(headers=headers)
        if self.chunked_blobs and request.method == "GET":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(data)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        sent = 0
        for i in range(0, len(data), 65536):
            chunk = data[i:i + 65536]
            if self.die_after is not None and sent + len(chunk) > self.die_after:
                await resp.write(chunk[: self.die_after - sent])
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(chunk)
            sent += len(chunk)
            if sent == self.stall_after:
                await self.resume.wait()
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await resp.write_eof()
        self.sent_all.add(digest_of(data))
        return resp

    async def _send_range(self, request: web.Request, data: bytes, wanted: str,
                          headers: dict[str, str]) -> web.StreamResponse:
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) + 1, len(data)) if last else len(data)
        body = data[start:end]
        if self.corrupt_ranges:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        failing = self.fail_ranges > 0
        self.fail_ranges -= 1 if failing else 0
        resp = web.StreamResponse(status=206, headers={
            **headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
        resp.content_length = len(body)
        await resp.prepare(request)
        cut = len(body) // 2 if failing else len(body)
        for i in range(0, cut, 65536):
            await resp.write(body[i:min(i + 65536, cut)])
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        if failing:
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp
