"""Bearer tokens: short-lived ES256 JWTs issued by our token endpoint and verified by the API.

Claims follow the Docker token authentication spec (distribution's ``token`` auth):
``iss``, ``sub`` (user, empty for anonymous), ``aud`` (service), ``exp``/``nbf``/``iat``,
``jti`` and ``access`` = ``[{"type": "repository", "name": ..., "actions": [...]}]``.
The signing key (P-256, PEM) lives under ``certs/`` and is generated when missing.
Only ``alg: ES256`` is accepted; a token signed by another key, expired, not yet valid,
for another audience or issuer, or malformed is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from proxy.atomicfile import write_atomic
from proxy.untrusted import loads_json

ISSUER = "regproxy"
LEEWAY = 30.0  #: seconds of clock skew tolerated on exp/nbf
MAX_TOKEN_LENGTH = 8192


class TokenError(Exception):
    """The token is not acceptable; the message says why (for the log, not for clients)."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                       for c in text):
        raise TokenError("bad base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("bad base64url") from None


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 signing key at ``path``; created (mode 0600) when the file does not exist.

    Workers starting together may all find it missing: the file appears complete or not at
    all, the first writer wins and the others load its key.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        if write_atomic(path, pem, replace=False):
            return key
        data = path.read_bytes()
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise ValueError(f"{path}: the token signing key must be an EC P-256 private key")
    return loaded


def key_id(public: ec.EllipticCurvePublicKey) -> str:
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64url(hashlib.sha256(der).digest()[:16])


@dataclass(frozen=True)
class Claims:
    subject: str | None  #: None for an anonymous token
    access: dict[str, frozenset[str]]  #: repository name -> actions
    expires: float


class TokenAuthority:
    """Issues and verifies ES256 tokens for one ``service``."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, service: str, ttl: float,
                 issuer: str = ISSUER) -> None:
        self._key = key
        self._public = key.public_key()
        self.kid = key_id(self._public)
        self.service = service
        self.ttl = ttl
        self.issuer = issuer

    def issue(self, subject: str | None, access: dict[str, frozenset[str]],
              now: float | None = None, ttl: float | None = None) -> tuple[str, int, float]:
        """A signed token; returns (token, expires_in seconds, issued_at)."""
        now = time.time() if now is None else now
        lifetime = int(self.ttl if ttl is None else ttl)
        header = {"alg": "ES256", "typ": "JWT", "kid": self.kid}
        payload = {
            "iss": self.issuer, "sub": subject or "", "aud": self.service,
            "iat": int(now), "nbf": int(now) - 1, "exp": int(now) + lifetime,
            "jti": secrets.token_urlsafe(16),
            "access": [{"type": "repository", "name": name, "actions": sorted(actions)}
                       for name, actions in sorted(access.items()) if actions],
        }
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + b64url(json.dumps(payload, separators=(",", ":")).encode()))
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{b64url(signature)}", lifetime, now

    def verify(self, token: str, now: float | None = None) -> Claims:
        """The claims of a valid token, or :class:`TokenError`."""
        if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise TokenError("not a JWS compact token")
        h64, p64, s64 = token.split(".")
        try:
            header = loads_json(b64url_decode(h64))
        except (ValueError, UnicodeDecodeError):
            raise TokenError("bad header") from None
        if not isinstance(header, dict) or header.get("alg") != "ES256":
            raise TokenError("only ES256 tokens are accepted")
        signature = b64url_decode(s64)
        if len(signature) != 64:
            raise TokenError("bad signature length")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                   int.from_bytes(signature[32:], "big"))
        try:
            self._public.verify(der, f"{h64}.{p64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise TokenError("signature does not verify with our key") from None
        try:
            payload = loads_json(b64url_decode(p64))
        except (ValueError, UnicodeDecodeError):
            raise TokenError("bad payload") from None
        if not isinstance(payload, dict):
            raise TokenError("bad payload")
        return self._claims(payload, time.time() if now is None else now)

    def _claims(self, p: dict[str, Any], now: float) -> Claims:
        if p.get("iss") != self.issuer:
            raise TokenError("wrong issuer")
        aud = p.get("aud")
        if aud != self.service and not (isinstance(aud, list) and self.service in aud):
            raise TokenError("wrong audience")
        exp, nbf = p.get("exp"), p.get("nbf", 0)
        if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
            raise TokenError("bad exp/nbf")
        if exp + LEEWAY < now:
            raise TokenError("expired")
        if nbf - LEEWAY > now:
            raise TokenError("not yet valid")
        access: dict[str, frozenset[str]] = {}
        entries = p.get("access", [])
        if not isinstance(entries, list):
            raise TokenError("bad access claim")
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("type") != "repository":
                continue
            name, actions = entry.get("name"), entry.get("actions")
            if isinstance(name, str) and isinstance(actions, list):
                access[name] = access.get(name, frozenset()) | frozenset(
                    a for a in actions if isinstance(a, str))
        sub = p.get("sub")
        return Claims(subject=sub if isinstance(sub, str) and sub else None, access=access,
                      expires=float(exp))


def parse_scopes(values: list[str]) -> list[tuple[str, str, frozenset[str]]]:
    """``repository:NAME:pull,push`` (several per value, space separated) ->
    [(type, name, actions)]. Names may hold ``:`` (``host:5000/img``), so the actions are
    after the last colon. Malformed scopes are skipped, as distribution does."""
    out = []
    for value in values:
        for scope in value.split():
            typ, sep, rest = scope.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not sep or not sep2 or not typ or not name:
                continue
            out.append((typ, name, frozenset(a for a in actions.split(",") if a)))
    return out
