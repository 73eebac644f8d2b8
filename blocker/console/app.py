"""The console's pages and its HTTP server: a thread of `blocker serve` on `console.listen`.

Each page reads the running policy through `Runtime`, so what it shows is what the resolver
decides with. Every form is a POST carrying the session's CSRF token; every view of the query
log or of one device, every request and every decision is appended to the audit trail with the
user's name. Pages are Jinja2 templates with autoescaping; no page needs JavaScript.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2

from blocker.config import ConsoleConfig
from blocker.console.approvals import ChangeRequest, RequestError, RequestStore
from blocker.console.auth import Session, Sessions, Throttle, User, Users, csrf_ok
from blocker.console.querysearch import QueryFilter, search
from blocker.errors import BlockerError
from blocker.explain import build_report, find_client
from blocker.policy import Policy, check_name
from blocker.policy import explain as explain_decision
from blocker.yamlfile import format_endpoint

log = logging.getLogger("blocker")

COOKIE = "blocker_console"
MAX_BODY = 64 * 1024
PAGE_SIZE = 50
ADDRESS_FACTOR = 5
IDLE_SECONDS = 30
_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,63}$")
_HERE = Path(__file__).resolve().parent
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    ok: bool
    loaded_at: float  # Unix time the running policy was loaded
    error: str | None = None  # FILE:LINE: message of the last rejected reload


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the console sees of the running server."""

    policy: Callable[[], Policy]
    reload_status: Callable[[], ReloadStatus]
    config_path: Path | None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, list[str]]
    peer: str
    session: Session | None
    user: User | None
    new_cookie: str | None = None

    def arg(self, name: str) -> str:
        return self.query.get(name, "").strip()

    def field(self, name: str) -> str:
        values = self.form.get(name)
        return values[0].strip() if values else ""


class FormError(ValueError):
    """A form field is wrong; the message is shown above the form."""


