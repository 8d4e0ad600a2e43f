"""``[storage]`` of ``config.toml``: the S3 backend's settings (``storage.backend = "s3"``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.settings.fields import ConfigError, bool_value, parse_size, parse_url, str_value, take_keys


@dataclass(frozen=True, slots=True)
class S3Config:
    """Where the blobs live. ``access_key``/``secret_key`` left ``None`` fall back to
    botocore's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, IAM
    roles). ``endpoint_url`` ``None`` means AWS itself; custom endpoints (MinIO, SeaweedFS)
    get path-style addressing unless ``addressing_style`` says otherwise."""

    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    prefix: str = ""
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    addressing_style: str | None = None  # "path" | "virtual" | "auto"
    part_size: int = 8 << 20
    #: answer blob GETs with a 307 to a presigned URL instead of streaming the bytes
    redirect: bool = False

    def key(self, rest: str) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/{rest}" if prefix else rest


def parse_s3(storage: dict[str, Any]) -> S3Config | None:
    """``storage.backend`` and ``[storage.s3]``: ``None`` for the filesystem backend."""
    backend = storage.get("backend", "filesystem")
    if backend not in ("filesystem", "s3"):
        raise ConfigError("storage.backend", f"expected \"filesystem\" or \"s3\", got {backend!r}")
    if backend == "filesystem":
        if "s3" in storage:
            raise ConfigError("storage.s3", "only used with storage.backend = \"s3\"")
        return None
    t = take_keys(storage.get("s3", {}), "storage.s3", {
        "bucket", "endpoint", "region", "prefix", "access_key", "secret_key",
        "addressing_style", "part_size", "redirect"})
    if "bucket" not in t:
        raise ConfigError("storage.s3.bucket", "required with storage.backend = \"s3\"")
    endpoint = t.get("endpoint")
    if endpoint is not None:
        endpoint = parse_url("storage.s3.endpoint", endpoint)
    style = t.get("addressing_style")
    if style is not None and style not in ("path", "virtual", "auto"):
        raise ConfigError("storage.s3.addressing_style", f"expected path, virtual or auto, got {style!r}")
    part_size = parse_size("storage.s3.part_size", t.get("part_size", 8 << 20))
    if part_size < 5 << 20:
        raise ConfigError("storage.s3.part_size", "S3 needs parts of at least 5 MiB")
    keys = {k: str_value(f"storage.s3.{k}", t[k]) for k in ("access_key", "secret_key") if k in t}
    if len(keys) == 1:
        raise ConfigError("storage.s3.secret_key" if "access_key" in keys else "storage.s3.access_key",
                          "set both keys, or neither (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return S3Config(
        bucket=str_value("storage.s3.bucket", t["bucket"]), endpoint_url=endpoint,
        region=str_value("storage.s3.region", t.get("region", "us-east-1")),
        prefix=str_value("storage.s3.prefix", t["prefix"]) if "prefix" in t else "",
        addressing_style=style,
        part_size=part_size, redirect=bool_value("storage.s3.redirect", t.get("redirect", False)),
        **keys)
