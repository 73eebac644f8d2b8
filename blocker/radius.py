"""The RADIUS accounting listener (RFC 2866): the VPN gateway tells us which handset holds which address.

Only listed client networks with the right shared secret are heard (the Request Authenticator, and
a Message-Authenticator when present, are verified); everything else is dropped, counted, and
logged at most once a minute per source. Start and Interim-Update bind Framed-IP-Address,
Framed-IPv6-Prefix and Framed-IPv6-Address to the device id taken from the configured attribute;
Stop unbinds; Accounting-On/Off drop every binding of that gateway. A packet is answered only once
it is recorded (RFC 2866 section 2: a gateway retransmits what is not answered).

pyrad does the wire format (attribute codec, authenticators); this module owns the rules. Run it
alone with `python -m blocker.radius --config FILE` to watch bindings arrive (one JSON line each).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pyrad.dictionary import Dictionary
from pyrad.packet import AccountingRequest, AcctPacket, PacketError

from blocker.bindings import FULL, STALE, Binding, BindingTable
from blocker.config import RadiusConfig
from blocker.errors import ConfigError, Problem
from blocker.inventory import AddressTable, Network, parse_address, parse_network

log = logging.getLogger("blocker.radius")

# The attributes we read, in FreeRADIUS dictionary format (RFC 2865, 2866, 2869, 3162, 6911).
_DICTIONARY = """\
ATTRIBUTE User-Name 1 string
ATTRIBUTE NAS-IP-Address 4 ipaddr
ATTRIBUTE Framed-IP-Address 8 ipaddr
ATTRIBUTE Class 25 octets
ATTRIBUTE Calling-Station-Id 31 string
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Proxy-State 33 octets
ATTRIBUTE Acct-Status-Type 40 integer
ATTRIBUTE Acct-Delay-Time 41 integer
ATTRIBUTE Acct-Session-Id 44 string
ATTRIBUTE Acct-Session-Time 46 integer
ATTRIBUTE Message-Authenticator 80 octets
ATTRIBUTE Acct-Interim-Interval 85 integer
ATTRIBUTE NAS-IPv6-Address 95 ipv6addr
ATTRIBUTE Framed-IPv6-Prefix 97 ipv6prefix
ATTRIBUTE Framed-IPv6-Address 168 ipv6addr
"""
DICTIONARY = Dictionary(io.StringIO(_DICTIONARY))

STATUS_TYPES = {1: "start", 2: "stop", 3: "interim", 7: "accounting_on", 8: "accounting_off"}
PACKET_TYPES = (*STATUS_TYPES.values(), "other", "unknown")
RESULTS = ("ok", "bad_authenticator", "unknown_client", "malformed", "no_identity", "table_full", "rate_limited")
MAX_PACKET = 4096  # RFC 2865 section 3
MAX_DEVICE_ID = 128
MAX_PACKETS_PER_SECOND = 10_000  # above this the rest of the second is dropped: DNS shares the event loop
DEFAULT_TTL = 3600.0
LOG_EVERY = 60.0
_MAX_NOTED = 4096


class AccountingStats:
    """Plain counters (the metrics collector reads them when scraped)."""

    def __init__(self) -> None:
        self.packets: dict[tuple[str, str], int] = {(t, r): 0 for t in PACKET_TYPES for r in RESULTS}
        self.last_ok = 0.0  # wall-clock time of the last accepted accounting packet

    def count(self, kind: str, result: str) -> None:
        self.packets[(kind, result)] += 1


def load_secret(path: Path) -> bytes:
    """The shared secret (the file's first line); raises ConfigError naming the file."""
    try:
        text = path.read_bytes().splitlines()
    except OSError as err:
        raise ConfigError([Problem(str(path), 1, f"RADIUS secret: cannot read: {err.strerror or err}")]) from err
    secret = text[0].strip() if text else b""
    if not secret:
        raise ConfigError([Problem(str(path), 1, "RADIUS secret is empty")])
    return secret


class DeviceAttribute:
    """Takes the device id out of the configured attribute (optionally through a regex)."""

    def __init__(self, attribute: str, regex: str | None) -> None:
        self.attribute = attribute
        self.regex = re.compile(regex) if regex else None
        self._group: int | str = "device" if self.regex and "device" in self.regex.groupindex else 1

    def device(self, packet: AcctPacket) -> str | None:
        values = packet.get(self.attribute)
        if not values:
            return None
        value = values[0]
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if self.regex is not None:
            match = self.regex.search(text)
            if match is None:
                return None
            text = match.group(self._group) or ""
        text = text.strip()
        if not text or len(text) > MAX_DEVICE_ID or not text.isprintable():
            return None
        return text


class AccountingServer(asyncio.DatagramProtocol):
    """The UDP listener: one packet in, at most one Accounting-Response out, the binding table updated."""

    def __init__(self, config: RadiusConfig, secret: bytes, table: BindingTable,
                 stats: AccountingStats | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.secret = secret
        self.table = table
        self.stats = stats or AccountingStats()
        self.clock = clock
        self.clients: AddressTable[bool] = AddressTable()
        for network in config.clients:
            self.clients.add((network.version, int(network.network_address), network.prefixlen), True)
        self.device_attribute = DeviceAttribute(config.device_attribute, config.device_regex)
        self.transport: asyncio.DatagramTransport | None = None
        self._noted: dict[tuple[str, str], float] = {}
        self._second = 0
        self._budget = MAX_PACKETS_PER_SECOND

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            reply = self.handle(data, str(addr[0]))
        except Exception:  # one bad packet must never stop the listener
            log.exception("RADIUS packet from %s: unexpected error", addr[0])
            self.stats.count("unknown", "malformed")
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("RADIUS socket error: %s", exc)

    def handle(self, data: bytes, host: str) -> bytes | None:
        """Process one datagram from `host`; returns the Accounting-Response to send, or None."""
        now = self.clock()
        source = parse_address(host)
        if source is None or self.clients.lookup(*source) is None:
            self.stats.count("unknown", "unknown_client")
            self._note(host, "unknown_client", now, "not a listed RADIUS client (identity.radius_accounting.clients)")
            return None
        # Decoding and MD5 cost more than the check above: cap them per second for the event loop's sake.
        second = int(now)
        if second != self._second:
            self._second, self._budget = second, MAX_PACKETS_PER_SECOND
        if self._budget <= 0:
            self.stats.count("unknown", "rate_limited")
            self._note(host, "rate_limited", now, f"more than {MAX_PACKETS_PER_SECOND} packets a second, dropping")
            return None
        self._budget -= 1
        if not 20 <= len(data) <= MAX_PACKET or data[0] != AccountingRequest:
            self.stats.count("unknown" if len(data) < 20 else "other", "malformed")
            self._note(host, "malformed", now, "not an Accounting-Request")
            return None
        try:
            packet = AcctPacket(secret=self.secret, dict=DICTIONARY, packet=data)
        except PacketError as err:
            self.stats.count("unknown", "malformed")
            self._note(host, "malformed", now, f"unreadable packet ({err})")
            return None
        if not packet.VerifyAcctRequest() or (packet.message_authenticator
                                              and not packet.verify_message_authenticator()):
            self.stats.count("unknown", "bad_authenticator")
            self._note(host, "bad_authenticator", now, "bad authenticator (wrong shared secret?)")
            return None
        try:
            status = _integer(packet, 40)
            kind = STATUS_TYPES.get(status, "other") if status is not None else "other"
            result = self._apply(packet, kind, host, now)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
            self.stats.count("unknown", "malformed")
            self._note(host, "malformed", now, f"unreadable attribute ({err})")
            return None
        self.stats.count(kind, result)
        if result == "table_full":
            self._note(host, "table_full", now, f"binding table full ({self.table.capacity} entries): not recorded")
            return None
        if result in ("ok", "no_identity"):
            self.stats.last_ok = now
        return packet.CreateReply().ReplyPacket()

    def _apply(self, packet: AcctPacket, kind: str, host: str, now: float) -> str:
        gateway = _gateway(packet, host)
        if kind in ("accounting_on", "accounting_off"):
            gone = self.table.unbind_gateway(gateway)
            if gone:
                log.info("RADIUS %s from %s: %d bindings dropped", kind, gateway, gone)
            return "ok"
        if kind == "other":
            return "ok"
        networks = _networks(packet)
        device = self.device_attribute.device(packet)
        if not networks or device is None:
            return "no_identity"
        delay = _integer(packet, 41) or 0
        session_time = _integer(packet, 46) or 0
        since = now - delay - (session_time if kind != "start" else 0)
        if kind == "stop":
            for network in networks:
                self.table.unbind(network, device, since)
            return "ok"
        ttl = self.config.binding_ttl
        if ttl is None:
            interval = _integer(packet, 85)
            ttl = 3.0 * interval if interval else DEFAULT_TTL
        results = [self.table.bind(network, device, gateway, since, now - delay + ttl) for network in networks]
        if FULL in results:
            return "table_full"
        if all(r == STALE for r in results):
            log.debug("RADIUS %s for %s from %s: an older session than the binding held", kind, device, gateway)
        return "ok"

    def _note(self, host: str, reason: str, now: float, message: str) -> None:
        """Log a dropped packet at most once a minute per source and reason."""
        key = (host, reason)
        last = self._noted.get(key)
        if last is not None and now - last < LOG_EVERY:
            return
        if len(self._noted) >= _MAX_NOTED:
            self._noted.clear()
        self._noted[key] = now
        log.warning("RADIUS packet from %s dropped: %s (logged at most once a minute per source)", host, message)


def _integer(packet: AcctPacket, code: int) -> int | None:
    values = packet.get(code)
    if not values or len(values[0]) != 4:
        return None
    return int.from_bytes(values[0], "big")


def _gateway(packet: AcctPacket, host: str) -> str:
    """The NAS as named by itself (NAS-Identifier, else NAS-IP-Address), else the packet's source address."""
    for name in ("NAS-Identifier", "NAS-IP-Address", "NAS-IPv6-Address"):
        values = packet.get(name)
        if values:
            text = str(values[0]).strip()
            if text and len(text) <= 64 and text.isprintable():
                return text
    return host


def _networks(packet: AcctPacket) -> list[Network]:
    out: list[Network] = []
    for name in ("Framed-IP-Address", "Framed-IPv6-Prefix", "Framed-IPv6-Address"):
        for value in packet.get(name) or ():
            network = parse_network(str(value))
            if network is not None:
                out.append(network)
    return out


async def start_listener(config: RadiusConfig, secret: bytes, table: BindingTable,
                         stats: AccountingStats | None = None,
                         clock: Callable[[], float] = time.time) -> tuple[asyncio.DatagramTransport, AccountingServer]:
    """Bind the UDP socket and start serving; raises OSError if the address is taken."""
    loop = asyncio.get_running_loop()
    host, port = config.listen
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: AccountingServer(config, secret, table, stats, clock), local_addr=(host, port))
    return transport, protocol  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """`python -m blocker.radius --config FILE`: the listener alone, printing each change as a JSON line."""
    from blocker.bindings import SnapshotWriter
    from blocker.config import load_config

    parser = argparse.ArgumentParser(prog="python -m blocker.radius", description=main.__doc__)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = load_config(args.config)
        radius = config.identity.radius_accounting
        if radius is None:
            raise ConfigError([Problem(str(args.config), 1, "identity.radius_accounting is not configured")])
        secret = load_secret(radius.secret_file)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    table = BindingTable(radius.max_bindings)

    def show(op: str, binding: Binding, local: bool) -> None:
        print(json.dumps({"op": op, "binding": binding.as_row(), "local": local}), flush=True)

    table.listeners.append(show)

    async def run() -> None:
        snapshot = SnapshotWriter(table, config.identity.snapshot) if config.identity.snapshot else None
        if snapshot is not None:
            snapshot.restore()
        transport, _ = await start_listener(radius, secret, table)
        log.info("RADIUS accounting on %s:%d", *transport.get_extra_info("sockname")[:2])
        writer = asyncio.ensure_future(snapshot.run()) if snapshot is not None else None
        store = None
        if config.identity.store is not None:
            from blocker.store import BindingStore

            store = asyncio.ensure_future(BindingStore(table, config.identity.store).run())
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for task in (writer, store):
                if task is not None:
                    task.cancel()
            transport.close()
            if snapshot is not None:
                snapshot.flush()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
