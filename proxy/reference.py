"""The grammar of repository names, tags and digests (OCI distribution spec, "Pulling").

Everything a client puts in a URL path passes through here before it touches the store or
an upstream URL, so nothing outside the grammar (``..``, ``%2f``, upper case, NUL) can reach
the filesystem.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from proxy.errors import DigestInvalid, NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")

#: Distribution caps the full name (host included) at 255 characters; so do we.
MAX_NAME_LENGTH = 255

#: Algorithms we can verify, with the exact length of their lower-case hex encoding.
SUPPORTED_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """A verified-syntax content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Parse and validate a digest string; DIGEST_INVALID when it is malformed."""
        m = DIGEST_RE.fullmatch(value)
        if not m:
            raise DigestInvalid(f"invalid digest {value[:200]!r}")
        algorithm, encoded = m.groups()
        length = SUPPORTED_ALGORITHMS.get(algorithm)
        if length is None:
            raise DigestInvalid(f"unsupported digest algorithm {algorithm[:32]!r}")
        if len(encoded) != length or not _HEX.fullmatch(encoded):
            raise DigestInvalid(f"invalid {algorithm} digest {value[:200]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def validate_name(name: str) -> str:
    """Return ``name`` when it is a valid repository name, else raise NAME_INVALID."""
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}")
    return name


def is_tag(reference: str) -> bool:
    """Whether ``reference`` is a syntactically valid tag."""
    return TAG_RE.fullmatch(reference) is not None


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference: a tag (returned as ``str``) or a :class:`Digest`."""
    if ":" in reference:
        return Digest.parse(reference)
    if not is_tag(reference):
        raise TagInvalid(f"invalid tag {reference[:200]!r}")
    return reference

