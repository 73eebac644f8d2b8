"""Table tests for name normalisation and the most-specific-rule-wins index."""

from __future__ import annotations

import random

import pytest

from blocker.domains import (
    CompactNames,
    InvalidName,
    RuleIndex,
    RuleSource,
    all_valid_names,
    is_valid_name,
    normalize,
    normalize_rule,
)


def build(rules: list[tuple[str, str, bool]]) -> RuleIndex:
    index = RuleIndex()
    for line, (rule, category, allow) in enumerate(rules, start=1):
        index.add(normalize_rule(rule), RuleSource(category, f"{category}.yaml", line, rule, allow))
    return index


RULES = [
    ("facebook.com", "facebook", False),
    ("fbcdn.net", "facebook", False),
    ("whatsapp-cdn-shv-*.fbcdn.net", "whatsapp", False),
    ("whatsapp-chatd-*.facebook.com", "whatsapp", False),
    ("instagram.*.fna.fbcdn.net", "instagram", False),
    ("instagram.c10r.facebook.com", "instagram", False),
    ("tiktok.com", "tiktok", False),
    ("newsroom.tiktok.com", "tiktok", True),  # except: stays open
    ("shared.example", "facebook", False),
    ("shared.example", "instagram", False),
    ("exact-vs-pattern.example", "tiktok", False),
    ("a*.exact-vs-pattern.example", "twitter", False),
    ("abc.exact-vs-pattern.example", "snapchat", False),
]


@pytest.mark.parametrize(("name", "categories", "rule"), [
    pytest.param("facebook.com", {"facebook"}, "facebook.com", id="apex"),
    pytest.param("www.facebook.com", {"facebook"}, "facebook.com", id="subdomain"),
    pytest.param("notfacebook.com", set(), "", id="not-a-label-suffix"),
    pytest.param("whatsapp-cdn-shv-01-lhr8.fbcdn.net", {"whatsapp"}, "whatsapp-cdn-shv-*.fbcdn.net",
                 id="pattern-beats-suffix"),
    pytest.param("scontent-lhr8-1.xx.fbcdn.net", {"facebook"}, "fbcdn.net", id="shared-cdn-stays-facebook"),
    pytest.param("media.whatsapp-cdn-shv-01-lhr8.fbcdn.net", {"whatsapp"}, "whatsapp-cdn-shv-*.fbcdn.net",
                 id="under-a-pattern"),
    pytest.param("whatsapp-chatd-edge-shv-01-ams2.facebook.com", {"whatsapp"}, "whatsapp-chatd-*.facebook.com",
                 id="pattern-under-facebook"),
    pytest.param("instagram.flhr8-1.fna.fbcdn.net", {"instagram"}, "instagram.*.fna.fbcdn.net",
                 id="pattern-in-middle-label"),
    pytest.param("x.instagram.c10r.facebook.com", {"instagram"}, "instagram.c10r.facebook.com", id="exact-host"),
    pytest.param("newsroom.tiktok.com", set(), "newsroom.tiktok.com", id="except-allows"),
    pytest.param("www.newsroom.tiktok.com", set(), "newsroom.tiktok.com", id="except-covers-subdomains"),
    pytest.param("www.tiktok.com", {"tiktok"}, "tiktok.com", id="beside-the-except"),
    pytest.param("shared.example", {"facebook", "instagram"}, "shared.example", id="two-categories"),
    pytest.param("abc.exact-vs-pattern.example", {"snapchat"}, "abc.exact-vs-pattern.example",
                 id="exact-beats-pattern-at-same-depth"),
    pytest.param("axe.exact-vs-pattern.example", {"twitter"}, "a*.exact-vs-pattern.example", id="pattern-depth"),
    pytest.param("b.exact-vs-pattern.example", {"tiktok"}, "exact-vs-pattern.example", id="pattern-no-match"),
    pytest.param("com", set(), "", id="tld-alone"),
])
def test_most_specific_rule_wins(name: str, categories: set[str], rule: str) -> None:
    index = build(RULES)
    match = index.lookup(name)
    assert set(match.categories) == categories
    assert match.rule == rule
    assert index.classify(name) == frozenset(categories)


