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
from typing import Any
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


def _is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass
class Fetcher:
    """Thread-safe downloader: one connection pool per checked (address, port, host)."""

    policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    timeout: float = 30.0
    retries: int = 3
    max_bytes: int = 50 * 1024 * 1024
    pool_size: int = 16
    user_agent: str = USER_AGENT
    _pools: dict[tuple[str, str, int, str], urllib3.connectionpool.HTTPConnectionPool] = field(default_factory=dict)
    _dns: dict[tuple[str, int], tuple[float, list[IPAddress]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, url: str, headers: dict[str, str] | None = None) -> bytes:
        """The body of `url` after at most MAX_REDIRECTS checked redirects; raises Skip."""
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(url, headers or {})
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                response.drain_conn()
                response.release_conn()
                url = urljoin(url, response.headers["Location"])
                continue
            try:
                body = self._read_body(response)
            except Skip:
                response.close()  # unread bytes must not go back to the pool with the connection
                raise
            finally:
                response.release_conn()
            return body
        raise Skip("too-many-redirects", url)

    def _request(self, url: str, headers: dict[str, str]) -> Any:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Skip("bad-url", url[:200])
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._checked_address(parts.hostname, port)
        pool = self._pool(parts.scheme, address, port, parts.hostname)
        host_header = parts.netloc.rsplit("@", 1)[-1]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        retry = CappedRetry(
            total=self.retries, connect=self.retries, read=min(1, self.retries), status=self.retries, other=0,
            redirect=False, status_forcelist=RETRY_STATUSES, backoff_factor=0.5, backoff_max=30,
            respect_retry_after_header=True, raise_on_status=False, allowed_methods=None,
        )
        try:
            response = pool.urlopen(
                "GET", path, headers={"Host": host_header, "User-Agent": self.user_agent, **headers},
                retries=retry, preload_content=False, redirect=False, assert_same_host=False,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            )
        except urllib3.exceptions.MaxRetryError as error:
            raise _skip_for(error.reason) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _skip_for(error) from None
        if response.status >= 400:
            response.close()
            response.release_conn()
            raise Skip(f"http-{response.status}", url[:200])
        return response

    def _read_body(self, response: Any) -> bytes:
        content_type = response.headers.get("Content-Type", "").lower()
        if content_type.startswith(NOT_IMAGE_TYPES):  # an HTML error page answered with 200
            raise Skip("not-an-image", content_type)
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise Skip("too-large", f"{length} bytes")
        chunks, size = [], 0
        try:
            for chunk in response.stream(256 * 1024):
                size += len(chunk)
                if size > self.max_bytes:
                    raise Skip("too-large", f"over {self.max_bytes} bytes")
                chunks.append(chunk)
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
            raise Skip("connection-error", f"cannot resolve {host}: {error}") from None
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
                        str(address), port, maxsize=self.pool_size, server_hostname=host,
                        assert_hostname=host, cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(),
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