class Console:
    """The pages; `handle` turns one request into one response."""

    def __init__(self, settings: ConsoleConfig, runtime: Runtime) -> None:
        assert settings.users is not None and settings.requests is not None
        self.settings = settings
        self.runtime = runtime
        self.users = Users(settings.users)
        self.sessions = Sessions(settings.session_minutes * 60)
        self.throttle = Throttle(settings.login_attempts, settings.lockout_seconds)
        # Colleagues behind one NAT or proxy share an address: it gets more tries than one user name.
        self.address_throttle = Throttle(settings.login_attempts * ADDRESS_FACTOR, settings.lockout_seconds)
        self.store = RequestStore(settings.requests)
        audit_file = runtime.policy().config.audit.path
        if audit_file is None:
            raise BlockerError("console: the console writes every view and decision to the audit trail; "
                               "set audit.path")
        self.audit_file: Path = audit_file
        self._audit_lock = threading.Lock()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.templates.filters["ago"] = _ago
        self.stylesheet = (_HERE / "static" / "console.css").read_bytes()
        self.routes: dict[tuple[str, str], tuple[str | None, Callable[[Request], Response]]] = {
            ("GET", "/"): ("viewer", self.overview),
            ("GET", "/explain"): ("viewer", self.explain),
            ("GET", "/exemptions"): ("viewer", self.exemptions),
            ("POST", "/exemptions/request"): ("admin", self.request_change),
            ("POST", "/requests/decide"): ("viewer", self.decide_request),
            ("GET", "/audit"): ("viewer", self.audit_page),
            ("GET", "/queries"): ("viewer", self.queries),
        }

    # -- plumbing ---------------------------------------------------------------------------

    def record(self, request: Request | None, event: str, /, **details: object) -> None:
        """Append one console event to the audit trail (the user is the actor)."""
        from blocker.audit_trail import AuditTrail

        entry: dict[str, object] = {**details, "event": event,
                                    "actor": f"console:{request.user.name}" if request and request.user else None}
        if request is not None:
            entry["address"] = request.peer
        with self._audit_lock:
            AuditTrail(self.audit_file).append(entry)

    def render(self, request: Request, template: str, status: int = 200, **context: object) -> Response:
        page = self.templates.get_template(template).render(
            user=request.user, csrf=request.session.csrf if request.session else "", path=request.path,
            **context)
        return Response(status, page.encode())

    def message(self, request: Request, status: int, title: str, text: str) -> Response:
        return self.render(request, "message.html", status, title=title, text=text)

    def handle(self, request: Request) -> Response:
        if request.path == "/static/console.css" and request.method == "GET":
            return Response(200, self.stylesheet, "text/css; charset=utf-8",
                            {"Cache-Control": "max-age=3600"})
        if request.method == "POST" and not csrf_ok(request.session, request.field("csrf")):
            return self.message(request, 403, "Form expired",
                                "The form's security token is missing or stale (CSRF protection). "
                                "Reload the page and send the form again.")
        if request.path == "/login":
            return self.login(request)
        if request.path == "/logout" and request.method == "POST":
            if request.session is not None:
                self.sessions.drop(request.session.token)
            return _redirect("/login")
        route = self.routes.get((request.method, request.path))
        if route is None:
            known = any(path == request.path for _, path in self.routes)
            if known:
                return self.message(request, 405, "Method not allowed", f"{request.method} is not used here.")
            return self.message(request, 404, "Not found", f"There is no page {request.path}.")
        role, handler = route
        if request.user is None:
            if request.method == "GET":
                target = request.path + ("?" + urlencode(request.query) if request.query else "")
                return _redirect("/login?" + urlencode({"next": target}))
            return self.message(request, 401, "Logged out", "Your session has ended; log in again.")
        if not (request.user.roles if role == "viewer" else request.user.may(str(role))):
            return self.message(request, 403, "Not allowed",
                                f"This needs the {role} role; {request.user.name} has "
                                f"{', '.join(sorted(request.user.roles))}.")
        return handler(request)

    # -- login ------------------------------------------------------------------------------

    def login(self, request: Request) -> Response:
        target = request.arg("next") or request.field("next") or "/"
        if not target.startswith("/") or target[1:2] in ("/", "\\") or any(c in target for c in "\r\n"):
            target = "/"  # only a path on this site: `//host` and `/\\host` would leave it
        if request.method == "GET":
            if request.user is not None:
                return _redirect(target)
            return self.render(request, "login.html", next=target, error=None, name="")
        name = request.field("name")
        password = request.form.get("password", [""])[0]
        wait = max(self.throttle.retry_after(name.lower()), self.address_throttle.retry_after(request.peer))
        if wait:
            self.record(request, "console_login_throttled", user=name)
            return self.render(request, "login.html", 429, next=target, name=name,
                               error=f"Too many failed logins: try again in {wait} s.")
        if not name or not password:
            return self.render(request, "login.html", 400, next=target, name=name,
                               error="Enter your user name and password.")
        user = self.users.authenticate(name, password)
        if user is None:
            self.throttle.failed(name.lower())
            self.address_throttle.failed(request.peer)
            self.record(request, "console_login_failed", user=name)
            return self.render(request, "login.html", 401, next=target, name=name,
                               error="Wrong user name or password.")
        self.throttle.succeeded(name.lower())
        if request.session is not None:
            self.sessions.drop(request.session.token)
        session = self.sessions.new(user.name)
        request.user = user
        self.record(request, "console_login")
        response = _redirect(target)
        response.headers["Set-Cookie"] = self.cookie(session.token)
        return response

    def cookie(self, token: str) -> str:
        secure = "; Secure" if self.settings.secure_cookies else ""
        return f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}"

    # -- pages ------------------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        policy = self.runtime.policy()
        status = self.runtime.reload_status()
        now = datetime.now(UTC)
        sizes = policy.lists.index.categories_sizes()
        categories = [(name, sizes.get(name, 0), category.description, category.file)
                      for name, category in sorted(policy.lists.categories.items())]
        members: dict[str, int] = {}
        for device in policy.devices.values():
            members[device.group] = members.get(device.group, 0) + 1
        groups = [(name, blocks, members.get(name, 0), name == policy.config.policy.default_group)
                  for name, blocks in policy.group_order.items()]
        window = _window(policy)
        counts = {"active": 0, "pending": 0, "expiring": 0, "expired": 0}
        for exemption in policy.config.policy.exemptions:
            state = _state(exemption.starts, exemption.expires, now)
            counts[state] += 1
            if state == "active" and exemption.expires - now <= window:
                counts["expiring"] += 1
        pending = sum(1 for r in self.store.all() if r.state == "pending")
        return self.render(
            request, "overview.html", policy=policy, reload=status, age=time.time() - status.loaded_at,
            categories=categories, groups=groups, devices=len(policy.devices),
            bindings=policy.inventory.table.size, counts=counts,
            window_days=window.days, pending=pending, query_log=policy.config.query_log.path is not None)

    def explain(self, request: Request) -> Response:
        policy = self.runtime.policy()
        domain, who = request.arg("domain"), request.arg("who")
        if not domain:
            return self.render(request, "explain.html", domain="", who=who, report=None, error=None)
        try:
            qname = check_name(domain)
        except ValueError as err:
            return self.render(request, "explain.html", 400, domain=domain, who=who, report=None,
                               error=f"'{domain}' is not a domain name: {err}")
        try:
            if who and _is_address(who):
                client, identity = find_client(policy, address=who)
            else:
                client, identity = find_client(policy, device=who or None)
        except ValueError as err:
            return self.render(request, "explain.html", 400, domain=domain, who=who, report=None,
                               error=f"{err} (give a device id from policy.devices or an IP address)")
        decision = explain_decision(policy, client, qname, datetime.now(UTC))
        report = build_report(policy, client, qname, decision, identity)
        if who:
            self.record(request, "console_view_device", page="explain", device=client.device, client=who,
                        domain=qname)
        return self.render(request, "explain.html", domain=domain, who=who, report=report, error=None,
                           report_json=_json(report))

    def exemptions(self, request: Request, error: str | None = None, status: int = 200,
                   values: dict[str, str] | None = None) -> Response:
        policy = self.runtime.policy()
        now = datetime.now(UTC)
        window = _window(policy)
        device, state, category = request.arg("device"), request.arg("state"), request.arg("category")
        rows = []
        for exemption in sorted(policy.config.policy.exemptions, key=lambda e: e.expires):
            current = _state(exemption.starts, exemption.expires, now)
            expiring = current == "active" and exemption.expires - now <= window
            if device and exemption.device != device:
                continue
            if state and not (current == state or (state == "expiring" and expiring)):
                continue
            if category and category not in exemption.allow:
                continue
            rows.append((exemption, current, expiring))
        if device and request.method == "GET":
            self.record(request, "console_view_device", page="exemptions", device=device)
        requests = sorted(self.store.all(), key=lambda r: r.requested_at, reverse=True)
        # The notice after a form names a stored request, never text from the address bar.
        notice = next((r for r in requests if r.id == request.arg("request")), None)
        return self.render(
            request, "exemptions.html", status, rows=rows, device=device, state=state, category=category,
            categories=sorted(policy.lists.categories), devices=sorted(policy.devices),
            pending=[r for r in requests if r.state == "pending"],
            decided=[r for r in requests if r.state != "pending"][:20], error=error, values=values or {},
            notice=notice if error is None else None,
            today=now.strftime("%Y-%m-%dT%H:%M"))

    def request_change(self, request: Request) -> Response:
        assert request.user is not None
        values = {key: request.field(key) for key in ("kind", "device", "reference", "reason", "expires", "starts")}
        values["allow"] = ",".join(request.form.get("allow", []))
        try:
            kind, fields = self._validate(request)
            created = self.store.create(kind, request.user.name, fields)
        except (FormError, RequestError) as err:
            return self.exemptions(request, error=str(err), status=400, values=values)
        self.record(request, "console_request", request=created.id, kind=kind, **fields)
        return _redirect(f"/exemptions?request={created.id}")

    def _validate(self, request: Request) -> tuple[str, dict[str, object]]:
        """The request's fields, checked against the running policy; raises FormError."""
        policy = self.runtime.policy()
        now = datetime.now(UTC)
        kind = request.field("kind")
        if kind not in ("grant", "renew", "revoke"):
            raise FormError("Choose grant, renew or revoke.")
        reference = request.field("reference")
        existing = {e.reference: e for e in policy.config.policy.exemptions}
        if not _REFERENCE.match(reference):
            raise FormError("Reference: 1 to 64 letters, digits or . _ / : - (e.g. CHG-2026-0042).")
        if kind == "grant":
            if reference in existing:
                raise FormError(f"Reference {reference} is already used by an exemption for "
                                f"{existing[reference].device}; renew it or choose another reference.")
            device = request.field("device")
            if device not in policy.devices:
                raise FormError(f"Device '{device}' is not in policy.devices.")
            allow = [c.strip() for c in request.form.get("allow", []) if c.strip()]
            if not allow:
                raise FormError("Allow: choose at least one category.")
            unknown = [c for c in allow if c not in policy.lists.categories]
            if unknown:
                raise FormError(f"Unknown category: {', '.join(unknown)}.")
            blocked = policy.group_blocks.get(policy.devices[device].group, frozenset())
            if not set(allow) & blocked:
                raise FormError(f"The group of {device} blocks none of {', '.join(allow)}: nothing to grant.")
            reason = _reason(request.field("reason"))
            expires = _when(request.field("expires"), "Expires")
            starts = _when(request.field("starts"), "Starts") if request.field("starts") else None
            if expires <= now:
                raise FormError("Expires must be in the future.")
            if starts is not None and starts >= expires:
                raise FormError("Starts must be before expires.")
            return kind, {"device": device, "allow": allow, "reference": reference, "reason": reason,
                          "expires": _iso(expires), "starts": _iso(starts) if starts else None}
        if reference not in existing:
            raise FormError(f"No exemption has reference {reference}.")
        device = existing[reference].device
        if kind == "renew":
            expires = _when(request.field("expires"), "Expires")
            if expires <= now:
                raise FormError("Expires must be in the future.")
            return kind, {"device": device, "reference": reference, "expires": _iso(expires),
                          "previous_expires": _iso(existing[reference].expires)}
        return kind, {"device": device, "reference": reference, "reason": _reason(request.field("reason"))}

    def decide_request(self, request: Request) -> Response:
        assert request.user is not None
        user = request.user
        request_id, verdict = request.field("id"), request.field("decision")
        if verdict not in ("approve", "reject"):
            return self.exemptions(request, error="Choose approve or reject.", status=400)
        own = next((r for r in self.store.all() if r.id == request_id), None)
        withdrawing = own is not None and own.requested_by == user.name and verdict == "reject"
        if not user.may("approver") and not withdrawing:
            return self.message(request, 403, "Not allowed",
                                f"Approving or rejecting a request needs the approver role; {user.name} has "
                                f"{', '.join(sorted(user.roles))}.")
        try:
            decided = self.store.decide(request_id, user.name, verdict == "approve",
                                        lambda change: self._apply(change, user))
        except RequestError as err:
            status = 403 if "four eyes" in str(err) else 409
            return self.exemptions(request, error=str(err), status=status)
        self.record(request, "console_approved" if verdict == "approve" else "console_rejected",
                    request=decided.id, kind=decided.kind, requested_by=decided.requested_by,
                    state=decided.state, result=decided.result, **decided.fields)
        if decided.state == "failed":
            return self.exemptions(request, error=f"Request {decided.id} was approved but could not be applied: "
                                                  f"{decided.result}", status=409)
        return _redirect(f"/exemptions?request={decided.id}")

    def _apply(self, change: ChangeRequest, approver: User) -> str:
        """Write an approved request through the same code path as `blocker exemptions grant`."""
        from blocker import exemption_edit

        config = self.runtime.config_path
        if config is None:
            raise RequestError("blocker runs on embedded defaults: there is no file to write exemptions to")
        fields = change.fields
        actor = f"console:{change.requested_by} (approved by console:{approver.name})"
        if change.kind == "grant":
            starts = fields.get("starts")
            exemption_edit.grant(
                config, device=str(fields["device"]), allow=list(fields["allow"]),  # type: ignore[call-overload]
                approved_by=approver.display, reference=change.reference, reason=str(fields["reason"]),
                expires=_parse_iso(str(fields["expires"])), starts=_parse_iso(str(starts)) if starts else None,
                actor=actor)
            return f"granted {change.reference}"
        if change.kind == "renew":
            exemption_edit.renew(config, reference=change.reference, expires=_parse_iso(str(fields["expires"])),
                                 actor=actor)
            return f"renewed {change.reference} until {fields['expires']}"
        exemption_edit.revoke(config, reference=change.reference, reason=str(fields["reason"]), actor=actor)
        return f"revoked {change.reference}"

    def audit_page(self, request: Request) -> Response:
        from blocker.audit_trail import read_events, verify

        filters = {key: request.arg(key) for key in ("event", "actor", "device", "reference", "text")}
        page = _page(request.arg("page"))
        result = verify(self.audit_file)
        try:
            events = read_events(self.audit_file)
        except (OSError, ValueError, BlockerError) as err:
            events = []
            log.warning("console: cannot read the audit trail: %s", err)
        kinds = sorted({str(e.get("event")) for e in events})
        chosen = []
        for event in reversed(events):
            if filters["event"] and event.get("event") != filters["event"]:
                continue
            if filters["actor"] and filters["actor"].lower() not in str(event.get("actor") or "").lower():
                continue
            if filters["device"] and event.get("device") != filters["device"]:
                continue
            if filters["reference"] and event.get("reference") != filters["reference"]:
                continue
            if filters["text"] and filters["text"].lower() not in _json(event).lower():
                continue
            chosen.append(event)
        shown = chosen[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
        self.record(request, "console_view_audit", filters={k: v for k, v in filters.items() if v})
        return self.render(request, "audit.html", events=[(e, _details(e)) for e in shown], filters=filters,
                           kinds=kinds, verify=result, page=page, more=len(chosen) > page * PAGE_SIZE,
                           total=len(chosen), links=_links(request, page))

    def queries(self, request: Request) -> Response:
        policy = self.runtime.policy()
        path = policy.config.query_log.path
        form = {key: request.arg(key) for key in ("device", "category", "since", "until", "action")}
        if path is None:
            return self.render(request, "queries.html", enabled=False, form=form, result=None, error=None,
                               categories=[], links={})
        page = _page(request.arg("page"))
        error = None
        result = None
        try:
            if form["action"] not in ("", "blocked", "exempted"):
                raise FormError("Action: blocked or exempted.")
            query = QueryFilter(form["device"] or None, form["category"] or None,
                                _when(form["since"], "From") if form["since"] else None,
                                _when(form["until"], "To") if form["until"] else None, form["action"] or None)
            if query.since and query.until and query.since > query.until:
                raise FormError("From must be before To.")
            result = search(path, query, page, PAGE_SIZE)
        except FormError as err:
            error = str(err)
        self.record(request, "console_view_queries", page=page, **{k: v for k, v in form.items() if v})
        return self.render(request, "queries.html", 400 if error else 200, enabled=True, form=form,
                           result=result, error=error, categories=sorted(policy.lists.categories),
                           links=_links(request, page))


# -- helpers of the pages ---------------------------------------------------------------------

def _state(starts: datetime | None, expires: datetime, now: datetime) -> str:
    if now >= expires:
        return "expired"
    if starts is not None and now < starts:
        return "pending"
    return "active"


def _window(policy: Policy) -> timedelta:
    return timedelta(days=policy.config.policy.expiry_warning_days)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _reason(text: str) -> str:
    if not text:
        raise FormError("Reason: say why (it goes on the record).")
    if len(text) > 500:
        raise FormError("Reason: at most 500 characters.")
    return text


def _when(text: str, label: str) -> datetime:
    """A date-time from a form: ISO 8601, a time zone optional (UTC when none), or a date (its end)."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.fromisoformat(text + "T23:59:00+00:00")
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FormError(f"{label}: '{text}' is not a date-time like 2026-12-31T23:59 (UTC).") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _page(text: str) -> int:
    return int(text) if text.isdigit() and 0 < int(text) < 100_000 else 1


def _links(request: Request, page: int) -> dict[str, str]:
    base = {k: v for k, v in request.query.items() if k != "page" and v}
    return {"prev": "?" + urlencode({**base, "page": page - 1}) if page > 1 else "",
            "next": "?" + urlencode({**base, "page": page + 1})}


def _json(value: object) -> str:
    import json

    return json.dumps(value, indent=2, default=str)


def _details(event: dict[str, object]) -> str:
    import json

    skip = {"event", "actor", "time", "prev", "hash"}

    def text(value: object) -> str:
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        if isinstance(value, dict):
            return json.dumps(value, separators=(",", ":"), default=str)
        return str(value)

    return "; ".join(f"{k}={text(v)}" for k, v in event.items() if k not in skip and v not in (None, "", [], {}))


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _redirect(target: str) -> Response:
    return Response(303, b"", "text/plain; charset=utf-8", {"Location": target})


# -- the HTTP server ------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread: a client that never
        # finishes it holds up only itself, never the accept loop.
        if self.tls is not None:
            request.settimeout(IDLE_SECONDS)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("console: connection from %s failed", client_address, exc_info=True)


class ConsoleServer:
    """A threaded HTTP(S) server beside the event loop, like the ops endpoint."""

    def __init__(self, settings: ConsoleConfig, runtime: Runtime) -> None:
        self.console = Console(settings, runtime)
        host, port = settings.listen
        context = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
            if settings.tls_client_ca is not None:
                # Client certificates (a smart card, the force's PKI): no valid one, no connection.
                context.load_verify_locations(settings.tls_client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        server_class = type("ConsoleHTTPServer", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
            "daemon_threads": True,
            "tls": context,
        })
        self.server = server_class((host, port), _handler(self.console))
        self.address = self.server.server_address[:2]
        self.scheme = "https" if settings.tls_cert else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, name="blocker-console", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(console: Console) -> type[BaseHTTPRequestHandler]:
    settings = console.settings
    proxy = settings.proxy_auth

    class Handler(BaseHTTPRequestHandler):
        server_version = "blocker-console"
        sys_version = ""
        timeout = IDLE_SECONDS  # an idle or slow connection is closed, its thread freed

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            try:
                request = self._request(method)
                if request is None:
                    return
                response = console.handle(request)
                if request.new_cookie and "Set-Cookie" not in response.headers:
                    response.headers["Set-Cookie"] = console.cookie(request.new_cookie)
            except Exception:
                log.exception("console: %s %s failed", method, self.path)
                response = Response(500, b"internal error (logged)\n", "text/plain; charset=utf-8")
            self._send(response)

        def _request(self, method: str) -> Request | None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query, max_num_fields=50).items()}
            form: dict[str, list[str]] = {}
            if method == "POST":
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:
                    self._send(Response(413, b"form too large\n", "text/plain; charset=utf-8"))
                    return None
                body = self.rfile.read(length).decode("utf-8", "replace")
                form = parse_qs(body, keep_blank_values=True, max_num_fields=100)
            peer = self.client_address[0]
            token = None
            try:
                cookie = SimpleCookie(self.headers.get("Cookie") or "")
                token = cookie[COOKIE].value if COOKIE in cookie else None
            except CookieError:
                token = None
            session = console.sessions.get(token)
            user = console.users.get(session.user) if session is not None and session.user else None
            new_cookie = None
            vouched = None
            if proxy is not None and _trusted(peer, proxy.trusted_proxies) and self.headers.get(proxy.header):
                # SSO in front: the proxy vouches for the user; its header is believed from its address only.
                vouched = str(self.headers.get(proxy.header)).strip()
            elif settings.tls_client_ca is not None:
                vouched = _certificate_name(self.connection)  # verified against tls_client_ca in the handshake
            if vouched is not None:
                user = console.users.get(vouched)
                if user is None:
                    self._send(Response(403, f"{vouched} is not a console user (console.users)\n".encode(),
                                        "text/plain; charset=utf-8"))
                    return None
                if session is None or session.user != vouched:
                    session = console.sessions.new(vouched)
                    new_cookie = session.token
            if session is None:
                session = console.sessions.new()
                new_cookie = session.token
            return Request(method, parts.path, query, form, peer, session, user, new_cookie)

        def _send(self, response: Response) -> None:
            self.send_response(response.status)
            headers = {**_HEADERS, "Content-Type": response.content_type,
                       "Content-Length": str(len(response.body)), **response.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the audit trail records what matters; page hits are not logged

    return Handler


def _certificate_name(connection: Any) -> str | None:
    """The commonName of the client certificate the TLS handshake verified, if any."""
    getpeercert = getattr(connection, "getpeercert", None)
    certificate = getpeercert() if getpeercert else None
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _trusted(peer: str, networks: tuple[object, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)  # type: ignore[operator]


def start_console(daemon: Any, settings: ConsoleConfig) -> ConsoleServer | None:
    """Start the console beside a running `Daemon` (the hook `blocker serve` calls); None, logged, if it cannot."""
    from blocker.daemon import bind_error

    stats = daemon.stats

    def status() -> ReloadStatus:
        error = stats.last_reload_error
        return ReloadStatus(error is None, stats.last_reload_success or time.time(),
                            f"{error[0]}:{error[1]}: {error[2]}" if error else None)

    try:
        server = ConsoleServer(settings, Runtime(lambda: daemon.policy, status, daemon.source.config_path))
    except BlockerError as err:
        log.error("cannot start the console: %s", err)
        return None
    except OSError as err:
        log.error("%s", bind_error("for the console (http)", format_endpoint(*settings.listen), err))
        return None
    server.start()
    log.info("listening console=%s://%s/", server.scheme, format_endpoint(*server.address))
    return server
