"""Where webhooks may go: no private, loopback or otherwise internal address (no SSRF).

A URL is checked twice: when it is registered (`check_url`), and at every connection
(`GuardedBackend`), which resolves the name itself, checks every address it resolves to, and
connects to the address it checked. So a name that resolved to a public address at
registration and to 169.254.169.254 later (DNS rebinding) is refused at the connection, and
no name is resolved a second time between the check and the connect.

Refused: loopback (unless WEBHOOK_ALLOW_LOOPBACK, for development and tests), private,
link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10), multicast, reserved,
unspecified and every other non-global range, in IPv4 and IPv6; an IPv4-mapped IPv6 address
(::ffff:10.0.0.1), a 6to4 (2002::/16) or NAT64 (64:ff9b::/96) one is judged as the
IPv4 address it carries.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from httpcore2 import ConnectError, ConnectTimeout, NetworkBackend, NetworkStream
from httpcore2._backends.sync import SyncStream

URL_MAX = 2048
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedError(Exception):
    """A URL or address webhooks may not reach; the message says why, for the user."""


def forbidden_reason(address: Address, allow_loopback: bool) -> str | None:
    """Return why webhooks may not connect to `address`, or None when they may."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches that one: judge it.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            address = embedded
    if address.is_loopback:
        return None if allow_loopback else "is a loopback address"
    if address.is_unspecified:
        return "is the unspecified address"
    if address.is_link_local:
        return (
            "is link-local (169.254.0.0/16 holds the cloud metadata service)"
            if address.version == 4
            else "is link-local"
        )
    if address.is_multicast:
        return "is a multicast address"
    if address.is_private:
        return "is a private address"
    if address.is_reserved:
        return "is a reserved address"
    if not address.is_global:
        return "is not a public address"
    return None


def resolve(host: str, port: int, allow_loopback: bool) -> list[Address]:
    """Return the addresses of `host`, all of them allowed; raise RefusedError otherwise.

    One forbidden address refuses the name: which one a connection would use is not ours to pick.
    """
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise RefusedError(f"the host {host!r} does not resolve ({exc})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    for address in addresses:
        reason = forbidden_reason(address, allow_loopback)
        if reason:
            shown = host if literal is not None else f"{host} ({address})"
            raise RefusedError(f"{shown} {reason}; webhooks go to public addresses only")
    return addresses


def check_url(url: str, allow_loopback: bool) -> str:
    """Return the URL if webhooks may be sent to it; raise RefusedError saying why not."""
    if not isinstance(url, str) or not url.strip():
        raise RefusedError("enter the URL of your receiver, like https://example.com/hooks")
    if len(url) > URL_MAX:
        raise RefusedError(f"the URL has {len(url):,} characters; the limit is {URL_MAX:,}")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise RefusedError("the URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedError(f"this is not a URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        if not parts.scheme:
            raise RefusedError("this is not a URL: it needs http:// or https:// and a host")
        raise RefusedError(f"the scheme {parts.scheme!r} is not allowed; use http or https")
    if not parts.hostname:
        raise RefusedError("this is not a URL: it has no host")
    if parts.username is not None or parts.password is not None:
        raise RefusedError("the URL carries a user name or password; verify deliveries by their signature instead")
    resolve(parts.hostname, port or (443 if parts.scheme.lower() == "https" else 80), allow_loopback)
    return url


class _DeadlineStream(NetworkStream):
    """A connection whose reads and writes never wait past one deadline for the whole try."""

    def __init__(self, stream: NetworkStream, deadline: float):
        self._stream = stream
        self._deadline = deadline

    def _left(self, timeout: float | None) -> float:
        left = max(0.001, self._deadline - time.monotonic())
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._left(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, self._left(timeout))
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class GuardedBackend(NetworkBackend):
    """httpcore's network layer for webhooks: check the address, connect to it, keep to a deadline.

    TLS still verifies the certificate against the URL's host name (httpcore passes it as the
    server name), while the socket goes to the address that was checked.
    """

    def __init__(self, allow_loopback: bool, seconds: float):
        self.allow_loopback = allow_loopback
        self.deadline = time.monotonic() + seconds
        self.connected: str | None = None  # the address the try went to, for the log

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None) -> NetworkStream:
        host = host.decode("ascii") if isinstance(host, bytes) else host
        addresses = resolve(host, port, self.allow_loopback)
        last: Exception | None = None
        for address in addresses:
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(min(left, timeout) if timeout else left)
                sock.connect((str(address), port))
            except TimeoutError as exc:
                sock.close()
                last = ConnectTimeout(f"connecting to {address} timed out")
                last.__cause__ = exc
                continue
            except OSError as exc:
                sock.close()
                last = ConnectError(f"could not connect to {address}: {exc.strerror or exc}")
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connected = str(address)
            return _DeadlineStream(SyncStream(sock), self.deadline)
        raise last or ConnectTimeout("no time left to connect")

    def connect_unix_socket(self, path, timeout=None, socket_options=None) -> NetworkStream:
        raise RefusedError("webhooks do not go to local sockets")
