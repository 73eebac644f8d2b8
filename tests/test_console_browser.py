"""The admin console in a real headless Chromium (Debian's, driven by Playwright): log in, explain a
blocked and an allowed name, request a grant as one user and approve it as another, see the grant
take effect with dig against the running resolver, and see the events on the audit page.

Screenshots of every page go to tests/artifacts/console/ (not committed)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from console_site import PASSWORD, console_config, start, wait_until
from helpers import ROOT, Blocker, Knot, require_tool
from playwright.sync_api import sync_playwright  # the test extra installs it; Chromium is Debian's

ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(knot: Knot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Blocker, int, Path]]:
    directory = tmp_path_factory.mktemp("console-browser")
    server, port = start(console_config(directory, knot.endpoint, ROOT / "blocklists"))
    yield server, port, directory
    server.stop()


def dig(server: Blocker, name: str, source: str) -> str:
    done = subprocess.run([require_tool("dig"), "-b", source, "-p", str(server.port), "@127.0.0.1", name, "A",
                           "+tries=1", "+time=2"], capture_output=True, text=True, timeout=10)
    return done.stdout


def status_of(output: str) -> str:
    found = re.search(r"status: (\w+)", output)
    assert found, output
    return found.group(1)


def test_the_console_in_a_browser(site: tuple[Blocker, int, Path], tmp_path: Path) -> None:
    chromium = require_tool("chromium")
    server, port, _ = site
    base = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expires = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        page = browser.new_page()
        page.set_default_timeout(10_000)

        def shot(name: str) -> None:
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

        def log_in(name: str) -> None:
            page.goto(base + "/")
            assert page.url.startswith(base + "/login")
            page.fill("input[name=name]", name)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/")

        page.goto(base + "/")
        shot("01-login")
        log_in("alice")
        assert page.inner_text("h1") == "Overview" and "Sgt. A. Adams" in page.inner_text("header")
        assert "2 address bindings" in page.inner_text("main")
        shot("02-overview")

        page.goto(base + "/explain")
        page.fill("input[name=domain]", "web.whatsapp.com")
        page.fill("input[name=who]", "MPS-000456")
        page.click("form.row button")
        verdict = page.inner_text("section.verdict")
        assert "web.whatsapp.com: BLOCKED" in verdict and "whatsapp.yaml:" in verdict
        assert "device id MPS-000456" in verdict and "standard" in verdict
        shot("03-explain-blocked")
        page.fill("input[name=domain]", "www.example.test")
        page.fill("input[name=who]", "127.0.0.56")
        page.click("form.row button")
        verdict = page.inner_text("section.verdict")
        assert "www.example.test: ALLOWED" in verdict and "matches device MPS-000456" in verdict
        shot("04-explain-allowed")

        assert status_of(dig(server, "web.whatsapp.com", "127.0.0.56")) == "NXDOMAIN"

        page.goto(base + "/exemptions")
        grant = page.locator("form#grant")
        grant.locator("input[name=device]").fill("MPS-000456")
        grant.locator("input[name=allow][value=whatsapp]").check()
        grant.locator("input[name=reference]").fill("CHG-2026-0042")
        grant.locator("input[name=reason]").fill("Witness liaison")
        grant.locator("input[name=expires]").fill(expires)
        grant.locator("button[type=submit]").click()
        page.wait_for_url(re.compile(r".*/exemptions\?request=.*"))
        assert "waiting for a different user with the approver role" in page.inner_text("#notice")
        pending = page.inner_text("table#pending")
        assert "CHG-2026-0042" in pending and "needs another approver" in pending
        assert page.locator("table#pending button", has_text="Approve").count() == 0  # not for the requester
        shot("05-exemptions-requested")
        page.click("header button")  # log out
        page.wait_for_url(base + "/login")

        log_in("bob")
        page.goto(base + "/exemptions")
        shot("06-exemptions-to-approve")
        page.locator("table#pending tr", has_text="CHG-2026-0042").locator("button", has_text="Approve").click()
        page.wait_for_url(re.compile(r".*/exemptions\?request=.*"))
        assert "approved by bob: granted CHG-2026-0042" in page.inner_text("#notice")
        assert "approved" in page.inner_text("table#decided")

        def listed() -> bool:
            page.goto(base + "/exemptions?device=MPS-000456")
            return "CHG-2026-0042" in page.inner_text("table#exemptions")

        wait_until(listed, what="the running policy listing the approved grant")
        row = page.inner_text("table#exemptions")
        assert "Insp. B. Brown" in row and "active" in row and "whatsapp" in row
        shot("07-exemptions-approved")
        wait_until(lambda: status_of(dig(server, "web.whatsapp.com", "127.0.0.56")) == "NOERROR",
                   what="dig seeing the grant")
        assert "157.240.0.30" in dig(server, "web.whatsapp.com", "127.0.0.56")

        page.goto(base + "/explain?domain=web.whatsapp.com&who=MPS-000456")
        assert "EXEMPTED" in page.inner_text("section.verdict")
        assert "CHG-2026-0042" in page.inner_text("section.verdict")
        shot("08-explain-exempted")

        page.goto(base + "/audit")
        events = page.inner_text("table#events")
        assert "Chain verified" in page.inner_text("#chain")
        for kind in ("console_login", "console_request", "console_approved", "grant", "console_view_device"):
            assert kind in events, kind
        assert "console:alice (approved by console:bob)" in events
        shot("09-audit")

        page.goto(base + "/queries?device=MPS-000456")
        assert "web.whatsapp.com" in page.inner_text("table#queries")
        shot("10-queries")

        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.goto(base + "/")
        shot("11-phone-overview")
        page.goto(base + "/exemptions")
        shot("12-phone-exemptions")
        browser.close()
