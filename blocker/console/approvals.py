"""Four-eyes requests: a grant, renewal or revocation asked for by one user, applied when another approves.

The requests live in one JSON file beside the users file, so a restart keeps them. Every change to
it happens under a lock (a thread lock and `flock` on a lock file, for several processes): the
approval that finds the request still pending applies it while holding the lock, and any other
approval of the same request finds it already decided.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from blocker.errors import BlockerError

KINDS = ("grant", "renew", "revoke")


class RequestError(BlockerError):
    """A request cannot be decided (unknown, already decided, own request); the message says why."""


@dataclass(slots=True)
class ChangeRequest:
    id: str
    kind: str  # grant | renew | revoke
    requested_by: str
    requested_at: str
    fields: dict[str, object]  # device, allow, reference, reason, expires, starts (as strings)
    state: str = "pending"  # pending | approved | rejected | failed
    decided_by: str | None = None
    decided_at: str | None = None
    result: str | None = None  # the error when applying failed, or what was written
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return str(self.fields.get("reference", ""))


class RequestStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[list[ChangeRequest]]:
        """The requests, locked against every other writer; saved when the block ends without error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                requests = self._read()
                before = [asdict(r) for r in requests]
                yield requests
                if [asdict(r) for r in requests] != before:
                    self._write(requests)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[ChangeRequest]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            raise RequestError(f"{self.path}: cannot read the console requests: {err}") from None
        return [ChangeRequest(**item) for item in data.get("requests", [])]

    def _write(self, requests: list[ChangeRequest]) -> None:
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump({"requests": [asdict(r) for r in requests]}, out, indent=1)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def all(self) -> list[ChangeRequest]:
        with self._locked() as requests:
            return list(requests)

    def create(self, kind: str, user: str, fields: dict[str, object]) -> ChangeRequest:
        if kind not in KINDS:
            raise RequestError(f"unknown request kind '{kind}'")
        with self._locked() as requests:
            reference = str(fields.get("reference", ""))
            for other in requests:
                if other.state == "pending" and other.reference == reference:
                    raise RequestError(f"request {other.id} for {reference} is already waiting for approval")
            request = ChangeRequest(secrets.token_hex(4), kind, user, _now(), dict(fields))
            requests.append(request)
            return request

    def decide(self, request_id: str, user: str, approve: bool,
               apply: Callable[[ChangeRequest], str]) -> ChangeRequest:
        """Approve (apply it, then record) or reject one pending request; raises RequestError."""
        with self._locked() as requests:
            request = next((r for r in requests if r.id == request_id), None)
            if request is None:
                raise RequestError(f"no request {request_id}")
            if request.state != "pending":
                raise RequestError(f"request {request_id} was already {request.state} by {request.decided_by}")
            if approve and request.requested_by == user:
                raise RequestError("four eyes: a request is approved by someone other than the user who made it")
            request.decided_by = user
            request.decided_at = _now()
            if not approve:
                request.state = "rejected"
                return request
            try:
                request.result = apply(request)
                request.state = "approved"
            except BlockerError as err:
                request.state = "failed"
                request.result = str(err)
            return request


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
