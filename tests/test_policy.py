"""Table tests for the decision function: groups, devices, exemptions and their expiry (injected `now`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import ROOT

from blocker.clients import Client, identify
from blocker.config import load_config
from blocker.policy import Action, Policy, compile_policy, decide

EXPIRES = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
BEFORE = EXPIRES - timedelta(days=3)
AFTER = EXPIRES + timedelta(seconds=1)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    directory = tmp_path_factory.mktemp("policy")
    path = directory / "blocker.yaml"
    path.write_text(f"""\
dns:
  allow_networks: ["10.0.0.0/8", "127.0.0.0/8", "fd00::/8"]
  trusted_forwarders: ["10.9.0.1/32"]
blocklists: "{ROOT / 'blocklists'}"
policy:
  devices:
    - {{id: MPS-EXEMPT, addresses: ["10.8.0.2"], group: standard}}
    - {{id: MPS-COMMS, addresses: ["10.8.1.0/24"], group: comms-team}}
    - {{id: MPS-NARROW, addresses: ["10.8.1.7/32"], group: standard}}
    - {{id: MPS-V6, addresses: ["fd00::7"], group: comms-team}}
  exemptions:
    - device: MPS-EXEMPT
      allow: [whatsapp]
      approved_by: "Insp. J. Doe"
      reference: "CHG-2026-0042"
      reason: "Witness liaison"
      expires: {EXPIRES.isoformat()}
