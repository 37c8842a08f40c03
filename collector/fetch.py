"""Downloading untrusted image URLs safely.

Every URL (and every redirect target) is resolved once; the address is checked against the
network policy and the connection goes to that checked address, with the original host name
kept for the Host header, TLS SNI and certificate checks. So a name cannot resolve to a public
address for the check and to 169.254.169.254 for the connection (DNS rebinding).

urllib3 is used directly rather than requests because requests cannot pin the connection to an
already-resolved address; urllib3's `Retry` does the backoff, Retry-After and status retries.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3
from urllib3.util.retry import Retry

from kubetune import __version__
from kubetune.collector.errors import Skip

USER_AGENT = f"kubetune-collector/{__version__} (+https://github.com/kubetune/kubetune; image dataset collector)"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
NOT_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CappedRetry(Retry):
    """urllib3's Retry, but a Retry-After longer than `backoff_max` is capped rather than obeyed:
    a server asking for an hour must not stall a worker for an hour."""

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.backoff_max)


class DeadlineRetry(CappedRetry):
    """CappedRetry that is spent when the download's deadline has passed: retries and their
    backoff happen inside urllib3, so the deadline must be checked there too."""

    def __init__(self, *args: Any, deadline: float = float("inf"), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def new(self, **kwargs: Any) -> DeadlineRetry:
        retry = cast(DeadlineRetry, super().new(**kwargs))
        retry.deadline = self.deadline
        return retry

    def is_exhausted(self) -> bool:
        return super().is_exhausted() or time.monotonic() >= self.deadline


@dataclass(frozen=True)
class NetworkPolicy:
    """Which addresses downloads may reach: public ones always; others only when allowed."""

    allow_private: bool = False
    allow_hosts: frozenset[str] = frozenset()  # "host", "host:port", "ip" or "ip:port"

    def allows(self, host: str, address: IPAddress, port: int) -> bool:
        if self.allow_private or _is_public(address):
            return True
        names = {host, str(address)}
        return any(name in self.allow_hosts or f"{name}:{port}" in self.allow_hosts for name in names)


NAT64_NETWORKS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _is_public(address: IPAddress) -> bool:
    """Public, and so is every IPv4 address embedded in it.

    IPv6 forms that carry an IPv4 address reach that address through a translator or tunnel:
    IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` (and the
    local-use `64:ff9b:1::/48`, last 32 bits), 6to4 `2002::/16` and Teredo `2001::/32` (client
    address XORed with 0xffffffff in the last 32 bits). Each is allowed only when the embedded
    address is public too. Teredo is in fact refused wholesale: Python counts `2001::/23` as
    not global, so the IPv6 address itself fails the first check.
    """
    if not (address.is_global and not address.is_multicast):
        return False
    return all(_is_public(embedded) for embedded in _embedded_ipv4(address))


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
    last32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network for network in NAT64_NETWORKS) or address in IPV4_COMPATIBLE:
        found.append(last32)
    return [embedded for embedded in found if embedded is not None]


@dataclass
class Fetcher:
    """Thread-safe downloader: one connection pool per checked (address, port, host)."""

    policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    timeout: float = 30.0  # seconds to connect, and between two reads
    retries: int = 3
    max_bytes: int = 50 * 1024 * 1024
    pool_size: int = 16
    user_agent: str = USER_AGENT
    total_timeout: float = 0.0  # seconds for a whole download; 0: 4 x timeout
    _pools: dict[tuple[str, str, int, str], urllib3.connectionpool.HTTPConnectionPool] = field(default_factory=dict)
    _dns: dict[tuple[str, int], tuple[float, list[IPAddress]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, url: str, headers: dict[str, str] | None = None) -> bytes:
        """The body of `url` after at most MAX_REDIRECTS checked redirects; raises Skip.

        The whole download (redirects, retries, backoff and the body) must end within
        `total_timeout` seconds (default 4 x `timeout`): a server dripping a byte a second
        would otherwise hold a worker for as long as it likes."""
        deadline = time.monotonic() + self._total()
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(url, headers or {}, deadline)
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                response.close()  # not drained: a redirect's body could drip past the deadline
                response.release_conn()
                try:
                    url = urljoin(url, response.headers["Location"])
                except ValueError:  # a port over 65535, a broken IPv6 bracket
                    raise Skip("bad-url", "redirect to a malformed URL") from None
                continue
            try:
                body = self._read_body(response, deadline)
            except Skip:
                response.close()  # unread bytes must not go back to the pool with the connection
                raise
            finally:
                response.release_conn()
            return body
        raise Skip("too-many-redirects", url[:200])

    def _total(self) -> float:
        return self.total_timeout or 4 * self.timeout

    def _request(self, url: str, headers: dict[str, str], deadline: float) -> Any:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.hostname
        except ValueError:  # urlsplit and .port raise it for a bad port or IPv6 literal
            raise Skip("bad-url", url[:200]) from None
        if parts.scheme not in ("http", "https") or not host or parts.port == 0:
            raise Skip("bad-url", url[:200])
        address = self._checked_address(host, port)
        pool = self._pool(parts.scheme, address, port, host)
        host_header = parts.netloc.rsplit("@", 1)[-1]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        left = _time_left(deadline)
        retry = DeadlineRetry(
            total=self.retries,
            connect=self.retries,
            read=min(1, self.retries),
            status=self.retries,
            other=0,
            redirect=False,
            status_forcelist=RETRY_STATUSES,
            backoff_factor=0.5,
            backoff_max=min(30, left),
            respect_retry_after_header=True,
            raise_on_status=False,
            allowed_methods=None,
            deadline=deadline,
        )
        try:
            response = pool.urlopen(
                "GET",
                path,
                headers={"Host": host_header, "User-Agent": self.user_agent, **headers},
                retries=retry,
                preload_content=False,
                redirect=False,
                assert_same_host=False,
                timeout=urllib3.Timeout(connect=min(self.timeout, left), read=min(self.timeout, left)),
            )
        except urllib3.exceptions.MaxRetryError as error:
            raise _skip_for(error.reason) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _skip_for(error) from None
        except ValueError:  # http.client refuses control characters in the path or Host header
            raise Skip("bad-url", url[:200]) from None
        if response.status >= 400:
            response.close()
            response.release_conn()
            raise Skip(f"http-{response.status}", url[:200])
        if time.monotonic() > deadline:  # retries and backoff used up the time
            response.close()
            response.release_conn()
            raise Skip("timeout", f"no answer within {self._total():g} s")
        return response

    def _read_body(self, response: Any, deadline: float) -> bytes:
        content_type = response.headers.get("Content-Type", "").lower()
        if content_type.startswith(NOT_IMAGE_TYPES):  # an HTML error page answered with 200
            raise Skip("not-an-image", content_type)
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise Skip("too-large", f"{length} bytes")
        chunks, size = [], 0
        try:
            while True:
                _shorten_read_timeout(response, min(self.timeout, _time_left(deadline)))
                chunk = response.read1(256 * 1024)  # returns what has arrived, not a full chunk
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise Skip("too-large", f"over {self.max_bytes} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise Skip("timeout", f"download took over {self._total():g} s")
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _skip_for(error) from None
        return b"".join(chunks)

    def _checked_address(self, host: str, port: int) -> IPAddress:
        """The first address of `host` the policy allows; Skip("private-address") if none."""
        addresses = self._resolve(host, port)
        for address in addresses:
            if self.policy.allows(host, address, port):
                return address
        raise Skip("private-address", f"{host} resolves to {addresses[0]}")

    def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        now = time.monotonic()
        with self._lock:
            cached = self._dns.get((host, port))
        if cached and now - cached[0] < 60:  # a short cache: thousands of URLs share a few hosts
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise Skip("connection-error", f"cannot resolve {host[:100]}: {error}") from None
        except ValueError:  # a NUL in the name, say
            raise Skip("bad-url", f"bad host name {host[:100]!r}") from None
        addresses = _unique(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)
        with self._lock:
            self._dns[(host, port)] = (now, addresses)
        return addresses

    def _pool(self, scheme: str, address: IPAddress, port: int, host: str) -> urllib3.connectionpool.HTTPConnectionPool:
        key = (scheme, str(address), port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                if scheme == "https":
                    pool = urllib3.HTTPSConnectionPool(
                        str(address),
                        port,
                        maxsize=self.pool_size,
                        server_hostname=host,
                        assert_hostname=host,
                        cert_reqs="CERT_REQUIRED",
                        ca_certs=certifi.where(),
                    )
                else:
                    pool = urllib3.HTTPConnectionPool(str(address), port, maxsize=self.pool_size)
                self._pools[key] = pool
            return pool

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Skip("timeout", "the download's time is up")
    return left


def _shorten_read_timeout(response: Any, seconds: float) -> None:
    """Each read may wait at most `seconds`: the socket timeout set when the request was sent
    would otherwise let the last read run past the download's deadline."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _unique(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    return list(dict.fromkeys(addresses))


def _skip_for(error: BaseException | None) -> Skip:
    if isinstance(error, Skip):
        return error
    if isinstance(error, (urllib3.exceptions.TimeoutError, socket.timeout, TimeoutError)):
        return Skip("timeout", str(error)[:200])
    if isinstance(error, urllib3.exceptions.ResponseError) and "too many" in str(error):
        status = next((s for s in RETRY_STATUSES if f"{s} " in str(error)), None)
        return Skip(f"http-{status}" if status else "connection-error", str(error)[:200])
    return Skip("connection-error", str(error)[:200])
