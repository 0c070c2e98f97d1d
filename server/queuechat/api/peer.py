"""Who is calling, as far as the network says: the address the rate limits count by."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import unquote

import grpc

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def _networks(trusted: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in trusted)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def peer_ip(peer: str) -> str:
    """grpc's peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678" or, percent-encoded,
    "ipv6:%5B::1%5D:5678", "unix:...") without the port; an IPv4-mapped IPv6 address as IPv4."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
        addr = _ip(host)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return host
    return peer  # a unix socket: one local caller


def client_address(context: grpc.aio.ServicerContext, trusted_proxies: Iterable[str]) -> str:
    """The peer's address; if the peer is a trusted proxy (the web bridge, a load balancer), the
    right-most address of X-Forwarded-For that is not itself a trusted proxy."""
    ip = peer_ip(context.peer() or "")
    nets = _networks(tuple(trusted_proxies))
    addr = _ip(ip)
    if addr is None or not any(addr in n for n in nets):
        return ip
    forwarded = next((v for k, v in context.invocation_metadata() or () if k == "x-forwarded-for"), None)
    if not isinstance(forwarded, str):
        return ip
    for hop in reversed(forwarded.split(",")[-16:]):
        hop_ip = _ip(hop)
        if hop_ip is None:
            return ip  # a malformed chain: count the proxy itself
        if not any(hop_ip in n for n in nets):
            return str(hop_ip)
    return ip
