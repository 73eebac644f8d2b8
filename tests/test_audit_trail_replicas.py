"""ExemptionAudit on a real trail file: two replicas record a change once, a restart records only what
happened while it was down, and the trail stays a valid chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from blocker.audit import ExemptionAudit, make_event, values
from blocker.audit_trail import AuditTrail, read_events, verify
from blocker.config import Exemption

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def exemption(reference: str, expires: datetime, reason: str = "liaison") -> Exemption:
    return Exemption("MPS-1", ("whatsapp",), "Insp. A", reference, reason, expires, None, "ex.yaml", 3)


def test_replicas_sharing_a_trail_record_each_change_once(tmp_path: Path) -> None:
    trail = tmp_path / "trail.jsonl"
    first, second = ExemptionAudit(trail), ExemptionAudit(trail)
    grants = [exemption("R-1", NOW + timedelta(days=30))]
    assert [e["event"] for e in first.update(grants, NOW, "v1")] == ["grant"]
    assert second.update(grants, NOW, "v1") == []  # the other replica already recorded it
    changed = [exemption("R-1", NOW + timedelta(days=30), reason="witness liaison")]
    events = second.update(changed, NOW, "v2")
    assert [(e["event"], e["actor"], e["changes"]) for e in events] == [
        ("change", "file-edit", {"reason": ["liaison", "witness liaison"]})]
    assert first.update(changed, NOW, "v2") == []
    assert [e["event"] for e in read_events(trail)] == ["grant", "change"]
    assert verify(trail).ok


def test_a_restart_records_only_what_happened_while_it_was_down(tmp_path: Path) -> None:
    trail = tmp_path / "trail.jsonl"
    short = exemption("R-2", NOW + timedelta(hours=1))
    ExemptionAudit(trail).update([exemption("R-1", NOW + timedelta(days=30)), short], NOW, "v1")
    assert ExemptionAudit(trail).update([exemption("R-1", NOW + timedelta(days=30)), short], NOW, "v1") == []
    later = NOW + timedelta(hours=2)
    events = ExemptionAudit(trail).update([exemption("R-1", NOW + timedelta(days=30)), short], later, "v1")
    assert [(e["event"], e["reference"], e["actor"]) for e in events] == [("expiry", "R-2", "blocker")]
    again = ExemptionAudit(trail)
    assert again.update([exemption("R-1", NOW + timedelta(days=30)), short], later, "v1") == []
    assert again.tick(later + timedelta(seconds=1), "v1") == []
    # Taking the expired one out of the file is tidying, not a revocation; removing one in force is.
    assert again.update([exemption("R-1", NOW + timedelta(days=30))], later, "v2") == []
    assert [(e["event"], e["state"]) for e in again.update([], later, "v3")] == [("revoke", "revoked")]
    assert len(read_events(trail)) == 4 and verify(trail).ok


def test_an_event_a_command_recorded_is_not_recorded_again(tmp_path: Path) -> None:
    trail = tmp_path / "trail.jsonl"
    server = ExemptionAudit(trail)
    assert server.update([], NOW, "v1") == []
    grant = exemption("R-3", NOW + timedelta(days=10))
    AuditTrail(trail).append(make_event("grant", "jdoe", None, values(grant), "active", "v2", grant))
    assert server.tick(NOW, "v1") == []  # the old policy, before the reload: no "revoke" for it
    assert server.update([grant], NOW, "v2") == []  # the reload sees what the command recorded
    assert [(e["event"], e["actor"]) for e in read_events(trail)] == [("grant", "jdoe")]
