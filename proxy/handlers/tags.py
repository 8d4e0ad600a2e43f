"""``/v2/<name>/tags/list`` and ``/v2/_catalog``, with ``n``/``last`` pagination."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote

from aiohttp import web

from proxy.errors import RegistryError, TagInvalid
from proxy.handlers.common import CATALOG_FILTER, ROUTER, STORE, route_of, service_for
from proxy.reference import is_tag, validate_name
from proxy.results import paginate
from proxy.routing import Route

#: Upper bound on ``n`` so one request cannot ask for an unbounded page.
MAX_PAGE = 10_000


class PaginationNumberInvalid(RegistryError):
    code, status, default_message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results"


#: ``n``: ASCII digits only (``str.isdigit`` also takes "²"), at most 9 of them.
_N_RE = re.compile(r"[0-9]{1,9}")


def _page_params(request: web.Request, last_grammar: Callable[[str], object]
                 ) -> tuple[int | None, str | None]:
    """``n`` and ``last``, validated: ``last`` must be a tag (tags/list) or a repository name
    (_catalog), since it is compared with stored names and sent upstream as a query."""
    raw_n = request.query.get("n")
    n: int | None = None
    if raw_n is not None:
        if not _N_RE.fullmatch(raw_n):
            raise PaginationNumberInvalid(f"n must be a non-negative integer, got {raw_n[:20]!r}")
        n = min(int(raw_n), MAX_PAGE)
    last = request.query.get("last") or None
    if last is not None:
        last_grammar(last)
    return n, last


def _tag(value: str) -> str:
    if not is_tag(value):
        raise TagInvalid(f"last must be a tag, got {value[:100]!r}")
    return value


def _link(path: str, n: int | None, page: list[str], extra: str = "") -> dict[str, str]:
    if not page:
        return {}
    query = f"n={n}&" if n is not None else ""
    return {"Link": f'<{path}?{query}last={quote(page[-1], safe="")}{extra}>; rel="next"'}


async def list_tags(request: web.Request) -> web.Response:
    """Tags of a repository, sorted lexically as the spec asks."""
    route = route_of(request)
    n, last = _page_params(request, _tag)
    if n == 0:
        return web.json_response({"name": request.match_info["name"], "tags": []})
    tags, more = await service_for(request, route).tags(route, n, last)
    ns = request.query.get("ns")
    extra = f"&ns={quote(ns, safe='')}" if ns else ""
    headers = _link(request.path, n, tags, extra) if more else {}
    return web.json_response({"name": request.match_info["name"], "tags": tags}, headers=headers)


def _listed(route: Route) -> bool:
    """Whether the catalog names ``route``: not a cached repository whose upstream's rules
    refuse its tag list (what is refused to every read is not advertised either)."""
    if route.hosted:
        return True
    rules = route.upstream_client.config.rules
    return rules is None or rules.decide(route.remote, None).allowed


async def catalog(request: web.Request) -> web.Response:
    """Repositories held in the store (cached ones under their local names)."""
    n, last = _page_params(request, validate_name)
    keys = await request.app[STORE].list_repositories()
    namespaces = request.app[ROUTER].names
    names = sorted({name for key in keys if (name := namespaces.name_of_key(key)) is not None})
    visible = request.get(CATALOG_FILTER)  # set by proxy.auth: what this client may pull
    if visible is not None:
        names = [name for name in names if visible(name)]
    router = request.app[ROUTER]
    names = [name for name in names if _listed(router.route(name))]
    page, more = paginate(names, n, last) if n != 0 else ([], False)
    headers = _link(request.path, n, page) if more else {}
    return web.json_response({"repositories": page}, headers=headers)
