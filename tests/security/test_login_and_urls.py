"""Findings 7, 14 and 15 of issue 14: login timing and throttling, bcrypt's 72-byte limit,
credentials in configured URLs."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from proxy.app import create_app
from proxy.auth.htpasswd import PasswordChecker
from proxy.auth.middleware import AUTH_GATE
from proxy.auth.throttle import LoginThrottle, Throttled, address_key
from proxy.config import ConfigError, from_dict
from proxy.redact import redact_url
from proxy.settings.auth import parse_auth
from tests.support.proxyfix import make_config

DEAD_UPSTREAM = "http://127.0.0.1:9"  # requests that pass the edge fail fast (503)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def entry(user: str, password: bytes, cost: int) -> str:
    return f"{user}:{bcrypt.hashpw(password, bcrypt.gensalt(cost)).decode()}\n"


USERS = entry("alice", b"alice-pw", 4) + entry("bob", b"bob-pw", 4) + entry("carol", b"carol-pw", 4)


class Clock:
    """A monotonic clock the test moves by hand (the throttle's window without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def make_client(aiohttp_client: Any, tmp_path: Path, lines: str, **auth: Any) -> Any:
    (tmp_path / "htpasswd").write_text(lines)
    table = {"htpasswd": "htpasswd", "realm": "r", **auth}
    cfg = make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM},
                      auth=parse_auth(table, tmp_path))
    return await aiohttp_client(create_app(cfg))


async def error_of(resp: Any) -> str:
    return str((await resp.json())["errors"][0]["code"])


# -- finding 7: an unknown user costs the same bcrypt work as a known one ---------------------

async def test_unknown_user_costs_the_bcrypt_work_of_the_files_users(aiohttp_client, tmp_path,
                                                                     monkeypatch):
    client = await make_client(aiohttp_client, tmp_path,
                               entry("alice", b"alice-pw", 5) + entry("bob", b"bob-pw", 5))
    costs: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        costs.append(hashed[:7])  # "$2b$05$": the cost, i.e. how much work the check did
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    for user in ("alice", "nobody", "mallory"):
        async with client.get("/v2/", headers=basic(user, "wrong")) as r:
            assert r.status == 401
    assert len(costs) == 3
    assert {c[4:6] for c in costs} == {b"05"}, costs  # was $2b$10$ for unknown users


async def test_dummy_cost_follows_the_file_on_reload(tmp_path):
    f = tmp_path / "h"
    f.write_text(entry("a", b"1", 4) + entry("b", b"2", 6) + entry("c", b"3", 6))
    checker = PasswordChecker(f, stat_interval=0)
    try:
        assert checker.dummy_cost == 6  # the most common cost among the entries
        f.write_text(entry("a", b"1", 4) + entry("d", b"4", 4) + entry("c", b"3", 6) + "\n")
        assert not await checker.check("zed", "x")  # reloads
        assert checker.dummy_cost == 4
    finally:
        checker.close()


# -- finding 7: a failed-login budget per address and per user -------------------------------

async def test_failed_login_budget_per_address_then_429_then_recovery(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, USERS, login_failures_per_address=3,
                               login_failures_per_user=100, login_window="1m")
    edge = client.app[AUTH_GATE]
    clock = Clock()
    edge.throttle.clock = clock
    for password in ("a", "b", "c"):
        async with client.get("/v2/", headers=basic("alice", password)) as r:
            assert r.status == 401
        clock.now += 1
    calls = edge.passwords.bcrypt_calls
    # the budget is spent: even the right password, of this user or another, is not checked
    for user in ("alice", "bob"):
        async with client.get("/v2/", headers=basic(user, f"{user}-pw")) as r:
            assert r.status == 429
            assert await error_of(r) == "TOOMANYREQUESTS"
            assert r.headers["Content-Type"] == "application/json"
            assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert int(r.headers["Retry-After"]) == 57  # the oldest failure leaves the window then
    assert edge.passwords.bcrypt_calls == calls
    clock.now += 57
    async with client.get("/v2/", headers=basic("alice", "alice-pw")) as r:
        assert r.status == 200  # one failure left the window: one attempt is allowed again
    async with client.get("/v2/", headers=basic("bob", "wrong")) as r:
        assert r.status == 401
    async with client.get("/v2/", headers=basic("bob", "bob-pw")) as r:
        assert r.status == 429
    clock.now += 60
    async with client.get("/v2/", headers=basic("bob", "bob-pw")) as r:
        assert r.status == 200


