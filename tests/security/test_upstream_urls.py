"""Finding 3: client text never becomes part of an upstream URL's path.

``tags/list?last=`` used to be pasted into the upstream path, where yarl resolved its dot
segments: an anonymous client read the tags of a repository it was denied, and steered the
proxy's credentialed requests to any path of the upstream.
"""

from __future__ import annotations

import aiohttp
import pytest
from yarl import URL

from proxy.app import create_app
from proxy.errors import RegistryError
from proxy.reference import Digest
from proxy.settings.auth import parse_auth
from proxy.upstream.urls import Endpoint, v2_url
from tests.support.edge import write_htpasswd
from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyfix import make_config


@pytest.fixture
async def setup(aiohttp_server, tmp_path):
    fake = FakeUpstream()
    fake.add_image("library/alpine", "3", [b"alpine layer"])
    fake.add_image("secret/app", "private-tag", [b"secret layer"])
    upstream = await aiohttp_server(fake.app())
    write_htpasswd(tmp_path / "htpasswd", {"alice": "pw"})
    auth = parse_auth({"htpasswd": "htpasswd", "anonymous_pull": ["library/*"]}, tmp_path)
    cfg = make_config(tmp_path / "data", {"docker.io": str(upstream.make_url("")).rstrip("/")},
                      auth=auth)
    proxy = await aiohttp_server(create_app(cfg))
    async with aiohttp.ClientSession() as session:
        yield fake, str(proxy.make_url("")).rstrip("/"), session


@pytest.mark.parametrize("last", [
    "/../../../../secret/app/tags/list",
    "/../../../../../../anything",
    "a/b",
    "x?n=5",
    "..",
])
async def test_last_outside_the_tag_grammar_is_refused_and_never_sent(setup, last):
    fake, base, session = setup
    url = URL(f"{base}/v2/library/alpine/tags/list").with_query({"last": last})
    async with session.get(url) as resp:
        body = await resp.json()
        assert resp.status == 400, body
    assert body["errors"][0]["code"] == "TAG_INVALID"
    assert "secret" not in str(body) or "private-tag" not in str(body)
    assert not any(r.path != "/v2/" and "tags" in r.path for r in fake.requests), fake.requests


async def test_pagination_reaches_the_upstream_as_query_parameters(setup):
    fake, base, session = setup
    async with session.get(f"{base}/v2/library/alpine/tags/list?n=1&last=2") as resp:
        assert resp.status == 200
        assert (await resp.json())["tags"] == ["3"]
    sent = [r for r in fake.requests if r.path.endswith("/tags/list")]
    assert [r.path for r in sent] == ["/v2/library/alpine/tags/list"]
    assert sorted(sent[0].query.split("&")) == ["last=2", "n=1"]


@pytest.mark.parametrize("n", ["\u00b2", "\u0661", "-1", "1e3", "9999999999", " 1"])
async def test_n_must_be_ascii_digits(setup, n):
    _fake, base, session = setup
    async with session.get(URL(f"{base}/v2/library/alpine/tags/list").with_query({"n": n})) as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


async def test_catalog_last_must_be_a_repository_name(setup):
    _fake, base, session = setup
    auth = {"Authorization": aiohttp.encode_basic_auth("alice", "pw")}
    async with session.get(f"{base}/v2/_catalog?last=../x", headers=auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["code"] == "NAME_INVALID"


def test_the_builder_refuses_what_is_not_in_the_grammar():
    base = URL("https://upstream.example/prefix/")
    d = Digest.of(b"x")
    assert str(v2_url(base, "library/alpine", Endpoint.BLOBS, d)) == \
        f"https://upstream.example/prefix/v2/library/alpine/blobs/{d}"
    assert str(v2_url(base, "a/b", Endpoint.TAGS, query={"last": "/../x&n=1"})) == \
        "https://upstream.example/prefix/v2/a/b/tags/list?last=/../x%26n%3D1"
    for name, endpoint, ref in [("../x", Endpoint.TAGS, None), ("a", Endpoint.MANIFESTS, "../b"),
                                ("a", Endpoint.MANIFESTS, "t/../../x"), ("a", Endpoint.BLOBS, "t"),
                                ("a", Endpoint.TAGS, "t"), ("a//b", Endpoint.TAGS, None)]:
        with pytest.raises((ValueError, RegistryError)):
            v2_url(base, name, endpoint, ref)
