"""``regproxy client-config``: the mirror settings each container client needs, generated.

Users otherwise copy snippets by hand and get the details wrong: dockerd mirrors only Docker
Hub; containerd adds ``?ns=<registry>`` to every request to a mirror (which regproxy routes
by) and falls back to the registry itself when every mirror fails, even with ``server``
left out; podman sends no ``ns``, so its mirror locations carry the upstream as a path prefix
(``cache:5000/ghcr.io``); k3s writes containerd's hosts.toml files from its own
``registries.yaml``. Output goes to stdout (files announced by a comment line) or, with
``--dir``, into a directory laid out like the client's own configuration directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

CLIENTS = ("docker", "containerd", "podman", "k3s")
#: Where each client reads the generated files (``--dir`` stands in for it).
CONFIG_DIRS = {"docker": "/etc/docker", "containerd": "/etc/containerd/certs.d",
               "podman": "/etc/containers/registries.conf.d", "k3s": "/etc/rancher/k3s"}
DOCKER_HUB = "docker.io"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ClientConfigError(ValueError):
    """A bad --url, --ca or --upstream."""


@dataclass(frozen=True)
class Mirror:
    """The cache as clients reach it."""

    url: str  #: scheme://host[:port][/path], no trailing slash
    hostport: str  #: host[:port] as clients name it in certs.d directories
    secure: bool  #: https
    path: str  #: "" or "/prefix"
    ca: Path | None


@dataclass(frozen=True)
class OutFile:
    """One generated file, relative to the client's configuration directory."""

    name: str
    text: str
    note: str = ""  #: goes to stderr (JSON has no comments)


