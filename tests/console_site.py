"""Test support for the admin console: a real `blocker serve` with the console on, its users made
with the real `blocker console add-user`, and a small cookie-keeping HTTP client."""

from __future__ import annotations

import html
import http.client
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from argon2 import PasswordHasher
from helpers import ROOT, Blocker

from blocker.console import auth

PASSWORD = "correct horse battery staple"
CHEAP = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)  # real argon2id, a test-sized cost
USERS = {  # name: (roles, display)
    "alice": (["admin"], "Sgt. A. Adams"),
    "bob": (["approver"], "Insp. B. Brown"),
    "carol": (["admin", "approver"], "Insp. C. Clark"),
    "victor": (["viewer"], "V. Viewer"),
    "dave": (["approver"], "Insp. D. Doyle"),
}


def add_user(config: Path, name: str, roles: list[str], display: str, password: str = PASSWORD
             ) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "blocker", "console", "add-user", "--config", str(config), name,
            "--display", display]
    for role in roles:
        args += ["--role", role]
    return subprocess.run(args, input=password + "\n", capture_output=True, text=True, cwd=ROOT, timeout=30)


def console_config(directory: Path, upstream: str, blocklists: Path, extra_console: str = "") -> Path:
    config = directory / "blocker.yaml"
    config.write_text(textwrap.dedent(f"""\
        dns:
          listen: ["127.0.0.1:0"]
          upstreams: ["{upstream}"]
          upstream_timeout: 0.5
        metrics:
          listen: "127.0.0.1:0"
        blocklists: "{blocklists}"
        query_log:
          path: queries.jsonl
          only_blocked: false
        audit:
          path: audit.jsonl
        console:
          enabled: true
          listen: "127.0.0.1:0"
          users: console-users.yaml
        """) + textwrap.indent(textwrap.dedent(extra_console), "  ") + textwrap.dedent("""\
        policy:
          devices:
            - id: MPS-000456
              addresses: ["127.0.0.56"]
              group: standard
            - id: MPS-000123
              addresses: ["127.0.0.3"]
              group: comms-team
          exemptions: []
        """))
    for name, (roles, display) in USERS.items():  # in-process: `add-user` itself has its own test
        auth.add_user(directory / "console-users.yaml", name, roles, PASSWORD, display, hasher=CHEAP)
    return config


def start(config: Path) -> tuple[Blocker, int]:
    server = Blocker(config).start()
    line = server.wait_for_log(r"listening console=http://127\.0\.0\.1:\d+/")
    port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
    return server, port


class Web:
    """One browser-less user agent: keeps the session cookie, reads CSRF tokens from the pages."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.port = port
        self.source = source
        self.cookie: str | None = None
        self.csrf = ""

    def send(self, method: str, path: str, form: dict[str, object] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                                source_address=(self.source, 0))
        sent = dict(headers or {})
        body = None
        if form is not None:
            body = urlencode(form, doseq=True)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookie:
            sent["Cookie"] = self.cookie
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        text = response.read().decode()
        found = {k.lower(): v for k, v in response.getheaders()}
        connection.close()
        if "set-cookie" in found:
            self.cookie = found["set-cookie"].split(";", 1)[0]
        token = re.search(r'name="csrf" value="([^"]+)"', text)
        if token:
            self.csrf = token.group(1)
        return response.status, found, html.unescape(text)

    def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
        return self.send("GET", path, headers=headers)

    def post(self, path: str, form: dict[str, object], csrf: bool = True) -> tuple[int, dict[str, str], str]:
        return self.send("POST", path, {**({"csrf": self.csrf} if csrf else {}), **form})

    def login(self, name: str, password: str = PASSWORD) -> tuple[int, dict[str, str], str]:
        self.get("/login")
        result = self.post("/login", {"name": name, "password": password, "next": "/"})
        if result[0] == 303:
            self.get("/")  # the new session's CSRF token
        return result


def location(headers: dict[str, str]) -> str:
    return urlsplit(headers.get("location", "")).path


def wait_until(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")
