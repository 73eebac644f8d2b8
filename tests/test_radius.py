"""RADIUS accounting: real radclient against the standalone listener, crafted and random packets, the
binding table's rules and its snapshot file."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest
from radius_tools import SECRET, RadiusListener, acct_packet, radclient, send_from

from blocker.bindings import FULL, REPLACED, STALE, BindingTable, SnapshotWriter, read_snapshot
from blocker.config import RadiusConfig
from blocker.inventory import parse_address, parse_network
from blocker.radius import MAX_PACKETS_PER_SECOND, AccountingServer, load_secret


def config_file(directory: Path, clients: str = '["127.0.0.0/8"]', extra: str = "") -> Path:
    (directory / "radius.secret").write_text(SECRET + "\n")
    path = directory / "blocker.yaml"
    path.write_text(f"""\
identity:
  snapshot: bindings.json
  radius_accounting:
    listen: "127.0.0.1:0"
    secret_file: radius.secret
    clients: {clients}
    device_attribute: {{attribute: User-Name, regex: '^(?P<device>[^@]+)'}}
{extra}""")
    return path


@pytest.fixture
def listener(tmp_path: Path) -> RadiusListener:
    server = RadiusListener(config_file(tmp_path)).start()
    yield server
    server.stop()


def start(user: str, address: str, kind: str = "Start", **extra: str) -> dict[str, str]:
    return {"User-Name": user, "Acct-Status-Type": kind, "Framed-IP-Address": address,
            "Acct-Session-Id": f"s-{user}", "NAS-Identifier": "gw-a", **extra}


def ops(listener: RadiusListener, count: int) -> list[tuple[str, str, str]]:
    return [(e["op"], e["binding"][0], e["binding"][1]) for e in listener.wait_for_events(count)]  # type: ignore[index]


def test_start_interim_stop_with_radclient(listener: RadiusListener) -> None:
    assert radclient(listener.port, start("MPS-1@force.test", "10.8.0.2"))
    assert radclient(listener.port, start("MPS-1@force.test", "10.8.0.3", "Interim-Update", **{
        "Acct-Session-Time": "60"}))
    assert radclient(listener.port, start("MPS-1@force.test", "10.8.0.2", "Stop"))
    assert ops(listener, 3) == [("bind", "10.8.0.2", "MPS-1"), ("bind", "10.8.0.3", "MPS-1"),
                                ("unbind", "10.8.0.2", "MPS-1")]
    gateway = listener.events[0]["binding"][2]  # type: ignore[index]
    assert gateway == "gw-a"


def test_wrong_secret_changes_nothing_and_is_logged_once(listener: RadiusListener) -> None:
    assert radclient(listener.port, start("MPS-1", "10.8.0.2"))
    for _ in range(3):
        assert not radclient(listener.port, start("MPS-1", "10.8.0.2", "Stop"), secret="wrong", retries=1,
                             timeout=0.2)
    assert radclient(listener.port, start("MPS-2", "10.8.0.9"))
    assert ops(listener, 2) == [("bind", "10.8.0.2", "MPS-1"), ("bind", "10.8.0.9", "MPS-2")]
    listener.wait_for_log("bad authenticator")
    assert sum("bad authenticator" in line for line in listener.log) == 1


def test_unknown_client_is_dropped(tmp_path: Path) -> None:
    server = RadiusListener(config_file(tmp_path, clients='["127.0.0.1/32"]')).start()
    try:
        packet = acct_packet(User_Name="MPS-9", Acct_Status_Type=1, Framed_IP_Address="10.8.0.9")
        assert send_from("127.0.0.9", server.port, packet) is None
        assert send_from("127.0.0.1", server.port, packet) is not None
        assert ops(server, 1) == [("bind", "10.8.0.9", "MPS-9")]
        server.wait_for_log(r"from 127\.0\.0\.9 dropped: not a listed RADIUS client")
    finally:
        server.stop()


def test_snapshot_survives_restart_and_corruption_is_not_fatal(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    server = RadiusListener(config).start()
    assert radclient(server.port, start("MPS-1", "10.8.0.2"))
    assert radclient(server.port, {**start("MPS-6", "10.8.0.6"), "Framed-IPv6-Prefix": "2001:db8:6::/64"})
    assert server.stop() == 0
    rows = json.loads((tmp_path / "bindings.json").read_text())["bindings"]
    assert sorted(r[:2] for r in rows) == [["10.8.0.2", "MPS-1"], ["10.8.0.6", "MPS-6"], ["2001:db8:6::/64", "MPS-6"]]
    server = RadiusListener(config).start()
    try:
        server.wait_for_log("3 bindings restored")
        assert radclient(server.port, start("MPS-1", "10.8.0.2", "Stop"))
        events = ops(server, 4)
        assert sorted(events[:3]) == [("bind", "10.8.0.2", "MPS-1"), ("bind", "10.8.0.6", "MPS-6"),
                                      ("bind", "2001:db8:6::/64", "MPS-6")]  # restored (not learned: local false)
        assert not any(e["local"] for e in server.events[:3])
        assert events[3:] == [("unbind", "10.8.0.2", "MPS-1")]
    finally:
        server.stop()
    (tmp_path / "bindings.json").write_text('{"format": "blocker-bindings", "bindings": [1, 2')
    server = RadiusListener(config).start()
    try:
        server.wait_for_log("corrupt .*starting with no bindings")
        assert radclient(server.port, start("MPS-1", "10.8.0.2"))
    finally:
        server.stop()


def test_bad_input_keeps_serving_and_memory_bounded(listener: RadiusListener) -> None:
    rng = random.Random(11)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for i in range(20_000):
            if i % 4 == 0:  # a plausible header with random attributes
                body = rng.randbytes(rng.randrange(0, 200))
                data = struct.pack("!BBH", 4, i % 256, 20 + len(body)) + rng.randbytes(16) + body
            else:
                data = rng.randbytes(rng.randrange(0, 600))
            sock.sendto(data, ("127.0.0.1", listener.port))
        # Oversize: a 253-byte User-Name, a 5000-byte datagram, and a flood of Starts for one address.
        sock.sendto(acct_packet(User_Name="M" * 253, Acct_Status_Type=1, Framed_IP_Address="10.8.0.50"),
                    ("127.0.0.1", listener.port))
        sock.sendto(b"\x04\x01\x13\x88" + bytes(4996), ("127.0.0.1", listener.port))
        for i in range(2000):
            sock.sendto(acct_packet(User_Name=f"FLOOD-{i}", Acct_Status_Type=1, Framed_IP_Address="10.8.0.77"),
                        ("127.0.0.1", listener.port))
    assert radclient(listener.port, start("MPS-1", "10.8.0.2"), timeout=2.0)
    assert listener.stop() == 0
    rows = json.loads((listener.config.parent / "bindings.json").read_text())["bindings"]
    held = {row[0]: row[1] for row in rows}
    assert held["10.8.0.2"] == "MPS-1"
    # At most one binding for the flooded address (the newest session; the per-second cap may drop the rest).
    assert held.get("10.8.0.77", "FLOOD-").startswith("FLOOD-")
    assert "10.8.0.50" not in held  # a 253-character device id is not an identity
    assert set(held) <= {"10.8.0.2", "10.8.0.77"}


# Pure rules of the binding table and the packet handler (no sockets).

def net(text: str) -> tuple[int, int, int]:
    network = parse_network(text)
    assert network is not None
    return network


def test_binding_rules() -> None:
    now = [1000.0]
    table = BindingTable(capacity=3, clock=lambda: now[0])
    address = parse_address("10.8.0.2")
    assert address is not None
    table.bind(net("10.8.0.2"), "A", "gw", since=900, expires=2000)
    assert table.bind(net("10.8.0.2"), "B", "gw", since=800, expires=2000) == STALE  # older session
    assert table.lookup(*address, now[0]).device == "A"  # type: ignore[union-attr]
    assert not table.unbind(net("10.8.0.2"), "B")  # a Stop for another device
    assert table.bind(net("10.8.0.2"), "B", "gw", since=950, expires=2000) == REPLACED
    assert not table.unbind(net("10.8.0.2"), "B", since=100)  # the Stop of a session older than the binding
    table.bind(net("2001:db8::/64"), "C", "gw", since=950, expires=1500)
    assert table.lookup(6, parse_address("2001:db8::99")[1], now[0]).device == "C"  # type: ignore[index,union-attr]
    table.bind(net("10.8.0.3"), "D", "gw", since=950, expires=1500)
    assert table.bind(net("10.8.0.4"), "E", "gw", since=950, expires=3000) == FULL
    assert table.refused_total == 1
    now[0] = 1600.0  # C and D expired: at the cap they are purged to make room
    assert table.lookup(*parse_address("10.8.0.3"), now[0]) is None  # type: ignore[misc]
    now[0] = 1602.0
    assert table.bind(net("10.8.0.4"), "E", "gw", since=1601, expires=3000) == "bound"
    assert (len(table), table.expired_total) == (2, 2)
    assert table.unbind_gateway("gw") == 2 and len(table) == 0


def test_snapshot_reader_tolerates_junk(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": "blocker-bindings", "version": 1, "bindings": [
        ["10.8.0.2", "A", "gw", 1, 5000], ["nope", "B", "gw", 1, 5000], ["10.8.0.3", "C", "gw", 1, 10], 7]}))
    assert [b.device for b in read_snapshot(path, now=100)] == ["A"]
    path.write_text("[]")
    assert read_snapshot(path, now=100) == []
    assert read_snapshot(tmp_path / "missing.json", now=100) == []
    table = BindingTable()
    writer = SnapshotWriter(table, tmp_path / "deep" / "snap.json")
    table.bind(net("10.8.0.2"), "A", "gw", 1, time.time() + 60)
    writer.flush()
    assert [b.device for b in read_snapshot(tmp_path / "deep" / "snap.json", time.time())] == ["A"]
    assert not [p for p in os.listdir(tmp_path / "deep") if p.startswith(".")]  # no temporary left behind


def handler(**changes: object) -> tuple[AccountingServer, BindingTable, list[float]]:
    now = [1000.0]
    table = BindingTable(clock=lambda: now[0])
    config = RadiusConfig(clients=(__import__("ipaddress").ip_network("127.0.0.0/8"),), **changes)  # type: ignore[arg-type]
    return AccountingServer(config, SECRET.encode(), table, clock=lambda: now[0]), table, now


def test_handler_attributes_ttl_and_results() -> None:
    server, table, now = handler(device_attribute="Class")
    assert server.handle(acct_packet(Class=b"MPS-7", Acct_Status_Type=1, Framed_IP_Address="10.8.0.7",
                                     Acct_Interim_Interval=300, Acct_Delay_Time=5), "127.0.0.1") is not None
    binding = table.lookup(*parse_address("10.8.0.7"), now[0])  # type: ignore[misc]
    assert (binding.device, binding.since, binding.expires, binding.gateway) == ("MPS-7", 995.0, 1895.0, "127.0.0.1")
    assert server.stats.packets[("start", "ok")] == 1
    # Authentic but without an address: answered (or the gateway retransmits forever), nothing bound.
    assert server.handle(acct_packet(Class=b"MPS-8", Acct_Status_Type=1), "127.0.0.1") is not None
    assert server.stats.packets[("start", "no_identity")] == 1
    # Message-Authenticator present but computed with another secret.
    bad = acct_packet(secret=b"other", Class=b"MPS-9", Acct_Status_Type=1, Framed_IP_Address="10.8.0.9")
    assert server.handle(bad, "127.0.0.1") is None
    assert server.stats.packets[("unknown", "bad_authenticator")] == 1
    # Accounting-On from the gateway: its sessions are gone.
    assert server.handle(acct_packet(Acct_Status_Type=7), "127.0.0.1") is not None
    assert len(table) == 0


def test_handler_configured_ttl_ipv6_and_rate_limit() -> None:
    server, table, now = handler(binding_ttl=120.0)
    server.handle(acct_packet(User_Name="MPS-6", Acct_Status_Type=3, Acct_Session_Time=600,
                              Framed_IPv6_Prefix="2001:db8:6::/64", Framed_IPv6_Address="2001:db8:7::1"),
                  "127.0.0.1")
    six = table.lookup(6, parse_address("2001:db8:6::42")[1], now[0])  # type: ignore[index]
    assert (six.device, six.since, six.expires) == ("MPS-6", 400.0, 1120.0)  # type: ignore[union-attr]
    assert table.lookup(6, parse_address("2001:db8:7::1")[1], now[0]).device == "MPS-6"  # type: ignore[index,union-attr]
    packet = acct_packet(User_Name="X", Acct_Status_Type=3, Framed_IP_Address="10.8.0.1")
    answered = sum(server.handle(packet, "127.0.0.1") is not None for _ in range(MAX_PACKETS_PER_SECOND + 10))
    assert answered == MAX_PACKETS_PER_SECOND - 1
    assert server.stats.packets[("unknown", "rate_limited")] == 11


def test_secret_file(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("  hunter2  \nsecond line\n")
    assert load_secret(tmp_path / "s") == b"hunter2"
    (tmp_path / "e").write_text("\n")
    with pytest.raises(Exception, match=r"/e:1: RADIUS secret is empty"):
        load_secret(tmp_path / "e")


def test_mirror_follows_the_resolvers_snapshot(tmp_path: Path) -> None:
    """The proxy addon's view (mirror): no listener; the snapshot file the resolver writes is re-read on change."""
    import asyncio

    from blocker.bindings import Binding, write_snapshot
    from blocker.config import IdentityConfig
    from blocker.identity import IdentityService

    snapshot = tmp_path / "bindings.json"
    config = IdentityConfig(radius_accounting=RadiusConfig(secret_file=tmp_path / "none"), snapshot=snapshot)
    now = time.time()

    async def scenario() -> list[list[str]]:
        service = IdentityService(config, mirror=True)
        await service.start()  # no secret needed: a mirror runs no listener
        seen = []
        try:
            for rows in ([Binding(net("10.8.0.2"), "A", "gw", now, now + 60).as_row()],
                         [Binding(net("10.8.0.3"), "B", "gw", now, now + 60).as_row()]):
                write_snapshot(rows, snapshot, now)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    held = sorted(b.device for b in service.table.bindings())
                    if held == [rows[0][1]]:
                        break
                    await asyncio.sleep(0.05)
                seen.append(sorted(b.device for b in service.table.bindings()))
        finally:
            await service.stop()
        return seen

    assert asyncio.run(scenario()) == [["A"], ["B"]]
