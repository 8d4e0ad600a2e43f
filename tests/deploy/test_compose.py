"""deploy/compose/: both files render with the real `docker-compose config`, and the rendered
services agree with the image and with regproxy itself: the configs they mount load with
regproxy's own loader under the environment compose gives them, the published and probed ports
are the ones regproxy listens on, the healthcheck is the image's HEALTHCHECK, each replica
advertises its own service name, and HAProxy balances exactly the replicas on /readyz."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose"
SECRETS = {"REGPROXY_CLUSTER_SECRET": "compose-test-secret-0123456789",
           "S3_ACCESS_KEY": "regproxy", "S3_SECRET_KEY": "compose-test-s3-secret"}
REPLICAS = ["regproxy-1", "regproxy-2", "regproxy-3"]


def render(name: str, env: dict[str, str]) -> dict[str, Any]:
    assert shutil.which("docker-compose"), "apt-get install docker-compose (scripts/install-test-deps.sh)"
    res = subprocess.run(["docker-compose", "--project-directory", str(COMPOSE), "-f", str(COMPOSE / name),
                          "config"], capture_output=True, text=True, timeout=60, check=False,
                         env={"PATH": "/usr/bin:/bin", **env}, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    return dict(yaml.safe_load(res.stdout))


def image_healthcheck() -> list[str]:
    """The HEALTHCHECK command of deploy/Containerfile, as an exec list."""
    text = (DEPLOY / "Containerfile").read_text()
    m = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])", text, re.S | re.M)
    assert m, "no HEALTHCHECK in the Containerfile"
    return ["CMD", *json.loads(m.group(1))]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a rendered service's short-syntax volumes."""
    out = {}
    for item in service["volumes"]:
        source, target, mode = item.split(":")
        out[target] = (source, mode)
    return out


def config_of(service: dict[str, Any]) -> Path:
    source, mode = mounts(service)["/etc/regproxy/config.toml"]
    assert mode == "ro"
    path = Path(source)
    assert path.parent == COMPOSE and path.is_file(), source
    return path


def test_single_node_compose_renders_and_matches_the_image() -> None:
    rendered = render("compose.yml", {})
    assert set(rendered["services"]) == {"regproxy"}
    svc = rendered["services"]["regproxy"]
    assert svc["image"] == "regproxy:latest"
    assert svc["healthcheck"]["test"] == image_healthcheck()
    assert svc["stop_grace_period"] == "35s"  # longer than the 30 s drain
    cfg = load(config_of(svc), env=svc["environment"])
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 5000)
    assert cfg.tag_ttl == 300
    assert svc["ports"] == [{"published": 5000, "target": cfg.listen_port}]
    data = mounts(svc)[str(cfg.storage_root)]
    assert data == ("regproxy-data", "rw") and "regproxy-data" in rendered["volumes"]

    moved = render("compose.yml", {"REGPROXY_PORT": "5443", "REGPROXY_IMAGE": "reg.internal/regproxy:1"})
    svc = moved["services"]["regproxy"]
    assert svc["ports"] == [{"published": 5443, "target": 5000}]
    assert svc["image"] == "reg.internal/regproxy:1"


def test_replicas_compose_renders_a_consistent_cluster() -> None:
    rendered = render("replicas.yml", SECRETS)
    services = rendered["services"]
    assert set(services) == {*REPLICAS, "lb", "redis", "minio", "bucket"}
    buckets, advertised = set(), []
    for name in REPLICAS:
        svc = services[name]
        assert svc["healthcheck"]["test"] == image_healthcheck()
        assert svc["depends_on"] == {"redis": {"condition": "service_healthy"},
                                     "bucket": {"condition": "service_completed_successfully"}}
        assert "ports" not in svc, "replicas are reached through the load balancer only"
        cfg = load(config_of(svc), env=svc["environment"])
        assert cfg.s3 is not None and cfg.cluster is not None
        assert cfg.s3.endpoint_url == "http://minio:9000"
        assert (cfg.s3.access_key, cfg.s3.secret_key) == (SECRETS["S3_ACCESS_KEY"], SECRETS["S3_SECRET_KEY"])
        assert cfg.cache_backend == "redis" and cfg.cache_url == "redis://redis:6379/0"
        assert cfg.cluster.secret == SECRETS["REGPROXY_CLUSTER_SECRET"]
        assert cfg.cluster.advertise_url == f"http://{name}:{cfg.listen_port}"
        advertised.append(cfg.cluster.advertise_url)
        buckets.add(cfg.s3.bucket)
        scratch = mounts(svc)[str(cfg.storage_root)]
        assert scratch == (f"{name}-scratch", "rw")
    assert len(set(advertised)) == len(REPLICAS)
    (bucket,) = buckets
    assert f"store/{bucket}" in services["bucket"]["command"][0]
    assert services["minio"]["environment"] == {"MINIO_ROOT_USER": SECRETS["S3_ACCESS_KEY"],
                                                "MINIO_ROOT_PASSWORD": SECRETS["S3_SECRET_KEY"]}
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    lb = services["lb"]
    assert lb["ports"] == [{"published": 5000, "target": 5000}]
    haproxy_cfg = Path(mounts(lb)["/usr/local/etc/haproxy/haproxy.cfg"][0]).read_text()
    assert re.search(r"^\s*bind :5000$", haproxy_cfg, re.M)
    assert re.search(r"^\s*option httpchk GET /readyz$", haproxy_cfg, re.M)
    servers = re.findall(r"^\s*server (\S+) (\S+)", haproxy_cfg, re.M)
    assert servers == [(name, f"{name}:5000") for name in REPLICAS]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_replicas_compose_refuses_to_render_without_a_secret(missing: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    res = subprocess.run(["docker-compose", "-f", str(COMPOSE / "replicas.yml"), "config"],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={"PATH": "/usr/bin:/bin", **env}, stdin=subprocess.DEVNULL)
    assert res.returncode != 0 and missing in res.stderr
