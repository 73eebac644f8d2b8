"""Who may use the console: the users file (argon2 hashes, roles), sessions, CSRF tokens, throttling.

Roles: `viewer` reads every page; `admin` may also request a grant, renewal or revocation;
`approver` may also approve or reject another user's request. A user may hold several roles,
but never approves their own request.
"""

from __future__ import annotations

import hmac
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from blocker.errors import BlockerError

ROLES = ("viewer", "admin", "approver")
MAX_ANONYMOUS_SESSIONS = 10_000
_hasher = PasswordHasher()
# Verified against when the user name is unknown, so a wrong name costs what a wrong password does.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class UsersFileError(BlockerError):
    """The users file is missing or malformed (the message names the file)."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    display: str
    roles: frozenset[str]
    password_hash: str | None  # None: this user logs in only through the SSO proxy header

    def may(self, role: str) -> bool:
        return role in self.roles


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "._-@" for c in name)


def load_users(path: Path) -> dict[str, User]:
    """Read the users file; raises UsersFileError with FILE:LINE where it can."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsersFileError(f"{path}: cannot read the console users file: {err.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UsersFileError(f"{path}:{mark.line + 1 if mark else 1}: YAML syntax: {err}") from None
    if not isinstance(data, dict) or set(data) - {"users"} or not isinstance(data.get("users", []), list):
        raise UsersFileError(f"{path}:1: expected a mapping with one key, users: a list")
    users: dict[str, User] = {}
    for number, entry in enumerate(data.get("users") or [], 1):
        where = f"{path}: user #{number}"
        if not isinstance(entry, dict) or set(entry) - {"name", "display", "roles", "password"}:
            raise UsersFileError(f"{where}: expected name, display, roles and password")
        name = entry.get("name")
        if not isinstance(name, str) or not _valid_name(name):
            raise UsersFileError(f"{where}: name must be 1-64 letters, digits or ._-@")
        roles = entry.get("roles")
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise UsersFileError(f"{where} ({name}): roles must be a list of {', '.join(ROLES)}")
        password = entry.get("password")
        if password is not None and (not isinstance(password, str) or not password.startswith("$argon2")):
            raise UsersFileError(f"{where} ({name}): password must be an argon2 hash (blocker console add-user)")
        if name in users:
            raise UsersFileError(f"{where}: user '{name}' is listed twice")
        display = entry.get("display") or name
        users[name] = User(name, str(display), frozenset(roles), password)
    return users


def add_user(path: Path, name: str, roles: list[str], password: str | None, display: str | None = None,
             hasher: PasswordHasher = _hasher) -> bool:
    """Add or replace one user (atomically); True when the user was new.

    `hasher` sets the argon2 cost (the default is argon2-cffi's: 64 MiB, 3 passes); a verification
    uses the cost written in the hash, so cheaper test users log in faster.
    """
    if not _valid_name(name):
        raise UsersFileError(f"user name '{name}' must be 1-64 letters, digits or ._-@")
    bad = [r for r in roles if r not in ROLES]
    if not roles or bad:
        raise UsersFileError(f"roles must be among {', '.join(ROLES)}, got {', '.join(bad) or 'none'}")
    existing = load_users(path) if path.exists() else {}
    entries = [{"name": u.name, "display": u.display, "roles": sorted(u.roles), "password": u.password_hash}
               for u in existing.values() if u.name != name]
    entries.append({"name": name, "display": display or name, "roles": sorted(set(roles)),
                    "password": hasher.hash(password) if password else None})
    body = ("# blocker console users, written by `blocker console add-user` (argon2id hashes).\n"
            + yaml.safe_dump({"users": entries}, sort_keys=False, allow_unicode=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(body)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return name not in existing


class Users:
    """The users file, read again whenever it changes (add-user needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}
        self._lock = threading.Lock()
        self.get("")  # a broken file is an error at start, not at the first login

    def get(self, name: str) -> User | None:
        with self._lock:
            st = self.path.stat() if self.path.exists() else None
            stamp = (st.st_mtime_ns, st.st_ino) if st else (0, 0)
            if stamp != self._stamp:
                self._users = load_users(self.path)
                self._stamp = stamp
            return self._users.get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        user = self.get(name)
        try:
            if user is None or user.password_hash is None:
                _hasher.verify(_DUMMY_HASH, password)
                return None
            _hasher.verify(user.password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return user


@dataclass(slots=True)
class Session:
    token: str
    csrf: str
    created: float
    user: str | None = None


class Sessions:
    """Server-side sessions keyed by a random cookie value; anonymous ones carry the login form's CSRF token."""

    def __init__(self, lifetime_seconds: float) -> None:
        self.lifetime = lifetime_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self, user: str | None = None) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.monotonic(), user)
        with self._lock:
            anonymous = [s for s in self._sessions.values() if s.user is None]
            if len(anonymous) >= MAX_ANONYMOUS_SESSIONS:
                oldest = min(anonymous, key=lambda s: s.created)
                del self._sessions[oldest.token]
            self._sessions[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is not None and time.monotonic() - session.created > self.lifetime:
                del self._sessions[token]
                return None
            return session

    def drop(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)


def csrf_ok(session: Session | None, sent: str | None) -> bool:
    return session is not None and sent is not None and hmac.compare_digest(session.csrf, sent)


@dataclass(slots=True)
class Throttle:
    """Failed logins per user name and per address; too many within the window lock both out."""

    attempts: int
    window: float
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, *keys: str) -> int:
        """Seconds until a login for these keys is tried again (0: now)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in keys:
                failures = self._failures.get(key)
                if not failures:
                    continue
                while failures and now - failures[0] > self.window:
                    failures.popleft()
                if len(failures) >= self.attempts:
                    wait = max(wait, self.window - (now - failures[0]))
        return int(wait) + 1 if wait else 0

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 100_000:
                self._failures.clear()  # bounded memory under a spray of names
            for key in keys:
                self._failures.setdefault(key, deque(maxlen=self.attempts)).append(now)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
