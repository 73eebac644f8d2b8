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
  answer depends on their group alone (allowed, not a trusted forwarder, no exemption), found
  through `memo_clients` (source address -> such a client). A hit answers without parsing or
  deciding again (`Resolver.handle` looks it up itself: it is most queries). An answer is kept
  once its name is asked a second time (the name is then in `categories`), not the first: most
  names of the long tail are asked once, and remembering each of them cost an object per query
  and the garbage collector's time walking them all (bench/hotpath.py).

Each table is bounded, and the two that grow with the names asked (categories, answers) in bytes
too: together at most `dns.cache_bytes / MEMO_SHARE`. A full table drops its oldest entries one
by one as new ones come (never a wholesale clear, which stalled the loop for tens of ms).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from blocker.answers import BlockAnswers
from blocker.cache import MAX_ENTRY_BYTES, MEMO_SHARE
from blocker.clients import Client, identify
from blocker.inventory import Network, format_network
from blocker.policy import CANARY_NAMES, Action, Decision, Policy, decide_categories

if TYPE_CHECKING:
    from blocker.bindings import BindingTable

MEMO_LIMIT = 200_000
FOREVER = float("inf")
# What a table entry costs beside its own bytes, measured with tracemalloc (tests/test_memo_bytes.py
# keeps the estimates honest): the OrderedDict slot and link, the name string's header; for an
# answer, also the key tuple, the MemoHit, its float and its own name string (an answer is
# remembered on its name's second query, whose parse made a new string: 49 bytes plus the name).
CATEGORY_OVERHEAD = 150
REPLY_OVERHEAD = 340 + 49
CATEGORIES_SHARE = 4  # of the memo's bytes, at most a quarter for name -> categories


class BoundedTable(OrderedDict):  # type: ignore[type-arg]
    """A dict bounded by entries and by bytes (as `size_of` counts them), dropping the oldest
    insertions first. Lookups are plain dict lookups: nothing moves on a hit."""

    def __init__(self, max_entries: int, max_bytes: int, size_of: Callable[[object, object], int]) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.bytes = 0

    def add(self, key: object, value: object) -> None:
        size_of = self.size_of
        old = self.pop(key, None)
        if old is not None:
            self.bytes -= size_of(key, old)
        self[key] = value
        self.bytes += size_of(key, value)
        while self and (len(self) > self.max_entries or self.bytes > self.max_bytes):
            oldest, dropped = self.popitem(last=False)
            self.bytes -= size_of(oldest, dropped)


def _category_size(qname: object, categories: object) -> int:
    return len(qname) + CATEGORY_OVERHEAD  # type: ignore[arg-type]


def _reply_size(key: object, hit: object) -> int:
    return len(key[2]) + len(hit.reply) + len(hit.qname) + REPLY_OVERHEAD  # type: ignore[index, attr-defined]


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

    def __init__(self, policy: Policy, bindings: BindingTable | None = None, share: int = 1) -> None:
        """`share`: the processes the server's bound is shared by (its running workers)."""
        self.policy = policy
        self.bindings = bindings
        self.answers = BlockAnswers(policy)
        self.clients: dict[tuple[str, bytes | None], Client] = {}
        budget = policy.config.dns.cache_bytes // MEMO_SHARE // share
        self.categories = BoundedTable(MEMO_LIMIT, budget // CATEGORIES_SHARE, _category_size)
        self.decisions: dict[tuple[str, frozenset[str], bool], Decision] = {}
        # Source address -> client, only for clients whose answers `replies` may hold.
        self.memo_clients: dict[str, Client] = {}
        self.replies = BoundedTable(MEMO_LIMIT, budget - budget // CATEGORIES_SHARE, _reply_size)

    @property
    def bytes(self) -> int:
        """What the name-dependent tables hold (the others are bounded by devices and groups)."""
        return self.categories.bytes + self.replies.bytes

    @property
    def max_bytes(self) -> int:
        return self.categories.max_bytes + self.replies.max_bytes

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
            categories = self.policy.categorize(qname)
            self.categories.add(qname, categories)
        return categories  # type: ignore[no-any-return]

    def decision(self, client: Client, qname: str, categories: frozenset[str],
                 now: Callable[[], datetime]) -> Decision:
        """`decide_categories`, remembered for clients without exemptions (time cannot change it).

        `now` is read only when a decision is made, not when a remembered one is found."""
        policy = self.policy
        if client.device in policy.exemptions:
            return decide_categories(policy, client, qname, categories, now())
        key = (client.group, categories, qname in CANARY_NAMES)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = decide_categories(policy, client, qname, categories, now())
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
        if len(hit.reply) <= MAX_ENTRY_BYTES:  # what is too large for the cache is too large here
            self.replies.add(key, hit)
