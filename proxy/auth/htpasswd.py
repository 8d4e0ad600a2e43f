"""Apache htpasswd files with bcrypt entries, and a password checker that is cheap to call often.

Only bcrypt (``$2y$``, ``$2b$``, ``$2a$``; ``htpasswd -B``) is accepted: MD5-crypt, SHA1 and
crypt(3) entries are refused at start-up with the file and line, never silently ignored.

A bcrypt check costs milliseconds of CPU on purpose, so checks run in a small thread pool
(off the event loop), concurrent checks of the same credentials share one computation, and a
successful check is remembered for ``ttl`` seconds as a keyed hash of user and password
(compared with :func:`hmac.compare_digest`); a CI job making thousands of requests costs
one bcrypt round per ``ttl``. The file is re-read when it changes (``regproxy htpasswd add``
takes effect without a restart); a broken edit is logged and the previous users stay.

Unknown users are checked against a dummy hash of the file's most common cost, so their
timing does not give them away. Passwords of 72 bytes or more are refused: bcrypt ignores
what follows byte 72, and ``htpasswd -B`` stores such passwords silently truncated.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt

from proxy.atomicfile import write_atomic
from proxy.settings.fields import ConfigError

log = logging.getLogger("regproxy.auth")

BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: bcrypt uses at most 72 bytes (``$2b$`` counts a terminating NUL): a password of 72 bytes
#: matches every longer one that starts with it, so such passwords are refused at login.
MAX_PASSWORD_BYTES = 71


def typical_cost(users: dict[str, str]) -> int:
    """The most common bcrypt cost in the file (the higher on a tie; 10 for an empty file):
    the work an unknown user's check does, so its timing looks like a known user's."""
    counts = Counter(int(h[4:6]) for h in users.values())
    if not counts:
        return 10
    return max(counts, key=lambda cost: (counts[cost], cost))


def dummy_hash(cost: int) -> bytes:
    """A bcrypt hash of cost ``cost`` that no password matches (no hashing needed to make it)."""
    return bcrypt.gensalt(cost) + "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31)).encode()


def _scheme(hashed: str) -> str:
    if hashed.startswith("$apr1$"):
        return "Apache MD5 ($apr1$)"
    if hashed.startswith("{SHA}"):
        return "SHA1 ({SHA})"
    if hashed.startswith("$"):
        return f"{hashed.split('$')[1] if hashed.count('$') > 1 else '?'!r} crypt"
    return "crypt(3) or plain text"


def parse_htpasswd(text: str, source: str) -> dict[str, str]:
    """``user:hash`` lines -> {user: hash}; blank lines and ``#`` comments are skipped."""
    users: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        where = f"{source}:{lineno}"
        if not sep or not user or not hashed:
            raise ConfigError(where, "expected USER:HASH")
        if not hashed.startswith(BCRYPT_PREFIXES):
            raise ConfigError(where, f"user {user!r} uses {_scheme(hashed)}, which is not accepted; "
                                     "only bcrypt entries are (htpasswd -B, or regproxy htpasswd add)")
        m = _BCRYPT_RE.fullmatch(hashed)
        if m is None or not 4 <= int(m.group(1)) <= 31:
            raise ConfigError(where, f"user {user!r}: malformed bcrypt hash")
        if user in users:
            raise ConfigError(where, f"user {user!r} appears twice")
        users[user] = hashed
    return users


def read_htpasswd(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "htpasswd file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read htpasswd file: {exc}") from None
    return parse_htpasswd(text, str(path))


