"""Devices, groups and exemptions end to end: the real server, clients on different loopback addresses,
ECS from trusted and untrusted forwarders, expiry without reload, the audit trail and the query log."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest
from conftest import standard_config
from helpers import Blocker, Knot, edes, eventually, metric_value, rcode_text

DEVICES = """\
policy:
  devices:
    - {id: MPS-EXEMPT, addresses: ["127.0.0.2"], group: standard}
    - {id: MPS-COMMS, addresses: ["127.0.0.3/32"], group: comms-team}
    - {id: MPS-EXPIRED, addresses: ["127.0.0.4"], group: standard}
  exemptions:
    - device: MPS-EXEMPT
      allow: [whatsapp]
      approved_by: "Insp. J. Doe"
      reference: "CHG-2026-0042"
      reason: "Witness liaison"
      expires: 2099-12-31T23:59:00Z
    - device: MPS-EXPIRED
      allow: [whatsapp]
      approved_by: "Insp. J. Doe"
      reference: "CHG-2020-0001"
      reason: "Old case"
      expires: 2020-01-01T00:00:00Z
"""


@pytest.fixture(scope="module")
def fleet(knot: Knot, tmp_path_factory: pytest.TempPathFactory) -> Blocker:
    directory = tmp_path_factory.mktemp("fleet")
    config = standard_config(directory, [knot.endpoint], extra_dns='trusted_forwarders: ["127.0.0.5/32"]',
                             policy=DEVICES + "query_log:\n  path: queries.jsonl\n")
    server = Blocker(config).start()
    yield server
    server.stop()


def ask(server: Blocker, name: str, source: str, **kwargs: object) -> dns.message.Message:
    return server.query(name, source=source, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("source", "name", "rcode", "detail"), [
    pytest.param("127.0.0.2", "web.whatsapp.com", "NOERROR", "157.240.0.30", id="exempt-whatsapp"),
    pytest.param("127.0.0.2", "whatsapp-cdn-shv-01-lhr8.fbcdn.net", "NOERROR", "157.240.0.10",
                 id="exempt-whatsapp-media-on-fbcdn"),
    pytest.param("127.0.0.2", "scontent-lhr8-1.xx.fbcdn.net", "NXDOMAIN", "category=facebook",
                 id="exempt-device-facebook-cdn-closed"),
    pytest.param("127.0.0.2", "www.instagram.com", "NXDOMAIN", "category=instagram", id="exempt-device-instagram"),
    pytest.param("127.0.0.2", "www.tiktok.com", "NXDOMAIN", "category=tiktok", id="exempt-device-tiktok"),
    pytest.param("127.0.0.3", "www.tiktok.com", "NOERROR", "203.0.113.7", id="comms-team-tiktok"),
    pytest.param("127.0.0.3", "web.whatsapp.com", "NXDOMAIN", "category=whatsapp", id="comms-team-no-whatsapp"),
    pytest.param("127.0.0.4", "web.whatsapp.com", "NXDOMAIN", "category=whatsapp", id="expired-exemption"),
    pytest.param("127.0.0.9", "web.whatsapp.com", "NXDOMAIN", "category=whatsapp", id="unknown-client"),
    pytest.param("127.0.0.9", "whatsapp-cdn-shv-01-lhr8.fbcdn.net", "NXDOMAIN", "category=whatsapp",
                 id="unknown-client-whatsapp-media"),
    pytest.param("127.0.0.9", "www.example.test", "NOERROR", "192.0.2.1", id="unknown-client-work-site"),
])
def test_policy_per_device(fleet: Blocker, source: str, name: str, rcode: str, detail: str) -> None:
    response = ask(fleet, name, source)
    assert rcode_text(response) == rcode
    if rcode == "NOERROR":
        assert [str(r) for r in response.answer[-1]] == [detail]
    else:
        assert detail in edes(response)[0][1]


def test_ecs_names_the_client_only_from_a_trusted_forwarder(fleet: Blocker) -> None:
    ecs = dns.edns.ECSOption("127.0.0.2", 32)
    trusted = ask(fleet, "web.whatsapp.com", "127.0.0.5", options=[ecs])
    assert rcode_text(trusted) == "NOERROR"
    untrusted = ask(fleet, "web.whatsapp.com", "127.0.0.9", options=[ecs])
    assert rcode_text(untrusted) == "NXDOMAIN"
    # The forwarder's own queries without ECS are its own (the default group).
    assert rcode_text(ask(fleet, "web.whatsapp.com", "127.0.0.5")) == "NXDOMAIN"


def test_start_logs_the_exemptions_loaded(fleet: Blocker) -> None:
    # Without audit.path nothing is persisted: a start logs what it loaded, not "granted" again.
    events = [json.loads(line.split(" audit ", 1)[1]) for line in fleet.lines if " audit " in line]
    assert all(e["event"] == "loaded" for e in events)
    loaded = {e["reference"]: e for e in events}
    assert (loaded["CHG-2026-0042"]["device"], loaded["CHG-2026-0042"]["approved_by"],
            loaded["CHG-2026-0042"]["categories"], loaded["CHG-2026-0042"]["state"]) == (
        "MPS-EXEMPT", "Insp. J. Doe", ["whatsapp"], "active")
    assert loaded["CHG-2026-0042"]["expires"] == "2099-12-31T23:59:00+00:00"
    assert loaded["CHG-2020-0001"]["state"] == "expired"


def test_query_log_records_each_query(fleet: Blocker) -> None:
    ask(fleet, "web.whatsapp.com", "127.0.0.2")
    ask(fleet, "www.tiktok.com", "127.0.0.9", rdtype="AAAA")
    assert fleet.config is not None
    path = fleet.config.parent / "queries.jsonl"
    def logged() -> list[dict[str, object]]:
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return records if any(r["client"] == "127.0.0.9" and r["type"] == "AAAA" for r in records) else []

    records = eventually(logged, 5, 0.1, "both queries in the query log")
    exempted = [r for r in records if r["action"] == "exempted" and r["name"] == "web.whatsapp.com"][-1]
    assert exempted["device"] == "MPS-EXEMPT" and exempted["exemption"] == "CHG-2026-0042"
    assert exempted["group"] == "standard" and exempted["categories"] == ["whatsapp"]
    assert exempted["rcode"] == "NOERROR" and exempted["type"] == "A"
    blocked = [r for r in records if r["client"] == "127.0.0.9" and r["type"] == "AAAA"][-1]
    assert blocked["action"] == "blocked" and blocked["rcode"] == "NXDOMAIN" and blocked["device"] is None
    assert re.match(r"^[0-9a-f]{10}$", str(blocked["policy"]))
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", str(blocked["time"]))
    assert isinstance(blocked["latency_ms"], float)


def test_reload_logs_granted_changed_and_revoked(knot: Knot, tmp_path: Path) -> None:
    config = standard_config(tmp_path, [knot.endpoint], policy=DEVICES)
    server = Blocker(config).start()
    try:
        text = config.read_text()
        text = text.replace("expires: 2099-12-31T23:59:00Z", "expires: 2098-06-30T12:00:00Z")  # changed
        text = text.replace("""    - device: MPS-EXPIRED
      allow: [whatsapp]
      approved_by: "Insp. J. Doe"
      reference: "CHG-2020-0001"
      reason: "Old case"
      expires: 2020-01-01T00:00:00Z
