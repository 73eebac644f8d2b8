"""DNS wire format, dnspython-style tables: `read_question` on untrusted client bytes and
`scan_response` on upstream answers, each row a message and what must come of it."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset
import pytest

from blocker.message import BadVersion, Query, WireError, read_question, scan_response


def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, qid: int = 0x1234) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"


def wire(name: str = "www.example.test", rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "expected"), [
    pytest.param(wire(), ("www.example.test", 1, 1, False), id="plain-a"),
    pytest.param(wire("WWW.Example.TEST."), ("www.example.test", 1, 1, False), id="lower-cased"),
    pytest.param(wire(rdtype="AAAA", use_edns=0), ("www.example.test", 28, 1, True), id="edns"),
    pytest.param(wire(rdtype="TXT", rdclass="CH"), ("www.example.test", 16, 3, False), id="chaos-class"),
    pytest.param(header() + b"\x00\x00\x02\x00\x01", ("", 2, 1, False), id="root"),
    pytest.param(header() + b"\x03a\xffb\x00\x00\x01\x00\x01", ("a\xffb", 1, 1, False), id="binary-label-kept"),
])
def test_read_question_reads_good_queries(data: bytes, expected: tuple[str, int, int, bool]) -> None:
    query = read_question(data)
    assert (query.qname, query.qtype, query.qclass, query.edns) == expected
    assert query.id == data[:2]
    assert data[12:12 + len(query.question)] == query.question  # as the client spelled it


def test_read_question_keeps_do_udp_size_and_ecs() -> None:
    query = read_question(wire(use_edns=0, want_dnssec=True, payload=4096,
                               options=[dns.edns.ECSOption("10.8.0.23", 32)]))
    assert query.do and query.udp_size == 4096 and query.max_udp() == 1232
    assert query.ecs == b"\x00\x01\x20\x00\x0a\x08\x00\x17"
    assert read_question(wire()).max_udp() == 512


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(header()[:11], id="short-header"),
    pytest.param(header(flags=0x8100) + QUESTION, id="a-response"),
    pytest.param(header(qd=0), id="no-question"),
    pytest.param(header(qd=2) + QUESTION + QUESTION, id="two-questions"),
    pytest.param(header() + b"\x03www\x07exam", id="name-past-end"),
    pytest.param(header() + b"\x03www\x00\x00\x01", id="type-past-end"),
    pytest.param(header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", id="label-over-63"),
    pytest.param(header() + b"\xc0\x0c\x00\x01\x00\x01", id="pointer-in-question"),
    pytest.param(header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", id="name-over-255"),
    pytest.param(header(an=1) + QUESTION, id="answer-in-query"),
    pytest.param(header(ar=1) + QUESTION + b"\x00\x00\x29", id="opt-past-end"),
    pytest.param(header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x10", id="opt-rdata-past-end"),
    pytest.param(header(ar=2) + QUESTION + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2, id="two-opts"),
    pytest.param(header(ar=1) + QUESTION + b"\x01a\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00", id="opt-not-root"),
    pytest.param(header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x06\x00\x08\x00\x08\x00\x01",
                 id="option-past-rdata"),
])
def test_read_question_rejects_malformed_packets(data: bytes) -> None:
    with pytest.raises(WireError):
        read_question(data)


def test_other_opcodes_are_not_implemented_and_other_edns_versions_are_badvers() -> None:
    notify = dns.message.make_query("example.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    with pytest.raises(NotImplementedError):
        read_question(notify.to_wire())
    with pytest.raises(BadVersion) as caught:
        read_question(wire(use_edns=1))
    assert isinstance(caught.value.query, Query) and caught.value.query.qname == "www.example.test"


def response(**sections: list[str]) -> bytes:
    query = dns.message.make_query("www.example.test", "A", use_edns=0)
    message = dns.message.make_response(query)
    for section, records in sections.items():
        for text in records:
            getattr(message, section).append(dns.rrset.from_text(*text.split(" ", 4)))
    return message.to_wire()


def test_scan_response_finds_every_ttl_cname_target_and_the_negative_ttl() -> None:
    data = response(answer=["www.example.test. 60 IN CNAME Edge.Example.NET.", "edge.example.net. 30 IN A 192.0.2.1"],
                    authority=["example.test. 300 IN SOA ns.example.test. h.example.test. 1 2 3 4 45"])
    scan = scan_response(data)
    assert scan.ttls == (60, 30, 300) and scan.answer_count == 2
    assert scan.cname_targets == ("edge.example.net",)
    assert scan.negative_ttl == 45 and scan.rcode == 0 and not scan.truncated
    for offset, ttl in zip(scan.ttl_offsets, scan.ttls, strict=True):
        assert struct.unpack_from("!I", data, offset)[0] == ttl
    plain = dns.message.from_wire(scan.without_opt)
    assert plain.edns == -1 and len(plain.answer) == 2


def test_scan_response_follows_compression_and_reads_flags() -> None:
    query = dns.message.make_query("www.example.test", "A")
    message = dns.message.make_response(query)
    message.flags |= dns.flags.TC
    message.set_rcode(dns.rcode.NXDOMAIN)
    scan = scan_response(message.to_wire())
    assert scan.truncated and scan.rcode == dns.rcode.NXDOMAIN and scan.negative_ttl is None


@pytest.mark.parametrize("data", [
    pytest.param(b"\x00" * 11, id="short"),
    pytest.param(response(answer=["www.example.test. 60 IN A 192.0.2.1"])[:-2], id="rdata-past-end"),
    pytest.param(header(flags=0x8180, an=1) + QUESTION + b"\xc0\x0c\x00\x01", id="record-past-end"),
    pytest.param(header(flags=0x8180, an=1) + QUESTION + b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x02\xc0\xff",
                 id="cname-pointer-out-of-range"),
    pytest.param(header(flags=0x8180, an=1) + QUESTION + b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x02\xc0\x2e",
                 id="compression-loop"),
    pytest.param(header(flags=0x8180, ns=1) + QUESTION + b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x3c\x00\x02\x00\x00",
                 id="short-soa"),
])
def test_scan_response_rejects_malformed_answers(data: bytes) -> None:
    with pytest.raises(WireError):
        scan_response(data)
