"""The exemption audit trail with an injected clock: starts, expiries, changes and revocations are
recorded when they happen, and the daemon's once-a-second tick logs them without a reload. A tick
looks at no exemption until one is due, and a reload of unchanged exemptions compares none; the
real server records a start and an expiry at their times."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import short_exemption, standard_config
from helpers import Blocker, Knot, eventually

from blocker.audit import ExemptionAudit
from blocker.audit_trail import read_events, verify
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


def fleet(count: int, step: float = 60) -> list[Exemption]:
    """`count` grants on as many devices, each starting `step` seconds after the one before, and
    expiring an hour after it starts."""
    return [Exemption(f"MPS-{i}", ("whatsapp",), "Insp. J. Doe", f"CHG-{i}", "Operation",
                      START + timedelta(seconds=step * (i + 1) + 3600), START + timedelta(seconds=step * (i + 1)),
                      "blocker.yaml", 10 + i) for i in range(count)]


def test_ticks_between_transitions_look_at_no_exemption_and_each_transition_at_one() -> None:
    audit = ExemptionAudit()
    audit.update(fleet(500), START, "v1")
    audit.comparisons = 0
    for second in range(1, 60):  # the first start is at +60 s
        assert audit.tick(START + timedelta(seconds=second), "v1") == []
    assert audit.comparisons == 0
    started = audit.tick(START + timedelta(seconds=60), "v1")
    assert kinds(started) == [("start", "CHG-0")] and audit.comparisons == 1
    assert audit.tick(START + timedelta(seconds=61), "v1") == [] and audit.comparisons == 1
    # A tick that comes late (the loop was busy) still records each start and expiry that came due.
    late = audit.tick(START + timedelta(seconds=3600 + 60 + 1), "v1")
    assert sorted(kinds(late)) == sorted([("expiry", "CHG-0")] + [("start", f"CHG-{i}") for i in range(1, 61)])
    assert [e["state"] for e in late if e["reference"] == "CHG-0"] == ["expired"]


def test_a_reload_of_the_same_exemptions_compares_none_and_an_edit_records_only_what_changed() -> None:
    audit = ExemptionAudit()
    audit.update(fleet(300), START, "v1")
    audit.comparisons = 0
    assert audit.update(fleet(300), START + timedelta(seconds=1), "v1") == []  # new objects, same fields
    assert audit.comparisons == 0
    edited = fleet(300)
    edited[7] = replace(edited[7], reason="Operation extended")
    events = audit.update(edited, START + timedelta(seconds=2), "v2")
    assert kinds(events) == [("change", "CHG-7")] and events[0]["policy"] == "v2"
    assert audit.comparisons == 1  # the edited one only
    # Moving entries in the file changes nothing recorded, but the next event says where they are now.
    moved = [replace(e, line=e.line + 100) for e in edited]
    assert audit.update(moved, START + timedelta(seconds=3), "v2") == []
    started = audit.tick(START + timedelta(seconds=60), "v2")
    assert kinds(started) == [("start", "CHG-0")] and started[0]["line"] == 110
    # Two taken out of the file (one in force, one pending): two revocations, no other exemption compared.
    audit.comparisons = 0
    revoked = audit.update(moved[2:], START + timedelta(seconds=61), "v3")
    assert kinds(revoked) == [("revoke", "CHG-0"), ("revoke", "CHG-1")] and audit.comparisons == 0


def test_an_entry_edited_into_a_copy_of_another_revokes_the_one_it_was() -> None:
    audit = ExemptionAudit()
    audit.update([grant("CHG-A"), grant("CHG-B")], START, "v1")
    # Edited in place, the first entry now repeats the second's reference: CHG-A is gone from the file.
    events = audit.update([grant("CHG-B"), grant("CHG-B")], START + timedelta(seconds=1), "v2")
    assert kinds(events) == [("revoke", "CHG-A")]


def test_a_clock_stepped_back_is_compared_in_full() -> None:
    audit = ExemptionAudit()
    audit.update([grant(expires=60)], START, "v1")
    assert kinds(audit.tick(START + timedelta(seconds=60), "v1")) == [("expiry", "CHG-1")]
    # Back before the expiry (an NTP step): the grant is in force again, and that is recorded too.
    assert kinds(audit.tick(START + timedelta(seconds=30), "v1")) == [("start", "CHG-1")]


def test_a_trail_that_cannot_be_written_is_retried_on_the_next_tick(tmp_path: Path,
                                                                    blocker_log: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "audit"
    blocked.write_text("a file where the trail's folder should be\n")
    audit = ExemptionAudit(blocked / "trail.jsonl")
    with blocker_log.at_level(logging.ERROR, logger="blocker"):
        assert audit.update([grant()], START, "v1") == []
        assert audit.tick(START + timedelta(seconds=1), "v1") == []
    assert "cannot record" in blocker_log.text
    blocked.unlink()
    written = audit.tick(START + timedelta(seconds=2), "v1")
    assert kinds(written) == [("grant", "CHG-1")]
    assert audit.tick(START + timedelta(seconds=3), "v1") == []
    assert [e["event"] for e in read_events(blocked / "trail.jsonl")] == ["grant"]


def test_the_real_server_records_a_start_and_an_expiry_at_their_times_without_a_reload(knot: Knot,
                                                                                      tmp_path: Path) -> None:
    trail = tmp_path / "trail.jsonl"
    policy = f"""\
        audit:
          path: "{trail}"
        policy:
          devices:
            - {{id: MPS-7, addresses: ["127.0.0.7"], group: standard}}
        """
    config = standard_config(tmp_path, [knot.endpoint], policy=policy)
    server = Blocker(config).start()
    try:
        # Granted by an edit (one reload), to start and expire seconds later with no reload at all.
        starts = datetime.now(UTC) + timedelta(seconds=3)
        expires = starts + timedelta(seconds=1.5)
        config.write_text(config.read_text() + f"""\
  exemptions:
    - {{device: MPS-7, allow: [whatsapp], approved_by: "Insp. J. Doe", reference: "CHG-7", reason: "Test",
       starts: "{starts.isoformat()}", expires: "{expires.isoformat()}"}}
