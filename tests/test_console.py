"""The admin console over HTTP against a real `blocker serve`: login, cookies, CSRF, roles, four eyes,
form validation, login throttling, the SSO header's trust boundary, the query-log search and the audit."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from console_site import PASSWORD, Web, add_user, console_config, location, start, wait_until
from helpers import ROOT, Blocker, Knot, rcode_text, require_tool

SHIPPED = ROOT / "blocklists"


@pytest.fixture(scope="module")
def site(knot: Knot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Blocker, int, Path]]:
    directory = tmp_path_factory.mktemp("console")
    config = console_config(directory, knot.endpoint, SHIPPED, extra_console="""\
        login_attempts: 3
        proxy_auth:
          header: X-Forwarded-User
          trusted_proxies: ["127.0.0.2/32"]
        """)
    server, port = start(config)
    yield server, port, directory
    server.stop()


def future(days: int = 30) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M")


def grant_form(reference: str, **overrides: object) -> dict[str, object]:
    form: dict[str, object] = {"kind": "grant", "device": "MPS-000456", "allow": ["whatsapp"],
                               "reference": reference, "reason": "Witness liaison", "expires": future()}
    form.update(overrides)
    return form


def audit_events(directory: Path) -> list[dict[str, object]]:
    path = directory / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_add_user_writes_an_argon2_hash_and_refuses_bad_input(tmp_path: Path) -> None:
    config = tmp_path / "blocker.yaml"
    config.write_text("console:\n  users: users.yaml\n")
    done = add_user(config, "erin", ["viewer"], "E. Evans")
    assert done.returncode == 0, done.stderr
    users = yaml.safe_load((tmp_path / "users.yaml").read_text())["users"]
    assert users == [{"name": "erin", "display": "E. Evans", "roles": ["viewer"], "password": users[0]["password"]}]
    assert users[0]["password"].startswith("$argon2id$") and PASSWORD not in (tmp_path / "users.yaml").read_text()
    assert (tmp_path / "users.yaml").stat().st_mode & 0o077 == 0
    short = add_user(config, "frank", ["viewer"], "F", password="short")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    bad_role = subprocess.run([sys.executable, "-m", "blocker", "console", "add-user", "--config", str(config),
                               "--role", "root", "gary"], input=PASSWORD, capture_output=True, text=True, cwd=ROOT)
    assert bad_role.returncode == 2 and "invalid choice: 'root'" in bad_role.stderr


def test_pages_need_a_login_and_the_cookie_is_locked_down(site: tuple[Blocker, int, Path]) -> None:
    _, port, directory = site
    web = Web(port)
    status, headers, _ = web.get("/exemptions?device=MPS-000456")
    assert status == 303 and location(headers) == "/login"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    status, _, page = web.login("alice", "wrong password here")
    assert status == 401 and "Wrong user name or password" in page
    web.get("/login")
    status, headers, _ = web.post("/login", {"name": "alice", "password": PASSWORD, "next": "/\\evil.example"})
    assert status == 303 and headers["location"] == "/"  # never off the site
    status, _, page = web.get("/")
    assert status == 200 and "Overview" in page and "Sgt. A. Adams" in page
    kinds = [(e["event"], e.get("actor"), e.get("user")) for e in audit_events(directory)]
    assert ("console_login_failed", None, "alice") in kinds and ("console_login", "console:alice", None) in kinds


def test_every_form_needs_its_csrf_token(site: tuple[Blocker, int, Path]) -> None:
    _, port, directory = site
    anonymous = Web(port)
    anonymous.get("/login")
    status, _, page = anonymous.post("/login", {"name": "alice", "password": PASSWORD}, csrf=False)
    assert status == 403 and "CSRF" in page
    web = Web(port)
    web.login("alice")
    for form in ({}, {"csrf": "not-the-token"}):
        status, _, page = web.send("POST", "/exemptions/request", {**grant_form("CSRF-1"), **form})
        assert status == 403 and "security token" in page
    status, _, page = web.send("POST", "/requests/decide", {"id": "x", "decision": "approve"})
    assert status == 403
    assert not any(e.get("reference") == "CSRF-1" for e in audit_events(directory))
    assert "CSRF-1" not in (directory / "console-requests.json").read_text() \
        if (directory / "console-requests.json").exists() else True


def test_forms_are_validated_with_a_clear_message(site: tuple[Blocker, int, Path]) -> None:
    _, port, _ = site
    web = Web(port)
    web.login("alice")
    cases = [
        (grant_form("VAL-1", device="MPS-999999"), "Device 'MPS-999999' is not in policy.devices"),
        (grant_form("VAL-2", expires="2020-01-01T00:00"), "Expires must be in the future"),
        (grant_form("VAL-3", expires="next tuesday"), "is not a date-time"),
        (grant_form("bad reference!"), "Reference: 1 to 64 letters"),
        (grant_form("VAL-4", allow=[]), "choose at least one category"),
        (grant_form("VAL-5", allow=["myspace"]), "Unknown category: myspace"),
        (grant_form("VAL-6", reason=""), "Reason: say why"),
        (grant_form("VAL-7", device="MPS-000123", allow=["tiktok"]), "blocks none of tiktok"),
        ({"kind": "renew", "reference": "NOPE-1", "expires": future()}, "No exemption has reference NOPE-1"),
        ({"kind": "delete", "reference": "X-1"}, "Choose grant, renew or revoke"),
    ]
    for form, message in cases:
        status, _, page = web.post("/exemptions/request", form)
        assert status == 400, (form, status)
        assert message in page, (form, page[page.find('class="error"'):][:300])
    status, _, page = web.get("/explain?domain=not..a..name&who=MPS-000456")
    assert status == 400 and "is not a domain name" in page
    status, _, page = web.get("/explain?domain=web.whatsapp.com&who=MPS-424242")
    assert status == 400 and "unknown device 'MPS-424242'" in page
    status, _, page = web.get("/queries?since=yesterday")
    assert status == 400 and "From: 'yesterday' is not a date-time" in page


def test_roles_and_four_eyes(site: tuple[Blocker, int, Path]) -> None:
    _, port, directory = site
    viewer, carol, alice = Web(port), Web(port), Web(port)
    viewer.login("victor")
    carol.login("carol")
    alice.login("alice")
    status, _, page = viewer.post("/exemptions/request", grant_form("ROLE-1"))
    assert status == 403 and "needs the admin role" in page
    status, _, _ = carol.post("/exemptions/request", grant_form("ROLE-1"))
    assert status == 303
    request_id = json.loads((directory / "console-requests.json").read_text())["requests"][-1]["id"]
    status, _, page = viewer.post("/requests/decide", {"id": request_id, "decision": "approve"})
    assert status == 403 and "needs the approver role" in page
    status, _, page = alice.post("/requests/decide", {"id": request_id, "decision": "approve"})
    assert status == 403 and "needs the approver role" in page  # admin without approver
    status, _, page = carol.post("/requests/decide", {"id": request_id, "decision": "approve"})
    assert status == 403 and "four eyes" in page
    stored = json.loads((directory / "console-requests.json").read_text())["requests"]
    assert [r["state"] for r in stored if r["id"] == request_id] == ["pending"]
    # A second request for the same reference waits behind the first.
    status, _, page = alice.post("/exemptions/request", grant_form("ROLE-1"))
    assert status == 400 and "already waiting for approval" in page
    # The requester may withdraw; nothing was written to the config.
    status, _, _ = carol.post("/requests/decide", {"id": request_id, "decision": "reject"})
    assert status == 303
    assert "ROLE-1" not in (directory / "blocker.yaml").read_text()
    events = [e["event"] for e in audit_events(directory) if e.get("reference") == "ROLE-1"]
    assert events == ["console_request", "console_rejected"]


def test_concurrent_approvals_apply_once_and_reach_the_resolver(site: tuple[Blocker, int, Path]) -> None:
    server, port, directory = site
    alice = Web(port)
    alice.login("alice")
    assert rcode_text(server.query("media.whatsapp.com", source="127.0.0.56")) == "NXDOMAIN"
    status, _, _ = alice.post("/exemptions/request", grant_form("ONCE-1"))
    assert status == 303
    request_id = json.loads((directory / "console-requests.json").read_text())["requests"][-1]["id"]
    approvers = [Web(port), Web(port)]
    approvers[0].login("bob")
    approvers[1].login("dave")
    results: list[int] = []
    threads = [threading.Thread(target=lambda w=w: results.append(
        w.post("/requests/decide", {"id": request_id, "decision": "approve"})[0])) for w in approvers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert sorted(results) == [303, 409]
    text = (directory / "blocker.yaml").read_text()
    assert text.count("ONCE-1") == 1
    exemption = next(e for e in yaml.safe_load(text)["policy"]["exemptions"] if e["reference"] == "ONCE-1")
    assert exemption["device"] == "MPS-000456" and exemption["approved_by"] in ("Insp. B. Brown", "Insp. D. Doyle")
    wait_until(lambda: rcode_text(server.query("media.whatsapp.com", source="127.0.0.56")) == "NOERROR",
               what="the approved grant reaching the resolver")
    approvals = [e for e in audit_events(directory) if e["event"] == "console_approved"
                 and e.get("reference") == "ONCE-1"]
    assert len(approvals) == 1 and approvals[0]["requested_by"] == "alice" and approvals[0]["state"] == "approved"


def test_login_throttling(site: tuple[Blocker, int, Path]) -> None:
    _, port, directory = site
    web = Web(port)
    for _ in range(3):
        status, _, _ = web.login("dave", "not the password")
        assert status == 401
    status, _, page = web.login("dave")  # the right password, but locked out now
    assert status == 429 and "Too many failed logins: try again in" in page
    assert web.get("/")[0] == 303
    other = Web(port)
    assert other.login("bob")[0] == 303  # another user from the same address still gets in
    assert any(e["event"] == "console_login_throttled" and e["user"] == "dave" for e in audit_events(directory))


def test_sso_header_is_believed_only_from_the_trusted_proxy(site: tuple[Blocker, int, Path]) -> None:
    _, port, _ = site
    outsider = Web(port, source="127.0.0.1")
    status, headers, _ = outsider.get("/", **{"X-Forwarded-User": "carol"})
    assert status == 303 and location(headers) == "/login"
    proxy = Web(port, source="127.0.0.2")
    status, _, page = proxy.get("/", **{"X-Forwarded-User": "carol"})
    assert status == 200 and "Insp. C. Clark" in page
    status, _, page = proxy.get("/", **{"X-Forwarded-User": "mallory"})
    assert status == 403 and "not a console user" in page


def test_blocked_query_search_shows_only_blocked_and_audits_the_view(site: tuple[Blocker, int, Path]) -> None:
    server, port, directory = site
    assert rcode_text(server.query("www.tiktok.com", source="127.0.0.56")) == "NXDOMAIN"
    assert rcode_text(server.query("www.example.test", source="127.0.0.56")) == "NOERROR"
    log = directory / "queries.jsonl"
    wait_until(lambda: log.exists() and "www.example.test" in log.read_text(), what="the query log entry")
    web = Web(port)
    web.login("victor")
    status, _, page = web.get("/queries?device=MPS-000456&category=tiktok")
    assert status == 200 and "www.tiktok.com" in page and "www.example.test" not in page
    status, _, page = web.get("/queries?device=MPS-000456")
    assert "www.example.test" not in page  # allowed queries are never shown
    status, _, page = web.get(f"/queries?category=tiktok&since={future(1)}")
    assert "www.tiktok.com" not in page and "No blocked query matches" in page
    views = [e for e in audit_events(directory)
             if e["event"] == "console_view_queries" and e["actor"] == "console:victor"]
    assert views and views[0]["device"] == "MPS-000456" and views[0]["category"] == "tiktok"


def test_audit_page_shows_the_chain_result(site: tuple[Blocker, int, Path]) -> None:
    _, port, directory = site
    web = Web(port)
    web.login("victor")
    status, _, page = web.get("/audit?event=console_login")
    assert status == 200 and "Chain verified" in page and "console:victor" in page
    status, _, page = web.get("/explain?domain=web.whatsapp.com&who=127.0.0.3")
    assert status == 200 and "BLOCKED" in page and "whatsapp.yaml:" in page
    assert any(e["event"] == "console_view_device" and e["device"] == "MPS-000123" for e in audit_events(directory))


def test_https_with_its_own_certificate_sets_secure_cookies(knot: Knot, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    cert, key = tmp_path / "console.crt", tmp_path / "console.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    config = console_config(tmp_path, knot.endpoint, SHIPPED, extra_console=f"""\
        tls_cert: "{cert}"
        tls_key: "{key}"
        """)
    server = Blocker(config).start()
    try:
        line = server.wait_for_log(r"listening console=https://127\.0\.0\.1:\d+/")
        port = int(line.rsplit(":", 1)[1].strip("/ "))
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)  # never starts the handshake
        context = ssl.create_default_context(cafile=str(cert))
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        connection.request("GET", "/login")
        response = connection.getresponse()
        assert response.status == 200 and "Log in" in response.read().decode()
        cookie = response.getheader("Set-Cookie") or ""
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        connection.close()
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/login")
            plain.getresponse().read()
        idle.close()
    finally:
        server.stop()


def test_overview_shows_a_rejected_reload_with_its_line(site: tuple[Blocker, int, Path]) -> None:
    _, port, directory = site
    web = Web(port)
    web.login("victor")
    config = directory / "blocker.yaml"
    good = config.read_text()
    lines = len(good.splitlines())
    try:
        config.write_text(good + "bogus_key: 1\n")
        wait_until(lambda: "rejected" in web.get("/")[2], what="the overview showing the rejected reload")
        page = web.get("/")[2]
        assert f"blocker.yaml:{lines + 1}: config: unknown key 'bogus_key'" in page
        assert "the policy above keeps serving" in page
    finally:
        config.write_text(good)
    wait_until(lambda: "accepted" in web.get("/")[2], what="the overview showing the good reload")


def test_a_missing_users_file_stops_the_start_with_the_reason(knot: Knot, tmp_path: Path) -> None:
    config = console_config(tmp_path, knot.endpoint, SHIPPED)
    (tmp_path / "console-users.yaml").unlink()
    server = Blocker(config).start(expect_ready=False)
    try:
        line = server.wait_for_log(r"cannot start the console")
        assert "console-users.yaml: cannot read the console users file" in line
        assert server.process is not None and server.process.wait(10) == 2
        assert not any(" ready " in entry for entry in server.lines)
    finally:
        server.stop()


def test_an_approval_that_cannot_be_applied_is_recorded_as_failed(site: tuple[Blocker, int, Path]) -> None:
    _, port, directory = site
    alice, bob = Web(port), Web(port)
    alice.login("alice")
    bob.login("bob")
    assert alice.post("/exemptions/request", grant_form("RACE-1", allow=["signal"]))[0] == 303
    request_id = json.loads((directory / "console-requests.json").read_text())["requests"][-1]["id"]
    # Meanwhile someone grants the same reference from the shell.
    done = subprocess.run([sys.executable, "-m", "blocker", "exemptions", "grant", "--config",
                           str(directory / "blocker.yaml"), "--device", "MPS-000456", "--allow", "signal",
                           "--approved-by", "Supt. S. Shell", "--reference", "RACE-1", "--reason", "Shell grant",
                           "--for", "7d", "--by", "shelluser"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    status, _, page = bob.post("/requests/decide", {"id": request_id, "decision": "approve"})
    assert status == 409 and "could not be applied: reference RACE-1 is already used" in page
    text = (directory / "blocker.yaml").read_text()
    assert text.count("RACE-1") == 1 and "Supt. S. Shell" in text
    stored = json.loads((directory / "console-requests.json").read_text())["requests"]
    assert [r["state"] for r in stored if r["id"] == request_id] == ["failed"]


def test_client_certificates_log_in_as_their_common_name(knot: Knot, tmp_path: Path) -> None:
    openssl = require_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Force PKI test CA",
        "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.crt"))
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "server.key"),
        "-out", str(tmp_path / "server.crt"))
    for name in ("carol", "mallory"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(tmp_path / f"{name}.key"),
            "-out", str(tmp_path / f"{name}.csr"))
        run("x509", "-req", "-in", str(tmp_path / f"{name}.csr"), "-CA", str(tmp_path / "ca.crt"), "-CAkey",
            str(tmp_path / "ca.key"), "-CAcreateserial", "-days", "1", "-out", str(tmp_path / f"{name}.crt"))
    config = console_config(tmp_path, knot.endpoint, SHIPPED, extra_console=f"""\
        tls_cert: "{tmp_path / 'server.crt'}"
        tls_key: "{tmp_path / 'server.key'}"
        tls_client_ca: "{tmp_path / 'ca.crt'}"
        """)
    server = Blocker(config).start()
    try:
        line = server.wait_for_log(r"listening console=https://127\.0\.0\.1:\d+/")
        port = int(line.rsplit(":", 1)[1].strip("/ "))

        def get(name: str | None) -> tuple[int, str]:
            context = ssl.create_default_context(cafile=str(tmp_path / "server.crt"))
            if name:
                context.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
            connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                return response.status, response.read().decode()
            finally:
                connection.close()

        status, page = get("carol")
        assert status == 200 and "Insp. C. Clark" in page  # no password asked
        status, page = get("mallory")  # a valid certificate, but not a console user
        assert status == 403 and "mallory is not a console user" in page
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            get(None)  # no certificate, no connection
    finally:
        server.stop()
