"""Shared fixtures: one real Knot upstream for the session, and configs pointing blocker at it."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, Blocker, Knot

SHIPPED = ROOT / "blocklists"


@pytest.fixture(scope="session")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    # broken.test has no zone file: Knot answers SERVFAIL for it.
    zones = ["example.test", "tiktok.com", "fbcdn.net", "whatsapp.com", "proxy.test", "broken.test"]
    server = Knot(tmp_path_factory.mktemp("knot"), zones).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def refusing_knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    """An authoritative server for an unrelated zone: it answers REFUSED for everything we ask."""
    server = Knot(tmp_path_factory.mktemp("knot-refusing"), ["other.test"]).start()
    yield server
    server.stop()


def standard_config(directory: Path, upstreams: list[str], extra_dns: str = "", policy: str = "",
                    blocklists: Path = SHIPPED, name: str = "blocker.yaml", upstream_timeout: float = 0.5) -> Path:
    """A config on ephemeral loopback ports; `extra_dns` and `policy` are YAML snippets."""
    upstream_list = ", ".join(f'"{u}"' for u in upstreams)
    dns_extra = textwrap.indent(textwrap.dedent(extra_dns).strip(), "  ")
    text = (f"dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [{upstream_list}]\n"
            + f"  upstream_timeout: {upstream_timeout}\n"
            + (dns_extra + "\n" if dns_extra else "")
            + f"metrics:\n  listen: \"127.0.0.1:0\"\nblocklists: \"{blocklists}\"\n"
            + textwrap.dedent(policy))
    path = directory / name
    path.write_text(text)
    return path


def short_exemption(expires: str) -> str:
    """A policy snippet: device MPS-SHORT at 127.0.0.6 holds WhatsApp exemption CHG-SHORT until `expires`."""
    return f"""\
policy:
  devices:
    - {{id: MPS-SHORT, addresses: ["127.0.0.6"], group: standard}}
  exemptions:
    - {{device: MPS-SHORT, allow: [whatsapp], approved_by: "Supt. A. Smith", reference: "CHG-SHORT",
       reason: "Test", expires: "{expires}"}}
"""


@pytest.fixture(scope="module")
def blocker(knot: Knot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blocker]:
    """blocker on the shipped lists, forwarding to Knot, with a comms-team device at 127.0.0.3."""
    directory = tmp_path_factory.mktemp("blocker")
    config = standard_config(directory, [knot.endpoint], policy="""\
        policy:
          default_group: standard
          # groups: the defaults (standard blocks all ten categories, comms-team only messaging and doh)
          devices:
            - id: MPS-000123
              addresses: ["127.0.0.3"]
              group: comms-team
        """)
    server = Blocker(config).start()
    yield server
    server.stop()


@pytest.fixture
def blocker_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the `blocker` logger, which does not propagate once blocker's logging is set up."""
    logger = logging.getLogger("blocker")
    propagate = logger.propagate
    logger.propagate = False  # records reach caplog once, through its handler here
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
