"""The egress decision as a matrix: routes x allowlist x resolver answers -> allow/deny and reason.

No sockets: the resolver is a fake, so every branch (including DNS answers that point inside) is
exercised deterministically. DENY mirrors policy/egress.yaml.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from appliance.egress.decide import Decision, admit, decide
from appliance.egress.resolve import classify, parse_ip, resolve
from appliance.egress.routes import Route, RoutesFile, RouteTable, parse_routes
from appliance.policy import HostPort, PolicyError

N = ipaddress.ip_network
DENY = tuple(
    (N(cidr), reason)
    for reason, cidrs in [
        ("cloud metadata", ["169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32"]),
        ("loopback", ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"]),
        ("private", ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]),
        ("link-local", ["169.254.0.0/16", "fe80::/10"]),
        ("cgnat", ["100.64.0.0/10"]),
        ("reserved", ["192.0.2.0/24", "224.0.0.0/4", "240.0.0.0/4", "64:ff9b::/96"]),
    ]
    for cidr in cidrs
)
SOURCE = "172.28.5.9"
ROUTE = Route(
    location="example",
    cidrs=(N("172.28.5.0/24"),),
    allow=(HostPort("pypi.org", 443), HostPort("*.example.com", None), HostPort("db.internal", 5432)),
    allow_cidrs=(N("10.1.0.0/16"),),
)
TABLE = RouteTable(routes=(ROUTE,))
DNS: dict[str, list[str]] = {
    "pypi.org": ["151.101.0.223"],
    "files.example.com": ["93.184.215.14"],
    "private.example.com": ["10.0.0.5"],
    "loop.example.com": ["127.0.0.1"],
    "linklocal.example.com": ["169.254.1.1"],
    "meta.example.com": ["169.254.169.254"],
    "meta6.example.com": ["fd00:ec2::254"],
    "cgnat.example.com": ["100.64.0.1"],
    "mapped.example.com": ["::ffff:127.0.0.1"],
    "db.internal": ["10.1.2.3"],
    "mixed.example.com": ["10.0.0.5", "10.1.0.7"],
    "rebind.example.com": ["169.254.169.254", "151.101.0.1"],
    "alldenied.example.com": ["10.0.0.5", "127.0.0.1"],
    "empty.example.com": [],
}


class FakeResolver:
    """Answers from DNS, records every lookup so tests can prove a refused name was never resolved."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host == "slow.example.com":
            await asyncio.sleep(5)
        if host not in DNS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return DNS[host]


def run_decide(host: str, port: int, *, source: str = SOURCE, table: RouteTable = TABLE) -> tuple[Decision, list[str]]:
    resolver = FakeResolver()
    ip = ipaddress.ip_address(source)
    decision = asyncio.run(decide(table, ip, host, port, DENY, resolver, timeout=0.5))
    return decision, resolver.calls


@pytest.mark.parametrize(
    ("host", "port", "ip"),
    [
        ("pypi.org", 443, "151.101.0.223"),
        ("PyPI.org.", 443, "151.101.0.223"),  # case and trailing dot do not matter
        ("files.example.com", 8443, "93.184.215.14"),  # *.example.com:* glob, any port
        ("db.internal", 5432, "10.1.2.3"),  # private, but inside the location's allow_cidrs
        ("mixed.example.com", 443, "10.1.0.7"),  # first answer denied, second allowed by cidr: dial it
        ("rebind.example.com", 443, "151.101.0.1"),  # metadata answer skipped, the public one dialled
        ("10.1.2.3", 6379, "10.1.2.3"),  # IP literal inside allow_cidrs: any port
        ("::ffff:10.1.0.9", 80, "10.1.0.9"),  # mapped literal, unwrapped, inside allow_cidrs
    ],
)
def test_allowed(host: str, port: int, ip: str) -> None:
    decision, _ = run_decide(host, port)
    assert decision.allow, decision.reason
    assert decision.location == "example"
    assert str(decision.ip) == ip
    assert decision.reason.startswith("allowed: ")


@pytest.mark.parametrize(
    ("host", "port", "reason"),
    [
        ("pypi.org", 80, "host not in allowlist"),  # wrong port
        ("example.com", 443, "host not in allowlist"),  # *.example.com does not cover the bare domain
        ("evilexample.com", 443, "host not in allowlist"),
        ("a.example.com.evil.net", 443, "host not in allowlist"),
        ("private.example.com", 443, "address 10.0.0.5 is private"),
        ("loop.example.com", 443, "address 127.0.0.1 is loopback"),
        ("linklocal.example.com", 443, "address 169.254.1.1 is link-local"),
        ("meta.example.com", 80, "address 169.254.169.254 is cloud metadata"),
        ("meta6.example.com", 80, "address fd00:ec2::254 is cloud metadata"),
        ("cgnat.example.com", 443, "address 100.64.0.1 is cgnat"),
        ("mapped.example.com", 443, "address 127.0.0.1 is loopback"),  # ::ffff:127.0.0.1 unwrapped
        ("alldenied.example.com", 443, "address 10.0.0.5 is private"),  # the first refusal is reported
        ("nxdomain.example.com", 443, "resolution failed"),
        ("empty.example.com", 443, "resolution failed"),
        ("slow.example.com", 443, "timed out"),
        ("10.2.0.1", 5432, "host not in allowlist"),  # IP literal outside allow_cidrs
        ("8.8.8.8", 53, "host not in allowlist"),
        ("bad host!", 443, "invalid host"),
        ("pypi.org", 0, "invalid port"),
    ],
)
def test_refused(host: str, port: int, reason: str) -> None:
    decision, _ = run_decide(host, port)
    assert not decision.allow
    assert reason in decision.reason
    assert decision.ip is None
    assert decision.location == "example"


