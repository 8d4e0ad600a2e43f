"""Async wrappers around the ``skopeo`` CLI, isolated from the user's container config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SKOPEO_BINARY = os.environ.get("SKOPEO_BIN", "skopeo")

Platform = tuple[str, str] | tuple[str, str, str]
DEFAULT_PLATFORM: Platform = ("linux", "amd64")

_isolation_dir: Path | None = None


class SkopeoError(RuntimeError):
    """skopeo exited non-zero or timed out."""

    def __init__(self, cmd: list[str], returncode: int | None, stdout: str, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"skopeo {status}: {' '.join(cmd)}\n--- stderr ---\n{stderr.strip()}")


@dataclass(frozen=True)
class SkopeoResult:
    """Output of a successful skopeo run."""

    cmd: list[str]
    returncode: int
    stdout: bytes
    stderr: str


def isolation_dir() -> Path:
    """Directory with empty registries.conf, empty auth.json, permissive policy, registries.d."""
    global _isolation_dir
    if _isolation_dir is None:
        d = Path(tempfile.mkdtemp(prefix="skopeo-isolated-"))
        (d / "registries.conf").write_text("# empty: no mirrors, no short-name aliases\n")
        (d / "auth.json").write_text('{"auths": {}}\n')
        (d / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        (d / "registries.d").mkdir()
        (d / "home").mkdir()
        (d / "tmp").mkdir()
        _isolation_dir = d
    return _isolation_dir


def skopeo_env() -> dict[str, str]:
    """Environment that keeps skopeo away from the user's config, credentials and proxies."""
    d = isolation_dir()
    env = dict(os.environ)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(
        {
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
            "CONTAINERS_REGISTRIES_CONF": str(d / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(d / "auth.json"),
            "HOME": str(d / "home"),
            "XDG_CONFIG_HOME": str(d / "home" / ".config"),
            "TMPDIR": str(d / "tmp"),
        }
    )
    return env


def _global_args(platform: Platform | None) -> list[str]:
    d = isolation_dir()
    args = ["--policy", str(d / "policy.json"), "--registries.d", str(d / "registries.d")]
    if platform is not None:
        args += ["--override-os", platform[0], "--override-arch", platform[1]]
        if len(platform) > 2:
            args += ["--override-variant", platform[2]]  # type: ignore[misc]
    return args


async def run_skopeo(
    *args: str,
    timeout: float = 120.0,  # noqa: ASYNC109 - the child process is killed on timeout
    platform: Platform | None = DEFAULT_PLATFORM,
) -> SkopeoResult:
    """Run ``skopeo <global flags> *args`` without blocking the event loop."""
    cmd = [SKOPEO_BINARY, *_global_args(platform), *args]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=skopeo_env(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        stdout, stderr = await proc.communicate()
        out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
        raise SkopeoError(cmd, None, out, err) from None
    if proc.returncode != 0:
        raise SkopeoError(
            cmd, proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
        )
    return SkopeoResult(cmd, proc.returncode, stdout, stderr.decode(errors="replace"))


def _is_registry(ref: str) -> bool:
    return ref.startswith("docker://")


async def skopeo_copy(
    src: str,
    dst: str,
    *extra: str,
    timeout: float = 300.0,  # noqa: ASYNC109 - the child process is killed on timeout
    all_images: bool = False,
    platform: Platform | None = DEFAULT_PLATFORM,
    src_creds: str | None = None,
    dest_creds: str | None = None,
) -> SkopeoResult:
    """``skopeo copy SRC DST`` with TLS verification off for ``docker://`` refs.

    ``all_images`` adds ``--all`` (copy every child of an index).  Credentials
    are ``"user:password"``; without them skopeo uses an empty auth file.
    """
    args = ["copy", "--authfile", str(isolation_dir() / "auth.json")]
    if _is_registry(src):
        args.append("--src-tls-verify=false")
    if _is_registry(dst):
        args.append("--dest-tls-verify=false")
    if all_images:
        args.append("--all")
    if src_creds is not None:
        args += ["--src-creds", src_creds]
    if dest_creds is not None:
        args += ["--dest-creds", dest_creds]
    args += [*extra, src, dst]
    return await run_skopeo(*args, timeout=timeout, platform=platform)


async def skopeo_inspect(
    ref: str,
    raw: bool = False,
    *extra: str,
    config: bool = False,
    timeout: float = 120.0,  # noqa: ASYNC109 - the child process is killed on timeout
    platform: Platform | None = DEFAULT_PLATFORM,
    creds: str | None = None,
) -> Any:
    """``skopeo inspect REF``.

    With ``raw=True`` returns the exact manifest (or config, with ``config=True``)
    bytes; otherwise the parsed JSON.  ``--no-tags`` is always passed so skopeo
    does not call ``/v2/<name>/tags/list``.
    """
    args = ["inspect", "--no-tags", "--authfile", str(isolation_dir() / "auth.json")]
    if _is_registry(ref):
        args.append("--tls-verify=false")
    if raw:
        args.append("--raw")
    if config:
        args.append("--config")
    if creds is not None:
        args += ["--creds", creds]
    args += [*extra, ref]
    result = await run_skopeo(*args, timeout=timeout, platform=platform)
    if raw:
        return result.stdout
    return json.loads(result.stdout)


def read_oci_layout_index(layout_dir: Path | str) -> dict[str, Any]:
    """Parse ``<layout_dir>/index.json`` of an OCI layout written by ``skopeo copy ... oci:DIR``."""
    return json.loads((Path(layout_dir) / "index.json").read_text())  # type: ignore[no-any-return]
