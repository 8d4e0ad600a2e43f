"""``regproxy client-config``: each generated file parses as its client reads it (JSON, TOML,
YAML) with the entries the client needs. The end-to-end tests (tests/e2e/test_clients.py) prove the
docker, containerd and podman output with the real clients; k3s is checked here only."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from proxy.clientconfig import ClientConfigError, generate

ROOT = Path(__file__).resolve().parents[2]


def test_docker_mirrors_docker_hub_and_trusts_plain_http_only_when_told(tmp_path: Path) -> None:
    (f,) = generate("docker", "https://cache.internal:5000/")
    assert json.loads(f.text) == {"registry-mirrors": ["https://cache.internal:5000"]}
    (f,) = generate("docker", "http://10.1.2.3:5000", ["docker.io", "ghcr.io"])
    assert json.loads(f.text) == {"registry-mirrors": ["http://10.1.2.3:5000"],
                                  "insecure-registries": ["10.1.2.3:5000"]}
    assert "10.1.2.3:5000/ghcr.io/org/image" in f.note  # other registries: by path prefix
    (f,) = generate("docker", "http://127.0.0.1:5000")  # loopback is trusted by dockerd
    assert "insecure-registries" not in json.loads(f.text)


def test_containerd_one_hosts_toml_per_upstream_with_fallback_warning(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    files = generate("containerd", "https://cache:5000", ["docker.io", "ghcr.io", "index.docker.io"],
                     ca=str(ca))
    assert [f.name for f in files] == ["docker.io/hosts.toml", "ghcr.io/hosts.toml"]
    hub, ghcr = (tomllib.loads(f.text) for f in files)
    assert hub["server"] == "https://registry-1.docker.io"
    assert ghcr["server"] == "https://ghcr.io"
    assert hub["host"]["https://cache:5000"] == {
        "capabilities": ["pull", "resolve"], "dial_timeout": "2s", "ca": str(ca)}
    assert "WARNING" in files[0].text and "server" in files[0].text

    (only,) = generate("containerd", "https://gw.example/regproxy/v2", fallback=False)
    conf = tomllib.loads(only.text)
    assert conf == {"server": "https://gw.example/regproxy/v2", "capabilities": ["pull", "resolve"],
                    "override_path": True}


def test_podman_mirrors_each_upstream_under_its_path_prefix() -> None:
    (f,) = generate("podman", "http://cache:5000", ["docker.io", "quay.io"])
    regs = tomllib.loads(f.text)["registry"]
    assert regs == [
        {"prefix": "docker.io", "location": "docker.io",
         "mirror": [{"location": "cache:5000/docker.io", "insecure": True}]},
        {"prefix": "quay.io", "location": "quay.io",
         "mirror": [{"location": "cache:5000/quay.io", "insecure": True}]},
    ]
    (f,) = generate("podman", "https://cache:5000")
    assert "insecure" not in tomllib.loads(f.text)["registry"][0]["mirror"][0]


def test_k3s_registries_yaml(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    (f,) = generate("k3s", "https://cache:5000", ["docker.io", "ghcr.io"], ca=str(ca))
    assert f.name == "registries.yaml"
    assert yaml.safe_load(f.text) == {
        "mirrors": {"docker.io": {"endpoint": ["https://cache:5000"]},
                    "ghcr.io": {"endpoint": ["https://cache:5000"]}},
        "configs": {"cache:5000": {"tls": {"ca_file": str(ca)}}},
    }


@pytest.mark.parametrize(("url", "upstream"), [
    ("cache:5000", "docker.io"), ("ftp://cache", "docker.io"), ("https://u:p@cache", "docker.io"),
    ("https://cache?x=1", "docker.io"), ("https://cache", "ghcr.io/org"), ("https://cache", ""),
])
def test_bad_arguments_are_refused(url: str, upstream: str) -> None:
    with pytest.raises(ClientConfigError):
        generate("containerd", url, [upstream])


def test_command_prints_or_writes_files(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "proxy", "client-config", "containerd", "--url", "https://c:5000",
           "--upstream", "docker.io", "--upstream", "quay.io"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "# ==> /etc/containerd/certs.d/quay.io/hosts.toml <==" in out
    subprocess.run([*cmd, "--dir", str(tmp_path)], capture_output=True, check=True, cwd=ROOT)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.toml")) == [
        "docker.io/hosts.toml", "quay.io/hosts.toml"]
    bad = subprocess.run([*cmd[:-4], "--ca", str(tmp_path / "none.pem")], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and "no such file" in bad.stderr