def test_same_address_allowed_when_allow_cidrs_cover_it() -> None:
    wide = Route("example", ROUTE.cidrs, ROUTE.allow, (N("10.0.0.0/8"), N("127.0.0.1/32"), N("169.254.0.0/16")))
    table = RouteTable(routes=(wide,))
    for host, ip in [
        ("private.example.com", "10.0.0.5"),
        ("loop.example.com", "127.0.0.1"),
        ("mapped.example.com", "127.0.0.1"),
        ("meta.example.com", "169.254.169.254"),
    ]:
        decision, _ = run_decide(host, 443, table=table)
        assert decision.allow, (host, decision.reason)
        assert str(decision.ip) == ip
        assert "allow_cidrs" in decision.reason


def test_ip_literal_mapped_loopback_refused_even_when_allowlisted() -> None:
    route = Route("example", ROUTE.cidrs, (HostPort("127.0.0.1", 8080),), ())
    decision, calls = run_decide("::ffff:127.0.0.1", 8080, table=RouteTable(routes=(route,)))
    assert not decision.allow
    assert decision.reason == "address 127.0.0.1 is loopback"
    assert calls == []  # a literal is never sent to the resolver


def test_refused_name_is_never_resolved() -> None:
    decision, calls = run_decide("exfiltrate-secret.attacker.net", 443)
    assert not decision.allow
    assert calls == []


def test_unknown_source_refused_before_anything_else() -> None:
    decision, calls = run_decide("pypi.org", 443, source="172.28.6.1")
    assert not decision.allow
    assert decision.reason.startswith("unknown source")
    assert decision.location is None
    assert calls == []


def test_mapped_source_is_located() -> None:
    decision, _ = run_decide("pypi.org", 443, source="::ffff:172.28.5.9")
    assert decision.allow
    assert decision.location == "example"


def test_unusable_routes_refuse_everything() -> None:
    decision, calls = run_decide("pypi.org", 443, table=RouteTable(error="routes.json: not valid JSON"))
    assert not decision.allow
    assert decision.reason == "routes unavailable: routes.json: not valid JSON"
    assert calls == []


def test_admit_returns_route_without_resolving() -> None:
    assert admit(TABLE, ipaddress.ip_address(SOURCE), "pypi.org", 443) is ROUTE


def test_classify_prefers_the_specific_reason_listed_first() -> None:
    assert classify(ipaddress.ip_address("169.254.169.254"), DENY, ()) == (
        False,
        "address 169.254.169.254 is cloud metadata",
    )
    assert classify(ipaddress.ip_address("::1"), DENY, ())[1] == "address ::1 is loopback"
    assert classify(ipaddress.ip_address("1.1.1.1"), DENY, ())[0]


def test_resolve_unwraps_and_deduplicates() -> None:
    async def answers(host: str, port: int) -> list[str]:
        return ["::ffff:1.2.3.4", "1.2.3.4", "2001:4860::8888", "not-an-ip"]

    got = asyncio.run(resolve("x.example", 443, answers))
    assert [str(ip) for ip in got] == ["1.2.3.4", "2001:4860::8888"]
    assert parse_ip("[::1]") == ipaddress.ip_address("::1")
    assert parse_ip("example.com") is None


GOOD_ROUTES = """{"version": 1, "routes": [{"location": "example", "cidrs": ["172.28.5.0/24"],
  "allow": ["pypi.org:443", "*.example.com:*"], "allow_cidrs": ["10.1.0.0/16"]}]}"""


def test_parse_routes() -> None:
    table = parse_routes(GOOD_ROUTES)
    (route,) = table.routes
    assert route.location == "example"
    assert route.allow == (HostPort("pypi.org", 443), HostPort("*.example.com", None))
    assert route.allow_cidrs == (N("10.1.0.0/16"),)
    assert table.locate(ipaddress.ip_address("172.28.5.77")) is route
    assert table.locate(ipaddress.ip_address("172.28.6.1")) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not valid JSON"),
        ('{"version": 2, "routes": []}', "unsupported version"),
        ('{"version": 1, "routes": [{"location": "x", "cidrs": ["nope"]}]}', "not a CIDR"),
        ('{"version": 1, "routes": [{"location": "x", "cidrs": []}]}', "at least one"),
        ('{"version": 1, "routes": [{"location": "x", "cidrs": ["10.0.0.0/8"], "allow": ["pypi.org"]}]}', "host:port"),
        ('{"version": 1, "routes": [{"location": "x", "cidrs": ["10.0.0.0/8"], "alow": []}]}', "unknown field"),
        (
            '{"version": 1, "routes": [{"location": "x", "cidrs": ["10.0.0.0/8"]}, '
            '{"location": "y", "cidrs": ["10.1.0.0/16"]}]}',
            "overlaps",
        ),
        (
            '{"version": 1, "routes": [{"location": "x", "cidrs": ["10.0.0.0/8"]}, '
            '{"location": "x", "cidrs": ["11.0.0.0/8"]}]}',
            "duplicate",
        ),
    ],
)
def test_parse_routes_rejects(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_routes(text)


def test_routes_file_missing_or_invalid_refuses_and_recovers(tmp_path, capsys) -> None:
    path = tmp_path / "routes.json"
    routes = RoutesFile(path)
    assert routes.current().error and "cannot read" in (routes.current().error or "")
    path.write_text("{not json")
    assert "not valid JSON" in (routes.current().error or "")
    path.write_text(GOOD_ROUTES)
    assert routes.current().error is None
    assert [r.location for r in routes.current().routes] == ["example"]
    logged = capsys.readouterr().err.splitlines()
    assert len(logged) == 3  # one line per change, not per request
    assert '"ok": true' in logged[-1]
