"""blocker's own answers for one policy: blocked, refused, and the error answers, with their EDEs.

Everything that does not depend on the query (records, OPT with its EDE text) is built once when
a policy loads; a blocked answer is then a concatenation around the query's own question.
"""

from __future__ import annotations

from blocker.message import (
    EDE_BLOCKED,
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_NOT_SUPPORTED,
    EDE_OTHER,
    EDE_PROHIBITED,
    EDE_STALE_ANSWER,
    QTYPE_A,
    QTYPE_AAAA,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    Query,
    address_record,
    answer,
    ede_option,
    opt_pair,
    soa_record,
)
from blocker.policy import Policy


class BlockAnswers:
    """The pieces of blocker's own answers for one policy, built once at load time."""

    def __init__(self, policy: Policy) -> None:
        dns = policy.config.dns
        self.kind = dns.block_response.kind
        self.version = policy.version
        ttl = dns.block_ttl
        self.soa = soa_record(ttl)
        if self.kind == "null":
            self.a: bytes | None = address_record(QTYPE_A, ttl, "0.0.0.0")
            self.aaaa: bytes | None = address_record(QTYPE_AAAA, ttl, "::")
        elif self.kind == "ip":
            ipv4, ipv6 = dns.block_response.ipv4, dns.block_response.ipv6
            self.a = address_record(QTYPE_A, ttl, ipv4) if ipv4 else None
            self.aaaa = address_record(QTYPE_AAAA, ttl, ipv6) if ipv6 else None
        else:
            self.a = self.aaaa = None
        self._opts: dict[str, tuple[bytes, bytes]] = {}
        self._refused_opt = opt_pair(ede_option(EDE_PROHIBITED, "source address not in allow_networks"))
        self._servfail_opt = opt_pair(ede_option(EDE_NO_REACHABLE_AUTHORITY, "no upstream answered"))
        self._unreadable_opt = opt_pair(ede_option(EDE_OTHER, "upstream answer unreadable"))
        self._internal_opt = opt_pair(ede_option(EDE_OTHER, "internal error"))
        self._rate_limited_opt = opt_pair(ede_option(EDE_OTHER, "rate limited"))
        self._busy_opt = opt_pair(ede_option(EDE_OTHER, "too many queries of this client waiting upstream"))
        self.stale_opt = opt_pair(ede_option(EDE_STALE_ANSWER, "no upstream answered; expired answer"))
        self._class_opt = opt_pair(ede_option(EDE_NOT_SUPPORTED, "only class IN is served"))
        for category in policy.lists.categories:
            self._opt_for(category)

    def _opt_for(self, category: str) -> tuple[bytes, bytes]:
        opt = self._opts.get(category)
        if opt is None:
            text = f"blocked: category={category}; policy={self.version}"
            opt = self._opts[category] = opt_pair(ede_option(EDE_BLOCKED, text))
        return opt

    def blocked(self, query: Query, category: str, canary: bool) -> bytes:
        """The answer for a blocked name, per `block_response` (canaries always get NXDOMAIN)."""
        opt = self._opt_for(category)
        kind = self.kind
        if canary or kind == "nxdomain":
            return answer(query, RCODE_NXDOMAIN, authority=self.soa, nscount=1, opt=opt)
        if kind == "refused":
            return answer(query, RCODE_REFUSED, opt=opt)
        record = self.a if query.qtype == QTYPE_A else self.aaaa if query.qtype == QTYPE_AAAA else None
        if record is not None:
            return answer(query, RCODE_NOERROR, record, 1, opt=opt)
        return answer(query, RCODE_NOERROR, authority=self.soa, nscount=1, opt=opt)

    def refused(self, query: Query) -> bytes:
        """REFUSED with EDE 18 (Prohibited): the source is outside `allow_networks`."""
        return answer(query, RCODE_REFUSED, opt=self._refused_opt)

    def other_class(self, query: Query) -> bytes:
        """REFUSED with EDE 21 (Not Supported) for CHAOS and other non-IN classes, answered here:
        forwarded, `version.bind` and `hostname.bind` would reveal the upstream's software and host."""
        return answer(query, RCODE_REFUSED, opt=self._class_opt)

    def no_upstream(self, query: Query) -> bytes:
        """SERVFAIL with EDE 22 (No Reachable Authority): no upstream answered, or too many wait."""
        return answer(query, RCODE_SERVFAIL, opt=self._servfail_opt)

    def unreadable(self, query: Query) -> bytes:
        """SERVFAIL: the upstream's answer was not a well-formed message."""
        return answer(query, RCODE_SERVFAIL, opt=self._unreadable_opt)

    def rate_limited(self, query: Query) -> bytes:
        """REFUSED with EDE 0: the client is over its `dns.rate_limit`."""
        return answer(query, RCODE_REFUSED, opt=self._rate_limited_opt)

    def client_busy(self, query: Query) -> bytes:
        """SERVFAIL with EDE 0: the client already has `max_outstanding_per_client` queries waiting."""
        return answer(query, RCODE_SERVFAIL, opt=self._busy_opt)

    def internal_error(self, query: Query) -> bytes:
        """SERVFAIL: answering this query raised (logged with its traceback)."""
        return answer(query, RCODE_SERVFAIL, opt=self._internal_opt)
