"""The edge in process: htpasswd, access rules, bearer tokens, catalog filtering, headers,
config parsing and environment overrides."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import certs
from proxy.app import create_app
from proxy.auth.htpasswd import PasswordChecker, parse_htpasswd, update_htpasswd
from proxy.auth.middleware import AUTH_GATE
from proxy.auth.tokens import TokenAuthority, TokenError, b64url, parse_scopes
from proxy.cli import main
from proxy.config import ConfigError, load
from proxy.envconfig import apply_env
from proxy.settings.auth import parse_auth
from tests.support.edge import htpasswd_line, write_htpasswd
from tests.support.proxyfix import make_config
from tests.support.store import put_tag

DEAD_UPSTREAM = "http://127.0.0.1:9"  # nothing listens: requests that pass auth fail fast (503)
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def auth_table(tmp_path: Path, **extra) -> dict:
    write_htpasswd(tmp_path / "htpasswd", USERS)
    table = {
        "htpasswd": "htpasswd",
        "realm": "test-realm",
        "anonymous_pull": ["library/*", "ghcr.io/**"],
        "groups": {"devs": ["bob", "carol"]},
        "rules": [
            {"users": ["alice"], "repositories": ["team/*"], "actions": ["pull"]},
            {"groups": ["devs"], "repositories": ["team/*", "hosted/**"], "actions": ["pull", "push"]},
            {"users": ["carol"], "repositories": ["team/*"], "actions": ["delete"]},
        ],
    }
    table.update(extra)
    return table


async def make_client(aiohttp_client, tmp_path: Path, **extra):
    auth = parse_auth(auth_table(tmp_path, **extra), tmp_path)
    cfg = make_config(tmp_path / "data", {"docker.io": DEAD_UPSTREAM, "ghcr.io": DEAD_UPSTREAM},
                      auth=auth)
    return await aiohttp_client(create_app(cfg))


async def error_code(resp) -> str:
    return (await resp.json())["errors"][0]["code"]


# -- basic mode ------------------------------------------------------------------------------

async def test_missing_and_wrong_credentials_get_401_with_basic_challenge(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path)
    for headers in ({}, basic("alice", "nope"), basic("mallory", "x"), {"Authorization": "Basic !!"},
                    {"Authorization": "Digest abc"}, bearer("a.b.c")):
        async with client.get("/v2/team/app/manifests/latest", headers=headers) as r:
            assert r.status == 401, headers
            assert r.headers["WWW-Authenticate"].startswith('Basic realm="test-realm"')
            assert await error_code(r) == "UNAUTHORIZED"
            assert r.headers["Content-Type"] == "application/json"


async def test_rights_per_user_group_and_action(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path)
    # alice: pull only on team/*; the pull passes auth and reaches the (dead) upstream
    async with client.get("/v2/team/app/manifests/latest", headers=basic("alice", "alice-pw")) as r:
        assert r.status in (404, 503)
    for method in ("PUT", "POST", "PATCH"):
        path = {"PUT": "/v2/team/app/manifests/v1", "POST": "/v2/team/app/blobs/uploads/",
                "PATCH": "/v2/team/app/blobs/uploads/0f3c1e2a"}[method]
        async with client.request(method, path, headers=basic("alice", "alice-pw"), data=b"{}") as r:
            assert r.status == 403, method
            assert await error_code(r) == "DENIED"
    async with client.delete("/v2/team/app/manifests/sha256:" + "a" * 64,
                             headers=basic("alice", "alice-pw")) as r:
        assert r.status == 403
    # bob (group devs) may push: the decision passes the middleware, the handler then says
    # a cached repository does not take pushes
    async with client.put("/v2/team/app/manifests/v1", headers=basic("bob", "bob-pw"), data=b"{}") as r:
        assert r.status == 405 and await error_code(r) == "UNSUPPORTED"
    async with client.delete("/v2/team/app/manifests/sha256:" + "a" * 64,
                             headers=basic("bob", "bob-pw")) as r:
        assert r.status == 403
    async with client.delete("/v2/team/app/manifests/sha256:" + "a" * 64,
                             headers=basic("carol", "carol-pw")) as r:
        assert r.status != 403
    # nobody has a rule for other/*: signed in -> 403, anonymous -> 401
    async with client.get("/v2/other/app/tags/list", headers=basic("bob", "bob-pw")) as r:
        assert r.status == 403
    async with client.get("/v2/other/app/tags/list") as r:
        assert r.status == 401


async def test_anonymous_pull_matches_local_names_however_addressed(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path)
    # library/* on the default upstream (docker.io): by plain name, short name, ns, prefix
    for path in ("/v2/library/alpine/manifests/3", "/v2/alpine/manifests/3",
                 "/v2/alpine/manifests/3?ns=docker.io", "/v2/docker.io/library/alpine/manifests/3",
                 "/v2/ghcr.io/org/tool/manifests/1", "/v2/org/tool/manifests/1?ns=ghcr.io",
                 "/docker.io/v2/alpine/manifests/3", "/ghcr.io/v2/org/tool/manifests/1"):
        async with client.get(path) as r:
            assert r.status in (404, 503), path
    async with client.put("/v2/library/alpine/manifests/3", data=b"{}") as r:
        assert r.status == 401
    for path in ("/v2/team/app/manifests/1", "/v2/org/tool/manifests/1",
                 "/v2/org/tool/manifests/1?ns=docker.io", "/docker.io/v2/org/tool/manifests/1"):
        async with client.get(path) as r:
            assert r.status == 401, path
    for path in ("/v2/_catalog", "/docker.io/v2/_catalog"):  # filtered the same way
        async with client.get(path) as r:
            assert r.status == 200 and "team/app" not in await r.text()
    # /v2/ answers 200 (anonymous pull exists) but still advertises the challenge
    async with client.get("/v2/") as r:
        assert r.status == 200
        assert r.headers["WWW-Authenticate"].startswith("Basic ")
    # an empty Basic pair (podman/skopeo without credentials) counts as anonymous
    async with client.get("/v2/library/alpine/manifests/3", headers=basic("", "")) as r:
        assert r.status in (404, 503)


async def test_v2_requires_credentials_without_anonymous_pull(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, anonymous_pull=[])
    async with client.get("/v2/") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="test-realm", charset="UTF-8"'
    async with client.get("/v2/", headers=basic("alice", "alice-pw")) as r:
        assert r.status == 200


async def test_anonymous_networks_limit_anonymous_pull(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, anonymous_networks=["10.0.0.0/8"])
    async with client.get("/v2/library/alpine/manifests/3") as r:
        assert r.status == 401
    async with client.get("/v2/") as r:
        assert r.status == 401
    client2 = await make_client(aiohttp_client, tmp_path / "b" if (tmp_path / "b").mkdir() is None
                                else tmp_path, anonymous_networks=["127.0.0.0/8", "::1"])
    async with client2.get("/v2/library/alpine/manifests/3") as r:
        assert r.status in (404, 503)


async def test_catalog_lists_only_pullable_repositories(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path)
    for name in ("docker.io/library/alpine", "docker.io/team/app", "docker.io/secret/x",
                 "ghcr.io/org/tool"):  # (storage keys: cached ones under their upstream)
        await put_tag(tmp_path / "data", name, "v1", "sha256:" + "ab" * 32)
    async with client.get("/v2/_catalog") as r:
        assert r.status == 200
        assert (await r.json())["repositories"] == ["ghcr.io/org/tool", "library/alpine"]
    async with client.get("/v2/_catalog", headers=basic("alice", "alice-pw")) as r:
        assert (await r.json())["repositories"] == ["ghcr.io/org/tool", "library/alpine", "team/app"]
    async with client.get("/v2/_catalog?n=1", headers=basic("alice", "alice-pw")) as r:
        assert (await r.json())["repositories"] == ["ghcr.io/org/tool"]
        assert "last=ghcr.io" in r.headers["Link"]


async def test_bcrypt_runs_once_for_many_requests(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path)
    checker = client.app[AUTH_GATE].passwords
    import asyncio

    async def one() -> int:
        async with client.get("/v2/", headers=basic("alice", "alice-pw")) as r:
            return r.status

    assert set(await asyncio.gather(*(one() for _ in range(50)))) == {200}
    assert checker.bcrypt_calls == 1
    for _ in range(3):
        async with client.get("/v2/", headers=basic("alice", "wrong")) as r:
            assert r.status == 401
    assert checker.bcrypt_calls == 4  # failures are never remembered


async def test_security_headers(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path)
    async with client.get("/v2/") as r:
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["Server"] == "regproxy"
        assert "Strict-Transport-Security" not in r.headers  # plain HTTP here


# -- token mode ------------------------------------------------------------------------------

async def get_token(client, scope: str | list[str], headers=None, service="regproxy") -> dict:
    scopes = [scope] if isinstance(scope, str) else scope
    params = [("service", service), *(("scope", s) for s in scopes)]
    async with client.get("/auth/token", params=params, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Cache-Control"] == "no-store"
        return await r.json()


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def test_token_flow(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, mode="token", token_ttl="2m")
    assert (tmp_path / "certs" / "token.key").exists()  # generated on first start
    async with client.get("/v2/team/app/manifests/1") as r:
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="http://127.0.0.1:')
        assert '/auth/token",service="regproxy",scope="repository:team/app:pull"' in challenge
    async with client.put("/v2/team/app/manifests/1", data=b"{}") as r:
        assert 'scope="repository:team/app:pull,push"' in r.headers["WWW-Authenticate"]

    # alice asks for pull+push, gets pull (requested ∩ allowed)
    body = await get_token(client, "repository:team/app:pull,push", basic("alice", "alice-pw"))
    assert body["expires_in"] == 120 and body["token"] == body["access_token"]
    claims = claims_of(body["token"])
    assert claims["sub"] == "alice" and claims["aud"] == "regproxy"
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    async with client.get("/v2/team/app/manifests/1", headers=bearer(body["token"])) as r:
        assert r.status in (404, 503)
    async with client.put("/v2/team/app/manifests/1", headers=bearer(body["token"]), data=b"{}") as r:
        assert r.status == 403 and await error_code(r) == "DENIED"
    async with client.get("/v2/team/other/manifests/1", headers=bearer(body["token"])) as r:
        assert r.status == 401  # allowed by the rules, but not in this token: ask for a new one
        assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    async with client.get("/v2/", headers=bearer(body["token"])) as r:
        assert r.status == 200

    # bob may push: the token carries it and the middleware lets the PUT through
    bob = await get_token(client, ["repository:team/app:pull,push"], basic("bob", "bob-pw"))
    assert claims_of(bob["token"])["access"][0]["actions"] == ["pull", "push"]
    async with client.put("/v2/team/app/manifests/1", headers=bearer(bob["token"]), data=b"{}") as r:
        assert r.status == 405

    # anonymous: a token with anonymous rights only
    anon = await get_token(client, ["repository:library/alpine:pull,push", "repository:team/app:push"])
    assert claims_of(anon["token"])["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]}]
    # ns-addressed names: the grant covers every routing of the name, the API re-checks
    anon = await get_token(client, "repository:org/tool:pull")
    async with client.get("/v2/org/tool/manifests/1?ns=ghcr.io", headers=bearer(anon["token"])) as r:
        assert r.status in (404, 503)
    async with client.get("/v2/org/tool/manifests/1", headers=bearer(anon["token"])) as r:
        assert r.status == 401

    # wrong password at the token endpoint
    async with client.get("/auth/token", params={"scope": "repository:team/app:pull"},
                          headers=basic("alice", "bad")) as r:
        assert r.status == 401
    async with client.get("/auth/token", params={"service": "elsewhere"}) as r:
        assert r.status == 403


async def test_expired_foreign_and_forged_tokens_are_refused(aiohttp_client, tmp_path):
    client = await make_client(aiohttp_client, tmp_path, mode="token")
    authority = client.app[AUTH_GATE].authority
    access = {"team/app": frozenset({"pull"})}
    expired, _, _ = authority.issue("alice", access, now=time.time() - 3600)
    foreign, _, _ = TokenAuthority(ec.generate_private_key(ec.SECP256R1()), "regproxy", 300).issue(
        "alice", access)
    other_service, _, _ = TokenAuthority(authority._key, "other", 300).issue("alice", access)
    good, _, _ = authority.issue("alice", access)
    h, p, s = good.split(".")
    none_alg = b64url(b'{"alg":"none","typ":"JWT"}') + "." + p + "."
    tampered = h + "." + b64url(json.dumps({**claims_of(good), "sub": "bob"}).encode()) + "." + s
    unknown_user, _, _ = authority.issue("mallory", access)
    for token in (expired, foreign, other_service, none_alg, tampered, unknown_user, "x" * 8100, "a.b.c"):
        async with client.get("/v2/team/app/manifests/1", headers=bearer(token)) as r:
            assert r.status == 401
            assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
            assert await error_code(r) == "UNAUTHORIZED"
    async with client.get("/v2/team/app/manifests/1", headers=bearer(good)) as r:
        assert r.status in (404, 503)


def test_token_unit_checks(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    authority = TokenAuthority(key, "svc", 60)
    token, _, _ = authority.issue(None, {"a/b": frozenset({"pull"})}, now=1000.0)
    claims = authority.verify(token, now=1010.0)
    assert claims.subject is None and claims.access == {"a/b": frozenset({"pull"})}
    with pytest.raises(TokenError, match="expired"):
        authority.verify(token, now=1000.0 + 60 + 31)
    with pytest.raises(TokenError, match="not yet valid"):
        authority.verify(token, now=900.0)
    assert parse_scopes(["repository:host:5000/img:pull,push registry:catalog:*", "bad", "x:y"]) == [
        ("repository", "host:5000/img", frozenset({"pull", "push"})),
        ("registry", "catalog", frozenset({"*"})),
    ]


# -- configuration ---------------------------------------------------------------------------

def test_htpasswd_refuses_other_schemes_naming_file_and_line(tmp_path):
    f = tmp_path / "htpasswd"
    f.write_text("# users\n" + htpasswd_line("alice", "pw") + "\nbob:$apr1$abc$def\n")
    (tmp_path / "config.toml").write_text('[auth]\nhtpasswd = "htpasswd"\n')
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "config.toml", env={})
    assert err.value.key == f"{f}:3" and "bob" in str(err.value) and "bcrypt" in str(err.value)
    for line, what in (("carol:{SHA}abc", "SHA1"), ("dave:xyzzy", "crypt"), ("nocolon", "USER:HASH"),
                       ("eve:$2y$04$short", "malformed")):
        with pytest.raises(ConfigError, match=what):
            parse_htpasswd(line + "\n", "f")
    assert set(parse_htpasswd(htpasswd_line("a", "1").replace("$2b$", "$2y$") + "\n", "f")) == {"a"}


def test_auth_config_errors(tmp_path):
    write_htpasswd(tmp_path / "htpasswd", USERS)
    for table, key in (
        ({"anonymous_pull": ["Bad Pattern"]}, "auth.anonymous_pull"),
        ({"rules": [{"users": ["a"], "repositories": ["x/*"], "actions": ["fly"]}]}, "auth.rules[0].actions"),
        ({"rules": [{"groups": ["nope"], "repositories": ["x"]}]}, "auth.rules[0].groups"),
        ({"rules": [{"repositories": ["x"]}]}, "auth.rules[0]"),
        ({"mode": "magic"}, "auth.mode"),
        ({"anonymous_networks": ["10.0.0.0/33"]}, "auth.anonymous_networks"),
        ({"htpasswd": "missing"}, str(tmp_path / "missing")),
        ({"colour": "blue"}, "auth.colour"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_auth({"htpasswd": "htpasswd", **table}, tmp_path)
        assert err.value.key == key, (table, err.value)


def test_tls_config_errors(tmp_path):
    (tmp_path / "c.toml").write_text('[tls]\ncert = "nope.crt"\nkey = "nope.key"\n')
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "c.toml", env={})
    (tmp_path / "d.toml").write_text('[tls]\ncert = "nope.crt"\n')
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "d.toml", env={})
    assert err.value.key == "tls.key"


def test_environment_overrides(tmp_path, monkeypatch):
    certs.init(tmp_path / "certs", ["localhost"], ["127.0.0.1"])
    write_htpasswd(tmp_path / "ht", USERS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text('[server]\nlisten = "127.0.0.1:5000"\n[cache]\ntag_ttl = 60\n')
    env = {
        "REGISTRY_AUTH": "htpasswd", "REGISTRY_AUTH_HTPASSWD_REALM": "Corp",
        "REGISTRY_AUTH_HTPASSWD_PATH": "ht", "REGISTRY_HTTP_ADDR": ":5443",
        "REGISTRY_HTTP_TLS_CERTIFICATE": "certs/server.crt", "REGISTRY_HTTP_TLS_KEY": "certs/server.key",
        "REGISTRY_AUTH_FILE": "/ignored/auth.json",  # podman's variable, not ours
        "REGPROXY_CACHE_TAG_TTL": "10m", "REGPROXY_AUTH_ANONYMOUS_PULL": '["library/*"]',
        "REGPROXY_SERVER_ACCESS_LOG": "false",
    }
    cfg = load(tmp_path / "config.toml", env=env)
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 5443)
    assert cfg.tag_ttl == 600 and cfg.access_log is False
    assert cfg.auth is not None and cfg.auth.realm == "Corp" and cfg.auth.htpasswd == tmp_path / "ht"
    assert cfg.auth.anonymous_pull == ("library/*",)
    assert cfg.tls is not None and cfg.tls.cert == tmp_path / "certs" / "server.crt"
    with pytest.raises(ConfigError) as err:
        load(None, env={"REGISTRY_AUTH": "htpasswd"})
    assert err.value.key == "REGISTRY_AUTH"
    with pytest.raises(ConfigError) as err:
        load(None, env={"REGISTRY_AUTH": "token"})
    with pytest.raises(ConfigError) as err:
        load(None, env={"REGPROXY_NOPE_X": "1"})
    assert err.value.key == "REGPROXY_NOPE_X"
    with pytest.raises(ConfigError) as err:
        load(None, env={"REGPROXY_CACHE_TAG_TTL": "soon"})
    assert err.value.key == "cache.tag_ttl"
    assert apply_env({"a": 1}, {}) == {"a": 1}
    # replicas in containers: S3 and the cluster from the environment alone
    cfg = load(None, env={
        "REGISTRY_STORAGE_S3_BUCKET": "cache", "REGISTRY_STORAGE_S3_REGIONENDPOINT": "http://minio:9000",
        "REGISTRY_STORAGE_S3_ACCESSKEY": "AK", "REGISTRY_STORAGE_S3_SECRETKEY": "SK",
        "REGPROXY_STORAGE_S3_REDIRECT": "true", "REGPROXY_CACHE_BACKEND": "redis",
        "REGPROXY_CACHE_URL": "redis://r:6379/0", "REGPROXY_CLUSTER_ADVERTISE_URL": "http://10.1.2.3:5000",
        "REGPROXY_CLUSTER_SECRET": "z" * 24})
    assert cfg.s3 is not None and (cfg.s3.bucket, cfg.s3.endpoint_url, cfg.s3.access_key,
                                   cfg.s3.secret_key, cfg.s3.redirect) == (
        "cache", "http://minio:9000", "AK", "SK", True)
    assert cfg.cluster is not None and cfg.cluster.advertise_url == "http://10.1.2.3:5000"


# -- tools -----------------------------------------------------------------------------------

def test_certs_init_reuses_the_ca_and_covers_every_name(tmp_path, capsys):
    from cryptography import x509

    assert main(["certs", "init", "--host", "reg.internal", "--host", "localhost", "--ip", "127.0.0.1",
                 "--host", "10.1.2.3", "--dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "/etc/docker/certs.d/reg.internal:5000/ca.crt" in out and "hosts.toml" in out and "podman" in out
    ca1 = (tmp_path / "c" / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["reg.internal", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert (tmp_path / "c" / "server.key").stat().st_mode & 0o777 == 0o600
    assert main(["certs", "init", "--host", "other", "--dir", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "ca.crt").read_bytes() == ca1
    assert main(["certs", "client", "ci", "--dir", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "ci.cert").exists() and (tmp_path / "c" / "ci.key").exists()


def test_htpasswd_command(tmp_path, monkeypatch, capsys):
    import io

    f = tmp_path / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["htpasswd", "add", "dave", "--stdin", "--cost", "4", "--file", str(f)]) == 0
    users = parse_htpasswd(f.read_text(), "f")
    assert users["dave"].startswith("$2b$04$")
    monkeypatch.setattr("getpass.getpass", lambda _prompt="": "other")
    assert main(["htpasswd", "add", "erin", "--cost", "4", "--file", str(f)]) == 0
    assert set(parse_htpasswd(f.read_text(), "f")) == {"dave", "erin"}
    assert main(["htpasswd", "remove", "dave", "--file", str(f)]) == 0
    assert set(parse_htpasswd(f.read_text(), "f")) == {"erin"}
    assert main(["htpasswd", "remove", "dave", "--file", str(f)]) == 1
    assert "s3cret" not in capsys.readouterr().out


async def test_password_checker_reloads_the_file(tmp_path):
    f = write_htpasswd(tmp_path / "h", {"a": "1"})
    checker = PasswordChecker(f, stat_interval=0)
    try:
        assert await checker.check("a", "1")
        assert not await checker.check("b", "2")
        update_htpasswd(f, "b", htpasswd_line("b", "2").split(":", 1)[1])
        assert await checker.check("b", "2")
        f.write_text("broken line\n")
        assert await checker.check("b", "2")  # a broken edit keeps the previous users
        update_htpasswd(f, "a", None)
    finally:
        checker.close()