async def test_per_user_budget_spares_addresses_the_user_signed_in_from(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, USERS, login_failures_per_address=100,
                               login_failures_per_user=3, login_window="10m")
    edge = client.app[AUTH_GATE]
    edge.throttle.clock = Clock()
    async with client.get("/v2/", headers=basic("alice", "alice-pw")) as r:
        assert r.status == 200
    for user in ("alice", "carol"):
        for password in ("a", "b", "c"):
            async with client.get("/v2/", headers=basic(user, password)) as r:
                assert r.status == 401
    # carol's budget is spent and she never signed in from here: refused unchecked
    async with client.get("/v2/", headers=basic("carol", "carol-pw")) as r:
        assert r.status == 429 and await error_of(r) == "TOOMANYREQUESTS"
        assert int(r.headers["Retry-After"]) == 600
    # alice's too, but this address is one she signed in from: others' failures do not lock her out
    async with client.get("/v2/", headers=basic("alice", "alice-pw")) as r:
        assert r.status == 200
    async with client.get("/v2/", headers=basic("bob", "bob-pw")) as r:
        assert r.status == 200  # a per-user budget, not this address's


async def test_concurrent_guesses_cannot_outrun_the_budget(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, USERS, login_failures_per_address=3)
    edge = client.app[AUTH_GATE]

    async def attempt(password: str) -> int:
        async with client.get("/v2/", headers=basic("alice", password)) as r:
            return r.status

    # 30 requests of one (right) password are one check: a CI burst is not throttled
    assert set(await asyncio.gather(*(attempt("alice-pw") for _ in range(30)))) == {200}
    statuses = await asyncio.gather(*(attempt(f"guess-{i}") for i in range(30)))
    assert sorted(statuses) == [401] * 3 + [429] * 27
    assert edge.passwords.bcrypt_calls == 4


async def test_token_endpoint_is_throttled(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, USERS, mode="token",
                               login_failures_per_address=2, login_window="30s")
    clock = Clock()
    client.app[AUTH_GATE].throttle.clock = clock
    url = "/auth/token?service=regproxy&scope=repository:team/app:pull"
    for password in ("a", "b"):
        async with client.get(url, headers=basic("alice", password)) as r:
            assert r.status == 401
    async with client.get(url, headers=basic("alice", "alice-pw")) as r:
        assert r.status == 429 and await error_of(r) == "TOOMANYREQUESTS"
        assert r.headers["Retry-After"] == "30"
    clock.now += 30
    async with client.get(url, headers=basic("alice", "alice-pw")) as r:
        assert r.status == 200 and "token" in await r.json()


def test_distributed_guessing_is_stopped_by_the_user_budget_without_locking_out_alice():
    throttle = LoginThrottle(per_address=2, per_user=5, window=60, clock=Clock())
    throttle.begin("192.0.2.1", "alice", "alice-pw").done(True)  # alice's usual client
    for i in range(5):  # five attackers, one guess each: under every address budget
        throttle.begin(f"198.51.100.{i}", "alice", f"guess-{i}").done(False)
    with pytest.raises(Throttled) as err:
        throttle.begin("198.51.100.99", "alice", "guess-99")
    assert err.value.retry_after == 60
    throttle.begin("192.0.2.1", "alice", "alice-pw").done(True)
    # one IPv6 host holds a whole /64: its addresses share one budget
    assert address_key("2001:db8:1:2::5") == address_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    for host in ("2001:db8:1:2::5", "2001:db8:1:2::6"):
        throttle.begin(host, "bob", "x").done(False)
    with pytest.raises(Throttled):
        throttle.begin("2001:db8:1:2::7", "bob", "bob-pw")


def test_throttle_settings_are_validated(tmp_path):
    (tmp_path / "htpasswd").write_text(USERS)
    auth = parse_auth({"htpasswd": "htpasswd"}, tmp_path)
    assert (auth.login_failures_per_address, auth.login_failures_per_user,
            auth.login_window) == (10, 50, 600.0)
    for key, value in (("login_failures_per_address", -1), ("login_failures_per_user", "x"),
                       ("login_window", "0s")):
        with pytest.raises(ConfigError) as err:
            parse_auth({"htpasswd": "htpasswd", key: value}, tmp_path)
        assert err.value.key == f"auth.{key}"


