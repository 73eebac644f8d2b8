"""The audit trail of exemptions: what was granted, changed, revoked, started or expired, and when.

`ExemptionAudit` compares each new policy with the last one, and is ticked every second so an
expiry is recorded when it happens, not at the next reload. It returns events; the daemon logs
them as one JSON object per line, the record an inspector would ask for.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from blocker.config import Exemption

Key = tuple[str, str]  # (device, reference)
_FIELDS = ("allow", "approved_by", "reason", "expires", "starts")


def _state(exemption: Exemption, now: datetime) -> str:
    if now >= exemption.expires:
        return "expired"
    if exemption.starts is not None and now < exemption.starts:
        return "pending"
    return "active"


def describe(exemption: Exemption) -> dict[str, object]:
    return {
        "device": exemption.device,
        "categories": list(exemption.allow),
        "approved_by": exemption.approved_by,
        "reference": exemption.reference,
        "reason": exemption.reason,
        "starts": exemption.starts.isoformat() if exemption.starts else None,
        "expires": exemption.expires.isoformat(),
        "file": exemption.file,
        "line": exemption.line,
    }


class ExemptionAudit:
    """Remembers the exemptions of the last policy and the state each was in."""

    def __init__(self) -> None:
        self._known: dict[Key, Exemption] = {}
        self._states: dict[Key, str] = {}
        self._started = False

    def update(self, exemptions: Iterable[Exemption], now: datetime, version: str) -> list[dict[str, object]]:
        """Events for a newly loaded policy (on start: one per exemption in the file)."""
        new = {(e.device, e.reference): e for e in exemptions}
        events: list[dict[str, object]] = []
        for key, exemption in new.items():
            state = _state(exemption, now)
            old = self._known.get(key)
            if old is None:
                kind = "exemption_expired" if state == "expired" else "exemption_granted"
                events.append(self._event(kind, exemption, version, state=state))
            elif old != exemption:
                changes = {f: [_text(getattr(old, f)), _text(getattr(exemption, f))] for f in _FIELDS
                           if getattr(old, f) != getattr(exemption, f)}
                if changes:
                    events.append(self._event("exemption_changed", exemption, version, state=state,
                                              changes=changes))
            elif self._states.get(key) != state:
                events.append(self._event(_transition(state), exemption, version, state=state))
            self._states[key] = state
        for key, old in self._known.items():
            if key not in new:
                if self._states.get(key) != "expired" and _state(old, now) != "expired":
                    events.append(self._event("exemption_revoked", old, version, state="revoked"))
                self._states.pop(key, None)
        self._known = new
        self._started = True
        return events

    def tick(self, now: datetime, version: str) -> list[dict[str, object]]:
        """Events for exemptions that started or expired since the last call."""
        events = []
        for key, exemption in self._known.items():
            state = _state(exemption, now)
            if self._states.get(key) != state:
                self._states[key] = state
                events.append(self._event(_transition(state), exemption, version, state=state))
        return events

    @staticmethod
    def _event(kind: str, exemption: Exemption, version: str, **extra: object) -> dict[str, object]:
        return {"event": kind, **describe(exemption), "policy": version, **extra}


def _transition(state: str) -> str:
    return {"active": "exemption_started", "expired": "exemption_expired"}.get(state, "exemption_pending")


def _text(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    return value
