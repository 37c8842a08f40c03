"""The downloader's limits, unit by unit: malformed URLs and redirects are skipped items, a
download has a total deadline, and IPv6 forms embedding a private IPv4 address are refused."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubetune.collector.errors import Skip
from kubetune.collector.fetch import Fetcher, NetworkPolicy, _is_public
from kubetune.dev.testing.webapis import Reply, StandIn, photo

MALFORMED = [
    "http://example.org:99999/a.jpg",  # port over 65535
    "http://example.org:-1/a.jpg",
    "http://[::1/a.jpg",  # broken IPv6 bracket
    "http://[not-an-ip]/a.jpg",
    "http://example.org:0/a.jpg",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_url_is_a_bad_url_skip(url: str) -> None:
    fetcher = Fetcher(NetworkPolicy(allow_private=True), timeout=1, retries=0)
    with pytest.raises(Skip) as caught:
        fetcher.get(url)
    assert caught.value.reason == "bad-url"


@pytest.fixture
def host() -> Iterator[StandIn]:
    with StandIn() as stand_in:
        yield stand_in


@pytest.mark.parametrize("location", ["http://example.org:70000/x.jpg", "http://[::1/x.jpg", "http://[zz]:80/x"])
def test_a_redirect_to_a_malformed_url_is_a_bad_url_skip(host: StandIn, location: str) -> None:
    host.route("/moved", lambda _: Reply(302, headers={"Location": location}))
    policy = NetworkPolicy(allow_hosts=frozenset({f"127.0.0.1:{host.port}"}))
    fetcher = Fetcher(policy, timeout=1, retries=0)
    with pytest.raises(Skip) as caught:
        fetcher.get(host.url("/moved"))
    assert caught.value.reason == "bad-url"


@pytest.fixture
def dripping() -> Iterator[str]:
    """A server sending an image's bytes one small piece every 0.2 s for 6 s."""

    class Drip(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "30")
            self.end_headers()
            try:
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/drip.jpg"
    server.shutdown()
    server.server_close()


def test_a_dripping_download_ends_at_the_total_deadline(dripping: str) -> None:
    # the whole download's deadline: 4 x 0.5 s
    fetcher = Fetcher(NetworkPolicy(allow_private=True), timeout=0.5, retries=0)
    started = time.monotonic()
    with pytest.raises(Skip) as caught:
        fetcher.get(dripping)
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 3.0


def test_the_total_deadline_can_be_set_apart(dripping: str) -> None:
    fetcher = Fetcher(NetworkPolicy(allow_private=True), timeout=0.5, total_timeout=1.0, retries=0)
    started = time.monotonic()
    with pytest.raises(Skip, match="timeout"):
        fetcher.get(dripping)
    assert time.monotonic() - started < 1.8


def test_a_normal_download_is_unaffected(host: StandIn) -> None:
    body = photo(300, 200, 1)
    host.route("/ok.jpg", lambda _: Reply(200, body, "image/jpeg"))
    fetcher = Fetcher(NetworkPolicy(allow_private=True), timeout=1, retries=0)
    assert fetcher.get(host.url("/ok.jpg")) == body


EMBEDDED_PRIVATE = [
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2002:c0a8:0101::",  # 6to4 of 192.168.1.1
    "::169.254.169.254",  # IPv4-compatible
    "::10.0.0.1",
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254 (XORed)
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "::ffff:169.254.169.254",  # IPv4-mapped
]
EMBEDDED_PUBLIC = ["64:ff9b::808:808", "2002:808:808::1", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", EMBEDDED_PRIVATE)
def test_ipv6_embedding_a_private_ipv4_is_not_public(address: str) -> None:
    assert not _is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", EMBEDDED_PUBLIC)
def test_ipv6_embedding_a_public_ipv4_is_public(address: str) -> None:
    assert _is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", EMBEDDED_PRIVATE[:4])
def test_a_url_at_an_embedded_private_address_is_refused_before_connecting(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("connected")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    with pytest.raises(Skip) as caught:
        Fetcher(timeout=1, retries=0).get(f"http://[{address}]/latest/meta-data/")
    assert caught.value.reason == "private-address"


def test_retries_and_their_backoff_end_at_the_total_deadline(host: StandIn) -> None:
    host.route("/busy.jpg", lambda _: Reply(503, b"busy", "text/plain", {"Retry-After": "1"}))
    fetcher = Fetcher(NetworkPolicy(allow_private=True), timeout=0.5, retries=10)  # deadline 2 s
    started = time.monotonic()
    with pytest.raises(Skip) as caught:
        fetcher.get(host.url("/busy.jpg"))
    assert caught.value.reason in ("http-503", "timeout")
    assert time.monotonic() - started < 3.0
    assert host.count("/busy.jpg") <= 4
