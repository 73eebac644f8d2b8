"""DNS wire format: read a query's question from raw bytes, build our own answers, scan upstream ones.

The hot path never builds a full message object: the question is read straight from the bytes,
and answers are concatenated from the query's own question and pieces prepared at load time.
dnslib (see `describe`) is used only where speed does not matter.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import dnslib

QTYPE_A = 1
QTYPE_NS = 2
QTYPE_CNAME = 5
QTYPE_SOA = 6
QTYPE_AAAA = 28
QTYPE_OPT = 41
QTYPE_DNAME = 39

CLASS_IN = 1
CLASS_ANY = 255

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

# Extended DNS Error codes (RFC 8914) that blocker sends.
EDE_OTHER = 0
EDE_STALE_ANSWER = 3
EDE_BLOCKED = 15
EDE_PROHIBITED = 18
EDE_NOT_SUPPORTED = 21
EDE_NO_REACHABLE_AUTHORITY = 22
EDNS_ECS = 8

# What we advertise and the most we send over UDP (DNS flag day 2020).
EDNS_UDP_SIZE = 1232
NO_EDNS_UDP_SIZE = 512

_FLAG_QR = 0x8000
_FLAG_TC = 0x0200
_FLAG_RD = 0x0100
_FLAG_RA = 0x0080
_FLAG_CD = 0x0010
_HEADER = struct.Struct("!HHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_TTL = struct.Struct("!I")


class WireError(ValueError):
    """Bytes that are not a well-formed DNS message."""


class Query:
    """The parts of a client's query that the resolver needs, read from its raw bytes."""

    __slots__ = ("do", "ecs", "edns", "flags", "id", "qclass", "qname", "qtype", "question", "udp_size")

    def __init__(self, id_: bytes, flags: int, question: bytes, qname: str, qtype: int, qclass: int,
                 edns: bool, udp_size: int, do: bool, ecs: bytes | None) -> None:
        self.id = id_
        self.flags = flags
        self.question = question  # QNAME + QTYPE + QCLASS exactly as the client sent them
        self.qname = qname  # lower-case, no trailing dot; "" for the root
        self.qtype = qtype
        self.qclass = qclass
        self.edns = edns
        self.udp_size = udp_size
        self.do = do
        self.ecs = ecs

    @property
    def cache_key(self) -> bytes:
        """Name, type, class, DO and CD: what makes two queries share an upstream answer."""
        return self.question.lower() + bytes(((2 if self.do else 0) | (1 if self.flags & _FLAG_CD else 0),))

    def max_udp(self) -> int:
        if not self.edns:
            return NO_EDNS_UDP_SIZE
        return min(max(self.udp_size, NO_EDNS_UDP_SIZE), EDNS_UDP_SIZE)


def read_question(data: bytes) -> Query:
    """Parse a query; raises WireError (FORMERR), NotImplementedError (NOTIMP) or BadVersion."""
    n = len(data)
    if n < 12:
        raise WireError("shorter than a header")
    flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data, 2)
    if flags & _FLAG_QR:
        raise WireError("a response, not a query")
    # The opcode before the question count: a NOTIFY or UPDATE may carry no question (RFC 1996,
    # RFC 2136), and is an operation we do not implement, not a malformed query.
    if (flags >> 11) & 0xF != 0:
        raise NotImplementedError("opcode")
    if qdcount != 1:
        raise WireError(f"{qdcount} questions")
    pos = 12
    labels = []
    while True:
        if pos >= n:
            raise WireError("question runs past the end")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            raise WireError("bad label length in question")
        end = pos + 1 + length
        labels.append(data[pos + 1:end])
        pos = end
    if pos - 12 > 255:
        raise WireError("name longer than 255 octets")
    if pos + 4 > n:
        raise WireError("question runs past the end")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    question = data[12:pos + 4]
    qname = b".".join(labels).decode("latin-1").lower()
    edns, udp_size, do, ecs = False, 0, False, None
    if ancount or nscount:
        raise WireError("a query with answer or authority records")
    pos += 4
    for _ in range(arcount):
        rr_start = pos
        pos = skip_name(data, pos)
        if pos + 10 > n:
            raise WireError("additional record runs past the end")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        pos += 10
        if pos + rdlength > n:
            raise WireError("additional record runs past the end")
        if rtype == QTYPE_OPT:
            if edns or data[rr_start] != 0:
                raise WireError("more than one OPT record, or OPT not at the root")
            edns, udp_size, do = True, rclass, bool(ttl & 0x8000)
            version = (ttl >> 16) & 0xFF
            ecs = _find_option(data, pos, pos + rdlength, EDNS_ECS)
            if version != 0:
                raise BadVersion(Query(data[0:2], flags, question, qname, qtype, qclass, True, udp_size, do, None))
        pos += rdlength
    return Query(data[0:2], flags, question, qname, qtype, qclass, edns, udp_size, do, ecs)


