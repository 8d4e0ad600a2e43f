"""``[tls]`` of ``config.toml``: the certificate, key and client CAs the server uses.

The files are loaded once while parsing, so a missing file or a key that does not match its
certificate stops start-up with the key at fault; :mod:`proxy.tls` builds the server's
context (protocols, ciphers) and reloads it, loading the files with :func:`load_files`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.settings.fields import ConfigError, parse_duration, path_value, take_keys


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None
    reload_interval: float = 10.0


def load_files(ctx: ssl.SSLContext, cfg: TLSConfig) -> None:
    """Load ``cfg``'s certificate chain, key and client CAs into ``ctx`` (client CAs also
    turn on client-certificate checks); :class:`ConfigError` naming the key if a file
    cannot be used."""
    for key, p in (("tls.cert", cfg.cert), ("tls.key", cfg.key)):
        if not p.is_file():
            raise ConfigError(key, f"file not found: {p}")
    try:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls.cert", f"cannot use {cfg.cert} with {cfg.key}: {exc}") from None
    if cfg.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(cfg.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls.client_ca", f"cannot load {cfg.client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED


def parse_tls(raw: Any, base_dir: Path) -> TLSConfig:
    """``[tls] cert, key, client_ca, reload_interval``; paths relative to the config file."""
    t = take_keys(raw, "tls", {"cert", "key", "client_ca", "reload_interval"})
    for key in ("cert", "key"):
        if key not in t:
            raise ConfigError(f"tls.{key}", "missing: [tls] needs both cert and key "
                                            "(create them with `regproxy certs init`)")
    cfg = TLSConfig(cert=path_value("tls.cert", t["cert"], base_dir),
                    key=path_value("tls.key", t["key"], base_dir),
                    client_ca=(path_value("tls.client_ca", t["client_ca"], base_dir)
                               if "client_ca" in t else None),
                    reload_interval=parse_duration("tls.reload_interval", t.get("reload_interval", 10)))
    # unreadable or mismatched files stop start-up with a clear message
    load_files(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cfg)
    return cfg
