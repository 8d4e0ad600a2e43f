"""The one builder of upstream URLs: ``<base>/v2/<name>/<endpoint>[/<reference>]?<query>``.

Every part comes from the grammar of :mod:`proxy.reference` (a repository name, a tag or a
digest, an endpoint from a closed set) and the query goes through yarl's encoder, so no
client text can add a path segment, a dot segment or a query of its own to a request the
proxy sends with its upstream credentials (``tags/list?last=/../../x`` once reached the
upstream as ``GET /v2/x``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from yarl import URL

from proxy.errors import TagInvalid
from proxy.reference import TAG_RE, Digest, validate_name


class Endpoint(Enum):
    """What under ``/v2/<name>/`` the proxy asks an upstream for."""

    MANIFESTS = "manifests"
    BLOBS = "blobs"
    TAGS = "tags/list"
    REFERRERS = "referrers"  #: OCI 1.1, by digest only


def v2_url(base: URL, name: str, endpoint: Endpoint, reference: str | Digest | None = None,
           query: Mapping[str, str] | None = None) -> URL:
    """The URL of ``endpoint`` of repository ``name`` on the upstream at ``base``.

    Anything outside the grammar raises (NAME_INVALID, TAG_INVALID, DIGEST_INVALID: a 400
    if client text got this far unvalidated; ``ValueError`` for a wrong call), never sent.
    """
    validate_name(name)
    segments = [*name.split("/"), *endpoint.value.split("/")]
    if endpoint is Endpoint.TAGS:
        if reference is not None:
            raise ValueError("tags/list takes no reference")
    elif isinstance(reference, Digest) or (reference is not None and ":" in reference):
        segments.append(str(Digest.parse(str(reference))))
    elif endpoint is Endpoint.MANIFESTS and reference is not None:
        if not TAG_RE.fullmatch(reference):
            raise TagInvalid(f"invalid tag {reference[:100]!r}")
        segments.append(reference)
    else:
        raise ValueError(f"invalid reference for {endpoint.value}: {reference!r}")
    if any(s in ("", ".", "..") for s in segments):  # (the grammar allows none; belt and braces)
        raise ValueError(f"refusing a dot or empty segment in {name!r}")
    prefix = [s for s in base.path.split("/") if s]
    url = base.with_path("/" + "/".join([*prefix, "v2", *segments]), encoded=False)
    return url.with_query(dict(query)) if query else url


def same_origin(a: URL, b: URL) -> bool:
    """Whether ``a`` and ``b`` share an origin: scheme, host and *effective* port (yarl's
    ``port``: 80/443 when none is written; yarl lower-cases scheme and host), so
    ``http://h`` and ``http://h:80`` are one origin and ``http://h:5000`` and
    ``http://h:6666`` are two. yarl's ``origin()`` keeps a written default port, so it would
    call the first pair two."""
    return a.absolute and b.absolute and (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def realm_may_get_credentials(realm: URL, base: URL) -> bool:
    """Whether a token realm may receive credentials that belong to ``base``: an https realm
    (a registry's own auth service, e.g. auth.docker.io), or ``base``'s own origin, port
    included (an http realm elsewhere would get them in cleartext)."""
    return realm.absolute and (realm.scheme == "https" or same_origin(realm, base))
