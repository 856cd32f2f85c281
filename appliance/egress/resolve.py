"""Resolve a destination name once and classify each address it resolves to.

Why: a proxy that checks a name's addresses and then lets the OS connect *by name* resolves twice,
and the second answer (DNS rebinding, round-robin) may be an address nobody checked. So the proxy
resolves here, classifies every address, and the server dials the exact address chosen.
IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are unwrapped first so they cannot dodge an
IPv4 deny range.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

from protocol.errors import AirlockError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> address strings, in preference order. Injected in tests; the default asks the OS.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class ResolutionError(AirlockError):
    """The name did not resolve to any usable address; the request is refused."""


def unwrap(ip: Address) -> Address:
    """``::ffff:a.b.c.d`` is the IPv4 host a.b.c.d on the wire; classify it as that."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_ip(text: str) -> Address | None:
    """An IP literal (optionally ``[bracketed]`` IPv6), unwrapped; None if ``text`` is a name."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return unwrap(ipaddress.ip_address(text))
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Ask the OS resolver (in the loop's executor) for TCP addresses of ``host``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


async def resolve(
    host: str, port: int, resolver: Resolver = system_resolver, timeout: float | None = None
) -> tuple[Address, ...]:
    """All distinct addresses of ``host`` in resolver order. An IP literal is its own answer.

    Raises ResolutionError on failure, timeout or an empty answer: no address means no connection.
    """
    literal = parse_ip(host)
    if literal is not None:
        return (literal,)
    try:
        answers = await asyncio.wait_for(resolver(host, port), timeout)
    except TimeoutError:
        raise ResolutionError(f"resolution failed: {host} timed out") from None
    except (OSError, UnicodeError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ResolutionError(f"resolution failed: {host}: {detail}") from None
    out: list[Address] = []
    for answer in answers:
        ip = parse_ip(answer)
        if ip is not None and ip not in out:
            out.append(ip)
    if not out:
        raise ResolutionError(f"resolution failed: {host} has no addresses")
    return tuple(out)


def classify(
    ip: Address,
    always_deny: Sequence[tuple[IPNetwork, str]],
    allow_cidrs: Sequence[IPNetwork],
) -> tuple[bool, str]:
    """(usable, reason) for one address.

    A location's allow_cidrs win over the global deny ranges: that is how an operator opens one
    internal service to one location, and nothing else. Deny ranges are tried in policy order,
    so the more specific reason listed first (cloud metadata) wins over the wider one (link-local).
    """
    ip = unwrap(ip)
    for network in allow_cidrs:
        if ip in network:
            return True, f"address {ip} is inside allow_cidrs {network}"
    for network, why in always_deny:
        if ip in network:
            return False, f"address {ip} is {why}"
    return True, f"address {ip} is not in a denied range"
