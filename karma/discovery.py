"""Reward-service replicas: the URLs a client is given, expanded into endpoints, and their rotation.

A URL whose host is a name (`http://reward-api:8000`, a compose service scaled with `--scale
reward-api=N`) becomes one endpoint per address the name resolves to (`socket.getaddrinfo`; IPv4 when the
name has any, else IPv6). The names are resolved again every `interval_s` seconds — sooner, within a second,
after a connection to one of their addresses failed — so replicas that join are used and replicas that
leave are dropped. A request to an address keeps the name in its `Host` header (and, for https, in the TLS
server name). A URL whose host is an IP address is one endpoint, never resolved. A name that does not
resolve is used as it is (the connection then fails like any refused one and is retried) until a later
resolution succeeds; a name that stops resolving keeps its last addresses.

`Replicas` hands the endpoints out round-robin, skipping those out of rotation: an endpoint that failed is
out for its server's `Retry-After`, else `backoff_s` x 2^(n-1) with n its consecutive failures (capped by
`max_backoff_s`); then it is tried again, and one success puts it back for good.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

log = logging.getLogger("karma.client")  # the client's logger: one to follow for the whole reward path

#: (host, port) -> the addresses it resolves to; raises OSError (socket.gaierror) when it does not resolve
Resolver = Callable[[str, int], Sequence[str]]

#: after a failed connection to a resolved address, the name is resolved again at most this much later
RESOLVE_SOON_S = 1.0


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address of `host` for TCP, IPv4 first-class: the IPv4 ones if there are any (a name like
    `localhost` often has ::1 too, where an IPv4-bound server does not listen), else the IPv6 ones. Sorted, so
    the rotation order does not change with the DNS server's shuffling."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    by_family: dict[int, set[str]] = {}
    for family, _, _, _, sockaddr in infos:
        by_family.setdefault(family, set()).add(str(sockaddr[0]).split("%")[0])
    found = by_family.get(socket.AF_INET) or by_family.get(socket.AF_INET6) or set()
    return sorted(found, key=ipaddress.ip_address)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """One place to send requests: `url` (the base URL requests go to), from the configured URL `name`;
    `address` is set when `url` is `name` with its host replaced by one resolved address."""

    url: str
    name: str
    address: str | None = None

    @property
    def label(self) -> str:
        """For messages: `http://rm1:8000`, or `http://reward-api:8000 at 172.18.0.3`."""
        return self.name if self.address is None else f"{self.name} at {self.address}"

    def where(self, method: str, path: str) -> str:
        """For messages: `POST http://reward-api:8000/v1/score at 172.18.0.3`."""
        text = f"{method} {self.name}{path}"
        return text if self.address is None else f"{text} at {self.address}"

    @property
    def headers(self) -> dict[str, str]:
        """The configured name as the Host header, when the request goes to an address."""
        return {} if self.address is None else {"Host": httpx.URL(self.name).netloc.decode("ascii")}

    @property
    def extensions(self) -> dict[str, str]:
        """https to an address: the name as the TLS server name (SNI and certificate check)."""
        url = httpx.URL(self.name)
        return {"sni_hostname": url.host} if self.address is not None and url.scheme == "https" else {}


def expand(url: str, resolver: Resolver) -> list[Endpoint]:
    """The endpoints of one configured URL (see the module docstring); raises OSError when a name does not
    resolve (or resolves to nothing)."""
    parsed = httpx.URL(url)
    if _is_ip(parsed.host):
        return [Endpoint(url, url)]
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = list(dict.fromkeys(resolver(parsed.host, port)))
    if not addresses:
        raise OSError(f"{parsed.host!r} resolved to no address")
    return [Endpoint(str(parsed.copy_with(host=a)).rstrip("/"), url, a) for a in addresses]


@dataclass
class _State:
    failures: int = 0  # consecutive
    down_until: float = 0.0


@dataclass
class Replicas:
    """The endpoints of a client's URLs and their rotation (see the module docstring).

    `interval_s=None` turns discovery off: the URLs are the endpoints, as given. `clock` and `resolver` are
    replaceable for tests (fake time, a fake DNS)."""

    urls: Sequence[str]
    interval_s: float | None = 30.0
    resolver: Resolver = resolve_addresses
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    clock: Callable[[], float] = time.monotonic
    _by_url: dict[str, list[Endpoint]] = field(init=False, default_factory=dict)
    _state: dict[str, _State] = field(init=False, default_factory=dict)
    _next: int = field(init=False, default=0)
    _due: float = field(init=False, default=-math.inf)
    _resolved: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.interval_s is not None and self.interval_s <= 0:
            raise ValueError(f"resolve_interval_s must be > 0 (or None: no discovery), got {self.interval_s}")
        self._by_url = {u: [Endpoint(u, u)] for u in self.urls}
        if self.interval_s is None or all(_is_ip(httpx.URL(u).host) for u in self.urls):
            self._due = math.inf  # nothing to resolve, ever

    @property
    def endpoints(self) -> list[Endpoint]:
        return [ep for eps in self._by_url.values() for ep in eps]

    # ------------------------------------------------------------------------------------------ resolution
    async def refresh(self) -> None:
        """Resolve the names again if it is time (the lookups run in a worker thread). A refresh claims the
        next slot before it resolves, so concurrent callers go on with the current endpoints instead of
        queueing behind it (only callers before the very first resolution each resolve)."""
        now = self.clock()
        if now < self._due:
            return
        first = not self._resolved
        if not first:
            self._due = now + self.interval_s
        found = await asyncio.to_thread(self._resolve_all)
        self._apply(found)
        self._resolved = True
        if first:
            self._due = max(self._due, self.clock() + self.interval_s)

    def _resolve_all(self) -> dict[str, list[Endpoint] | OSError]:
        out: dict[str, list[Endpoint] | OSError] = {}
        for url in self.urls:
            try:
                out[url] = expand(url, self.resolver)
            except OSError as exc:
                out[url] = exc
        return out

    def _apply(self, found: dict[str, list[Endpoint] | OSError]) -> None:
        for url, result in found.items():
            old = self._by_url[url]
            if isinstance(result, OSError):
                if old[0].address is None:
                    log.debug("reward service %s does not resolve (%s); using it as given", url, result)
                else:
                    log.info(
                        "reward service %s does not resolve (%s); keeping its last addresses", url, result
                    )
                continue
            if [e.url for e in result] != [e.url for e in old]:
                joined = [e.label for e in result if e not in old]
                left = [e.label for e in old if e not in result and e.address is not None]
                log.info(
                    "reward service %s: %d endpoint(s)%s%s",
                    url,
                    len(result),
                    f"; joined: {', '.join(joined)}" if joined else "",
                    f"; left: {', '.join(left)}" if left else "",
                )
            self._by_url[url] = result
        live = {e.url for e in self.endpoints}
        self._state = {u: s for u, s in self._state.items() if u in live}

    # ------------------------------------------------------------------------------------------ rotation
    def is_up(self, ep: Endpoint, now: float | None = None) -> bool:
        state = self._state.get(ep.url)
        return state is None or state.down_until <= (self.clock() if now is None else now)

    def any_up(self) -> bool:
        now = self.clock()
        return any(self.is_up(ep, now) for ep in self.endpoints)

    def pick(self) -> Endpoint:
        """The next endpoint round-robin that is in rotation; if none is, the one back soonest."""
        endpoints = self.endpoints
        now = self.clock()
        n = len(endpoints)
        for k in range(n):
            ep = endpoints[(self._next + k) % n]
            if self.is_up(ep, now):
                self._next = (self._next + k + 1) % n
                return ep
        return min(endpoints, key=lambda e: self._state[e.url].down_until)

    def failed(self, ep: Endpoint, retry_after: float | None, *, connect: bool = False) -> None:
        """Take `ep` out of rotation for its back-off; a failed connection to a resolved address also brings
        the next resolution forward (the replica may have left)."""
        state = self._state.setdefault(ep.url, _State())
        state.failures += 1
        pause = retry_after or min(self.max_backoff_s, self.backoff_s * 2 ** (state.failures - 1))
        state.down_until = self.clock() + pause
        if connect and ep.address is not None:
            self._due = min(self._due, self.clock() + RESOLVE_SOON_S)

    def succeeded(self, ep: Endpoint) -> None:
        self._state.pop(ep.url, None)
