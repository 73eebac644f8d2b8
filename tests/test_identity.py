"""Who is asking, end to end: the real server with an inventory and RADIUS accounting; real radclient
binds an address, real dig from that address gets the device's decision; two servers share bindings
through a real redis-server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import standard_config
from helpers import ROOT, Blocker, Knot, free_port, metric_value, require_tool
from radius_tools import SECRET, RedisServer, radclient

INVENTORY = """\
id,group,addresses,model
MPS-STATIC,comms-team,127.0.0.4,iPhone 15
MPS-COMMS,comms-team,,Pixel 8
MPS-PLAIN,standard,,Pixel 8
"""


def identity_config(directory: Path, knot: Knot, store: str = "") -> Path:
    (directory / "radius.secret").write_text(SECRET + "\n")
    (directory / "devices.csv").write_text(INVENTORY)
    return standard_config(directory, [knot.endpoint], policy=f"""\
policy:
  inventory: [devices.csv]
identity:
  snapshot: bindings.json
  vpn_networks: ["127.0.0.0/24"]
  {store}
  radius_accounting:
    listen: "127.0.0.1:0"
    secret_file: radius.secret
    clients: ["127.0.0.1/32"]
    device_attribute: {{attribute: User-Name, regex: '^(?P<device>[^@]+)@'}}
query_log:
  path: queries.jsonl
