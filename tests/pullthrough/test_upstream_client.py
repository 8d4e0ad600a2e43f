"""The upstream client's parts: WWW-Authenticate challenges and the circuit breaker."""

from __future__ import annotations

from proxy.upstream.auth import parse_challenges
from proxy.upstream.breaker import BreakerState, CircuitBreaker


def test_challenges():
    (c,) = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull,push"}
    (b,) = parse_challenges('Basic realm="Registry Realm"')
    assert b.scheme == "basic" and b.params["realm"] == "Registry Realm"


def test_breaker_opens_and_probes():
    now = [0.0]
    br = CircuitBreaker(threshold=2, cooldown=10, clock=lambda: now[0])
    assert br.allow()
    br.failure()
    assert br.state is BreakerState.CLOSED
    br.failure()
    assert br.state is BreakerState.OPEN and not br.allow()
    now[0] = 11
    assert br.allow() and not br.allow()  # one probe at a time
    br.success()
    assert br.state is BreakerState.CLOSED
