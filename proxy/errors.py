"""OCI distribution error codes, as exceptions that the HTTP layer turns into error bodies.

Every failure a client can see is one of these, so that clients (dockerd, containerd,
podman) get a well-formed ``{"errors": [...]}`` body and a status they know how to act on
(404 makes them fall back to their next mirror, 5xx makes some of them retry).
"""

from __future__ import annotations

import json
from typing import Any


class RegistryError(Exception):
    """An error with an OCI error code, an HTTP status and a human message."""

    code = "UNKNOWN"
    status = 500

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = headers or {}
        if status is not None:
            self.status = status
        super().__init__(self.message)

    default_message = "unknown error"

    def body(self) -> bytes:
        """The JSON error document of the distribution spec."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return json.dumps({"errors": [err]}).encode()


class BlobUnknown(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class BlobUploadUnknown(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown"


class DigestInvalid(RegistryError):
    code, status, default_message = "DIGEST_INVALID", 400, "provided digest did not match"


class ManifestBlobUnknown(RegistryError):
    code, status, default_message = "MANIFEST_BLOB_UNKNOWN", 400, "manifest references unknown blob"


class ManifestInvalid(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestUnknown(RegistryError):
    code, status, default_message = "MANIFEST_UNKNOWN", 404, "manifest unknown"


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class TagInvalid(RegistryError):
    """A reference that is neither a digest nor a tag of the spec's grammar (distribution's code)."""

    code, status, default_message = "TAG_INVALID", 400, "invalid tag"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class SizeInvalid(RegistryError):
    code, status, default_message = "SIZE_INVALID", 400, "provided length did not match content length"


class Unauthorized(RegistryError):
    code, status, default_message = "UNAUTHORIZED", 401, "authentication required"


class Denied(RegistryError):
    code, status, default_message = "DENIED", 403, "requested access to the resource is denied"


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "the operation is unsupported"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"


class RangeNotSatisfiable(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 416, "requested range not satisfiable"
    # The spec has no code of its own for 416; distribution answers with the bare status.


class PayloadTooLarge(RegistryError):
    code, status, default_message = "SIZE_INVALID", 413, "request body too large"


class InsufficientStorage(RegistryError):
    """The disk is below the free-space watermark. The spec has no code of its own for 507;
    UNAVAILABLE is the one every client knows, the message says why."""

    code, status, default_message = "UNAVAILABLE", 507, "insufficient storage"


class Unavailable(RegistryError):
    """The upstream could not be reached or answered with an error; clients should fall back."""

    code, status, default_message = "UNAVAILABLE", 503, "upstream registry unavailable"


class StorageFailed(RegistryError):
    """The local store could not write (a full or read-only disk, an I/O error): this
    proxy's fault, never counted against the upstream; clients may try their next mirror."""

    code, status, default_message = "UNAVAILABLE", 503, "local storage failed"


class BadGateway(RegistryError):
    """The upstream answered, but with content we refuse (wrong digest, truncated, oversized)."""

    code, status, default_message = "UNAVAILABLE", 502, "upstream registry sent invalid content"
