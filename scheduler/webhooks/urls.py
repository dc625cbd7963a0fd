"""Which webhook URLs are allowed: the admin's allowlist (its syntax: host/allowlist.py), no
private, loopback or cloud-metadata address unless listed, checked again at delivery time (a name
may resolve elsewhere later).
"""

from __future__ import annotations

import socket
from ipaddress import IPv6Address, ip_address
from urllib.parse import urlsplit

from host.allowlist import IPAddress, parse_allowlist, url_problem

# --- URL policy ---------------------------------------------------------------------------------
# Residual risk, DNS rebinding: check_url(resolve=True) resolves the host, then httpx resolves it
# again to connect. A name whose DNS answer changes between the two (short TTL, attacker-run
# DNS) can pass the check with an allowed address and connect to another. Host-name entries
# should therefore name hosts whose DNS the operator controls; an allowlist of IPs/CIDRs with IP
# URLs has no such gap. Closing it fully means connecting to the checked address itself.

# Cloud instance-metadata services: AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba.
METADATA_ADDRESSES = frozenset(ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))


def _plain(addr: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d reaches a.b.c.d: judge it as that."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _literal(host: str) -> IPAddress | None:
    try:
        return _plain(ip_address(host))
    except ValueError:
        return None


def special_kind(addr: IPAddress) -> str | None:
    """Why an address is never reached without an explicit IP/CIDR entry, or None."""
    if addr in METADATA_ADDRESSES:
        return "cloud-metadata"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_multicast:
        return "multicast"
    return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (raises OSError when it does not)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({_plain(ip_address(str(info[4][0]))) for info in infos}, key=str)


def check_url(url: str, allow: list[str], resolve: bool) -> str | None:
    """None when a webhook may POST to `url`; else why not, for a human.

    The host must be admitted by the allowlist: by name ("hooks.corp.example", "*.corp.example")
    or by address (an IP or CIDR entry). With resolve=True, every address the host resolves to
    is checked too: each must be inside an IP/CIDR entry unless the host was admitted by name,
    and loopback, link-local (cloud metadata included), unspecified and multicast addresses
    need an IP/CIDR entry containing them whatever admitted the host. With resolve=False, a host
    name that only IP/CIDR entries could admit passes: resolve=True decides it at delivery.
    Raises ValueError on a malformed allowlist (see parse_allowlist).
    """
    problem = url_problem(url)
    if problem is not None:
        return problem
    if not allow:
        return "webhooks are off: no hosts are allowed"
    rules = parse_allowlist(allow)
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    literal = _literal(host)
    by_name = literal is None and rules.admits_name(host)
    if literal is not None and not rules.contains(literal):
        return f"{host} is not in the webhook allowlist"
    if literal is None and not by_name and not rules.networks:
        return f"{host} is not in the webhook allowlist"
    if not resolve:
        return None
    try:
        addrs = resolve_host(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as e:
        return f"cannot resolve {host}: {e}"
    if not addrs:
        return f"{host} resolves to no address"
    for addr in addrs:
        explicit = rules.contains(addr)
        kind = special_kind(addr)
        if kind is not None and not explicit:
            return (
                f"{host} resolves to {addr}, a {kind} address: only an IP or CIDR allowlist entry admits it"
            )
        if not by_name and not explicit:
            return f"{host} resolves to {addr}, outside the allowed addresses"
    return None