def test_match_reports_file_and_line() -> None:
    match = build(RULES).lookup("www.tiktok.com")
    [source] = match.sources
    assert (source.category, source.file, source.line) == ("tiktok", "tiktok.yaml", 7)
    both = build(RULES).lookup("shared.example")
    assert sorted((s.category, s.line) for s in both.sources) == [("facebook", 9), ("instagram", 10)]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("WWW.TikTok.COM", "www.tiktok.com", id="case"),
    pytest.param("www.tiktok.com.", "www.tiktok.com", id="trailing-dot"),
    pytest.param("  x.com ", "x.com", id="spaces"),
    pytest.param("bücher.example", "xn--bcher-kva.example", id="idna"),
    pytest.param("xn--bcher-kva.example", "xn--bcher-kva.example", id="punycode-stays"),
])
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_idna_name_matches_punycode_rule() -> None:
    index = build([("bücher.example", "tiktok", False)])
    assert index.classify(normalize("WWW.BÜCHER.example.")) == {"tiktok"}


@pytest.mark.parametrize("text", ["", ".", "a..b", "-bad.example", "bad-.example", "sp ace.example",
                                  "x" * 64 + ".example", "*.*", "tiktok.*", "a**b.example"])
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(InvalidName):
        normalize_rule(text)


def test_lookup_cost_does_not_grow_with_rules() -> None:
    """Not a timing test: the number of dictionary probes is bounded by the name's labels."""
    small = build(RULES)
    big = build(RULES)
    for i in range(50_000):
        big.add(f"filler{i}.example", RuleSource("tiktok", "big.txt", i, "", False))
    for name in ("a.b.c.www.tiktok.com", "whatsapp-cdn-shv-01-lhr8.fbcdn.net", "nothing.here.invalid"):
        assert small.classify(name) == big.classify(name)
    assert big.classify("filler49999.example") == {"tiktok"}


def test_all_valid_names_never_passes_what_is_valid_name_rejects() -> None:
    rng = random.Random(7)
    alphabet = "ab-_.0 #A\u00e9"
    valid_batches = 0
    for _ in range(20_000):
        names = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 7))) for _ in range(rng.randrange(1, 4))]
        every = all(is_valid_name(name) for name in names)
        assert all_valid_names(names) == every, names
        valid_batches += every
    assert valid_batches > 100
    assert all_valid_names(["a.example", "b-c.example"]) and not all_valid_names(["a.example", "-b.example"])
    # Longer than 63 characters: not sure, so checked name by name by the caller.
    assert not all_valid_names(["x" * 64 + ".example"])


def test_compact_names_holds_exactly_its_names() -> None:
    names = {f"host{i}.bulk.example".encode() for i in range(5000)}
    compact = CompactNames(names)
    assert len(compact) == 5000 and sorted(compact) == sorted(names)
    assert all(name in compact for name in names)
    assert not any(name in compact for name in (b"host1.bulk.exampl", b"ost1.bulk.example", b"bulk.example", b""))
    assert compact.deepest(b"a.b.host7.bulk.example") == len(b"host7.bulk.example")
    assert compact.deepest(b"host7.bulk.example.evil") == 0


def test_bulk_names_keep_their_meaning_once_compacted() -> None:
    index = RuleIndex()
    bulk = RuleSource("ads", "/lists/ads.txt", 0, "")
    assert index.add_names([f"n{i}.ads.example" for i in range(1000)] + ["shared.example"], bulk) == []
    assert index.add_names(["n5.ads.example", "new.ads.example"], bulk) == [0]  # listed before: a duplicate
    assert index.add("shared.example", RuleSource("tracking", "/lists/tracking.yaml", 3, "shared.example"))
    assert index.add("*.n7.ads.example", RuleSource("other", "/lists/other.yaml", 4, "*.n7.ads.example"))
    before = {name: index.lookup(name) for name in ("n5.ads.example", "www.n5.ads.example", "shared.example",
                                                    "x.n7.ads.example", "new.ads.example", "ads.example", "")}
    index.compact()
    for name, match in before.items():
        assert index.lookup(name) == match, name
    assert index.classify("shared.example") == {"ads", "tracking"}
    assert index.classify("x.n7.ads.example") == {"other"}  # the pattern is deeper than the bulk rule
    assert index.classify("") == frozenset()
    assert index.categories_sizes() == {"ads": 1002, "tracking": 1, "other": 1}
    assert "n999.ads.example" in index.exact_rules() and len(index.exact_rules()) == 1002
    assert [s.category for s in index.sources("n3.ads.example")] == ["ads"]
