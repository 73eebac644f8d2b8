"""The mitmproxy addon: blocker's policy at an HTTP(S) proxy, deciding with the resolver's own `decide`.

It never decrypts: a blocked HTTPS destination is refused at CONNECT (regular mode) or, from the
TLS ClientHello's SNI, by failing the handshake before a byte of application data; allowed TLS is
passed through untouched. Blocked plain HTTP gets a short 451 page naming the category, and
DNS-over-HTTPS requests seen in plain HTTP are refused as `doh`. Destinations are resolved
through the configured upstreams, never the host's resolver.

Use: `blocker proxy`, or `mitmdump -s <this file> --set blocker_config=FILE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import dnslib
from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks

if __package__ in (None, ""):  # loaded by path with `mitmdump -s`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blocker.clients import Client, identify
from blocker.clock import Clock
from blocker.domains import InvalidName, normalize
from blocker.errors import ConfigError
from blocker.httpd import OpsServer
from blocker.identity import IdentityService
from blocker.logs import setup_logging
from blocker.message import read_question
from blocker.metrics import Stats
from blocker.policy import Action, Decision, Policy, decide
from blocker.proxy_metrics import ProxyStats, make_proxy_registry
from blocker.source import PolicySource
from blocker.upstream import Upstreams, follow_config

log = logging.getLogger("blocker")

BARE_IP_CHOICES = ("allow", "block")
DOH_CATEGORY = "doh"
IP_LITERAL = "ip_literal"


def is_doh_request(request: http.Request) -> bool:
    """DNS-over-HTTPS by its shape (RFC 8484 and the JSON API), whatever the host."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    accept = request.headers.get("accept", "").lower()
    return (content_type == "application/dns-message" or "application/dns-message" in accept
            or "application/dns-json" in accept or "dns" in request.query
            or request.path.split("?")[0].rstrip("/").endswith("/dns-query"))


def block_page(host: str, decision: Decision, version: str) -> str:
    category = html.escape(decision.category or "")
    return (f"<!doctype html><meta charset=utf-8><title>Blocked</title><h1>Blocked by policy</h1>"
            f"<p>{html.escape(host)} is in the category <b>{category}</b>, which this device may not reach."
            f"</p><p>Policy {html.escape(version)}</p>\n")


