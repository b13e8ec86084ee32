"""Client IP and "local" detection (PROTOCOL.md A7, with the product's stricter rules)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.locality import (
    ClientAddress,
    is_loopback,
    normalize_ip,
    parse_trusted_proxies,
    resolve_client,
)

LOCAL_HOST = {"host": "127.0.0.1:18789"}
NO_PROXIES = parse_trusted_proxies([])
LOOPBACK_PROXY = parse_trusted_proxies(["127.0.0.1"])


# -- trusted proxy entries -----------------------------------------------------------------


def test_exact_addresses_and_ranges_of_both_families_parse() -> None:
    networks = parse_trusted_proxies(
        ["10.0.0.1", " 192.168.0.0/16 ", "2001:DB8::1", "fd00::/8", "[::1]"]
    )
    assert networks == (
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("192.168.0.0/16"),
        ipaddress.ip_network("2001:db8::1/128"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_range_with_host_bits_is_widened_to_its_network() -> None:
    assert parse_trusted_proxies(["10.1.2.3/8"]) == (ipaddress.ip_network("10.0.0.0/8"),)


def test_ipv4_mapped_entries_become_ipv4() -> None:
    assert parse_trusted_proxies(["::ffff:10.0.0.1", "::ffff:10.0.0.0/104"]) == (
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )


@pytest.mark.parametrize(
    "bad_entry", ["", "proxy.example.com", "10.0.0.256", "10.0.0.0/33", "fd00::/129", "1.2.3"]
)
def test_bad_entry_is_named_in_the_error(bad_entry: str) -> None:
    with pytest.raises(ValueError, match="invalid trusted proxy") as caught:
        parse_trusted_proxies(["10.0.0.1", bad_entry])
    assert repr(bad_entry) in str(caught.value)


def test_a_single_string_is_not_mistaken_for_a_list() -> None:
    with pytest.raises(TypeError):
        parse_trusted_proxies("10.0.0.1")


# -- normalisation and loopback ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 10.0.0.1 ", "10.0.0.1"),
        ("::FFFF:10.0.0.1", "10.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        (" Not-An-IP ", "not-an-ip"),
        ("", ""),
    ],
)
def test_normalize_ip(text: str, expected: str) -> None:
    assert normalize_ip(text) == expected


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("::2", False),
        ("::ffff:10.0.0.1", False),
        ("localhost", False),
        ("", False),
    ],
)
def test_is_loopback(ip: str, expected: bool) -> None:
    assert is_loopback(ip) is expected


# -- direct connections --------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:18789", "127.0.0.1", "127.0.0.1:80", "[::1]:18789", "::1"]
)
def test_loopback_peer_with_loopback_host_is_local(host: str) -> None:
    client = resolve_client("127.0.0.1", {"host": host}, NO_PROXIES)
    assert client == ClientAddress(
        ip="127.0.0.1", is_local=True, via_trusted_proxy=False, forwarded=False
    )


@pytest.mark.parametrize("peer", ["::1", "::ffff:127.0.0.1", "127.0.0.2"])
def test_every_loopback_peer_spelling_is_local(peer: str) -> None:
    assert resolve_client(peer, LOCAL_HOST, NO_PROXIES).is_local


@pytest.mark.parametrize(
    "host",
    ["gateway.tail1234.ts.net", "example.com", "127.0.0.2", "localhost.", "192.168.1.5", ""],
)
def test_other_host_names_are_not_local(host: str) -> None:
    assert not resolve_client("127.0.0.1", {"host": host}, NO_PROXIES).is_local


def test_missing_host_header_is_not_local() -> None:
    assert not resolve_client("127.0.0.1", {}, NO_PROXIES).is_local


def test_remote_peer_is_not_local_whatever_the_host_says() -> None:
    client = resolve_client("203.0.113.7", LOCAL_HOST, NO_PROXIES)
    assert client == ClientAddress(
        ip="203.0.113.7", is_local=False, via_trusted_proxy=False, forwarded=False
    )


def test_peer_address_is_normalised() -> None:
    assert resolve_client("::FFFF:203.0.113.7", {}, NO_PROXIES).ip == "203.0.113.7"


def test_unreadable_peer_address_gives_no_ip() -> None:
    client = resolve_client("", LOCAL_HOST, NO_PROXIES)
    assert client.ip is None
    assert not client.is_local


def test_peer_address_with_a_port_is_not_guessed_at() -> None:
    assert resolve_client("127.0.0.1:80", LOCAL_HOST, NO_PROXIES).ip is None


# -- forwarding headers from peers that are not trusted ------------------------------------


@pytest.mark.parametrize(
    "header", ["x-forwarded-for", "x-real-ip", "x-forwarded-host", "forwarded"]
)
def test_forwarding_header_from_untrusted_peer_is_ignored_and_not_local(header: str) -> None:
    headers = {**LOCAL_HOST, header: "127.0.0.1"}
    client = resolve_client("127.0.0.1", headers, NO_PROXIES)
    assert client == ClientAddress(
        ip="127.0.0.1", is_local=False, via_trusted_proxy=False, forwarded=True
    )


def test_spoofed_forwarded_for_from_remote_peer_does_not_change_ip() -> None:
    headers = {"x-forwarded-for": "10.9.9.9", "x-real-ip": "10.8.8.8"}
    client = resolve_client("203.0.113.7", headers, parse_trusted_proxies(["10.0.0.0/8"]))
    assert client.ip == "203.0.113.7"
    assert not client.via_trusted_proxy


def test_blank_forwarding_header_still_counts_as_forwarded() -> None:
    client = resolve_client("127.0.0.1", {**LOCAL_HOST, "x-forwarded-for": ""}, NO_PROXIES)
    assert client.forwarded
    assert not client.is_local


# -- trusted proxies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forwarded_for", "expected_ip"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("2001:DB8::7", "2001:db8::7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 , 127.0.0.1", "203.0.113.7"),
    ],
)
def test_trusted_proxy_forwarded_for_gives_client_ip(forwarded_for: str, expected_ip: str) -> None:
    headers = {**LOCAL_HOST, "x-forwarded-for": forwarded_for}
    client = resolve_client("127.0.0.1", headers, LOOPBACK_PROXY)
    assert client == ClientAddress(
        ip=expected_ip, is_local=False, via_trusted_proxy=True, forwarded=True
    )


def test_client_prepended_entries_are_not_believed() -> None:
    # The proxy appended the address it saw; the "127.0.0.1" before it came from the client.
    headers = {**LOCAL_HOST, "x-forwarded-for": "127.0.0.1, 203.0.113.7"}
    client = resolve_client("127.0.0.1", headers, LOOPBACK_PROXY)
    assert client.ip == "203.0.113.7"
    assert not client.is_local


def test_chain_of_trusted_proxies_is_walked_to_the_first_untrusted_hop() -> None:
    proxies = parse_trusted_proxies(["127.0.0.1", "10.0.0.0/8"])
    headers = {"x-forwarded-for": "198.51.100.1, 203.0.113.7, 10.0.0.5, 10.0.0.6"}
    assert resolve_client("127.0.0.1", headers, proxies).ip == "203.0.113.7"


def test_x_real_ip_is_used_when_there_is_no_forwarded_for() -> None:
    headers = {**LOCAL_HOST, "x-real-ip": "203.0.113.8"}
    assert resolve_client("127.0.0.1", headers, LOOPBACK_PROXY).ip == "203.0.113.8"


def test_x_real_ip_is_used_when_forwarded_for_is_unreadable() -> None:
    headers = {"x-forwarded-for": "unknown", "x-real-ip": "203.0.113.8"}
    assert resolve_client("127.0.0.1", headers, LOOPBACK_PROXY).ip == "203.0.113.8"


@pytest.mark.parametrize(
    "headers",
    [{"x-forwarded-for": "unknown"}, {"x-forwarded-for": ""}, {"x-real-ip": "nonsense"}],
)
def test_unreadable_client_headers_from_proxy_give_no_ip_and_not_local(
    headers: dict[str, str],
) -> None:
    client = resolve_client("127.0.0.1", {**LOCAL_HOST, **headers}, LOOPBACK_PROXY)
    assert client.ip is None
    assert not client.is_local


def test_trusted_proxy_reporting_a_loopback_client_is_local() -> None:
    headers = {"host": "localhost", "x-forwarded-for": "127.0.0.1", "x-forwarded-host": "x"}
    client = resolve_client("127.0.0.1", headers, LOOPBACK_PROXY)
    assert client == ClientAddress(
        ip="127.0.0.1", is_local=True, via_trusted_proxy=True, forwarded=True
    )


@pytest.mark.parametrize(
    ("header", "value"), [("x-forwarded-host", "localhost"), ("forwarded", "for=127.0.0.1")]
)
def test_trusted_proxy_forwarding_only_the_host_has_not_vouched_for_the_client(
    header: str, value: str
) -> None:
    # Only X-Forwarded-For and X-Real-IP name the client; RFC 7239's header is not read.
    headers = {**LOCAL_HOST, header: value}
    client = resolve_client("127.0.0.1", headers, LOOPBACK_PROXY)
    assert client.ip == "127.0.0.1"
    assert client.via_trusted_proxy
    assert not client.is_local


def test_trusted_proxy_peer_without_forwarding_headers_is_a_direct_client() -> None:
    client = resolve_client("127.0.0.1", LOCAL_HOST, LOOPBACK_PROXY)
    assert client == ClientAddress(
        ip="127.0.0.1", is_local=True, via_trusted_proxy=True, forwarded=False
    )


def test_remote_trusted_proxy_cannot_make_a_client_local() -> None:
    proxies = parse_trusted_proxies(["10.0.0.0/8"])
    headers = {**LOCAL_HOST, "x-forwarded-for": "127.0.0.1"}
    client = resolve_client("10.0.0.5", headers, proxies)
    assert client.via_trusted_proxy
    assert client.ip == "127.0.0.1"
    assert not client.is_local


def test_ipv6_trusted_proxy_range_matches_ipv6_peer() -> None:
    proxies = parse_trusted_proxies(["fd00::/8"])
    client = resolve_client("FD00::1", {"x-forwarded-for": "203.0.113.9"}, proxies)
    assert client.via_trusted_proxy
    assert client.ip == "203.0.113.9"


def test_mapped_peer_matches_ipv4_trusted_proxy() -> None:
    proxies = parse_trusted_proxies(["10.0.0.0/8"])
    client = resolve_client("::ffff:10.1.1.1", {"x-real-ip": "203.0.113.9"}, proxies)
    assert client.via_trusted_proxy
    assert client.ip == "203.0.113.9"


# -- properties ----------------------------------------------------------------------------

header_values = st.one_of(st.text(max_size=40), st.ip_addresses().map(str))


@given(
    peer=st.one_of(st.text(max_size=40), st.ip_addresses().map(str)),
    headers=st.dictionaries(
        st.sampled_from(["host", "x-forwarded-for", "x-real-ip", "x-forwarded-host", "forwarded"]),
        header_values,
    ),
    trust_loopback=st.booleans(),
)
def test_resolve_client_never_raises_and_local_needs_a_loopback_peer(
    peer: str, headers: dict[str, str], trust_loopback: bool
) -> None:
    proxies = LOOPBACK_PROXY if trust_loopback else NO_PROXIES
    client = resolve_client(peer, headers, proxies)
    if client.is_local:
        assert is_loopback(peer)
        assert client.ip is not None and is_loopback(client.ip)
    if client.forwarded and not client.via_trusted_proxy:
        assert not client.is_local
    if client.ip is not None:
        ipaddress.ip_address(client.ip)  # always a canonical address, never header garbage
        assert normalize_ip(client.ip) == client.ip


@given(st.ip_addresses())
def test_normalize_ip_is_idempotent_and_keeps_the_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    normalized = normalize_ip(str(address).upper())
    assert normalize_ip(normalized) == normalized
    parsed = ipaddress.ip_address(normalized)
    mapped = getattr(address, "ipv4_mapped", None)
    assert parsed == (mapped or address)
