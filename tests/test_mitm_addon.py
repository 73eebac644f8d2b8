"""The addon's hooks in-process, with mitmproxy's own test helpers and a real TLS ClientHello."""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from mitmproxy import connection, exceptions, tls
from mitmproxy.options import Options
from mitmproxy.proxy import context
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.test import taddons, tflow, tutils

from blocker.mitm_addon import BlockerAddon, is_doh_request

CONFIG = f"""\
blocklists: "{ROOT / 'blocklists'}"
policy:
  devices:
    - {{id: MPS-EXEMPT, addresses: ["192.0.2.2"], group: standard}}
    - {{id: MPS-COMMS, addresses: ["192.0.2.3"], group: comms-team}}
  exemptions:
    - {{device: MPS-EXEMPT, allow: [whatsapp], approved_by: a, reference: CHG-1, reason: r,
       expires: 2099-01-01T00:00:00Z}}
dns:
  allow_networks: ["192.0.2.0/24", "127.0.0.0/8"]
  upstreams: ["127.0.0.1:9"]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "blocker.yaml"
    path.write_text(CONFIG)
    return path


TLS_CLIENT = ssl.create_default_context()


def client_hello(sni: str | None) -> object:
    """The bytes a real TLS client sends first, parsed as mitmproxy parses them."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = TLS_CLIENT.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return parse_client_hello(outgoing.read())


def hello_data(sni: str | None, source: str) -> tls.ClientHelloData:
    client = connection.Client(peername=(source, 50000), sockname=("127.0.0.1", 8080), timestamp_start=0)
    return tls.ClientHelloData(context.Context(client, Options()), client_hello(sni))  # type: ignore[arg-type]


@pytest.mark.parametrize(("sni", "source", "passthrough"), [
    pytest.param("www.tiktok.com", "192.0.2.9", False, id="blocked-sni"),
    pytest.param("www.bbc.co.uk", "192.0.2.9", True, id="allowed-sni-passthrough"),
    pytest.param("www.tiktok.com", "192.0.2.3", True, id="comms-team-tiktok"),
    pytest.param("web.whatsapp.com", "192.0.2.2", True, id="exempt-whatsapp"),
    pytest.param("whatsapp-cdn-shv-01-lhr8.fbcdn.net", "192.0.2.2", True, id="exempt-whatsapp-on-fbcdn"),
    pytest.param("scontent-lhr8-1.xx.fbcdn.net", "192.0.2.2", False, id="exempt-device-facebook-closed"),
    pytest.param("dns.google", "192.0.2.9", False, id="doh-provider"),
    pytest.param("www.bbc.co.uk", "198.51.100.1", False, id="outside-allow-networks"),
])
def test_clienthello_decides_by_sni(config: Path, sni: str, source: str, passthrough: bool) -> None:
    addon = BlockerAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, blocker_config=str(config))
        data = hello_data(sni, source)
        addon.tls_clienthello(data)
        assert data.ignore_connection is passthrough
        start = tls.TlsData(data.context.client, data.context)
        addon.tls_start_client(start)
        # A refused connection gets a TLS context with no certificate: the handshake fails.
        assert (start.ssl_conn is not None) is (not passthrough)


@pytest.mark.parametrize(("choice", "passthrough"), [("allow", True), ("block", False)])
def test_bare_ip_without_sni_follows_the_option(config: Path, choice: str, passthrough: bool) -> None:
    addon = BlockerAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, blocker_config=str(config), blocker_bare_ip=choice)
        data = hello_data(None, "192.0.2.9")
        data.context.server.address = ("203.0.113.5", 443)
        addon.tls_clienthello(data)
        assert data.ignore_connection is passthrough
        assert addon.stats.requests[("allowed" if passthrough else "blocked", "ip_literal")] == 1


def test_blocked_plain_http_gets_451_and_allowed_passes(config: Path) -> None:
    addon = BlockerAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, blocker_config=str(config))
        blocked = tflow.tflow(req=tutils.treq(host="www.tiktok.com", headers=[(b"Host", b"www.tiktok.com")]))
        blocked.client_conn.peername = ("192.0.2.9", 40000)
        addon.request(blocked)
        assert blocked.response is not None and blocked.response.status_code == 451
        assert b"<b>tiktok</b>" in blocked.response.content  # type: ignore[operator]
        assert blocked.response.headers["X-Blocker-Category"] == "tiktok"
        allowed = tflow.tflow(req=tutils.treq(host="www.bbc.co.uk", headers=[(b"Host", b"www.bbc.co.uk")]))
        allowed.client_conn.peername = ("192.0.2.9", 40000)
        addon.request(allowed)
        assert allowed.response is None