def hash_password(password: str, cost: int = 10) -> str:
    if not password:
        raise ValueError("empty password")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ValueError(f"bcrypt cannot tell a password of 72 bytes or more from its first 72 "
                         f"bytes; choose one of at most {MAX_PASSWORD_BYTES} bytes")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def update_htpasswd(path: Path, user: str, password_hash: str | None) -> bool:
    """Add or replace ``user`` (``password_hash``) or remove it (``None``); atomic rewrite,
    mode 0600 for a new file (the hashes can be attacked offline).

    Returns whether the file changed. Other lines (comments included) are kept as they are.
    """
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"invalid user name {user!r}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    out, found = [], False
    for line in lines:
        if line.strip().partition(":")[0] == user and not line.lstrip().startswith("#"):
            found = True
            if password_hash is not None:
                out.append(f"{user}:{password_hash}")
            continue
        out.append(line)
    if password_hash is not None and not found:
        out.append(f"{user}:{password_hash}")
    if password_hash is None and not found:
        return False
    try:  # an existing file keeps its owner and group permissions, never more
        mode = (path.stat().st_mode & 0o660) | 0o600
    except FileNotFoundError:
        mode = 0o600
    write_atomic(path, "".join(f"{line}\n" for line in out).encode(), mode=mode)
    return True


class PasswordChecker:
    """Checks user/password pairs against an htpasswd file (re-read when it changes)."""

    def __init__(self, path: Path, *, ttl: float = 60.0, max_cached: int = 10_000,
                 workers: int = 4, stat_interval: float = 2.0) -> None:
        self.path = path
        self.ttl = ttl
        self._max_cached = max_cached
        self._stat_interval = stat_interval
        self._set_users(read_htpasswd(path))
        self._mtime = self._stat()
        self._checked_stat = time.monotonic()
        self._key = secrets.token_bytes(32)
        #: user -> (keyed hash of user+password+stored hash, expiry)
        self._ok: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[bool]] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        self.bcrypt_calls = 0  #: for tests and metrics

    def _set_users(self, users: dict[str, str]) -> None:
        self._users = users
        self.dummy_cost = typical_cost(users)  #: bcrypt cost of an unknown user's check
        self._dummy = dummy_hash(self.dummy_cost)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_stat < self._stat_interval:
            return
        self._checked_stat = now
        stat = self._stat()
        if stat == self._mtime:
            return
        self._mtime = stat
        try:
            users = read_htpasswd(self.path)
        except ConfigError as exc:
            log.error("htpasswd not reloaded, keeping the previous users: %s", exc)
            return
        self._set_users(users)
        self._ok.clear()
        log.info("htpasswd reloaded: %d users", len(self._users))

    def knows(self, user: str) -> bool:
        return user in self._users

    async def check(self, user: str, password: str) -> bool:
        self.maybe_reload()
        if len(password.encode(errors="surrogateescape")) > MAX_PASSWORD_BYTES:
            # refused whoever the user is (no bcrypt, so no timing difference either)
            log.warning("login refused for user %r: a password of 72 bytes or more is never "
                        "accepted (bcrypt would ignore everything after byte 72)", user[:100])
            return False
        stored = self._users.get(user)
        digest = hmac.new(self._key, b"\0".join(
            (user.encode(errors="surrogateescape"), password.encode(errors="surrogateescape"),
             (stored or "").encode())), hashlib.sha256).digest()
        hit = self._ok.get(user)
        if hit is not None and hit[1] > time.monotonic() and hmac.compare_digest(hit[0], digest):
            return True
        pending = self._inflight.get(digest)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(
                self._pool, self._bcrypt, password, stored)
            self._inflight[digest] = pending
            pending.add_done_callback(lambda fut: self._done(fut, user, digest))
        # shielded: a client hanging up does not cancel the check others are waiting for
        return await asyncio.shield(pending)

    def _done(self, fut: asyncio.Future[bool], user: str, digest: bytes) -> None:
        self._inflight.pop(digest, None)
        if fut.cancelled() or fut.exception() is not None or not fut.result():
            return
        self._ok[user] = (digest, time.monotonic() + self.ttl)
        self._ok.move_to_end(user)
        while len(self._ok) > self._max_cached:
            self._ok.popitem(last=False)

    def _bcrypt(self, password: str, stored: str | None) -> bool:
        self.bcrypt_calls += 1
        pw = password.encode(errors="surrogateescape")
        try:
            if stored is None:
                bcrypt.checkpw(pw, self._dummy)
                return False
            return bcrypt.checkpw(pw, stored.encode())
        except ValueError:  # a hash bcrypt refuses, or (bcrypt >= 5) a password over 72 bytes
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