""")
    return compile_policy(load_config(path))


@pytest.mark.parametrize(("address", "name", "now", "action", "category"), [
    pytest.param("10.0.0.9", "www.tiktok.com", BEFORE, Action.BLOCKED, "tiktok", id="standard-blocks-tiktok"),
    pytest.param("10.0.0.9", "www.bbc.co.uk", BEFORE, Action.ALLOWED, None, id="news-open"),
    pytest.param("10.8.1.50", "www.tiktok.com", BEFORE, Action.ALLOWED, None, id="comms-team-tiktok"),
    pytest.param("10.8.1.50", "web.whatsapp.com", BEFORE, Action.BLOCKED, "whatsapp", id="comms-team-no-whatsapp"),
    pytest.param("10.8.1.7", "www.tiktok.com", BEFORE, Action.BLOCKED, "tiktok", id="narrowest-cidr-wins"),
    pytest.param("fd00::7", "www.tiktok.com", BEFORE, Action.ALLOWED, None, id="ipv6-device"),
    pytest.param("10.8.0.2", "web.whatsapp.com", BEFORE, Action.EXEMPTED, "whatsapp", id="exempt-whatsapp"),
    pytest.param("10.8.0.2", "whatsapp-cdn-shv-01-lhr8.fbcdn.net", BEFORE, Action.EXEMPTED, "whatsapp",
                 id="exempt-whatsapp-on-fbcdn"),
    pytest.param("10.8.0.2", "whatsapp-chatd-edge-shv-01-lhr8.facebook.com", BEFORE, Action.EXEMPTED, "whatsapp",
                 id="exempt-whatsapp-chatd-on-facebook"),
    pytest.param("10.8.0.2", "scontent-lhr8-1.xx.fbcdn.net", BEFORE, Action.BLOCKED, "facebook",
                 id="exempt-device-facebook-cdn-closed"),
    pytest.param("10.8.0.2", "www.facebook.com", BEFORE, Action.BLOCKED, "facebook", id="exempt-device-facebook"),
    pytest.param("10.8.0.2", "instagram.flhr8-1.fna.fbcdn.net", BEFORE, Action.BLOCKED, "instagram",
                 id="exempt-device-instagram-closed"),
    pytest.param("10.8.0.2", "web.whatsapp.com", AFTER, Action.BLOCKED, "whatsapp", id="exemption-expired"),
    pytest.param("10.8.0.3", "web.whatsapp.com", BEFORE, Action.BLOCKED, "whatsapp", id="other-device"),
    pytest.param("192.0.2.1", "www.bbc.co.uk", BEFORE, Action.REFUSED, None, id="outside-allow-networks"),
    pytest.param("10.0.0.9", "use-application-dns.net", BEFORE, Action.BLOCKED, "doh", id="canary"),
])
def test_decide(policy: Policy, address: str, name: str, now: datetime, action: Action,
                category: str | None) -> None:
    decision = decide(policy, identify(policy, address), name, now)
    assert decision.action is action
    assert decision.category == category


def test_exemption_details_and_ttl_limit(policy: Policy) -> None:
    decision = decide(policy, identify(policy, "10.8.0.2"), "web.whatsapp.com", EXPIRES - timedelta(seconds=90))
    assert decision.exemption is not None
    assert (decision.exemption.approved_by, decision.exemption.reference) == ("Insp. J. Doe", "CHG-2026-0042")
    assert decision.expires_in == 90


def test_first_blocking_category_in_group_order(policy: Policy) -> None:
    client = Client("10.0.0.9", None, "standard", True)
    # Meta's shared suffix is in facebook; a name in two categories reports the first the group lists.
    assert decide(policy, client, "fbcdn.net", BEFORE).category == "facebook"


def test_ecs_is_trusted_only_from_trusted_forwarders(policy: Policy) -> None:
    ecs = bytes([0, 1, 32, 0, 10, 8, 1, 50])  # 10.8.1.50/32: a comms-team handset
    assert identify(policy, "10.9.0.1", ecs).device == "MPS-COMMS"
    assert identify(policy, "10.0.0.9", ecs).device is None


def test_groups_naming_unknown_categories_are_rejected(tmp_path: Path) -> None:
    from blocker.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(f"blocklists: \"{ROOT / 'blocklists'}\"\npolicy:\n  groups:\n    standard: {{block: [tikotk]}}\n")
    with pytest.raises(ConfigError) as caught:
        compile_policy(load_config(path))
    assert str(caught.value) == f"{path}:4: group 'standard' blocks unknown category 'tikotk'"


def test_thirty_thousand_devices_index_by_prefix_length(tmp_path: Path) -> None:
    devices = "\n".join(f'    - {{id: MPS-{i:06d}, addresses: ["10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"], '
                        f'group: comms-team}}' for i in range(30_000))
    path = tmp_path / "c.yaml"
    path.write_text(f"blocklists: \"{ROOT / 'blocklists'}\"\npolicy:\n  devices:\n{devices}\n"
                    '    - {id: POOL, addresses: ["10.200.0.0/16", "10.201.0.0/24"], group: comms-team}\n')
    policy = compile_policy(load_config(path))
    assert identify(policy, "10.0.117.47").device == f"MPS-{117 * 256 + 47:06d}"
    assert identify(policy, "10.200.9.9").device == "POOL"
    assert identify(policy, "10.202.0.1").device is None
    # A lookup probes one dictionary per distinct prefix length, however many devices there are.
    assert policy.inventory.table.prefix_lengths(4) == [32, 24, 16]


def test_validate_reports_overlapping_and_duplicate_device_addresses(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"""blocklists: "{ROOT / 'blocklists'}"
policy:
  devices:
    - {{id: A, addresses: ["10.8.0.0/24"], group: standard}}
    - {{id: B, addresses: ["10.8.0.7"], group: comms-team}}
    - {{id: C, addresses: ["10.9.0.1"], group: standard}}
    - {{id: D, addresses: ["10.9.0.1"], group: standard}}
    - {{id: E, addresses: ["fd00::/64"], group: standard}}
    - {{id: F, addresses: ["fd00::9"], group: standard}}
""")
    warnings = [f"{p.line}: {p.message}" for p in compile_policy(load_config(path)).warnings
                if "device" in p.message]
    # Each at the line of the device that loses or is nested, naming both devices.
    assert "7: device 'D': address 10.9.0.1/32 is also given to device 'C' (line 6), which keeps it" in warnings
    assert ("5: device 'B': address 10.8.0.7/32 lies inside 10.8.0.0/24 of device 'A' (line 4); "
            "the narrower wins") in warnings
    assert ("9: device 'F': address fd00::9/128 lies inside fd00::/64 of device 'E' (line 8); "
            "the narrower wins") in warnings
    assert len(warnings) == 3
