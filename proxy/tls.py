"""TLS termination: the server's SSL context, and certificate reload without a restart.

The context accepts TLS 1.2 and 1.3 only, with ECDHE + AEAD cipher suites for TLS 1.2
(TLS 1.3 suites are all modern). Reload builds a *fresh* context from the files; only one
that loads completely (certificate and key match, ``client_ca`` readable) is swapped in, and
a bad one never touches the context in use. The listener's context hands every new
handshake the current one from its SNI callback (OpenSSL calls it for every ClientHello,
with or without a server name), so handshakes after a reload use the new certificate while
established connections (a layer half-way through its transfer) keep theirs. A renewal
tool that writes the certificate before its key thus leaves the old pair serving until the
key lands; the next check then picks the new pair up. Reload happens on SIGHUP and when the
files' mtimes change (checked every ``reload_interval`` seconds). ``client_ca`` turns on
mutual TLS (client certificates required); a reload picks up CAs added to or removed from
that file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.settings.fields import ConfigError
from proxy.settings.tls import TLSConfig, load_files

log = logging.getLogger("regproxy.tls")

#: TLS 1.2 suites: forward secrecy and AEAD only. TLS 1.3 suites are fixed by OpenSSL.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    """A server context for ``cfg``; :class:`ConfigError` if the files cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    load_files(ctx, cfg)
    return ctx


class CertReloader:
    """Swaps a freshly loaded context in on SIGHUP and when the files change."""

    def __init__(self, cfg: TLSConfig, ctx: ssl.SSLContext) -> None:
        self.cfg = cfg
        self.ctx = ctx  # the listener's: its SNI callback picks the context of each handshake
        self.current = ctx
        ctx.sni_callback = self._select
        self._stamp = self._stat()
        self.reloads = 0

    def _select(self, conn: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None,
                _ctx: ssl.SSLContext) -> None:
        """Serve the handshake from the newest context that loaded."""
        if self.current is not self.ctx:
            conn.context = self.current

    def _stat(self) -> tuple[tuple[int, int] | None, ...]:
        out = []
        for p in (self.cfg.cert, self.cfg.key, self.cfg.client_ca):
            try:
                st = p.stat() if p is not None else None
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_size) if st is not None else None)
        return tuple(out)

    def reload(self, force: bool = False) -> bool:
        """Load the files again if they changed (or ``force``); True when it did."""
        stamp = self._stat()
        if not force and stamp == self._stamp:
            return False
        try:
            fresh = server_context(self.cfg)  # a scratch context: the one in use stays intact
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.warning("TLS certificate not reloaded, the previous one stays in use: %s", exc)
            return False
        self.current = fresh
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cfg.cert)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval)
            self.reload()

    def install(self, app: web.Application) -> None:
        """Watch the files and listen for SIGHUP while ``app`` runs."""

        async def ctx(_app: web.Application) -> AsyncIterator[None]:
            loop = asyncio.get_running_loop()
            hup = False
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self.reload, True)
                hup = True
            task = loop.create_task(self._watch()) if self.cfg.reload_interval > 0 else None
            try:
                yield
            finally:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if hup:
                    loop.remove_signal_handler(signal.SIGHUP)

        app.cleanup_ctx.append(ctx)


SSL_CONTEXT = web.AppKey("ssl_context", ssl.SSLContext)


def install(app: web.Application, cfg: TLSConfig | None) -> None:
    """With ``[tls]``: build the context (``app[SSL_CONTEXT]``, for the listener) and its reloader."""
    if cfg is None:
        return
    ctx = server_context(cfg)
    app[SSL_CONTEXT] = ctx
    CertReloader(cfg, ctx).install(app)
