"""Logs a pipeline can read: JSON lines, access lines that say who, what went upstream and
why a request failed, a request id, client addresses behind trusted proxies only, breaker
transitions, a start-up summary and upstream failures that say what happened."""

from __future__ import annotations

import base64
import json
import logging
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import main
from proxy.config import ConfigError, from_dict
from proxy.forwarded import ClientAddresses
from proxy.upstream.breaker import CircuitBreaker
from tests.support.edge import write_htpasswd
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyproc import ProxyProcess
from tests.support.registry import free_port

ID_RE = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


def _config(tmp_path: Path, up: str, **server: object) -> Path:
    lines = ["[server]", *(f"{k} = {json.dumps(v)}" for k, v in server.items()),
             "[upstreams.\"fake.io\"]", f'url = "{up}"',
             "[upstreams.\"dead.io\"]", f'url = "http://127.0.0.1:{free_port()}"',
             'connect_timeout = 2', "breaker_threshold = 1",
             "[hosted]", 'repositories = ["team/*"]',
             "[auth]", 'htpasswd = "htpasswd"', 'anonymous_pull = ["**"]',
             "login_failures_per_address = 2",
             "[[auth.rules]]", 'users = ["alice"]', 'repositories = ["**"]', 'actions = ["*"]']
    write_htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _requests(proxy: ProxyProcess, fake: FakeUpstream) -> dict[str, aiohttp.ClientResponse]:
    """A cold pull by a signed-in user via a trusted proxy, a 404, a dead upstream, a bad id."""
    fake.add_image("app", "1", [b"layer"])
    alice = {"Authorization": "Basic " + base64.b64encode(b"alice:wonderland").decode()}
    answers = {}
    async with aiohttp.ClientSession() as client:
        for name, path, headers in (
                ("pull", "/v2/fake.io/app/manifests/1",
                 {"X-Request-Id": "ci-run-42.step:7", "X-Forwarded-For": "203.0.113.9, 127.0.0.1",
                  "Forwarded": 'for="[2001:db8::7]:4711";proto=https'}),
                ("missing", "/v2/fake.io/app/manifests/nope", {"X-Forwarded-For": "198.51.100.4"}),
                ("dead", "/v2/dead.io/x/manifests/1", {"X-Request-Id": 'bad id"\\'}),
                ("dead-again", "/v2/dead.io/x/manifests/1", {})):
            async with client.get(f"{proxy.url}{path}",
                                  headers={**headers, **(alice if name == "pull" else {})}) as r:
                await r.read()
                answers[name] = r
    return answers


async def test_json_log_lines_carry_every_access_field(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    config = _config(tmp_path, up, log_format="json", trusted_proxies=["127.0.0.0/8"])
    proxy = ProxyProcess(tmp_path / "p", "--config", str(config)).start()
    try:
        answers = await _requests(proxy, fake)
        # the login throttle counts the forwarded client, not the proxy all clients share
        wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()}
        statuses = []
        async with aiohttp.ClientSession() as client:
            for address in ("192.0.2.50", "192.0.2.50", "192.0.2.50", "192.0.2.51"):
                async with client.get(f"{proxy.url}/v2/team/x/tags/list",
                                      headers={**wrong, "X-Forwarded-For": address}) as r:
                    statuses.append(r.status)
        assert statuses == [401, 401, 429, 401]
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(30) == 0
    finally:
        proxy.stop()
    records = [json.loads(line) for line in proxy.log_path.read_text().splitlines()]
    for record in records:  # every line is one object with the common keys
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    access = {r["path"]: r for r in records if r["logger"] == "regproxy.access"}
    pull = access["/v2/fake.io/app/manifests/1"]
    assert answers["pull"].headers["X-Request-Id"] == "ci-run-42.step:7" == pull["request_id"]
    # Forwarded wins over X-Forwarded-For; the client is the address the trusted peer saw
    assert pull["remote"] == "2001:db8::7"
    assert pull["user"] == "alice" and pull["cache"] == "miss" and pull["status"] == 200
    assert pull["upstream_status"] == 200 and pull["upstream_ms"] > 0
    assert pull["error"] is None and pull["upstream_error"] is None
    assert {"method", "bytes", "duration_ms", "ua"} <= pull.keys()
    missing = access["/v2/fake.io/app/manifests/nope"]
    assert missing["status"] == 404 and missing["upstream_status"] == 404
    assert missing["error"].startswith("MANIFEST_UNKNOWN: ") and missing["user"] is None
    assert missing["remote"] == "198.51.100.4"
    dead = [r for r in records if r["logger"] == "regproxy.access"
            and r["path"] == "/v2/dead.io/x/manifests/1"]
    assert dead[0]["status"] == 503 and dead[0]["error"].startswith("UNAVAILABLE: ")
    assert "Cannot connect to host 127.0.0.1" in dead[0]["upstream_error"]
    assert dead[0]["upstream_status"] is None
    assert answers["dead"].headers["X-Request-Id"] == dead[0]["request_id"]
    assert ID_RE.fullmatch(dead[0]["request_id"])  # the client's unsafe id was replaced
    assert dead[1]["upstream_error"] is None  # the open breaker answered, nothing went upstream
    messages = [r["message"] for r in records]
    assert any(m.startswith("upstream dead.io: GET 127.0.0.1/v2/x/manifests/1 failed: "
                            "ClientConnectorError: Cannot connect to host") for m in messages)
    assert any("dead.io: circuit breaker open after 1 consecutive failure(s)" in m for m in messages)
    summary = next(m for m in messages if m.startswith("regproxy 0.1.0: http://127.0.0.1:"))
    for part in ("1 worker", "upstreams: docker.io (default) https://registry-1.docker.io, ",
                 f"fake.io {up}, dead.io http://127.0.0.1:",
                 "hosted: team/*", "cache budget: no size limit, no age limit",
                 "auth: basic, anonymous pull of **"):
        assert part in summary, summary
    assert "SIGTERM: no longer accepting connections; shutting down" in messages


