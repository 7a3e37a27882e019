"""The SSRF guard: a webhook URL may only reach public addresses.

A job's `webhook_url` makes our servers send a request wherever a user points it, so it could
be aimed at the cloud metadata service, Redis or an admin port inside our network. The host is
resolved and *every* address it resolves to is checked (one private answer among public ones
is enough for an attacker), and delivery connects to an address that was checked, keeping the
name only for the Host header and TLS SNI, so a DNS answer that changes between the check and
the connection (rebinding) cannot slip through. The check runs at submit and again per attempt.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.settings import get_settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
ALLOW_HOSTS_ENV = "RENDERFARM_WEBHOOK_ALLOW_HOSTS"
ONLY_HOSTS_ENV = "RENDERFARM_WEBHOOK_ONLY_HOSTS"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class WebhookUrlError(ValueError):
    """The URL may not be used as a webhook target; the message says why and what is allowed."""


class UnresolvableHostError(WebhookUrlError):
    """The host has no DNS answer right now. Refused at submit; at delivery it may be temporary."""


@dataclass(frozen=True)
class ResolvedTarget:
    """A checked URL together with the addresses it may be delivered to."""

    url: str
    scheme: str
    hostname: str
    port: int
    path: str
    addresses: tuple[Address, ...]

    @property
    def is_ip_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.hostname)
        except ValueError:
            return False
        return True

    @property
    def host_header(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    @property
    def sni_hostname(self) -> str | None:
        """The name TLS must present and verify; None when the URL names an address."""
        return None if self.is_ip_literal else self.hostname

    def pinned_url(self, address: Address) -> str:
        """The URL with its host replaced by a checked address, so no second DNS lookup happens."""
        host = f"[{address.compressed}]" if address.version == 6 else address.compressed
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def system_resolver(hostname: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHostError(f"webhook_url host {hostname!r} could not be resolved: {exc}") from exc
    return [str(info[4][0]) for info in infos]


def check_webhook_url(
    url: str, *, allow_hosts: Iterable[str] | None = None, resolver: Resolver | None = None,
    only_hosts: Iterable[str] | None = None, field: str = "webhook_url", allow_env: str = ALLOW_HOSTS_ENV,
) -> ResolvedTarget:
    """Parse, resolve and check `url`; raise WebhookUrlError unless every address is public (or allowlisted).

    `allow_hosts` defaults to RENDERFARM_WEBHOOK_ALLOW_HOSTS: host names, addresses or CIDR networks exempt from
    the public-address rule. `only_hosts` (default RENDERFARM_WEBHOOK_ONLY_HOSTS), when not empty, is the only set
    of hosts, addresses or networks a webhook may reach at all: checked before any DNS lookup of another name.
    ``field`` and ``allow_env`` name the request field and the allow-list's variable in messages (the model store's
    import from a URL uses the same guard).
    """
    try:
        scheme, hostname, port, path = _parse(url)
    except WebhookUrlError as exc:
        raise WebhookUrlError(str(exc).replace("webhook_url", field, 1)) from exc
    if allow_hosts is None:
        allow_hosts = get_settings().webhooks.allow_hosts
    if only_hosts is None:
        only_hosts = get_settings().webhooks.only_hosts
    only_names, only_networks = _parse_allowlist(only_hosts)
    if (only_names or only_networks) and hostname not in only_names:
        try:
            literal_address = ipaddress.ip_address(hostname)
        except ValueError:
            literal_address = None
        if literal_address is None or not any(literal_address in network for network in only_networks):
            raise WebhookUrlError(f"{field} host {hostname!r} is not one this farm sends webhooks to "
                                  f"({ONLY_HOSTS_ENV}: {', '.join(sorted(only_hosts))})")
    allowed_names, allowed_networks = _parse_allowlist(allow_hosts)
    try:
        addresses = [ipaddress.ip_address(hostname)]
        literal = True
    except ValueError:
        literal = False
        try:
            raw = (resolver or system_resolver)(hostname, port)
        except UnresolvableHostError as exc:
            raise UnresolvableHostError(str(exc).replace("webhook_url", field, 1)) from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in raw))
        if not addresses:
            raise UnresolvableHostError(f"{field} host {hostname!r} resolved to no address") from None
    if hostname not in allowed_names:
        for address in addresses:
            if any(address in network for network in allowed_networks):
                continue
            reason = refusal_reason(address)
            if reason is not None:
                shown = hostname if literal else f"{hostname!r} resolves to {address}, which"
                raise WebhookUrlError(
                    f"{field} host {shown} is {reason}; {'webhook targets' if field == 'webhook_url' else field} "
                    "must be public internet addresses "
                    f"(operators can allow hosts for local testing with {allow_env})"
                )
    return ResolvedTarget(url=url, scheme=scheme, hostname=hostname, port=port, path=path, addresses=tuple(addresses))


def refusal_reason(address: Address) -> str | None:
    """Why an address may not be a webhook target ('a loopback address', ...), or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if address in _IPV4_COMPATIBLE and not (address.is_loopback or address.is_unspecified):
            return "an IPv4-compatible IPv6 address"
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and refusal_reason(embedded) is not None:
            return f"an IPv6 address embedding {embedded}, which is {refusal_reason(embedded)}"
        if address in _UNIQUE_LOCAL:
            return "a unique-local address"
        if address.is_site_local:
            return "a site-local address"
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_link_local, "a link-local address (cloud metadata services live there)"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a publicly routable address"),
    )
    return next((reason for refused, reason in checks if refused), None)


def _parse(url: str) -> tuple[str, str, int, str]:
    if not isinstance(url, str) or not url:
        raise WebhookUrlError("webhook_url must be an absolute http:// or https:// URL")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"webhook_url must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise WebhookUrlError("webhook_url must not contain spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise WebhookUrlError(f"webhook_url must use http or https, got {parts.scheme or 'no scheme'!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError("webhook_url must not carry credentials (user:password@); deliveries are signed")
    hostname = parts.hostname
    if not hostname:
        raise WebhookUrlError("webhook_url must name a host")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise WebhookUrlError(f"webhook_url has an invalid port: {exc}") from exc
    if not hostname.isascii():
        try:
            hostname = hostname.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise WebhookUrlError(f"webhook_url host {hostname!r} is not a valid domain name") from exc
    hostname = hostname.rstrip(".")
    if not hostname:
        raise WebhookUrlError("webhook_url must name a host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, hostname, port, path


def _parse_allowlist(entries: Iterable[str]) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    names: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in entries:
        entry = entry.strip().lower().strip("[]")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.rstrip("."))
    return names, networks