def test_doh_request_shapes() -> None:
    def request(path: str, **headers: str) -> object:
        return tutils.treq(path=path.encode(), headers=[(k.replace("_", "-").encode(), v.encode())
                                                        for k, v in headers.items()])
    assert is_doh_request(request("/dns-query"))  # type: ignore[arg-type]
    assert is_doh_request(request("/resolve?dns=AAABAAAB"))  # type: ignore[arg-type]
    assert is_doh_request(request("/x", content_type="application/dns-message"))  # type: ignore[arg-type]
    assert is_doh_request(request("/resolve?name=x", accept="application/dns-json"))  # type: ignore[arg-type]
    assert not is_doh_request(request("/index.html", accept="text/html"))  # type: ignore[arg-type]


def test_broken_config_raises_options_error_and_keeps_the_old_policy(config: Path, tmp_path: Path) -> None:
    addon = BlockerAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, blocker_config=str(config))
        version = addon.policy.version  # type: ignore[union-attr]
        broken = tmp_path / "broken.yaml"
        broken.write_text("dns:\n  cache_size: lots\n")
        with pytest.raises(exceptions.OptionsError) as caught:
            tctx.configure(addon, blocker_config=str(broken))
        assert f"{broken}:2: dns.cache_size" in str(caught.value)
        assert addon.policy is not None and addon.policy.version == version
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, blocker_bare_ip="sometimes")


def test_decisions_never_read_a_list_file_even_with_a_bulk_include(tmp_path: Path) -> None:
    """The proxy decides on the fast path: the explaining lookup (which finds a bulk rule's line by
    reading its file again, 0.4 s per decision with a million names) is for `blocker check` only."""
    lists = tmp_path / "lists"
    lists.mkdir()
    names = [f"host{i}.bulk.example" for i in range(200_000)]
    (lists / "bulk.txt").write_text("\n".join(names) + "\n")
    (lists / "bulk.yaml").write_text("name: bulk\ndomains: []\ninclude: [bulk.txt]\n")
    config = tmp_path / "blocker.yaml"
    config.write_text(f'blocklists: "{lists}"\npolicy:\n  groups:\n    standard: {{block: [bulk]}}\n'
                      'dns:\n  upstreams: ["127.0.0.1:9"]\n')
    opened: list[str] = []
    watching = False

    def hook(event: str, args: tuple[object, ...]) -> None:
        if watching and event == "open":
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one is inert outside the loop below
    addon = BlockerAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, blocker_config=str(config))
        hellos = [hello_data(name, "127.0.0.9") for name in names[-1000:]]
        watching = True
        for data in hellos:
            addon.tls_clienthello(data)
        watching = False
    assert not opened, opened[:3]
    assert addon.stats.requests[("blocked", "bulk")] == 1000


def test_a_new_config_is_followed_by_the_upstreams_and_every_series_starts_at_zero(config: Path,
                                                                                     tmp_path: Path) -> None:
    addon = BlockerAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, blocker_config=str(config))
        first = addon.upstreams
        assert first is not None and first.timeout == 2.0
        assert addon.stats.requests[("blocked", "tiktok")] == 0
        assert addon.stats.requests[("allowed", "ip_literal")] == 0
        slower = tmp_path / "slower.yaml"
        slower.write_text(CONFIG.replace('upstreams: ["127.0.0.1:9"]', 'upstreams: ["127.0.0.1:9"]\n'
                                         "  upstream_timeout: 4.5"))
        tctx.configure(addon, blocker_config=str(slower))
        assert addon.upstreams is not first and addon.upstreams.timeout == 4.5  # type: ignore[union-attr]


def test_blocker_log_requests_logs_one_line_per_decision(config: Path,
                                                        blocker_log: pytest.LogCaptureFixture) -> None:
    addon = BlockerAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, blocker_config=str(config))
        with blocker_log.at_level(logging.INFO, logger="blocker"):
            addon.tls_clienthello(hello_data("www.tiktok.com", "192.0.2.9"))
            assert "proxy tls blocked" not in blocker_log.text  # off by default
            tctx.configure(addon, blocker_log_requests=True)
            addon.tls_clienthello(hello_data("www.tiktok.com", "192.0.2.9"))
    assert "proxy tls blocked category=tiktok device=- client=192.0.2.9 host=www.tiktok.com" in blocker_log.text
