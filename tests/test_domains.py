"""Table tests for name normalisation and the most-specific-rule-wins index."""

from __future__ import annotations

import pytest

from blocker.domains import InvalidName, RuleIndex, RuleSource, normalize, normalize_rule


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
