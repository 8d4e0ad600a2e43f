"""A failed-login budget per client address and per user, so passwords cannot be guessed at
the speed of the bcrypt pool.

Each address (IPv6 by /64, which one host usually holds whole) and each user name (known or
not, so a refusal does not tell which users exist) may fail ``budget`` logins within a sliding
``window``. Past that, logins are refused without checking the password (so a right guess
cannot be told from a wrong one) until the oldest failure leaves the window.

An attempt takes its place in the budget before its check runs, so many concurrent guesses
cannot outrun it; concurrent requests with the same credentials share one place, as they
share one bcrypt computation, so a CI burst costs one attempt.

Lock-out: anyone can spend a user's budget. The per-user budget is therefore larger than the
per-address one, and it is not applied to an address the user signed in from during the last
:data:`TRUST_PERIOD`: an attacker can keep a user from signing in from new addresses for a
window, not stop the clients they already use. Clients behind one NAT share an address
budget, and so do clients behind a reverse proxy unless it is in ``server.trusted_proxies``
(then the forwarded address counts; otherwise set the budget to 0 when every client arrives
through one proxy).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("regproxy.auth")

#: how long a successful sign-in exempts that address from the user's budget
TRUST_PERIOD = 86400.0
#: addresses remembered per user for that exemption
TRUSTED_PER_USER = 16


@dataclass
class _Budget:
    failures: deque[float] = field(default_factory=deque)
    pending: Counter[bytes] = field(default_factory=Counter)


class _Table:
    """Budgets by key, least recently used dropped beyond ``max_keys`` (bounded memory)."""

    def __init__(self, what: str, budget: int, max_keys: int) -> None:
        self.what = what
        self.budget = budget
        self.max_keys = max_keys
        self.entries: OrderedDict[str, _Budget] = OrderedDict()

    def get(self, key: str, now: float, window: float) -> _Budget:
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Budget()
            while len(self.entries) > self.max_keys:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        while entry.failures and entry.failures[0] <= now - window:
            entry.failures.popleft()
        return entry

    def retry_after(self, entry: _Budget, fingerprint: bytes, now: float, window: float) -> float:
        """0 when an attempt may start, else seconds until one may."""
        if self.budget == 0 or fingerprint in entry.pending:
            return 0.0
        excess = len(entry.failures) + len(entry.pending) - self.budget + 1
        if excess <= 0:
            return 0.0
        if excess > len(entry.failures):  # full of checks still running: a moment
            return 1.0
        return entry.failures[excess - 1] + window - now  # when enough failures age out

    def release(self, key: str, fingerprint: bytes, ok: bool, now: float) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        entry.pending[fingerprint] -= 1
        if entry.pending[fingerprint] > 0:
            return  # the last of the requests sharing this check records its outcome
        del entry.pending[fingerprint]
        if not ok:
            entry.failures.append(now)
            if len(entry.failures) == self.budget:
                log.warning("login throttled: %s %r failed %d logins; refusing its logins until "
                            "they age out", self.what, key[:100], self.budget)
        if not entry.failures and not entry.pending:
            del self.entries[key]


def address_key(remote: str | None) -> str:
    """The budget key of a client address: IPv4 as is, IPv6 by its /64."""
    if not remote:
        return "-"
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:100]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Attempt:
    """One admitted login attempt; :meth:`done` gives its outcome back to the budgets."""

    def __init__(self, throttle: LoginThrottle, address: str, user: str, fingerprint: bytes) -> None:
        self._throttle = throttle
        self._address = address
        self._user = user
        self._fingerprint = fingerprint
        self._done = False

    def done(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        t = self._throttle
        now = t.clock()
        t.by_address.release(self._address, self._fingerprint, ok, now)
        t.by_user.release(self._user, self._fingerprint, ok, now)
        if ok:
            t.trust(self._user, self._address, now)


class Throttled(Exception):
    """A login refused unchecked: the budget is spent for ``retry_after`` more seconds."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"too many failed logins; retry in {retry_after} s")


class LoginThrottle:
    """Budgets of failed logins by address and by user (0: that budget is off)."""

    def __init__(self, per_address: int, per_user: int, window: float, *,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self.window = window
        self.clock = clock  #: replaceable, so tests move time instead of sleeping
        self.by_address = _Table("address", per_address, max_keys)
        self.by_user = _Table("user", per_user, max_keys)
        self._trusted: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()
        self._max_keys = max_keys
        self._key = secrets.token_bytes(32)

    def begin(self, remote: str | None, user: str, password: str) -> Attempt:
        """Admit an attempt (call :meth:`Attempt.done` with its outcome) or raise :class:`Throttled`."""
        now = self.clock()
        address = address_key(remote)
        fingerprint = hmac.new(self._key, b"\0".join(
            (user.encode(errors="surrogateescape"), password.encode(errors="surrogateescape"))),
            hashlib.sha256).digest()
        by_address = self.by_address.get(address, now, self.window)
        by_user = self.by_user.get(user, now, self.window)
        wait = self.by_address.retry_after(by_address, fingerprint, now, self.window)
        if not self.trusted(user, address, now):
            wait = max(wait, self.by_user.retry_after(by_user, fingerprint, now, self.window))
        if wait > 0:
            raise Throttled(max(1, math.ceil(wait)))
        by_address.pending[fingerprint] += 1
        by_user.pending[fingerprint] += 1
        return Attempt(self, address, user, fingerprint)

    def trusted(self, user: str, address: str, now: float) -> bool:
        addresses = self._trusted.get(user)
        seen = addresses.get(address) if addresses is not None else None
        return seen is not None and now - seen < TRUST_PERIOD

    def trust(self, user: str, address: str, now: float) -> None:
        addresses = self._trusted.setdefault(user, OrderedDict())
        self._trusted.move_to_end(user)
        addresses[address] = now
        addresses.move_to_end(address)
        while len(addresses) > TRUSTED_PER_USER:
            addresses.popitem(last=False)
        while len(self._trusted) > self._max_keys:
            self._trusted.popitem(last=False)


__all__ = ["Attempt", "LoginThrottle", "Throttled", "address_key"]
