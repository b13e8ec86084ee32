"""Who is on the other end of a connection, and whether it counts as local.

"Local" is a privilege: a local connection may sign without a challenge nonce and is paired
silently (PROTOCOL.md A7, A10, A11). So the test is strict and fails closed: the socket peer
must be loopback, the Host header must name the loopback host, and any forwarding header
must come from a configured trusted proxy that itself reports a loopback client. Unlike
upstream, a ``*.ts.net`` Host does not count.

The effective client IP computed here keys rate limiting and is recorded for presence and
pairing, so forwarding headers are only believed when the peer is a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "LOCAL_HOSTNAMES",
    "ClientAddress",
    "IPNetwork",
    "is_loopback",
    "normalize_ip",
    "parse_trusted_proxies",
    "resolve_client",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Host header names (port and brackets removed, lowercased) that a local client may use.
LOCAL_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "::1"})

#: Headers a proxy adds; any of them from a peer that is not a trusted proxy makes the
#: connection remote. ``forwarded`` is RFC 7239's, sent by proxies configured the standard way.
_FORWARDING_HEADERS = ("x-forwarded-for", "x-real-ip", "x-forwarded-host", "forwarded")
_CLIENT_IP_HEADERS = ("x-forwarded-for", "x-real-ip")
_MAPPED_PREFIX = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """What the gateway believes about a connection's origin.

    :param ip: the effective client IP, canonical form; ``None`` when neither the peer nor a
        trusted proxy gave a usable address.
    :param is_local: the connection gets the local privileges (no nonce, silent pairing).
    :param via_trusted_proxy: the socket peer is one of the configured trusted proxies.
    :param forwarded: the request carried a forwarding header, trusted or not.
    """

    ip: str | None
    is_local: bool
    via_trusted_proxy: bool
    forwarded: bool


def parse_trusted_proxies(entries: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Parse ``gateway.trustedProxies``: exact IPv4/IPv6 addresses and CIDR ranges.

    Host bits in a range are ignored (``10.0.0.1/8`` means ``10.0.0.0/8``); an IPv4-mapped
    IPv6 address or range is read as the IPv4 one, matching how peers are normalised.

    :raises ValueError: naming the first entry that is neither an address nor a range.
    :raises TypeError: for a bare string, which would otherwise be read one character at a
        time.
    """
    if isinstance(entries, str):
        raise TypeError("trusted proxies must be a list of strings, not one string")
    networks: list[IPNetwork] = []
    for entry in entries:
        text = entry.strip().lower() if isinstance(entry, str) else ""
        try:
            if "/" in text:
                networks.append(_unmap_network(ipaddress.ip_network(text, strict=False)))
            else:
                networks.append(ipaddress.ip_network(_parse_ip(text)))
        except ValueError:
            raise ValueError(
                f"invalid trusted proxy {entry!r}: expected an IP address or a CIDR range"
            ) from None
    return tuple(networks)


def _unmap_network(network: IPNetwork) -> IPNetwork:
    """Turn a range inside ``::ffff:0:0/96`` into the IPv4 range it maps."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_PREFIX):
        base = network.network_address.ipv4_mapped
        if base is not None:
            prefix = network.prefixlen - _MAPPED_PREFIX.prefixlen
            return ipaddress.IPv4Network((base, prefix))
    return network


def _parse_ip(text: str) -> _IPAddress:
    """Parse an address, unwrapping brackets and IPv4-mapped IPv6; raise ``ValueError``."""
    candidate = text.strip().lower()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    address = ipaddress.ip_address(candidate)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_ip(text: str) -> str:
    """Return ``text`` as one canonical spelling of its address.

    Trims, lowercases, drops brackets and the ``::ffff:`` IPv4-mapped prefix, and compresses
    IPv6, so that one client never appears under two spellings (two rate-limit keys, say).
    Text that is not an IP address comes back trimmed and lowercased only.
    """
    try:
        return str(_parse_ip(text))
    except ValueError:
        return text.strip().lower()


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` is a loopback address: ``127.0.0.0/8``, ``::1``, ``::ffff:127.x``."""
    try:
        return _parse_ip(ip).is_loopback
    except ValueError:
        return False


