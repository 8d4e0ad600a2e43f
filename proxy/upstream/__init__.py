"""Talking to upstream registries: auth challenges, tokens, redirects and a circuit breaker."""

from proxy.upstream.breaker import BreakerState
from proxy.upstream.client import UpstreamClient, UpstreamResponse, read_capped, upstream_error
from proxy.upstream.urls import Endpoint

__all__ = ["BreakerState", "Endpoint", "UpstreamClient", "UpstreamResponse", "read_capped", "upstream_error"]
