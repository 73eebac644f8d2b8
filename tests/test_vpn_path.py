"""The VPN path end to end, in network namespaces this test creates: two handsets with their own tunnel
addresses resolve through blocker in a third namespace (with its upstream on that namespace's loopback).
The exempt handset reaches WhatsApp; the other does not.

    ns h1 (10.99.1.2) ──veth── 10.99.1.1 ┐
                                         ├─ ns dns: blocker on :53, Knot on 127.0.0.1
    ns h2 (10.99.2.2) ──veth── 10.99.2.1 ┘
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, Blocker, Knot, eventually, require_tool


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


class Namespaces:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.dns, self.h1, self.h2 = f"bdns{tag}", f"bh1{tag}", f"bh2{tag}"
        self.created: list[str] = []

    def create(self) -> None:
        ip = require_tool("ip")
        for name in (self.dns, self.h1, self.h2):
            run(ip, "netns", "add", name)
            self.created.append(name)
            run(ip, "-n", name, "link", "set", "lo", "up")
        for index, handset in ((1, self.h1), (2, self.h2)):
            outer, inner = f"vd{index}{self.dns[-6:]}", f"vh{index}{self.dns[-6:]}"
            run(ip, "link", "add", outer, "netns", self.dns, "type", "veth", "peer", "name", inner, "netns", handset)
            run(ip, "-n", self.dns, "addr", "add", f"10.99.{index}.1/30", "dev", outer)
            run(ip, "-n", handset, "addr", "add", f"10.99.{index}.2/30", "dev", inner)
            run(ip, "-n", self.dns, "link", "set", outer, "up")
            run(ip, "-n", handset, "link", "set", inner, "up")

    def exec(self, namespace: str, *args: str) -> list[str]:
        return [require_tool("ip"), "netns", "exec", namespace, *args]

    def delete(self) -> None:
        for name in self.created:
            run(require_tool("ip"), "netns", "delete", name, check=False)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    spaces = Namespaces()
    try:
        spaces.create()
    except subprocess.CalledProcessError as err:
        spaces.delete()
        message = f"network namespaces refused by this kernel/sandbox: {err.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run this test)")
        print(f"\n!!! SKIPPING the VPN-path test: {message} !!!\n", file=sys.stderr)
        pytest.skip(message)
    yield spaces
    spaces.delete()


def dig(spaces: Namespaces, handset: str, server: str, name: str) -> str:
    result = subprocess.run(spaces.exec(handset, require_tool("dig"), f"@{server}", name, "+tries=1", "+time=3"),
                            capture_output=True, text=True, timeout=30)
    return result.stdout


def test_handsets_resolve_through_blocker_by_tunnel_address(namespaces: Namespaces, tmp_path: Path) -> None:
    spaces = namespaces
    # Knot inside the resolver's namespace, on its loopback (readiness is seen through blocker below).
    knot = Knot(tmp_path / "knot", ["whatsapp.com", "example.test"], port=5300,
                prefix=tuple(spaces.exec(spaces.dns))).start(wait=False)
    config = tmp_path / "blocker.yaml"
    config.write_text(textwrap.dedent(f"""\
        dns:
          listen: ["0.0.0.0:53"]
          upstreams: ["127.0.0.1:5300"]
          allow_networks: ["10.99.0.0/16", "127.0.0.0/8"]
        metrics:
          listen: "127.0.0.1:9153"
        blocklists: "{ROOT / 'blocklists'}"
        policy:
          devices:
            - {{id: HANDSET-1, addresses: ["10.99.1.2"], group: standard}}
            - {{id: HANDSET-2, addresses: ["10.99.2.2"], group: standard}}
          exemptions:
            - {{device: HANDSET-1, allow: [whatsapp], approved_by: "Insp. J. Doe", reference: "CHG-VPN-1",
               reason: "Witness liaison", expires: 2099-01-01T00:00:00Z}}
        """))
    server = Blocker(config, prefix=tuple(spaces.exec(spaces.dns))).start()
    try:
        eventually(lambda: "status: NOERROR" in dig(spaces, spaces.h1, "10.99.1.1", "www.example.test"), 20, 0.2,
                   "the handset resolving through blocker")
        exempt = dig(spaces, spaces.h1, "10.99.1.1", "web.whatsapp.com")
        assert "status: NOERROR" in exempt and "157.240.0.30" in exempt
        other = dig(spaces, spaces.h2, "10.99.2.1", "web.whatsapp.com")
        assert "status: NXDOMAIN" in other and "blocked: category=whatsapp" in other
        # Social media stays closed for both handsets; work sites are open for both.
        for handset, server_address in ((spaces.h1, "10.99.1.1"), (spaces.h2, "10.99.2.1")):
            assert "blocked: category=tiktok" in dig(spaces, handset, server_address, "www.tiktok.com")
            assert "status: NOERROR" in dig(spaces, handset, server_address, "www.example.test")
        # The handsets cannot reach each other's resolver address: each sits alone on its tunnel.
        assert "status:" not in dig(spaces, spaces.h1, "10.99.2.1", "www.example.test")
    finally:
        assert server.stop() == 0
        knot.stop()