class BadVersion(Exception):
    """An EDNS version we do not speak (answered BADVERS, RFC 6891 §6.1.3)."""

    def __init__(self, query: Query) -> None:
        super().__init__("EDNS version")
        self.query = query


def _find_option(data: bytes, pos: int, end: int, wanted: int) -> bytes | None:
    while pos + 4 <= end:
        code, length = struct.unpack_from("!HH", data, pos)
        pos += 4
        if pos + length > end:
            raise WireError("EDNS option runs past its record")
        if code == wanted:
            return data[pos:pos + length]
        pos += length
    return None


def skip_name(data: bytes, pos: int) -> int:
    """Offset just past a (possibly compressed) name."""
    n = len(data)
    while True:
        if pos >= n:
            raise WireError("name runs past the end")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise WireError("pointer runs past the end")
            return pos + 2
        if length > 63:
            raise WireError("bad label length")
        pos += 1 + length


def read_name(data: bytes, pos: int) -> str:
    """The (possibly compressed) name at `pos`, lower-case, without the trailing dot."""
    labels: list[bytes] = []
    jumps = 0
    n = len(data)
    total = 0
    while True:
        if pos >= n:
            raise WireError("name runs past the end")
        length = data[pos]
        if length == 0:
            break
        if length & 0xC0 == 0xC0:
            if pos + 2 > n:
                raise WireError("pointer runs past the end")
            jumps += 1
            if jumps > 64:
                raise WireError("compression loop")
            pos = ((length & 0x3F) << 8) | data[pos + 1]
            continue
        if length > 63:
            raise WireError("bad label length")
        labels.append(data[pos + 1:pos + 1 + length])
        total += length + 1
        if total > 255:
            raise WireError("name too long")
        pos += 1 + length
    return b".".join(labels).decode("latin-1").lower()


# --- our own answers -------------------------------------------------------------------------

def _response_flags(query_flags: int, rcode: int) -> int:
    # QR, RA; RD and CD copied from the query; AA and AD never set by a forwarder's own answers.
    return _FLAG_QR | _FLAG_RA | (query_flags & (_FLAG_RD | _FLAG_CD)) | (rcode & 0xF)


def opt_record(do: bool, options: bytes = b"", ext_rcode: int = 0) -> bytes:
    """An OPT pseudo-record advertising our UDP size, echoing DO."""
    return b"\x00" + struct.pack("!HHBBHH", QTYPE_OPT, EDNS_UDP_SIZE, ext_rcode, 0,
                                 0x8000 if do else 0, len(options)) + options


def ede_option(code: int, text: str) -> bytes:
    """An Extended DNS Error option (RFC 8914)."""
    payload = struct.pack("!H", code) + text.encode("utf-8")
    return struct.pack("!HH", 15, len(payload)) + payload


def answer(query: Query, rcode: int, answers: bytes = b"", ancount: int = 0, authority: bytes = b"",
           nscount: int = 0, opt: tuple[bytes, bytes] | None = None) -> bytes:
    """One of our own answers: the query's question, then the given sections.

    `opt` is (OPT without DO, OPT with DO); it is only added when the client sent EDNS.
    """
    if query.edns:
        extra = (opt[1] if query.do else opt[0]) if opt else (OPT_DO if query.do else OPT_PLAIN)
        arcount = 1
    else:
        extra, arcount = b"", 0
    header = query.id + _HEADER.pack(_response_flags(query.flags, rcode), 1, ancount, nscount, arcount)
    return b"".join((header, query.question, answers, authority, extra))


def error_answer(data: bytes, rcode: int) -> bytes | None:
    """FORMERR/NOTIMP for a packet we could not read as a query: header only. None means drop."""
    if len(data) < 12 or data[2] & 0x80:
        return None  # too short to answer, or itself a response: answering could start a loop
    flags = struct.unpack_from("!H", data, 2)[0]
    out_flags = _FLAG_QR | (flags & (0x7800 | _FLAG_RD)) | rcode
    return data[0:2] + _HEADER.pack(out_flags, 0, 0, 0, 0)


def badvers_answer(query: Query) -> bytes:
    """BADVERS (extended rcode 16 = 1 in the OPT's high bits)."""
    opt = opt_record(query.do, ext_rcode=1)
    return answer(query, RCODE_NOERROR, opt=(opt, opt))


OPT_PLAIN = opt_record(False)
OPT_DO = opt_record(True)


def opt_pair(options: bytes) -> tuple[bytes, bytes]:
    return opt_record(False, options), opt_record(True, options)


