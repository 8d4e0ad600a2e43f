"""Talking to upstream registries: auth challenges, tokens, redirects and a circuit breaker."""

from proxy.upstream.client import UpstreamClient, UpstreamResponse, read_capped, upstream_error

__all__ = ["UpstreamClient", "UpstreamResponse", "read_capped", "upstream_error"]