def _split_host_port(text: str) -> str:
    """Return the host part of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    value = text.strip()
    if value.startswith("["):
        closing = value.find("]")
        return value[1:closing] if closing != -1 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # a bare IPv6 address (several colons) or a plain name


def _address_or_none(text: str) -> _IPAddress | None:
    try:
        return _parse_ip(_split_host_port(text))
    except ValueError:
        return None


def _is_trusted(address: _IPAddress, trusted_proxies: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted_proxies)


def _forwarded_for_client(header: str, trusted_proxies: Sequence[IPNetwork]) -> _IPAddress | None:
    """Pick the client out of an ``X-Forwarded-For`` chain sent by a trusted proxy.

    Proxies append the address they saw, so only the right-hand end of the chain is vouched
    for; anything to the left of the first untrusted hop was written by the client and could
    be ``127.0.0.1``. The client is therefore the rightmost entry that is not itself a trusted
    proxy. For a single entry (a proxy that overwrites the header) this is simply that entry.
    An unreadable entry before the client is found makes the chain worthless: ``None``.
    """
    hops = [hop for hop in header.split(",") if hop.strip()]
    leftmost: _IPAddress | None = None
    for hop in reversed(hops):
        address = _address_or_none(hop)
        if address is None:
            return None
        if not _is_trusted(address, trusted_proxies):
            return address
        leftmost = address
    return leftmost


def _host_is_local(host_header: str | None) -> bool:
    if host_header is None:
        return False
    return _split_host_port(host_header).lower() in LOCAL_HOSTNAMES


def resolve_client(
    peer_ip: str,
    headers: Mapping[str, str],
    trusted_proxies: Sequence[IPNetwork],
) -> ClientAddress:
    """Work out the effective client IP and whether the connection is local.

    :param peer_ip: the socket's remote address.
    :param headers: the upgrade request's headers, names in lower case.
    :param trusted_proxies: the result of :func:`parse_trusted_proxies`.

    When the peer is a trusted proxy the client IP comes from ``X-Forwarded-For``, else
    ``X-Real-IP``, else the peer itself. From ``X-Forwarded-For`` it takes the rightmost entry
    that is not a trusted proxy, not the first entry as upstream does: with a proxy that
    appends, the first entry is whatever the client wrote. A trusted proxy whose client-IP
    headers name no usable address gives ``ip=None`` rather than its own address, which
    would make a remote client look like the proxy's host (loopback, for a local proxy).
    From any other peer, forwarding headers are ignored for the IP and make the connection
    non-local.
    """
    try:
        peer: _IPAddress | None = _parse_ip(peer_ip)
    except ValueError:
        peer = None
    forwarded = any(name in headers for name in _FORWARDING_HEADERS)
    via_trusted_proxy = peer is not None and _is_trusted(peer, trusted_proxies)

    client: _IPAddress | None = peer
    client_vouched_by_proxy = False
    if via_trusted_proxy and any(name in headers for name in _CLIENT_IP_HEADERS):
        client = None
        if "x-forwarded-for" in headers:
            client = _forwarded_for_client(headers["x-forwarded-for"], trusted_proxies)
        if client is None and "x-real-ip" in headers:
            client = _address_or_none(headers["x-real-ip"])
        client_vouched_by_proxy = client is not None

    # A proxy that forwards without naming the client has not said the client is local.
    forwarded_client_is_loopback = (
        client_vouched_by_proxy and client is not None and client.is_loopback
    )
    is_local = (
        peer is not None
        and peer.is_loopback
        and _host_is_local(headers.get("host"))
        and (not forwarded or forwarded_client_is_loopback)
    )
    return ClientAddress(
        ip=str(client) if client is not None else None,
        is_local=is_local,
        via_trusted_proxy=via_trusted_proxy,
        forwarded=forwarded,
    )
