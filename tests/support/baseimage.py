"""A Debian base image made here with ``mmdebstrap`` (no image can be pulled in the tests),
cached as a rootfs tarball keyed by everything that goes into it, and imported into a test's
own dockerd with ``docker import``.

The first run builds the tarball (about a minute); later runs only import it (seconds). The
cache lives in ``$REGPROXY_TEST_CACHE`` or ``~/.cache/regproxy-tests``; a lock file keeps two
concurrent runs from building it twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
from pathlib import Path

from tests.support.daemons import DOCKER_CLI, DockerDaemon

SUITE = "bookworm"
MIRROR = os.environ.get("REGPROXY_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: What the runtime needs: Python 3.11 with venv (pip comes with ensurepip), CA certificates
#: for HTTPS upstreams.
PACKAGES = ("python3", "python3-venv", "ca-certificates")
#: No documentation, manual pages or translations: a smaller tarball, a faster import.
DPKG_OPTS = ("path-exclude=/usr/share/doc/*", "path-exclude=/usr/share/man/*",
             "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/info/*")
BUILD_TIMEOUT = 600


def cache_dir() -> Path:
    path = Path(os.environ.get("REGPROXY_TEST_CACHE") or Path.home() / ".cache" / "regproxy-tests")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key() -> str:
    """Changes whenever the tarball would differ in what it was asked for."""
    spec = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "dpkg": DPKG_OPTS,
            "variant": "minbase"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def base_tarball() -> Path:
    """The cached rootfs tarball, built with mmdebstrap when missing."""
    key = cache_key()
    tar = cache_dir() / f"debian-{SUITE}-{key}.tar"
    with open(cache_dir() / f"{tar.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.is_file():
            return tar
        part = tar.with_name(f"{tar.stem}.part.tar")
        cmd = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--quiet",
               f"--include={','.join(PACKAGES)}",
               *(f"--dpkgopt={opt}" for opt in DPKG_OPTS),
               SUITE, str(part), MIRROR]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise RuntimeError(f"mmdebstrap failed ({res.returncode}):\n{res.stderr[-3000:]}")
        part.rename(tar)
        return tar


def import_base(dockerd: DockerDaemon) -> str:
    """``docker import`` the cached tarball into ``dockerd``; returns the image reference."""
    ref = f"regproxy-test-base:{cache_key()}"
    tar = base_tarball()
    res = subprocess.run([DOCKER_CLI, "-H", dockerd.host, "import", str(tar), ref],
                         capture_output=True, text=True, env=dockerd.env, timeout=300, check=False)
    assert res.returncode == 0, f"docker import: {res.stderr}\n{dockerd.log_tail()}"
    return ref
