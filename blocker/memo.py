"""What the resolver remembers per policy, so that repeated work is done once: the fast path.

Most queries repeat: the same handset asks the same name again, and thousands of handsets of one
group ask the same few names. A `PolicyMemo` belongs to one policy and is replaced whole on
reload, so nothing in it can outlive the policy it was derived from. It holds:

- clients: (source address, ECS) -> the identified client (an address whose binding changes is
  forgotten at once: see `forget`);
- categories: name -> its categories (one index walk per name);
- decisions: (group, categories, canary) -> decision, for clients without exemptions, whose
  decision then depends on nothing else, not even the time;
- answers: (transport, group, query bytes after the ID) -> the finished answer, for clients whose
  answer depends on their group alone (allowed, not a trusted forwarder, no exemption). A hit
  answers without parsing or deciding again.

Each table is bounded; a full table is cleared and refills with what is asked now.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from blocker.answers import BlockAnswers
from blocker.clients import Client, identify
from blocker.inventory import Network, format_network
from blocker.policy import CANARY_NAMES, Action, Decision, Policy, decide_categories

if TYPE_CHECKING:
    from blocker.bindings import BindingTable

MEMO_LIMIT = 200_000
FOREVER = float("inf")


class MemoHit:
    """A remembered answer and what to record when it is served again."""

    __slots__ = ("action", "blocked_counter", "categories", "category", "counter", "qname", "qtype", "reply",
                 "valid_until")

    def __init__(self, reply: bytes, action: Action, category: str | None, valid_until: float, qname: str,
                 qtype: int, categories: tuple[str, ...], counter: list[int],
                 blocked_counter: list[int] | None) -> None:
        self.reply = reply  # the answer after its two ID bytes
        self.action = action
        self.category = category
        self.valid_until = valid_until  # monotonic seconds; FOREVER for blocked answers
        self.qname = qname
        self.qtype = qtype
        self.categories = categories
        # The metric cells this answer counts in (see Stats): bound once, added to on every hit.
        self.counter = counter
        self.blocked_counter = blocked_counter


class PolicyMemo:
    """The running policy, its own answers, and everything remembered under it."""

    __slots__ = ("answers", "bindings", "categories", "clients", "decisions", "memo_clients", "policy", "replies")

    def __init__(self, policy: Policy, bindings: BindingTable | None = None) -> None:
        self.policy = policy
        self.bindings = bindings
        self.answers = BlockAnswers(policy)
        self.clients: dict[tuple[str, bytes | None], Client] = {}
        self.categories: dict[str, frozenset[str]] = {}
        self.decisions: dict[tuple[str, frozenset[str], bool], Decision] = {}
        # Source address -> client, only for clients whose answers `replies` may hold.
        self.memo_clients: dict[str, Client] = {}
        self.replies: dict[tuple[str, str, bytes], MemoHit] = {}

    def lookup(self, data: bytes, address: str, transport: str, now: float) -> tuple[Client, MemoHit] | None:
        """A remembered answer to these exact query bytes from this source, if one is still valid."""
        client = self.memo_clients.get(address)
        if client is None:
            return None
        hit = self.replies.get((transport, client.group, data[2:]))
        if hit is None or (hit.valid_until != FOREVER and hit.valid_until <= now):
            return None
        return client, hit

    def client(self, address: str, ecs: bytes | None) -> Client:
        """The client behind a source address (and ECS option), identified once per policy."""
        key = (address, ecs)
        client = self.clients.get(key)
        if client is None:
            if len(self.clients) >= MEMO_LIMIT:
                self.clients.clear()
                self.memo_clients.clear()
            policy = self.policy
            client = self.clients[key] = identify(policy, address, ecs, self.bindings)
            if client.allowed and client.device not in policy.exemptions and not policy.is_trusted(address):
                self.memo_clients[address] = client
        return client

    def categories_of(self, qname: str) -> frozenset[str]:
        categories = self.categories.get(qname)
        if categories is None:
            if len(self.categories) >= MEMO_LIMIT:
                self.categories.clear()
            categories = self.categories[qname] = self.policy.categorize(qname)
        return categories

    def decision(self, client: Client, qname: str, categories: frozenset[str], now: datetime) -> Decision:
        """`decide_categories`, remembered for clients without exemptions (time cannot change it)."""
        policy = self.policy
        if client.device in policy.exemptions:
            return decide_categories(policy, client, qname, categories, now)
        key = (client.group, categories, qname in CANARY_NAMES)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = decide_categories(policy, client, qname, categories, now)
        return decision

    def forget(self, network: Network) -> None:
        """A binding for this address (or prefix) changed: identify its clients again."""
        version, _value, prefix = network
        if prefix != (32 if version == 4 else 128) or self.policy.config.dns.trusted_forwarders:
            # A prefix, or clients known by ECS: cheaper to start afresh than to find every key.
            self.clients.clear()
            self.memo_clients.clear()
            return
        text = format_network(network)
        for address in (text, "::ffff:" + text) if version == 4 else (text,):
            self.clients.pop((address, None), None)
            self.memo_clients.pop(address, None)

    def may_remember(self, address: str) -> bool:
        return address in self.memo_clients

    def remember(self, key: tuple[str, str, bytes], hit: MemoHit) -> None:
        if len(self.replies) >= MEMO_LIMIT:
            self.replies.clear()
        self.replies[key] = hit
