"""``/v2/<name>/blobs/uploads/``: monolithic, chunked and resumable blob uploads, and
cross-repository mounts (hosted repositories only)."""

from __future__ import annotations

import functools

from aiohttp import web

from proxy.errors import BlobUploadInvalid, RegistryError
from proxy.handlers.cluster import forward_upload
from proxy.handlers.common import CLUSTER, ROUTER, USER, Handler, hosted_only, route_of
from proxy.hosted.service import upload_headers
from proxy.reference import Digest, validate_name


def _created(name: str, digest: Digest) -> web.Response:
    """201 for a blob that is now in repository ``name``."""
    return web.Response(status=201, headers={
        "Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": str(digest)})


def _owner(request: web.Request) -> str:
    """Whom a new upload counts against: the signed-in user, else the client's address."""
    user = request.get(USER)
    return f"user {user}" if user is not None else f"address {request.remote}"


def _digest_param(request: web.Request) -> Digest | None:
    value = request.query.get("digest")
    return Digest.parse(value) if value is not None else None


async def start_upload(request: web.Request) -> web.Response:
    """POST: a mount (201), a whole blob with ``?digest=`` (201), or a new upload (202)."""
    route = route_of(request)
    service = hosted_only(request, route)
    mount = request.query.get("mount")
    if mount is not None:
        digest = Digest.parse(mount)
        source = None
        source_name = request.query.get("from")
        if source_name is not None:
            try:
                source = request.app[ROUTER].route(validate_name(source_name))
            except RegistryError:
                source = None
        if await service.mount(route, digest, source):
            return _created(route.name, digest)
    whole = _digest_param(request)
    if whole is not None:
        await service.monolithic(route, whole, request.content.readany, _owner(request))
        return _created(route.name, whole)
    upload = await service.start_upload(route, _owner(request))
    # so that other replicas can forward this upload's requests here
    await request.app[CLUSTER].register_upload(upload.uuid, service.upload_max_age)
    return web.Response(status=202, headers=upload_headers(route.name, upload))


def _elsewhere(handler: Handler) -> Handler:
    """Requests for an upload this replica does not hold go to the replica that does."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        route = route_of(request)
        uid = request.match_info["uuid"]
        if not hosted_only(request, route).has_upload(uid):
            forwarded = await forward_upload(request, uid)
            if forwarded is not None:
                return forwarded
        return await handler(request)

    return wrapper


@_elsewhere
async def patch_upload(request: web.Request) -> web.StreamResponse:
    """PATCH: append a chunk (streamed); 416 when it does not start where the upload ends."""
    route = route_of(request)
    service = hosted_only(request, route)
    upload = await service.append(route, request.match_info["uuid"], request.content.readany,
                                  request.headers.get("Content-Range"))
    return web.Response(status=202, headers=upload_headers(route.name, upload))


@_elsewhere
async def finish_upload(request: web.Request) -> web.StreamResponse:
    """PUT ``?digest=``: the last chunk (optional), then verify and publish."""
    route = route_of(request)
    service = hosted_only(request, route)
    digest = _digest_param(request)
    if digest is None:
        raise BlobUploadInvalid("the digest query parameter is required to complete an upload")
    await service.finish(route, request.match_info["uuid"], digest, request.content.readany)
    return _created(route.name, digest)


@_elsewhere
async def upload_status(request: web.Request) -> web.StreamResponse:
    """GET: where the upload stands (204 with ``Range``), so a client can resume."""
    route = route_of(request)
    upload = hosted_only(request, route).upload(route, request.match_info["uuid"])
    return web.Response(status=204, headers=upload_headers(route.name, upload))


@_elsewhere
async def cancel_upload(request: web.Request) -> web.StreamResponse:
    route = route_of(request)
    hosted_only(request, route).cancel_upload(route, request.match_info["uuid"])
    return web.Response(status=204)
