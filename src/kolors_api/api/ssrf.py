"""The SSRF guard of webhooks: which addresses a delivery may reach, checked twice.

At submit, `check_webhook_url` refuses (400, naming the field) a URL that is not http(s) or whose host
is, or resolves to, an address of the server's own networks. At connect time `GuardedBackend` (the
network backend of the delivery client) resolves the host again, checks the very address it is about
to dial, and dials that address, so a name that resolves elsewhere the second time (DNS rebinding)
does not pass. Refused: loopback, private (RFC 1918, ULA), link-local, carrier-grade NAT
(100.64.0.0/10), multicast, unspecified, reserved, cloud metadata (169.254.169.254, fd00:ec2::254) and
every IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address that embeds one of them (IPv4-mapped ones are
refused whatever they embed). `KOLORS_API_WEBHOOK_ALLOW_HOSTS` lists host names, addresses or networks
(comma-separated) that are reached anyway: an operator's own receivers, and the tests'.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore

from kolors_api.schema import clip, short

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
#: (host, port) -> the addresses a host name resolves to.
Resolver = Callable[[str, int], Awaitable[list[IP]]]

METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_URL = 2048
#: Numeric IPv4 spellings that resolvers read as addresses: 0x7f000002, 2130706434, 127.1, 0177.0.0.1.
_NUMERIC = re.compile(r"[0-9a-fA-FxX.]+")


class Blocked(Exception):  # noqa: N818 - an outcome of the guard
    """The guard refused a URL or an address; the message says which and why."""


def why_blocked(ip: IP) -> str | None:
    """What kind of address the guard refuses `ip` as, or None when it may be dialled."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        inner = ip.sixtofour or (ip.teredo[1] if ip.teredo else None) or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if inner is not None and (kind := why_blocked(inner)) is not None:
            return f"an IPv6 address embedding {kind}"
    checks = (
        (ip in METADATA, "a cloud metadata address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT, "a carrier-grade NAT address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "a reserved address"),
    )
    return next((why for hit, why in checks if hit), None)


def literal(host: str) -> IP | None:
    """The address `host` spells, in any form a resolver would read as one (`[::1]`, `0x7f000002`)."""
    host = host.strip("[]").split("%")[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


async def system_resolve(host: str, port: int) -> list[IP]:
    """The addresses of `host` from the system resolver (a literal is itself)."""
    if (ip := literal(host)) is not None:
        return [ip]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # the IDNA codec refuses it: an empty or over-long label, a lone soft hyphen
        raise Blocked(f"{short(host)} is not a valid host name") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class Policy:
    """The allow-list: names (as written in URLs), addresses and networks reached despite the guard."""

    def __init__(self, allow_hosts: str = "") -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in (part.strip().lower() for part in allow_hosts.split(",")):
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                self.names.add(item)

    def refusal(self, host: str, ip: IP) -> str | None:
        """Why `ip` (an address of `host`) may not be dialled, or None."""
        if host.lower().strip("[]") in self.names or any(ip in net for net in self.networks if
                                                         ip.version == net.version):
            return None
        why = why_blocked(ip)
        name = clip(host)
        return None if why is None else f"{name} is {why}" if literal(host) else f"{name} resolves to {ip}, {why}"


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; Blocked otherwise."""
    if len(url) > MAX_URL:
        raise Blocked(f"must be at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Blocked(f"not a valid URL ({clip(str(exc))})") from None
    if parts.scheme not in ("http", "https"):
        raise Blocked(f"must be an http or https URL, got scheme {clip(parts.scheme or 'none')!r}")
    if not parts.hostname:
        raise Blocked("must name a host")
    if parts.username is not None or parts.password is not None:
        raise Blocked("must not carry credentials")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def check_webhook_url(url: str, policy: Policy, resolve: Resolver = system_resolve) -> None:
    """Refuse (Blocked) a webhook URL the guard would not deliver to (submit-time check)."""
    _, host, port = split_url(url)
    try:
        addresses = await asyncio.wait_for(resolve(host, port), 5)
    except (OSError, TimeoutError):
        raise Blocked(f"{clip(host)} does not resolve") from None
    for ip in addresses:
        if (why := policy.refusal(host, ip)) is not None:
            # an operator's own receiver (a local one while trying things out) is allowed by name
            raise Blocked(f"{why}; the server allows such hosts when they are listed in "
                          f"KOLORS_API_WEBHOOK_ALLOW_HOSTS (e.g. KOLORS_API_WEBHOOK_ALLOW_HOSTS={host.strip('[]')})")


#: (host, port, address): the address a delivery chose (`GuardedBackend.pick`) for its connection to
#: host and port, so that it connects to the very address its per-destination bound counted.
PINNED: contextvars.ContextVar[tuple[str, int, IP] | None] = contextvars.ContextVar("pinned", default=None)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, dialling only addresses the policy allows: it resolves the host,
    checks each address and connects to the first allowed one by address (TLS still verifies the name),
    or to the address `PINNED` holds for that host and port (checked again)."""

    def __init__(self, policy: Policy, resolve: Resolver = system_resolve) -> None:
        self.policy = policy
        self.resolve = resolve
        self.inner = httpcore.AnyIOBackend()

    async def pick(self, host: str, port: int) -> IP:
        """The first address of `host` the policy allows; Blocked when there is none."""
        refusals = []
        for ip in await self.resolve(host, port):
            why = self.policy.refusal(host, ip)
            if why is None:
                return ip
            refusals.append(why)
        raise Blocked(refusals[0] if refusals else f"{clip(host)} resolves to no address")

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        pinned = PINNED.get()
        if pinned is not None and pinned[:2] == (host.lower().strip("[]"), port):
            if (why := self.policy.refusal(host, pinned[2])) is not None:
                raise Blocked(why)
            ip = pinned[2]
        else:
            ip = await self.pick(host, port)
        return await self.inner.connect_tcp(str(ip), port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise Blocked("unix sockets are not reached")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
