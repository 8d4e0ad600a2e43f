"""Which forward (egress) proxy an upstream request goes through.

An upstream's ``proxy`` setting applies to every request made for it (registry, token
realm, CDN redirect targets); ``""`` means direct. Without the setting, the environment
decides, as curl and Go do: ``https_proxy``/``HTTPS_PROXY`` for https URLs,
``http_proxy``/``HTTP_PROXY`` for http ones (lower case first; ``ALL_PROXY`` for both),
except for hosts in ``NO_PROXY``/``no_proxy``: ``*`` (everything), a domain (``corp.example``
or ``.corp.example``: it and its subdomains), ``host:port``, an IP address or a CIDR network.
The environment is read once, at start-up (the client does not trust the environment for
anything else: no ``.netrc``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from aiohttp import BasicAuth
from yarl import URL


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = (env.get(name.lower()) or env.get(name.upper()) or "").strip()
    return value or None


class Egress:
    """The forward proxy for each URL: ``configured`` (an upstream's ``proxy`` setting:
    ``None`` = from ``env``, ``""`` = direct, else that proxy for everything)."""

    def __init__(self, configured: str | None, env: Mapping[str, str]) -> None:
        self._configured = configured
        fallback = _env(env, "ALL_PROXY")
        self._proxies = {"https": _env(env, "HTTPS_PROXY") or fallback,
                         "http": _env(env, "HTTP_PROXY") or fallback}
        raw = _env(env, "NO_PROXY") or ""
        self._no_proxy = [entry.strip().lower() for entry in raw.split(",") if entry.strip()]

    def for_url(self, url: URL) -> str | None:
        """The proxy URL to send a request for ``url`` through; ``None``: direct."""
        if self._configured is not None:
            return self._configured or None
        proxy = self._proxies.get(url.scheme)
        if proxy is None or self._bypassed(url):
            return None
        return proxy

    def request_args(self, url: URL) -> dict[str, Any]:
        """aiohttp's ``proxy``/``proxy_auth`` for a request to ``url`` (credentials in the
        proxy's URL, ``http://user:pw@proxy:3128``, become its ``Proxy-Authorization``)."""
        chosen = self.for_url(url)
        if chosen is None:
            return {}
        proxy = URL(chosen)
        if proxy.user is None:
            return {"proxy": proxy}
        return {"proxy": proxy.with_user(None), "proxy_auth": BasicAuth(proxy.user, proxy.password or "")}

    def _bypassed(self, url: URL) -> bool:
        host = (url.host or "").lower().strip("[]")
        port = url.port
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        for entry in self._no_proxy:
            if entry == "*":
                return True
            if "/" in entry and address is not None:
                try:
                    if address in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            name, _, entry_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
            if entry_port and str(port) != entry_port:
                continue
            name = name.strip("[]").lstrip(".")
            if host == name or host.endswith("." + name):
                return True
        return False


def _has_port(entry: str) -> bool:
    """``host:port`` or ``[v6]:port`` (a bare IPv6 address has colons but no port)."""
    if entry.startswith("["):
        return "]:" in entry
    return entry.count(":") == 1