# -- finding 15: bcrypt's 72-byte limit ------------------------------------------------------

async def test_passwords_bcrypt_would_truncate_are_refused(aiohttp_client, tmp_path, caplog):
    long_pw = "L" * 40 + "-secret-tail-" + "x" * 27
    assert len(long_pw.encode()) == 80
    # what Apache's `htpasswd -B` stores for it: bcrypt of its first 72 bytes
    lines = entry("long", long_pw.encode()[:72], 4) + entry("ok", b"k" * 71, 4)
    client = await make_client(aiohttp_client, tmp_path, lines)
    caplog.set_level(logging.INFO, logger="regproxy.auth")
    for password in (long_pw, long_pw[:72], long_pw[:72] + "anything"):
        async with client.get("/v2/", headers=basic("long", password)) as r:
            assert r.status == 401, len(password)  # never a 500 (bcrypt 5 raises ValueError)
            assert await error_of(r) == "UNAUTHORIZED"
    assert "72 bytes" in caplog.text and "long" in caplog.text
    assert long_pw not in caplog.text
    async with client.get("/v2/", headers=basic("ok", "k" * 71)) as r:
        assert r.status == 200


def test_the_security_docs_say_why_long_passwords_are_refused():
    readme = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert "72 bytes or more" in readme and "htpasswd -B" in readme


# -- finding 14: credentials in configured URLs ----------------------------------------------

def ups(url: str) -> dict[str, Any]:
    return {"upstreams": {"ghcr.io": {"url": url}}}


@pytest.mark.parametrize("url", ["https://:s3cret@ghcr.io", "https://user:s3cret@ghcr.io",
                                 "https://user@ghcr.io", "https://@ghcr.io/"])
@pytest.mark.parametrize("where", ["upstream", "advertise", "s3", "realm", "flag"])
def test_userinfo_in_a_configured_url_is_refused(tmp_path, url, where):
    (tmp_path / "htpasswd").write_text(USERS)
    data: dict[str, Any] = ups("https://ghcr.io")
    key = {"upstream": "upstreams.ghcr.io.url", "advertise": "cluster.advertise_url",
           "s3": "storage.s3.endpoint", "realm": "auth.token_realm", "flag": "--upstream"}[where]
    if where == "upstream":
        data = ups(url)
    elif where == "advertise":
        data |= {"cache": {"backend": "redis", "url": "redis://r:6379/0"},
                 "cluster": {"advertise_url": url, "secret": "x" * 20}}
    elif where == "s3":
        data |= {"storage": {"backend": "s3", "s3": {"bucket": "b", "endpoint": url}}}
    elif where == "realm":
        data |= {"auth": {"htpasswd": "htpasswd", "token_realm": url}}
    with pytest.raises(ConfigError) as err:
        cfg = from_dict(data, tmp_path)
        if where == "flag":
            cfg.with_overrides(upstream=url)
    assert err.value.key == key
    assert "\n" not in str(err.value) and "credentials" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_redact_url_strips_userinfo_query_and_fragment():
    assert redact_url("https://u:pw@Reg.example:8443/v2/x?token=t#f") == "https://Reg.example:8443/v2/x"
    assert redact_url("redis://:pw@[::1]:6379/0") == "redis://[::1]:6379/0"
    assert redact_url("http://host") == "http://host"
    assert "pw" not in redact_url("http://:pw@host:99999999")


def test_config_errors_do_not_echo_a_redis_password(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict({"cache": {"backend": "redis", "url": "http://:s3cret@redis:6379"}}, tmp_path)
    assert err.value.key == "cache.url" and "s3cret" not in str(err.value)


async def test_status_never_shows_url_credentials_or_query(aiohttp_client, tmp_path):
    # built past the parser (an older config, a future code path): the page must still hide them
    cfg = make_config(tmp_path / "data", {"docker.io": "http://robot:s3cret@127.0.0.1:9/?token=t0ken"})
    client = await aiohttp_client(create_app(cfg))
    assert "s3cret" not in repr(cfg.upstreams["docker.io"])
    for path in ("/status.json", "/status"):
        async with client.get(path) as r:
            assert r.status == 200
            text = await r.text()
            assert "127.0.0.1:9" in text
            assert "s3cret" not in text and "robot" not in text and "t0ken" not in text, path