""")


def radius_port(server: Blocker) -> int:
    line = server.wait_for_log(r"listening radius=")
    return int(re.search(r"radius=\S+:(\d+) ", line).group(1))  # type: ignore[union-attr]


def dig(server: Blocker, source: str, name: str) -> str:
    tool = require_tool("dig")
    out = subprocess.run([tool, "-b", source, "-p", str(server.port), "@127.0.0.1", name, "A", "+tries=1",
                          "+time=2"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"status: (\w+)", out)
    assert found, out
    return found.group(1)


def wait_status(server: Blocker, source: str, name: str, status: str, timeout: float = 2.0) -> float:
    """Seconds until dig from `source` gets `status` (fails after `timeout`)."""
    start = time.monotonic()
    while True:
        got = dig(server, source, name)
        if got == status:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{source} {name}: {got}, expected {status}")
        time.sleep(0.05)


def start(user: str, address: str, kind: str = "Start") -> dict[str, str]:
    return {"User-Name": user, "Acct-Status-Type": kind, "Framed-IP-Address": address, "NAS-Identifier": "gw-a",
            "Acct-Session-Id": "s1"}


@pytest.fixture
def served(knot: Knot, tmp_path: Path) -> Blocker:
    server = Blocker(identity_config(tmp_path, knot)).start()
    yield server
    server.stop()


def test_accounting_binds_an_address_to_its_device(served: Blocker, tmp_path: Path) -> None:
    port = radius_port(served)
    assert dig(served, "127.0.0.2", "www.tiktok.com") == "NXDOMAIN"  # default group
    assert dig(served, "127.0.0.4", "www.tiktok.com") == "NOERROR"  # static inventory address: comms-team
    assert radclient(port, start("MPS-COMMS@force.test", "127.0.0.2"))
    wait_status(served, "127.0.0.2", "www.tiktok.com", "NOERROR")
    # A wrong secret changes nothing: no answer, the binding stays.
    assert not radclient(port, start("MPS-COMMS@force.test", "127.0.0.2", "Stop"), secret="wrong", retries=1,
                         timeout=0.2)
    assert dig(served, "127.0.0.2", "www.tiktok.com") == "NOERROR"
    # A binding beats the static address: MPS-PLAIN (standard) now holds 127.0.0.4.
    assert radclient(port, start("MPS-PLAIN@force.test", "127.0.0.4"))
    wait_status(served, "127.0.0.4", "www.tiktok.com", "NXDOMAIN")
    assert radclient(port, start("MPS-COMMS@force.test", "127.0.0.2", "Stop"))
    wait_status(served, "127.0.0.2", "www.tiktok.com", "NXDOMAIN")

    text = served.metrics()
    assert metric_value(text, "blocker_radius_accounting_packets_total", {"type": "start", "result": "ok"}) == 2
    assert metric_value(text, "blocker_radius_accounting_packets_total", {"type": "stop", "result": "ok"}) == 1
    assert metric_value(text, "blocker_radius_accounting_packets_total",
                        {"type": "unknown", "result": "bad_authenticator"}) >= 1
    assert metric_value(text, "blocker_bindings_active") == 1
    assert metric_value(text, "blocker_radius_last_accounting_timestamp_seconds") > time.time() - 60
    assert metric_value(text, "blocker_dns_unidentified_vpn_queries_total") >= 2  # 127.0.0.2 before and after
    assert "127.0.0.4" not in "".join(line for line in text.splitlines() if line.startswith("blocker_"))
    assert served.stop() == 0

    entries = [json.loads(line) for line in (tmp_path / "queries.jsonl").read_text().splitlines()]
    origins = [(e["client"], e["identity"], e["device"]) for e in entries]
    assert ("127.0.0.2", "binding", "MPS-COMMS") in origins
    assert ("127.0.0.4", "inventory", "MPS-STATIC") in origins
    assert ("127.0.0.2", "default", None) in origins
    bound = next(e for e in entries if e["identity"] == "binding")
    assert bound["identity_source"].startswith("gateway gw-a since ")

    # `blocker check` tells where the identity came from (the snapshot written at stop).
    def check(address: str) -> dict[str, object]:
        done = subprocess.run([sys.executable, "-m", "blocker", "check", "www.tiktok.com", "--client", address,
                               "--config", str(served.config), "--json"], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
        return json.loads(done.stdout)

    held = check("127.0.0.4")
    assert (held["device"], held["group"], held["action"]) == ("MPS-PLAIN", "standard", "blocked")
    assert held["identity_origin"] == "binding"
    assert re.match(r"gateway gw-a since \S+Z \(snapshot .*bindings.json\)$", str(held["identity_source"]))
    assert str(held["identity"]).startswith("source address 127.0.0.4 is bound to device MPS-PLAIN by RADIUS "
                                            "accounting: gateway gw-a since ")
    (tmp_path / "bindings.json").unlink()
    static = check("127.0.0.4")
    assert (static["identity_origin"], static["identity_source"]) == ("inventory", f"{tmp_path / 'devices.csv'}:2")
    assert static["identity"] == (f"source address 127.0.0.4 matches device MPS-STATIC "
                                  f"(policy.inventory, {tmp_path / 'devices.csv'}:2)")
    nobody = check("127.0.0.9")
    assert (nobody["identity_origin"], nobody["identity_source"]) == ("default", None)


def test_bindings_survive_a_restart(knot: Knot, tmp_path: Path) -> None:
    config = identity_config(tmp_path, knot)
    server = Blocker(config).start()
    assert radclient(radius_port(server), start("MPS-COMMS@force.test", "127.0.0.5"))
    wait_status(server, "127.0.0.5", "www.tiktok.com", "NOERROR")
    assert server.stop() == 0
    server = Blocker(config).start()
    try:
        assert dig(server, "127.0.0.5", "www.tiktok.com") == "NOERROR"
    finally:
        server.stop()


def test_two_servers_share_bindings_through_redis(knot: Knot, tmp_path: Path) -> None:
    redis = RedisServer(free_port()).start()
    store = f'store: {{url: "{redis.url}", prefix: i11-e2e}}'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Blocker(identity_config(tmp_path / "a", knot, store)).start()
    b = Blocker(identity_config(tmp_path / "b", knot, store)).start()
    try:
        a.wait_for_log("binding store .* in sync")
        b.wait_for_log("binding store .* in sync")
        assert radclient(radius_port(a), start("MPS-COMMS@force.test", "127.0.0.6"))
        assert wait_status(b, "127.0.0.6", "www.tiktok.com", "NOERROR", timeout=1.0) < 1.0
        redis.kill()
        b.wait_for_log("binding store .* lost")
        assert metric_value(b.metrics(), "blocker_binding_store_up") == 0
        assert dig(b, "127.0.0.6", "www.tiktok.com") == "NOERROR"  # the last table keeps serving
        assert radclient(radius_port(b), start("MPS-COMMS@force.test", "127.0.0.7"))  # binds locally
        redis.start()
        wait_status(a, "127.0.0.7", "www.tiktok.com", "NOERROR", timeout=15.0)
        assert metric_value(a.metrics(), "blocker_binding_store_up") == 1
    finally:
        a.stop()
        b.stop()
        redis.kill()


def test_an_inventory_edit_reloads_without_recompiling_the_lists(served: Blocker, tmp_path: Path) -> None:
    assert dig(served, "127.0.0.8", "www.tiktok.com") == "NXDOMAIN"
    with (tmp_path / "devices.csv").open("a") as out:
        out.write("MPS-NEW,comms-team,127.0.0.8,Pixel 9\n")
    line = served.wait_for_log(r"reloaded \(file change\)")
    assert "lists reused" in line
    wait_status(served, "127.0.0.8", "www.tiktok.com", "NOERROR")
    # A broken inventory is rejected with FILE:LINE and the running one keeps serving.
    with (tmp_path / "devices.csv").open("a") as out:
        out.write("MPS-NEW,comms-team,127.0.0.9,duplicate id\n")
    served.wait_for_log(rf"rejected.*{re.escape(str(tmp_path / 'devices.csv'))}:6: device 'MPS-NEW' is listed twice "
                        rf"\(first at .*devices.csv:5\)")
    assert dig(served, "127.0.0.8", "www.tiktok.com") == "NOERROR"


def test_identity_metrics_pass_promtool(served: Blocker) -> None:
    assert radclient(radius_port(served), start("MPS-COMMS@force.test", "127.0.0.2"))
    text = served.metrics()
    result = subprocess.run([require_tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blocker_radius_accounting_packets_total" in text
