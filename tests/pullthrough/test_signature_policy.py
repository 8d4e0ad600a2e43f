"""The signature policy on pull (issue 19, item 5): ``require_signature`` of an upstream.
Against the real docker-registry, with cosign-format key-pair signatures (simple signing,
ECDSA P-256, made with ``cryptography``) pushed through the V2 API by the test: a signed
image pulls by tag and digest, GET and HEAD; an unsigned, wrongly signed or
signed-for-another-digest one is ``403 DENIED`` with the reason; repositories outside the
patterns are untouched. Against the fake upstream: the verdict is kept, and an outage is
an outage, not "unsigned". Config errors name the key."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.app import create_app
from proxy.config import ConfigError, from_dict
from tests.support.artifacts import (
    add_built,
    cosign_signature,
    push_built,
    sig_tag,
    signing_key,
    simple_signing_payload,
)
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, PushedImage, make_tar_layer, push_image, push_index
from tests.support.registry import RegistryProcess
from tests.support.skopeo import SkopeoError, read_oci_layout_index, skopeo_copy

UP = "upstream.test"


def config(data: Path, url: str, policy: dict[str, Any], base_dir: Path | None = None,
           tag_ttl: float | None = None) -> Any:
    upstream: dict[str, Any] = {"url": url, "proxy": "", "require_signature": policy}
    cache = {"tag_ttl": tag_ttl} if tag_ttl is not None else {}
    return from_dict({"storage": {"root": str(data)}, "proxy": {"default_upstream": UP},
                      "cache": cache, "upstreams": {UP: upstream}},
                     base_dir=base_dir or data.parent)


async def serve(aiohttp_server: Any, cfg: Any) -> str:
    server = await aiohttp_server(create_app(cfg))
    return str(server.make_url("")).rstrip("/")


async def pull(session: aiohttp.ClientSession, base: str, repo: str, ref: str,
               method: str = "GET") -> tuple[int, dict[str, Any] | None, str | None]:
    """(status, the error body's first error, Docker-Content-Digest)."""
    async with session.request(method, f"{base}/v2/{repo}/manifests/{ref}",
                               headers={"Accept": MANIFEST_ACCEPT}) as r:
        body = await r.read()
        error = json.loads(body)["errors"][0] if r.status >= 400 and body else None
        return r.status, error, r.headers.get("Docker-Content-Digest")


async def push_app(session: aiohttp.ClientSession, url: str, repo: str, seed: int) -> PushedImage:
    return await push_image(session, url, repo, "1.0", [make_tar_layer(seed=seed)], schema="oci")


async def test_only_images_signed_by_a_trusted_key_pull(
        upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession,
        aiohttp_server: Any, tmp_path: Path) -> None:
    reg, s = upstream_registry, http_session
    run = uuid.uuid4().hex[:8]
    key, pem = signing_key()
    other_key, _ = signing_key()
    signed, unsigned, wrong_key, wrong_digest, free = (
        f"signed/{name}-{run}" for name in ("good", "none", "key", "digest", "free"))
    images = {repo: await push_app(s, reg.url, repo, seed)
              for seed, repo in enumerate((signed, unsigned, wrong_key, wrong_digest, free), 1950)}
    for repo, signer in ((signed, key), (wrong_key, other_key)):
        digest = images[repo].digest
        await push_built(s, reg.url, repo, cosign_signature(signer, digest, f"{UP}/{repo}"),
                         tag=sig_tag(digest))
    # a valid signature by the trusted key, of another image, under this image's tag
    target = images[wrong_digest].digest
    await push_built(s, reg.url, wrong_digest, cosign_signature(
        key, target, "", payload=simple_signing_payload(images[signed].digest, f"{UP}/{signed}")),
        tag=sig_tag(target))
    # the key as a file, relative to the config's directory
    (tmp_path / "cosign.pub").write_text(pem)
    base = await serve(aiohttp_server, config(tmp_path / "data", reg.url, {
        "keys": ["cosign.pub"], "repositories": ["signed/good-*", "signed/none-*",
                                                 "signed/key-*", "signed/digest-*"]},
        base_dir=tmp_path))

    good = images[signed].digest
    for ref in ("1.0", good):
        for method in ("GET", "HEAD"):
            status, error, digest = await pull(s, base, signed, ref, method)
            assert (status, digest) == (200, good), error
    # cosign's own lookups of the signature still work through the policy
    status, _, digest = await pull(s, base, signed, sig_tag(good))
    assert status == 200

    for repo, reason in ((unsigned, f"no signature (no {sig_tag(images[unsigned].digest)} tag)"),
                         (wrong_key, "the signature does not verify with the trusted key"),
                         (wrong_digest, f"the signature is for {good}, not {target}")):
        for ref in ("1.0", images[repo].digest):
            for method in ("GET", "HEAD"):
                status, error, _ = await pull(s, base, repo, ref, method)
                assert status == 403, (repo, ref, method)
                if method == "GET":
                    assert error is not None and error["code"] == "DENIED"
                    assert reason in error["message"], error
                    assert "not signed by a trusted key" in error["message"]
    # outside the patterns: no signature needed
    status, _, digest = await pull(s, base, free, "1.0")
    assert (status, digest) == (200, images[free].digest)


async def test_a_refused_unsigned_pull_is_not_counted(
        upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession,
        aiohttp_server: Any, tmp_path: Path) -> None:
    """The console's per-tag ``pulls`` counts what was served: a GET the policy refused is
    none, a signed image's GET is one."""
    from proxy.handlers.common import PULLTHROUGH, ROUTER

    reg, s = upstream_registry, http_session
    run = uuid.uuid4().hex[:8]
    key, pem = signing_key()
    signed, unsigned = f"signed/count-{run}", f"signed/nocount-{run}"
    images = {repo: await push_app(s, reg.url, repo, seed)
              for seed, repo in enumerate((signed, unsigned), 1970)}
    await push_built(s, reg.url, signed, cosign_signature(key, images[signed].digest,
                                                          f"{UP}/{signed}"),
                     tag=sig_tag(images[signed].digest))
    app = create_app(config(tmp_path / "data", reg.url, {"keys": [pem]}))
    base = str((await aiohttp_server(app)).make_url("")).rstrip("/")

    async def pulls(repo: str) -> int:
        return (await app[PULLTHROUGH].tag_status(app[ROUTER].route(repo), "1.0")).pulls

    for _ in range(2):  # (the second: the refusal as kept)
        assert (await pull(s, base, unsigned, "1.0"))[0] == 403
    assert (await pull(s, base, signed, "1.0"))[0] == 200
    assert await pulls(unsigned) == 0 and await pulls(signed) == 1


async def test_a_signed_index_vouches_for_its_platform_manifests(
        upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession,
        aiohttp_server: Any, tmp_path: Path) -> None:
    reg, s = upstream_registry, http_session
    repo = f"signed/multi-{uuid.uuid4().hex[:8]}"
    key, pem = signing_key()
    amd = await push_image(s, reg.url, repo, None, [make_tar_layer(seed=1960)], schema="oci")
    arm = await push_image(s, reg.url, repo, None, [make_tar_layer(seed=1961)], schema="oci",
                           platform=("linux", "arm64"))
    index = await push_index(s, reg.url, repo, "2.0", [amd, arm])
    await push_built(s, reg.url, repo, cosign_signature(key, index.digest, f"{UP}/{repo}"),
                     tag=sig_tag(index.digest))
    base = await serve(aiohttp_server, config(tmp_path / "data", reg.url, {"keys": [pem]}))

    status, error, _ = await pull(s, base, repo, amd.digest)  # not yet vouched for
    assert status == 403 and error is not None and "no signature" in error["message"]
    assert (await pull(s, base, repo, "2.0"))[0] == 200
    for child in (amd, arm):
        assert (await pull(s, base, repo, child.digest))[0] == 200


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


async def test_the_verdict_is_kept_and_an_outage_is_not_unsigned(
        fake: FakeUpstream, upstream_url: str, aiohttp_server: Any, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    key, pem = signing_key()
    signed = fake.add_image("app", "1", [b"signed layer"])
    add_built(fake, "app", cosign_signature(key, signed, "fake/app"), tag=sig_tag(signed))
    cold = fake.add_image("app", "2", [b"another layer"])
    base = await serve(aiohttp_server, config(tmp_path / "data", upstream_url, {"keys": [pem]},
                                              tag_ttl=0))  # refusals are not kept
    assert (await pull(client, base, "app", signed))[0] == 200
    assert (await pull(client, base, "app", "1"))[0] == 200
    assert fake.count("GET", f"/manifests/{sig_tag(signed)}") == 1  # verified once
    status, error, _ = await pull(client, base, "app", cold)  # cached now, but unsigned
    assert status == 403 and error is not None and "no signature" in error["message"]

    add_built(fake, "app", cosign_signature(key, cold, "fake/app"), tag=sig_tag(cold))
    fake.status = 503  # an outage: the verified digest still pulls, from the cache
    assert (await pull(client, base, "app", signed))[0] == 200
    status, error, _ = await pull(client, base, "app", cold)  # cannot be checked: 503
    assert status == 503, error
    fake.status = None  # back, and signed meanwhile
    assert (await pull(client, base, "app", cold))[0] == 200


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    _, pem = signing_key()
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(
        ).public_bytes(serialization.Encoding.PEM,
                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    prefix = f"upstreams.{UP}.require_signature"
    for policy, key, words in (
            ({}, f"{prefix}.keys", "missing"),
            ({"keys": []}, f"{prefix}.keys", "non-empty list"),
            ({"keys": [rsa_pem]}, f"{prefix}.keys", "ECDSA P-256"),
            ({"keys": ["missing.pub"]}, f"{prefix}.keys", "cannot read"),
            ({"keys": [pem], "repositories": ["Bad Pattern"]}, f"{prefix}.repositories",
             "repository pattern"),
            ({"keys": [pem], "extra": 1}, f"{prefix}.extra", "unknown key")):
        with pytest.raises(ConfigError) as exc:
            config(tmp_path / "data", "http://127.0.0.1:1", policy, base_dir=tmp_path)
        assert exc.value.key == key and words in str(exc.value), (policy, str(exc.value))


async def test_skopeo_pulls_a_signed_multi_platform_image_and_is_refused_an_unsigned_one(
        upstream_registry: RegistryProcess, http_session: aiohttp.ClientSession,
        aiohttp_server: Any, tmp_path: Path) -> None:
    reg, s = upstream_registry, http_session
    run = uuid.uuid4().hex[:8]
    signed, unsigned = f"signed/skopeo-{run}", f"signed/skopeo-none-{run}"
    key, pem = signing_key()
    amd = await push_image(s, reg.url, signed, None, [make_tar_layer(seed=1970)], schema="oci")
    arm = await push_image(s, reg.url, signed, None, [make_tar_layer(seed=1971)], schema="oci",
                           platform=("linux", "arm64"))
    index = await push_index(s, reg.url, signed, "3.0", [amd, arm])
    await push_built(s, reg.url, signed, cosign_signature(key, index.digest, f"{UP}/{signed}"),
                     tag=sig_tag(index.digest))
    await push_app(s, reg.url, unsigned, 1972)
    host = (await serve(aiohttp_server, config(tmp_path / "data", reg.url, {"keys": [pem]}))
            ).removeprefix("http://")

    out = tmp_path / "pulled"
    await skopeo_copy(f"docker://{host}/{signed}:3.0", f"oci:{out}", "--preserve-digests",
                      all_images=True)
    assert [m["digest"] for m in read_oci_layout_index(out)["manifests"]] == [index.digest]
    for child in (amd, arm):
        assert (out / "blobs" / "sha256" / child.digest[7:]).read_bytes() == child.manifest
    with pytest.raises(SkopeoError) as refused:
        await skopeo_copy(f"docker://{host}/{unsigned}:1.0", f"oci:{tmp_path / 'refused'}")
    assert "not signed by a trusted key" in refused.value.stderr, refused.value.stderr