class BlockerAddon:
    """Loads the policy from `blocker_config` and enforces it on every connection and request."""

    def __init__(self) -> None:
        self.source: PolicySource | None = None
        self.upstreams: Upstreams | None = None
        self.stats = ProxyStats()
        self.upstream_stats = Stats()
        self.clock = Clock()
        self._refused: dict[str, Decision] = {}  # client connection id -> why its TLS is to be failed
        self._watcher: asyncio.Task[None] | None = None
        self.identity: IdentityService | None = None
        self._ops: OpsServer | None = None
        self._background: set[asyncio.Future[Any]] = set()

    @property
    def policy(self) -> Policy | None:
        return self.source.policy if self.source is not None else None

    def load(self, loader: Loader) -> None:
        from mitmproxy.tools.dump import DumpMaster

        # Under mitmdump (`blocker proxy`, run --quiet) blocker's lines go to stderr as the resolver's
        # do; elsewhere (mitmproxy's console, tests) they go through mitmproxy's own log.
        if isinstance(ctx.master, DumpMaster) and not logging.getLogger("blocker").handlers:
            setup_logging()
        loader.add_option("blocker_config", Optional[str], None, "blocker's config file (YAML)")  # noqa: UP045
        loader.add_option("blocker_bare_ip", str, "allow",
                          "what to do with a connection to a bare IP address without SNI: allow or block")
        loader.add_option("blocker_metrics", str, "127.0.0.1:9154",
                          "host:port for the proxy's /metrics, /healthz and /readyz; empty for none")
        loader.add_option("blocker_log_requests", bool, False,
                          "log one line per decision (stage, action, category, device, host)")

    def configure(self, updated: set[str]) -> None:
        if "blocker_bare_ip" in updated and ctx.options.blocker_bare_ip not in BARE_IP_CHOICES:
            raise exceptions.OptionsError(f"blocker_bare_ip must be one of {', '.join(BARE_IP_CHOICES)}")
        if "proxyauth" in updated and ctx.options.proxyauth == "any":
            log.warning("proxyauth=any accepts every user name and password: proxy user names are NOT taken "
                        "as device ids (clients are identified by address); set real credentials "
                        "(user:pass, @htpasswd or ldap) to identify devices by user name")
        if "blocker_config" in updated:
            path = ctx.options.blocker_config
            config_path = Path(path) if path else None
            try:
                policy = PolicySource.load(config_path)
            except ConfigError as err:
                self.stats.reloaded(False)
                # mitmproxy keeps the old options (and so the old policy) when configure raises.
                raise exceptions.OptionsError(f"blocker_config rejected:\n{err}") from None
            if self.source is not None:
                self.source.close()
            self.source = PolicySource(config_path, policy, self._loaded, self._rejected)
            self._loaded(policy, "configure", 0.0)
            if self._watcher is not None:  # already running: watch the new files instead
                self._watcher.cancel()
                self._watcher = asyncio.get_running_loop().create_task(self.source.watch())

    def _loaded(self, policy: Policy, why: str, milliseconds: float) -> None:
        self.upstreams = follow_config(self.upstreams, policy.config.dns, self.upstream_stats)
        self.stats.prepare(policy.lists.categories)
        self.stats.reloaded(True)
        log.info("proxy policy=%s loaded (%s) from %s in %.0f ms", policy.version, why, policy.config.source_name,
                 milliseconds)

    def _rejected(self, err: ConfigError | Exception, why: str) -> None:
        self.stats.reloaded(False)
        version = self.policy.version if self.policy is not None else "-"
        problems = err.problems if isinstance(err, ConfigError) else [f"internal error: {err}"]
        for problem in problems:
            log.error("proxy reload (%s) rejected, keeping policy %s: %s", why, version, problem)

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.source is not None:
            self._watcher = loop.create_task(self.source.watch())
        if self.policy is not None and IdentityService.wanted(self.policy.config.identity) and self.identity is None:
            # The same bindings as the resolver: mirrored from the store, or followed in its snapshot file.
            self.identity = IdentityService(self.policy.config.identity, self.clock.time, mirror=True)
            task = loop.create_task(self.identity.start())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform/loop
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        listen = ctx.options.blocker_metrics
        if listen:
            host, _, port = listen.rpartition(":")
            registry = make_proxy_registry(self.stats, self.upstream_stats, lambda: self.policy)
            self._ops = OpsServer(host.strip("[]"), int(port), registry, lambda: self.policy is not None)
            self._ops.start()
            log.info("proxy metrics=http://%s/metrics", listen)
        policy = self.policy
        log.info("proxy ready mode=%s policy=%s upstreams=%s bare_ip=%s",
                 ",".join(ctx.options.mode), policy.version if policy else "-",
                 ",".join(self.upstreams.names) if self.upstreams else "none", ctx.options.blocker_bare_ip)

    def _sighup(self) -> None:
        if self.source is not None:
            future = asyncio.ensure_future(self.source.reload("SIGHUP"))
            self._background.add(future)
            future.add_done_callback(self._background.discard)

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.identity is not None:
            for task in self.identity._tasks:
                task.cancel()
        if self.source is not None:
            self.source.close()
        if self._ops is not None:
            self._ops.stop()
        if self.upstreams is not None:
            self.upstreams.close()

    # --- who and what --------------------------------------------------------------------------

    def _client(self, client: connection.Client, username: str | None) -> Client:
        """The client by its proxy-auth username (a device id), else by source address."""
        policy = self._policy()
        address = str(client.peername[0]) if client.peername else ""
        by_address = identify(policy, address, bindings=self.identity.table if self.identity else None)
        # With proxyauth=any, anyone may claim any device id: user names are then not identity.
        if username and username in policy.devices and ctx.options.proxyauth != "any":
            device = policy.devices[username]
            return Client(address, device.id, device.group, by_address.allowed, "proxyauth", device)
        return by_address

    def _policy(self) -> Policy:
        if self.policy is None:
            raise exceptions.OptionsError("blocker_config is not loaded")
        return self.policy

    def _decide_host(self, client: Client, host: str) -> Decision:
        policy = self._policy()
        if _is_ip(host):
            if not client.allowed:
                return Decision(Action.REFUSED, client.group)
            if ctx.options.blocker_bare_ip == "block":
                return Decision(Action.BLOCKED, client.group, category=IP_LITERAL)
            return Decision(Action.ALLOWED, client.group, category=IP_LITERAL)
        try:
            name = normalize(host)
        except InvalidName:
            return Decision(Action.BLOCKED, client.group, category="invalid_name")
        return decide(policy, client, name, self.clock.now())

    @staticmethod
    def _username(client: connection.Client, flow: http.HTTPFlow | None = None) -> str | None:
        if flow is not None and "proxyauth" in flow.metadata:
            return str(flow.metadata["proxyauth"][0])
        auth = ctx.master.addons.get("proxyauth")
        credentials = auth.authenticated.get(client) if auth is not None else None
        return str(credentials[0]) if credentials else None

    def _count(self, kind: str, decision: Decision, client: Client, host: str) -> None:
        # A refused client counts as blocked: the proxy answers both the same way.
        action = Action.BLOCKED if decision.action in (Action.BLOCKED, Action.REFUSED) else decision.action
        self.stats.request(kind, action, decision.category or "none")
        if ctx.options.blocker_log_requests:
            log.info("proxy %s %s category=%s device=%s client=%s host=%s", kind, action.value,
                     decision.category or "-", client.device or "-", client.address, host)

    # --- hooks ---------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Regular mode: refuse a blocked destination at CONNECT, before any TLS."""
        if flow.response is not None:  # e.g. 407 from proxyauth
            return
        client = self._client(flow.client_conn, self._username(flow.client_conn, flow))
        decision = self._decide_host(client, flow.request.host)
        self._count("connect", decision, client, flow.request.host)
        if decision.action in (Action.BLOCKED, Action.REFUSED):
            flow.response = http.Response.make(
                451, block_page(flow.request.host, decision, self._policy().version),
                {"Content-Type": "text/html; charset=utf-8", "X-Blocker-Category": decision.category or ""})

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Every mode: decide by SNI; pass allowed TLS through untouched, fail blocked TLS."""
        client_conn = data.context.client
        client = self._client(client_conn, self._username(client_conn))
        # Without SNI, the destination the client asked for (a name in SOCKS5, else a bare IP).
        server = data.context.server.address
        host = data.client_hello.sni or (str(server[0]) if server else "0.0.0.0")
        decision = self._decide_host(client, host)
        self._count("tls", decision, client, host)
        if decision.action in (Action.BLOCKED, Action.REFUSED):
            self._refused[client_conn.id] = decision
        else:
            data.ignore_connection = True  # passthrough: no interception, nothing decrypted

    def tls_start_client(self, data: tls.TlsData) -> None:
        """Fail the handshake of a refused connection: a TLS context without a certificate."""
        decision = self._refused.pop(data.context.client.id, None)
        if decision is None:
            return
        from OpenSSL import SSL

        # mitmproxy's own TLS setup returns early when ssl_conn is already set.
        data.ssl_conn = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD))
        data.ssl_conn.set_accept_state()

    def request(self, flow: http.HTTPFlow) -> None:
        """Plain HTTP: 451 page for blocked hosts and for DNS-over-HTTPS requests."""
        if flow.response is not None:
            return
        client = self._client(flow.client_conn, self._username(flow.client_conn, flow))
        policy = self._policy()
        host = flow.request.pretty_host
        decision = self._decide_host(client, host)
        if (decision.action not in (Action.BLOCKED, Action.REFUSED) and is_doh_request(flow.request)
                and DOH_CATEGORY in policy.group_blocks.get(client.group, frozenset())):
            decision = Decision(Action.BLOCKED, client.group, frozenset({DOH_CATEGORY}), DOH_CATEGORY)
        self._count("http", decision, client, host)
        if decision.action in (Action.BLOCKED, Action.REFUSED):
            flow.response = http.Response.make(
                451, block_page(host, decision, policy.version),
                {"Content-Type": "text/html; charset=utf-8", "X-Blocker-Category": decision.category or ""})

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Resolve the destination through the configured upstreams; refuse blocked CNAME chains."""
        if data.server.address is None:
            return
        host, port = data.server.address[0], data.server.address[1]
        if _is_ip(host) or self.upstreams is None:
            return
        addresses, targets = await resolve_addresses(self.upstreams, str(host))
        client = self._client(data.client, self._username(data.client))
        for target in targets:
            decision = self._decide_host(client, target)
            if decision.action is Action.BLOCKED:
                self._count("connect", decision, client, target)
                data.server.error = f"blocked: category={decision.category} (via CNAME {target})"
                return
        if not addresses:
            data.server.error = f"cannot resolve {host} through the configured upstreams"
            return
        data.server.address = (addresses[0], port)


async def resolve_addresses(upstreams: Upstreams, name: str) -> tuple[list[str], list[str]]:
    """The IPv4 (else IPv6) addresses of a name through the configured upstreams, and the CNAME
    targets met on the way. For the proxy: it must never ask the host's own resolver."""
    addresses: list[str] = []
    targets: list[str] = []
    for qtype in ("A", "AAAA"):
        wire = dnslib.DNSRecord.question(name, qtype).pack()
        answer = await upstreams.resolve(read_question(bytes(wire)))
        if answer is None:
            continue
        try:
            record = dnslib.DNSRecord.parse(answer)
        except dnslib.DNSError:
            continue
        for rr in record.rr:
            if rr.rtype == dnslib.QTYPE.CNAME:
                targets.append(str(rr.rdata.label).rstrip(".").lower())
            elif rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA):
                addresses.append(str(rr.rdata))
        if addresses:
            break
    return addresses, targets


def _is_ip(host: Any) -> bool:
    try:
        ipaddress.ip_address(str(host))
    except ValueError:
        return False
    return True


addons = [BlockerAddon()]
