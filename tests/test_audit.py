"""The exemption audit trail with an injected clock: starts, expiries, changes and revocations are
recorded when they happen, and the daemon's once-a-second tick logs them without a reload."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import short_exemption, standard_config

from blocker.audit import ExemptionAudit
from blocker.clock import ManualClock
from blocker.config import Exemption
from blocker.daemon import Daemon
from blocker.policy import load_policy

CLOCK = ManualClock()
START = CLOCK.now()


def grant(reference: str = "CHG-1", starts: float | None = None, expires: float = 3600) -> Exemption:
    return Exemption("MPS-1", ("whatsapp",), "Insp. J. Doe", reference, "Witness liaison",
                     START + timedelta(seconds=expires), START + timedelta(seconds=starts) if starts else None,
                     "blocker.yaml", 12)


def kinds(events: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(e["event"], e["reference"]) for e in events]


def test_a_pending_grant_starts_then_expires_at_its_timestamps() -> None:
    audit = ExemptionAudit()
    assert kinds(audit.update([grant(starts=60, expires=120)], START, "v1")) == [("loaded", "CHG-1")]
    assert audit.tick(START + timedelta(seconds=59), "v1") == []
    started = audit.tick(START + timedelta(seconds=60), "v1")
    assert kinds(started) == [("start", "CHG-1")] and started[0]["state"] == "active"
    assert audit.tick(START + timedelta(seconds=61), "v1") == []  # recorded once
    expired = audit.tick(START + timedelta(seconds=120), "v1")
    assert kinds(expired) == [("expiry", "CHG-1")]
    assert expired[0]["approved_by"] == "Insp. J. Doe" and expired[0]["policy"] == "v1"


def test_a_changed_grant_names_the_fields_that_changed() -> None:
    audit = ExemptionAudit()
    audit.update([grant()], START, "v1")
    renewed = replace(grant(), expires=START + timedelta(days=30), reason="Extended operation")
    events = audit.update([renewed], START + timedelta(seconds=5), "v2")
    assert kinds(events) == [("change", "CHG-1")]
    changes = events[0]["changes"]
    assert isinstance(changes, dict) and set(changes) == {"expires", "reason"}
    assert changes["reason"] == ["Witness liaison", "Extended operation"]


def test_removing_a_grant_in_force_is_a_revocation_but_removing_an_expired_one_is_not() -> None:
    audit = ExemptionAudit()
    audit.update([grant("CHG-LIVE"), grant("CHG-OLD", expires=10)], START, "v1")
    audit.tick(START + timedelta(seconds=11), "v1")
    events = audit.update([], START + timedelta(seconds=12), "v2")
    assert kinds(events) == [("revoke", "CHG-LIVE")]


def test_the_daemon_tick_logs_an_expiry_without_any_reload(tmp_path: Path,
                                                           blocker_log: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    expires = (clock.now() + timedelta(seconds=30)).isoformat()
    config = standard_config(tmp_path, ["127.0.0.1:9"], policy=short_exemption(expires))
    daemon = Daemon(config, load_policy(config), clock)
    daemon.audit.update(daemon.policy.config.policy.exemptions, clock.now(), daemon.policy.version)
    with blocker_log.at_level(logging.INFO, logger="blocker"):
        daemon.tick()
        assert '"event":"expiry"' not in blocker_log.text
        clock.advance(30)
        daemon.tick()
    lines = [r.getMessage() for r in blocker_log.records if r.getMessage().startswith("audit ")]
    assert len(lines) == 1
    event = json.loads(lines[0].removeprefix("audit "))
    assert (event["event"], event["reference"], event["approved_by"]) == ("expiry", "CHG-SHORT",
                                                                          "Supt. A. Smith")
    daemon.upstreams.close()
