"""The `webhooks.allow` setting's syntax: which entries are well formed (`parse_allowlist`: host
names, "*.domain", IPs, CIDRs) and what makes a URL unusable as a webhook URL whatever the list
(`url_problem`). Pure: the settings validate with it at start and on every live change; the
policy that applies the list to a URL, resolving its host, is scheduler/webhooks/urls.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a webhook URL whatever the allowlist, or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"webhook URLs are at most {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "webhook URL contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises ValueError on a bad port
    except ValueError as e:
        return f"invalid webhook URL: {e}"
    if parts.scheme not in ("http", "https"):
        return "webhook URLs must be http or https"
    if "@" in parts.netloc:
        return "webhook URLs may not carry credentials (user:password@)"
    if not parts.hostname:
        return "webhook URL has no host"
    return None


@dataclass(frozen=True)
class Allowlist:
    """The parsed `webhooks.allow` setting. names: exact host names; suffixes: ".corp.example"
    from "*.corp.example" (any depth of subdomain, not the bare domain); networks: IPs and CIDRs."""

    names: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[IPNetwork, ...]

    def admits_name(self, host: str) -> bool:
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def contains(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.networks)  # False across IP versions


def parse_allowlist(allow: list[str]) -> Allowlist:
    """Raises ValueError on an entry that is neither a host name, "*.domain", an IP nor a CIDR."""
    names: set[str] = set()
    suffixes: list[str] = []
    networks: list[IPNetwork] = []
    for entry in allow:
        e = entry.strip().lower().rstrip(".")
        try:
            networks.append(ip_network(e.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        host = e.removeprefix("*.")
        if not host or any(c in host for c in "*/:@[] ") or url_problem(f"http://{host}/") is not None:
            raise ValueError(f"webhook allowlist entry {entry!r} is not a host name, *.domain, IP or CIDR")
        if e.startswith("*."):
            suffixes.append(f".{host}")
        else:
            names.add(host)
    return Allowlist(frozenset(names), tuple(suffixes), tuple(networks))