async def test_text_access_lines_and_untrusted_forwarding_headers(aiohttp_server, tmp_path):
    """Text lines gain the same fields; without trusted proxies, forwarding headers are
    the client's word and ignored."""
    fake = FakeUpstream()
    up = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    proxy = ProxyProcess(tmp_path / "p", "--config", str(_config(tmp_path, up))).start()
    try:
        answers = await _requests(proxy, fake)
    finally:
        proxy.stop()
    lines = [line for line in proxy.log_path.read_text().splitlines() if " regproxy.access " in line]
    pull = next(line for line in lines if 'path="/v2/fake.io/app/manifests/1"' in line)
    assert " remote=127.0.0.1 " in pull and "request_id=ci-run-42.step:7" in pull
    assert ' user="alice"' in pull and " upstream_status=200 upstream_ms=" in pull
    dead = next(line for line in lines if 'path="/v2/dead.io/x/manifests/1"' in line)
    rid = answers["dead"].headers["X-Request-Id"]
    assert ID_RE.fullmatch(rid) and f"request_id={rid}" in dead
    assert ' upstream_error="ClientConnectorError: Cannot connect to host 127.0.0.1' in dead
    assert ' error="UNAVAILABLE: upstream dead.io failed' in dead


def test_forwarding_chain_is_read_from_the_nearest_hop():
    addresses = ClientAddresses(from_dict({"server": {"trusted_proxies": [
        "10.0.0.0/8", "::1"]}}).trusted_proxies)
    assert addresses.client("10.0.0.2", [], ["198.51.100.1, 203.0.113.5"]) == "203.0.113.5"
    assert addresses.client("10.0.0.2", [], ["198.51.100.1", "203.0.113.5, 10.9.9.9"]) == "203.0.113.5"
    assert addresses.client("10.0.0.2", [], ["10.1.1.1"]) == "10.1.1.1"  # all trusted: leftmost
    assert addresses.client("10.0.0.2", [], ["garbage, 10.1.1.1"]) == "10.1.1.1"
    assert addresses.client("10.0.0.2", ['for=192.0.2.60;proto=http;by=203.0.113.43',
                                         'For="[2001:db8:cafe::17]:4711"'], []) == "2001:db8:cafe::17"
    assert addresses.client("10.0.0.2", ["for=unknown"], []) == "10.0.0.2"
    assert addresses.client("::1", [], ["192.0.2.1:5555"]) == "192.0.2.1"
    assert addresses.is_trusted_peer("::ffff:10.0.0.3") and not addresses.is_trusted_peer("11.0.0.1")


def test_breaker_logs_when_it_opens_and_closes(caplog):
    now = [0.0]
    breaker = CircuitBreaker(2, 10, clock=lambda: now[0], name="ghcr.io")
    with caplog.at_level(logging.INFO, logger="regproxy.upstream"):
        breaker.failure()
        assert not caplog.records
        breaker.failure()
        now[0] = 11
        assert breaker.allow()
        breaker.failure()  # the probe failed
        now[0] = 22
        assert breaker.allow()
        breaker.success()
    assert [r.getMessage() for r in caplog.records] == [
        "upstream ghcr.io: circuit breaker open after 2 consecutive failure(s); requests fail fast "
        "(or are served stale) for 10 s, then one probes",
        "upstream ghcr.io: circuit breaker stays open (the probe request failed); next probe in 10 s",
        "upstream ghcr.io: circuit breaker closed (a probe request succeeded)"]


def test_log_level_and_format_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--log-level", "LOUD"])
    assert exit_.value.code == 2 and "invalid choice: 'LOUD'" in capsys.readouterr().err
    assert from_dict({"server": {"log_level": "debug", "log_format": "json"}}).log_level == "DEBUG"
    for key, value in (("log_level", "LOUD"), ("log_format", "xml")):
        with pytest.raises(ConfigError) as err:
            from_dict({"server": {key: value}})
        assert err.value.key == f"server.{key}"