def parse_mirror(url: str, ca: str | None) -> Mirror:
    """Validate ``--url`` as a registry mirror URL (what dockerd's ValidateMirror accepts)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientConfigError(f"--url must be http(s)://host[:port], got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ClientConfigError("--url may not carry a query, fragment or credentials")
    hostport = parts.netloc
    path = parts.path.rstrip("/")
    ca_path = Path(ca).resolve() if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise ClientConfigError(f"--ca {ca}: no such file")
    return Mirror(url=f"{parts.scheme}://{hostport}{path}", hostport=hostport,
                  secure=parts.scheme == "https", path=path, ca=ca_path)


def upstream_server(host: str) -> str:
    """The registry a containerd namespace stands for (Docker Hub's API host differs)."""
    return "https://registry-1.docker.io" if host == DOCKER_HUB else f"https://{host}"


def is_loopback(m: Mirror) -> bool:
    return urlsplit(m.url).hostname in LOOPBACK


def docker(m: Mirror, upstreams: list[str]) -> list[OutFile]:
    """daemon.json keys: ``registry-mirrors`` (Docker Hub only), plus ``insecure-registries``
    for a plain-HTTP cache that is not on loopback (dockerd refuses it otherwise)."""
    conf: dict[str, list[str]] = {"registry-mirrors": [m.url]}
    notes = ["# merge into /etc/docker/daemon.json, then: systemctl restart docker"]
    if not m.secure and not is_loopback(m):
        conf["insecure-registries"] = [m.hostport]
    if m.ca is not None:
        notes.append(f"# trust the cache's CA: install -D -m 644 {m.ca} "
                     f"/etc/docker/certs.d/{m.hostport}/ca.crt")
    others = [u for u in upstreams if u != DOCKER_HUB]
    if others:
        notes.append(f"# dockerd uses registry-mirrors for Docker Hub images only; pull "
                     f"{', '.join(others)} images as {m.hostport}/<registry>/<name> "
                     f"(e.g. {m.hostport}/{others[0]}/org/image)")
    return [OutFile("daemon.json", json.dumps(conf, indent=2) + "\n", "\n".join(notes))]


def containerd(m: Mirror, upstreams: list[str], fallback: bool) -> list[OutFile]:
    """One ``<registry>/hosts.toml`` per upstream: the cache as a pull+resolve host. containerd
    appends ``?ns=<registry>`` to each request, which is how regproxy picks the upstream."""
    # a URL ending in /v2 names the API root: containerd must not append another /v2
    settings = ["override_path = true"] if m.path.endswith("/v2") else []
    if m.ca is not None:
        settings.append(f'ca = "{m.ca}"')
    files = []
    for host in upstreams:
        server = upstream_server(host)
        lines = [f"# {CONFIG_DIRS['containerd']}/{host}/hosts.toml, written by regproxy client-config"]
        if fallback:
            lines += [
                f"# WARNING: containerd tries `server` ({server}) after every [host] failed, and",
                "# it would do so with `server` removed too (it defaults to the registry itself).",
                "# Such pulls bypass the cache, need internet access and count against rate limits.",
                "# For the cache as the only source: regproxy client-config containerd --no-fallback",
                f'server = "{server}"',
            ]
        else:  # top-level keys configure the server entry
            lines += ["# the cache is the only source: containerd never contacts the registry",
                      f'server = "{m.url}"', 'capabilities = ["pull", "resolve"]', *settings]
        if not fallback:
            files.append(OutFile(f"{host}/hosts.toml", "\n".join(lines) + "\n"))
            continue
        lines += ["", f'[host."{m.url}"]', '  capabilities = ["pull", "resolve"]',
                  '  dial_timeout = "2s"  # a dead cache costs 2 s, then the next source',
                  *(f"  {s}" for s in settings)]
        files.append(OutFile(f"{host}/hosts.toml", "\n".join(lines) + "\n"))
    return files


def podman(m: Mirror, upstreams: list[str]) -> list[OutFile]:
    """A registries.conf.d drop-in: each upstream mirrored at ``<cache>/<registry>``, since
    podman sends no ``ns`` and regproxy routes its requests by that path prefix."""
    lines = [f"# {CONFIG_DIRS['podman']}/regproxy.conf, written by regproxy client-config",
             "# podman (and CRI-O, buildah, skopeo) try the mirror first, then the registry."]
    if m.ca is not None:
        lines.append(f"# trust the cache's CA: install -D -m 644 {m.ca} "
                     f"/etc/containers/certs.d/{m.hostport}/ca.crt")
    base = m.hostport + (m.path.removesuffix("/v2"))
    for host in upstreams:
        lines += ["", "[[registry]]", f'prefix = "{host}"', f'location = "{host}"', "",
                  "[[registry.mirror]]", f'location = "{base}/{host}"']
        if not m.secure:
            lines.append("insecure = true")
    return [OutFile("regproxy.conf", "\n".join(lines) + "\n")]


def k3s(m: Mirror, upstreams: list[str]) -> list[OutFile]:
    """k3s/rke2 ``registries.yaml``: k3s turns each mirror into a containerd hosts.toml."""
    lines = [f"# {CONFIG_DIRS['k3s']}/registries.yaml, written by regproxy client-config",
             "# on every node, then restart k3s (or k3s-agent); k3s falls back to the registry",
             "mirrors:"]
    for host in upstreams:
        lines += [f'  "{host}":', "    endpoint:", f'      - "{m.url}"']
    if m.ca is not None:
        lines += ["configs:", f'  "{m.hostport}":', "    tls:", f'      ca_file: "{m.ca}"']
    return [OutFile("registries.yaml", "\n".join(lines) + "\n")]


def generate(client: str, url: str, upstreams: list[str] | None = None, ca: str | None = None,
             fallback: bool = True) -> list[OutFile]:
    """The files ``client`` needs to use the cache at ``url`` for ``upstreams``."""
    m = parse_mirror(url, ca)
    hosts = []
    for u in upstreams or [DOCKER_HUB]:
        host = u.strip().lower().removeprefix("https://").rstrip("/")
        if host in ("index.docker.io", "registry-1.docker.io"):
            host = DOCKER_HUB
        if not host or "/" in host or host.startswith("http:"):
            raise ClientConfigError(f"--upstream must be a registry host such as ghcr.io, got {u!r}")
        if host not in hosts:
            hosts.append(host)
    if client == "docker":
        return docker(m, hosts)
    if client == "containerd":
        return containerd(m, hosts, fallback)
    if client == "podman":
        return podman(m, hosts)
    if client == "k3s":
        return k3s(m, hosts)
    raise ClientConfigError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("client-config", help="print the mirror configuration for a container client")
    p.add_argument("client", choices=CLIENTS)
    p.add_argument("--url", required=True, help="the cache as clients reach it, e.g. https://cache:5000")
    p.add_argument("--ca", metavar="FILE", help="CA certificate that signed the cache's certificate")
    p.add_argument("--upstream", metavar="HOST", action="append",
                   help="registry to mirror (repeatable; default docker.io), e.g. ghcr.io")
    p.add_argument("--no-fallback", action="store_true",
                   help="containerd: make the cache the only source (no direct pulls)")
    p.add_argument("--dir", type=Path, metavar="DIR",
                   help="write the files into DIR (standing for the client's config directory)")
    p.set_defaults(log_level="WARNING")


def run(args: argparse.Namespace) -> int:
    try:
        files = generate(args.client, args.url, args.upstream, args.ca, not args.no_fallback)
    except ClientConfigError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
    for f in files:
        if f.note:
            print(f.note, file=sys.stderr)
        if args.dir is not None:
            path = args.dir / f.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f.text)
            print(f"wrote {path}", file=sys.stderr)
        else:
            if len(files) > 1:
                gap = "\n" if f is not files[0] else ""
                print(f"{gap}# ==> {CONFIG_DIRS[args.client]}/{f.name} <==")
            sys.stdout.write(f.text)
    return 0
