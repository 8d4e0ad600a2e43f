"""deploy/kubernetes: ``kubectl kustomize`` renders the base, the S3 + Redis overlay and the
ServiceMonitor kustomization, and the rendered objects fit the app: probes name endpoints
regproxy serves on the port that serves them, the config the pod assembles (the init
container's own command, run here on the rendered ConfigMap and Secret) loads with regproxy's
loader and the pod's environment, and ports, selectors and volumes line up."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, load
from proxy.handlers import PROBES

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
POD_IP = "10.0.0.7"


def render(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders, by (kind, name)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl missing: bash scripts/install-test-deps.sh (kubernetes-client)"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}


def one(objs: dict[tuple[str, str], dict[str, Any]], kind: str, prefix: str = "") -> dict[str, Any]:
    (obj,) = [o for (k, n), o in objs.items() if k == kind and n.startswith(prefix)]
    return obj


def secret_data(obj: dict[str, Any]) -> dict[str, str]:
    import base64

    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return {**data, **(obj.get("stringData") or {})}


def assemble(objs: dict[tuple[str, str], dict[str, Any]], tmp: Path,
             secret_edit: Any = None) -> tuple[Config, dict[str, Any]]:
    """Run the init container's command against the rendered volumes (mount paths mapped
    into ``tmp``) and load the main container's --config with the pod's environment."""
    dep = objs[("Deployment", "regproxy")]
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    dirs: dict[str, Path] = {}
    for name, vol in volumes.items():
        d = dirs[name] = tmp / "vol" / name
        d.mkdir(parents=True)
        files: dict[str, str] = {}
        if "configMap" in vol:
            files = objs[("ConfigMap", vol["configMap"]["name"])]["data"]
        elif "secret" in vol:
            files = secret_data(objs[("Secret", vol["secret"]["secretName"])])
            if secret_edit is not None:
                files = secret_edit(files)
        for key, text in files.items():
            (d / key).write_text(text)

    def mapped(container: dict[str, Any], text: str) -> str:
        by_path = {m["mountPath"]: str(dirs[m["name"]]) for m in container["volumeMounts"]}
        alternatives = "|".join(map(re.escape, sorted(by_path, key=len, reverse=True)))
        return re.sub(rf"(?<![\w/])({alternatives})(?=/|\s|$)", lambda m: by_path[m.group(1)], text)

    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    subprocess.run(["sh", "-c", mapped(init, init["command"][2])], check=True, timeout=10)
    (main,) = pod["containers"]
    args = main["args"]
    assert main["command"] == ["regproxy"] and args[:2] == ["serve", "--config"]
    env: dict[str, str] = {}
    for e in main.get("env", []):
        src = e.get("valueFrom", {})
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "status.podIP"
            env[e["name"]] = POD_IP
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            env[e["name"]] = secret_data(objs[("Secret", ref["name"])])[ref["key"]]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    return load(Path(mapped(main, args[2])), env), main


def check_pod(objs: dict[tuple[str, str], dict[str, Any]], cfg: Config, main: dict[str, Any]) -> None:
    dep = objs[("Deployment", "regproxy")]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["registry"] == cfg.listen_port
    # probes: real endpoints, on the port serving them (debug_listen takes them off the main one)
    probe_port = cfg.debug_listen[1] if cfg.debug_listen else cfg.listen_port
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = main[kind]["httpGet"]
        assert get["path"] in PROBES, (kind, get)
        assert ports.get(get["port"], get["port"]) == probe_port, (kind, get)
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    svc = objs[("Service", "regproxy")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"registry"}
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # non-root, read-only root filesystem, resources, and the store on a writable volume
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert not mounts[str(cfg.storage_root)].get("readOnly") and "/tmp" in mounts
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30  # the drain


def test_base_renders_and_fits_the_app(tmp_path: Path) -> None:
    objs = render(KUBE / "base")
    cfg, main = assemble(objs, tmp_path)
    check_pod(objs, cfg, main)
    assert objs[("Deployment", "regproxy")]["spec"]["replicas"] == 1
    assert cfg.s3 is None and cfg.default_upstream == "docker.io"
    claim = objs[("PersistentVolumeClaim", "regproxy-data")]
    vols = {v["name"]: v for v in objs[("Deployment", "regproxy")]["spec"]["template"]["spec"]["volumes"]}
    data = next(m["name"] for m in main["volumeMounts"] if m["mountPath"] == str(cfg.storage_root))
    assert vols[data]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # the eviction cap sits below the claim
    assert 0 < cfg.max_size < 50 * 2**30 and claim["spec"]["resources"]["requests"]["storage"] == "50Gi"


def test_base_secret_adds_upstreams_with_credentials(tmp_path: Path) -> None:
    def uncomment(files: dict[str, str]) -> dict[str, str]:
        return {k: re.sub(r"(?m)^# ", "", v) for k, v in files.items()}

    cfg, _ = assemble(render(KUBE / "base"), tmp_path, uncomment)
    up = cfg.upstreams["registry.example.com"]
    assert (up.username, up.password) == ("robot", "...")


def test_s3_redis_overlay_renders_replicas_on_a_bucket(tmp_path: Path) -> None:
    objs = render(KUBE / "overlays" / "s3-redis")
    cfg, main = assemble(objs, tmp_path)
    check_pod(objs, cfg, main)
    assert objs[("Deployment", "regproxy")]["spec"]["replicas"] == 3
    assert not [k for k in objs if k[0] == "PersistentVolumeClaim"]
    vols = objs[("Deployment", "regproxy")]["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in vols if v["name"] == "data").keys() == {"name", "emptyDir"}
    assert cfg.s3 is not None and cfg.s3.bucket and cfg.s3.access_key == "change-me"
    assert cfg.cluster is not None and cfg.cluster.advertise_url == f"http://{POD_IP}:{cfg.listen_port}"
    # the Redis URL names the overlay's Redis Service and port
    assert cfg.cache_url is not None
    m = re.match(r"redis://([^:/]+):(\d+)/", cfg.cache_url)
    assert m, cfg.cache_url
    redis_svc = objs[("Service", m.group(1))]
    assert int(m.group(2)) in {p["port"] for p in redis_svc["spec"]["ports"]}
    redis = objs[("Deployment", "regproxy-redis")]
    assert redis_svc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("base", ["base", "overlays/s3-redis"])
def test_servicemonitor_scrapes_the_metrics_port(base: str, tmp_path: Path) -> None:
    mon = render(KUBE / "servicemonitor")
    objs = render(KUBE / base)
    cfg, main = assemble(objs, tmp_path)
    sm = one(mon, "ServiceMonitor")
    svc = one(mon, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    labels = objs[("Deployment", "regproxy")]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (endpoint,) = sm["spec"]["endpoints"]
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
    container_ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert cfg.debug_listen is not None and container_ports[port["targetPort"]] == cfg.debug_listen[1]
    assert endpoint["path"] == "/metrics"
