"""Config errors are reported as FILE:LINE: message; typos and YAML 1.1 traps never pass silently."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from blocker.config import load_config
from blocker.errors import ConfigError


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "blocker.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return [str(p).replace(str(tmp_path) + "/", "") for p in caught.value.problems]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("dns:\n  listn: []\n", "blocker.yaml:2: dns: unknown key 'listn'", id="unknown-key"),
    pytest.param("dsn: {}\n", "blocker.yaml:1: config: unknown key 'dsn'", id="unknown-top-key"),
    pytest.param("dns:\n  block_ttl: 60\n  block_ttl: 5\n", "blocker.yaml:3: dns: duplicate key 'block_ttl'",
                 id="duplicate-key"),
    pytest.param("dns:\n  block_ttl: 0755\n", "blocker.yaml:2: dns.block_ttl must be a whole number written in "
                 "decimal, got '0755'", id="octal-trap"),
    pytest.param("dns:\n  cache_size: 1_000\n", "blocker.yaml:2: dns.cache_size must be a whole number written "
                 "in decimal, got '1_000'", id="underscore-number"),
    pytest.param("query_log:\n  only_blocked: yes\n", "blocker.yaml:2: query_log.only_blocked must be true or "
                 "false, got 'yes'", id="yes-trap"),
    pytest.param("dns:\n  listen: [\"127.0.0.1\"]\n", "blocker.yaml:2: dns.listen entry must be IP:PORT (IPv6 as "
                 "[::1]:53), got '127.0.0.1'", id="listen-without-port"),
    pytest.param("dns:\n  listen: [\"::1:53\"]\n", "blocker.yaml:2: dns.listen entry must be IP:PORT (IPv6 as "
                 "[::1]:53), got '::1:53'", id="ipv6-without-brackets"),
    pytest.param("dns:\n  upstreams: [\"dns.google:53\"]\n", "blocker.yaml:2: dns.upstreams entry must be IP:PORT "
                 "(IPv6 as [::1]:53), got 'dns.google:53'", id="upstream-hostname"),
    pytest.param("dns:\n  block_response: blackhole\n", "blocker.yaml:2: dns.block_response must be nxdomain, "
                 "refused, null or ip:ADDR[,ADDR], got 'blackhole'", id="bad-block-response"),
    pytest.param("proxy:\n  mode: on\n", "blocker.yaml:2: proxy.mode: 'on' reads as a YAML boolean or null; "
                 "quote it", id="on-trap"),
    pytest.param("dns:\n  allow_networks: [\"10.0.0.0/33\"]\n", "blocker.yaml:2: dns.allow_networks entry must "
                 "be an IP address or CIDR, got '10.0.0.0/33'", id="bad-cidr"),
    pytest.param("dns: [1, 2\n", "blocker.yaml:2: YAML syntax:", id="syntax"),
    pytest.param("policy:\n  default_group: nobody\n", "blocker.yaml:2: policy.default_group 'nobody' is not a "
                 "group", id="unknown-default-group"),
])
def test_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, "dns:\n  block_ttl: x\n  cache_size: -1\nmetrics:\n  lisen: 1\n")
    assert len(found) == 3


def test_exemption_needs_every_field(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        policy:
          devices:
            - {id: MPS-1, addresses: ["10.8.0.1"], group: standard}
          exemptions:
            - device: MPS-1
              allow: [whatsapp]
              approved_by: "Insp. J. Doe"
              expires: 2026-12-31T23:59:00Z
        """)
    assert found == ["blocker.yaml:5: exemption needs reference, reason (no defaults: every grant is on record)"]


def test_exemption_expiry_needs_a_time_zone(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        policy:
          exemptions:
            - {device: MPS-1, allow: [whatsapp], approved_by: a, reference: r, reason: why,
               expires: "2026-12-31T23:59:00"}
        """)
    assert found == ["blocker.yaml:4: exemption expires needs a time zone (Z or +hh:mm), got '2026-12-31T23:59:00'"]


def test_full_schema_is_accepted(tmp_path: Path) -> None:
    config = load(tmp_path, """\
        dns:
          listen: ["127.0.0.1:5353", "[::1]:5353"]
          upstreams: ["127.0.0.1:5300"]
          allow_networks: ["127.0.0.0/8", "::1/128", "10.0.0.0/8"]
          block_response: null
          block_ttl: 60
          cache_size: 100000
          trusted_forwarders: ["10.8.0.1/32"]
        metrics:
          listen: "127.0.0.1:9153"
        blocklists: lists
        query_log:
          path: null
          only_blocked: false
        proxy:
          listen: "127.0.0.1:8080"
          mode: regular
        policy:
          default_group: standard
          groups:
            standard:   {block: [tiktok, whatsapp]}
            comms-team: {block: [whatsapp]}
          devices:
            - id: 000123
              addresses: ["10.8.0.23", "fd00::23/128"]
              group: comms-team
          exemptions:
            - device: 000123
              allow: [whatsapp]
              approved_by: "Insp. J. Doe"
              reference: "CHG-2023-0042"
              reason: "Witness liaison"
              expires: 2026-12-31T23:59:00Z
        """)
    assert config.dns.listen == (("127.0.0.1", 5353), ("::1", 5353))  # type: ignore[attr-defined]
    assert config.dns.block_response.kind == "null"  # type: ignore[attr-defined]
    assert config.blocklists == tmp_path / "lists"  # type: ignore[attr-defined]
    [device] = config.policy.devices  # type: ignore[attr-defined]
    assert device.id == "000123"  # not the octal number 83
    [exemption] = config.policy.exemptions  # type: ignore[attr-defined]
    assert exemption.expires == datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert exemption.line == 28