""", """    - device: MPS-COMMS
      allow: [whatsapp]
      approved_by: "Ch. Insp. R. Roe"
      reference: "CHG-2026-0099"
      reason: "Press liaison"
      expires: 2099-01-01T00:00:00Z
""")
        mark = len(server.lines)
        config.write_text(text)  # no signal: the file watcher sees the change
        server.wait_for_log(r"reloaded \(file change\)", after=mark)
        server.wait_for_log(r'audit \{"event":"renew"', after=mark)  # logged just after the reload line
        server.wait_for_log(r'audit \{"event":"grant"', after=mark)
        events = {json.loads(line.split(" audit ", 1)[1])["event"]: json.loads(line.split(" audit ", 1)[1])
                  for line in server.lines[mark:] if " audit " in line}
        assert events["renew"]["changes"] == {
            "expires": ["2099-12-31T23:59:00+00:00", "2098-06-30T12:00:00+00:00"]}
        assert events["renew"]["actor"] == "file-edit"
        assert events["grant"]["reference"] == "CHG-2026-0099"
        assert "revoke" not in events  # the removed one had already expired
        assert rcode_text(ask(server, "web.whatsapp.com", "127.0.0.3")) == "NOERROR"
        # Revoking an exemption in force is recorded, and takes effect at once.
        mark = len(server.lines)
        config.write_text(text.replace("    - device: MPS-COMMS\n      allow: [whatsapp]", "    - device: MPS-COMMS\n"
                                       "      allow: [telegram]"))
        server.wait_for_log(r"reloaded \(file change\)", after=mark)
        assert rcode_text(ask(server, "web.whatsapp.com", "127.0.0.3")) == "NXDOMAIN"
        mark2 = len(server.lines)
        config.write_text(text.split("    - device: MPS-COMMS")[0])
        server.wait_for_log(r"reloaded \(file change\)", after=mark2)
        server.wait_for_log(r'"event":"revoke".*"CHG-2026-0099"', after=mark2)
    finally:
        server.stop()


def test_query_log_drops_instead_of_delaying_answers(knot: Knot, tmp_path: Path) -> None:
    fifo = tmp_path / "stuck.jsonl"
    os.mkfifo(fifo)  # nobody reads it: the writer blocks, the queue fills, entries must be dropped
    config = standard_config(tmp_path, [knot.endpoint], policy=f"query_log:\n  path: \"{fifo}\"\n")
    server = Blocker(config).start()
    try:
        query = dns.message.make_query("www.tiktok.com", "A").to_wire()
        sent = 0
        deadline = time.monotonic() + 30
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            while sent < 80_000 and time.monotonic() < deadline:
                sock.sendto(query, ("127.0.0.1", server.port))
                sent += 1
                if sent % 200 == 0:
                    time.sleep(0.001)
                    try:
                        while sock.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
        text = server.metrics()
        assert metric_value(text, "blocker_querylog_dropped_total") > 0
        # Answers were never held up by the writer: the next one comes within the client's 1 s timeout.
        assert rcode_text(server.query("www.example.test", timeout=1.0)) == "NOERROR"
    finally:
        server.stop()


def test_reload_under_load_drops_no_query(knot: Knot, tmp_path: Path) -> None:
    """Queries run continuously while the policy flips between blocking example.test and not, by SIGHUP
    and by file edits, with broken edits between; no query is lost and each answer fits a real policy."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "testing.yaml").write_text("name: testing\ndomains:\n  - example.test\n")
    (lists / "tiktok.yaml").write_text("name: tiktok\ndomains:\n  - tiktok.com\n")
    blocking = standard_config(tmp_path, [knot.endpoint], blocklists=lists, name="a.yaml",
                               policy="policy:\n  groups:\n    standard: {block: [tiktok, testing]}\n").read_text()
    open_policy = blocking.replace("block: [tiktok, testing]", "block: [tiktok]")
    config = tmp_path / "blocker.yaml"
    config.write_text(blocking)
    server = Blocker(config).start()
    answers: list[tuple[str, str]] = []
    lost: list[str] = []
    stop = threading.Event()

    def load() -> None:
        end = time.monotonic() + 60
        names = ["www.example.test", "www.tiktok.com", "mail.example.test"]
        i = 0
        while not stop.is_set() and time.monotonic() < end and i < 200_000:
            name = names[i % 3]
            i += 1
            try:
                response = server.query(name, tcp=(i % 7 == 0), timeout=2)
            except (dns.exception.Timeout, OSError) as err:
                lost.append(f"{name}: {err}")
                continue
            texts = edes(response)
            answers.append((rcode_text(response), texts[0][1] if texts else ""))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        versions = set()
        for round_ in range(12):
            text = blocking if round_ % 2 == 0 else open_policy
            mark = len(server.lines)
            if round_ % 3 == 0:
                config.write_text(text + "  broken: [\n")  # a broken edit first: must be rejected
                server.signal(signal.SIGHUP)
                server.wait_for_log(r"reload \(SIGHUP\) rejected", after=mark)
                mark = len(server.lines)
            config.write_text(text)
            if round_ % 2 == 0:
                server.signal(signal.SIGHUP)
            line = server.wait_for_log(r"reloaded \(", after=mark)
            versions.add((text == blocking, re.search(r"policy=(\w+)", line).group(1)))  # type: ignore[union-attr]
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(30)
        server.stop()
    assert not lost, lost[:5]
    assert len(answers) > 200
    blocking_versions = {v for is_blocking, v in versions if is_blocking}
    initial = re.search(r"ready .*policy=(\w+)", "\n".join(server.lines)).group(1)  # type: ignore[union-attr]
    blocking_versions.add(initial)
    for rcode, text in answers:
        assert rcode in ("NOERROR", "NXDOMAIN"), rcode
        if "category=testing" in text:
            assert text.split("policy=")[1] in blocking_versions, text
    assert any("category=testing" in text for _, text in answers)
    assert any(rcode == "NOERROR" for rcode, _ in answers)
    reload_times = [float(m) for m in re.findall(r"reloaded \(.*\) policy=\w+ in (\d+) ms", "\n".join(server.lines))]
    assert reload_times
    print(f"reloads: {len(reload_times)}, median {sorted(reload_times)[len(reload_times) // 2]} ms, "
          f"max {max(reload_times)} ms; answers: {len(answers)}; lost: {len(lost)}")


def test_configmap_style_symlink_swap_is_seen(knot: Knot, tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as symlinks into a `..data` directory that it swaps atomically."""
    mount = tmp_path / "mount"
    mount.mkdir()
    first = standard_config(tmp_path, [knot.endpoint], name="first.yaml")
    version_a = mount / "..2026_11_22_a"
    version_a.mkdir()
    (version_a / "blocker.yaml").write_text(first.read_text())
    (mount / "..data").symlink_to(version_a.name)
    (mount / "blocker.yaml").symlink_to("..data/blocker.yaml")
    server = Blocker(mount / "blocker.yaml").start()
    try:
        assert rcode_text(server.query("www.tiktok.com")) == "NXDOMAIN"
        version_b = mount / "..2026_11_22_b"
        version_b.mkdir()
        opened = first.read_text() + "policy:\n  groups:\n    standard: {block: [doh]}\n"
        (version_b / "blocker.yaml").write_text(opened)
        mark = len(server.lines)
        (mount / "..data_tmp").symlink_to(version_b.name)
        os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap kubelet does
        server.wait_for_log(r"reloaded \(file change\)", after=mark)
        assert rcode_text(server.query("www.tiktok.com")) == "NOERROR"
    finally:
        server.stop()