def address_record(qtype: int, ttl: int, address: str) -> bytes:
    """An A or AAAA record owned by the question's name (compression pointer to offset 12)."""
    packed = ipaddress.ip_address(address).packed
    return b"\xc0\x0c" + _RR_FIXED.pack(qtype, 1, ttl, len(packed)) + packed


def soa_record(ttl: int) -> bytes:
    """A synthetic SOA owned by the question's name: its MINIMUM makes negative answers live `ttl`."""
    mname = b"\x07blocker\x07invalid\x00"
    rname = b"\x0ahostmaster\x07blocker\x07invalid\x00"
    rdata = mname + rname + struct.pack("!IIIII", 1, 3600, 600, 86400, ttl)
    return b"\xc0\x0c" + _RR_FIXED.pack(QTYPE_SOA, 1, ttl, len(rdata)) + rdata


def truncated(query: Query, response: bytes) -> bytes:
    """A truncated form of `response` for UDP: header with TC, the question and OPT (RFC 6891 §7)."""
    flags = struct.unpack_from("!H", response, 2)[0] | _FLAG_TC
    if query.edns:
        extra, arcount = (OPT_DO if query.do else OPT_PLAIN), 1
    else:
        extra, arcount = b"", 0
    return query.id + _HEADER.pack(flags, 1, 0, 0, arcount) + query.question + extra


def upstream_query(query: Query, query_id: int, question: bytes | None = None) -> bytes:
    """The query we send upstream: our ID, RD, the client's CD, its question (or `question`, the same
    with its case randomised), and an OPT with its DO."""
    flags = _FLAG_RD | (query.flags & _FLAG_CD)
    return (struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, 1)
            + (query.question if question is None else question) + (OPT_DO if query.do else OPT_PLAIN))


# --- upstream answers ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Scan:
    """What the cache needs to know about an upstream answer."""

    rcode: int
    ttl_offsets: tuple[int, ...]  # offsets of every TTL field, OPT excluded
    ttls: tuple[int, ...]
    answer_count: int
    negative_ttl: int | None  # min(SOA TTL, SOA MINIMUM) from the authority section
    cname_targets: tuple[str, ...]
    without_opt: bytes  # the same answer with the OPT record removed (for clients without EDNS)
    truncated: bool
    opt_span: tuple[int, int] | None = None  # where the OPT record sits: the cache cuts it out itself


def scan_response(wire: bytes) -> Scan:
    """Walk an upstream answer's records; raises WireError when it is malformed."""
    if len(wire) < 12:
        raise WireError("shorter than a header")
    flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire, 2)
    pos = 12
    for _ in range(qdcount):
        pos = skip_name(wire, pos) + 4
    offsets: list[int] = []
    ttls: list[int] = []
    targets: list[str] = []
    negative_ttl: int | None = None
    opt_span: tuple[int, int] | None = None
    n = len(wire)
    for index in range(ancount + nscount + arcount):
        start = pos
        pos = skip_name(wire, pos)
        if pos + 10 > n:
            raise WireError("record runs past the end")
        rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, pos)
        rdata = pos + 10
        if rdata + rdlength > n:
            raise WireError("record data runs past the end")
        if rtype == QTYPE_OPT:
            opt_span = (start, rdata + rdlength)
        else:
            offsets.append(pos + 4)
            ttls.append(ttl)
            if index < ancount and rtype in (QTYPE_CNAME, QTYPE_DNAME):
                targets.append(read_name(wire, rdata))
            elif ancount <= index < ancount + nscount and rtype == QTYPE_SOA:
                minimum_at = skip_name(wire, skip_name(wire, rdata)) + 16
                if minimum_at + 4 > rdata + rdlength:
                    raise WireError("short SOA")
                minimum = _TTL.unpack_from(wire, minimum_at)[0]
                negative_ttl = min(ttl, minimum)
        pos = rdata + rdlength
    if opt_span is None:
        without_opt = wire
    else:
        if any(off > opt_span[0] for off in offsets):
            # TTL offsets would differ between the two copies; rare enough not to cache.
            raise WireError("records after OPT")
        without_opt = wire[:10] + struct.pack("!H", arcount - 1) + wire[12:opt_span[0]] + wire[opt_span[1]:]
    return Scan(flags & 0xF, tuple(offsets), tuple(ttls), ancount, negative_ttl, tuple(targets),
                without_opt, bool(flags & _FLAG_TC), opt_span)


def describe(wire: bytes) -> str:
    """A human-readable rendering of a message, for logs and debugging (slow; not the hot path)."""
    try:
        return str(dnslib.DNSRecord.parse(wire))
    except Exception as err:  # dnslib raises several types on odd input
        return f"<unparsable message: {err}>"