""")

        def recorded() -> list[tuple[object, object, datetime]]:
            return [(e["event"], e["state"], datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00")))
                    for e in read_events(trail)]

        events = eventually(lambda: len(recorded()) == 3 and recorded(), timeout=15, what="grant, start, expiry")
        assert [(kind, state) for kind, state, _ in events] == [("grant", "pending"), ("start", "active"),
                                                                 ("expiry", "expired")]
        # Each at its time (the tick runs every second), not before, and not at some later reload.
        assert starts <= events[1][2] < starts + timedelta(seconds=2.5)
        assert expires <= events[2][2] < expires + timedelta(seconds=2.5)
        assert verify(trail).ok
    finally:
        server.stop()
    assert sum("reloaded" in line for line in server.lines) == 1


class EveryTime(ExemptionAudit):
    """The reference: every update and tick compares every exemption (as the audit did before)."""

    def update(self, exemptions: Iterable[Exemption], now: datetime, version: str) -> list[dict[str, object]]:
        self._current = {(e.device, e.reference): e for e in exemptions}
        return self._reconcile(now, version, None)

    def tick(self, now: datetime, version: str) -> list[dict[str, object]]:
        return self._reconcile(now, version, None)


def same(events: list[dict[str, object]]) -> list[dict[str, object]]:
    """Events without what differs between two trails (the time written, the hash chain)."""
    return [{k: v for k, v in e.items() if k not in ("time", "prev", "hash")} for e in events]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("trail", [False, True], ids=["log", "trail"])
def test_looking_only_at_what_changed_or_came_due_records_what_comparing_everything_records(
        seed: int, trail: bool, tmp_path: Path) -> None:
    rng = random.Random(seed)
    at = START
    entries = fleet(40, step=5)
    if trail:
        quick, reference = ExemptionAudit(tmp_path / "quick.jsonl"), EveryTime(tmp_path / "reference.jsonl")
    else:
        quick, reference = ExemptionAudit(), EveryTime()
    assert same(quick.update(entries, at, "v0")) == same(reference.update(entries, at, "v0"))
    for step in range(300):
        at += timedelta(seconds=rng.choice([0, 1, 1, 2, 7, 30, 400]) if rng.random() > 0.03 else -50)
        if rng.random() < 0.7:
            assert same(quick.tick(at, "v")) == same(reference.tick(at, "v")), step
            continue
        entries = list(entries)
        index = rng.randrange(len(entries)) if entries else 0
        change = rng.choice(["reason", "expires", "starts", "line", "remove", "add", "twice", "same"])
        if change == "reason" and entries:
            entries[index] = replace(entries[index], reason=f"reason {step}")
        elif change == "expires" and entries:
            entries[index] = replace(entries[index], expires=at + timedelta(seconds=rng.randrange(-20, 200)))
        elif change == "starts" and entries:
            entries[index] = replace(entries[index], starts=at + timedelta(seconds=rng.randrange(-20, 100)))
        elif change == "line" and entries:
            entries[index] = replace(entries[index], line=entries[index].line + 1)
        elif change == "remove" and entries:
            del entries[index]
        elif change == "add":
            entries.insert(index, replace(grant(f"CHG-N{step}", expires=rng.randrange(10, 900)), device=f"MPS-N{step}"))
        elif change == "twice" and entries:
            entries[index] = entries[rng.randrange(len(entries))]
        version = f"v{step}"
        assert same(quick.update(entries, at, version)) == same(reference.update(entries, at, version)), (step, change)
    if trail:
        assert verify(tmp_path / "quick.jsonl").ok and quick.recorded() == reference.recorded()
