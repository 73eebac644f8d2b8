"""The configuration file: YAML → frozen dataclasses per section, with defaults and FILE:LINE errors.

Unknown keys are errors: a typo must never silently weaken the policy. Paths are relative to the
config file. Without a file, `embedded_defaults()` gives the behaviour `blocker serve` documents.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from blocker.cache import DEFAULT_BYTES as DEFAULT_CACHE_BYTES
from blocker.errors import ConfigError, Problem
from blocker.yamlfile import Collector, Reader, compose

MAX_WORKERS = 256

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Endpoint = tuple[str, int]

SHIPPED_CATEGORIES = ("tiktok", "twitter", "facebook", "instagram", "snapchat", "threads",
                      "whatsapp", "telegram", "signal", "doh")
MESSAGING_CATEGORIES = ("whatsapp", "telegram", "signal", "doh")
PROXY_MODES = ("regular", "transparent", "socks5", "wireguard")
BLOCK_KINDS = ("nxdomain", "refused", "null", "ip")
EXPIRY_WARNING_DAYS = 14  # `policy.expiry_warning_days`: validate, `exemptions list --expiring`, the metric


@dataclass(frozen=True, slots=True)
class BlockResponse:
    """How a blocked name is answered: `nxdomain`, `refused`, `null` (0.0.0.0 / ::) or `ip`."""

    kind: str = "nxdomain"
    ipv4: str | None = None
    ipv6: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Queries a second per client address beyond which it is answered REFUSED (or dropped); 0 = off."""

    qps: float = 0.0
    burst: float = 0.0
    action: str = "refused"


@dataclass(frozen=True, slots=True)
class DnsConfig:
    listen: tuple[Endpoint, ...] = (("127.0.0.1", 8053),)  # 5353 is mDNS (avahi, mDNSResponder)
    upstreams: tuple[Endpoint, ...] = ()
    allow_networks: tuple[IPNetwork, ...] = tuple(
        ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8"))
    block_response: BlockResponse = BlockResponse()
    block_ttl: int = 60
    cache_size: int = 100_000
    trusted_forwarders: tuple[IPNetwork, ...] = ()
    upstream_timeout: float = 2.0
    upstream_0x20: bool = True  # randomise the case of names sent upstream (falls back per upstream)
    serve_stale: float = 86_400  # seconds an expired answer may still be served when upstreams fail
    rate_limit: RateLimit = RateLimit()
    max_outstanding_per_client: int = 2048  # queries one client may have waiting on the upstreams
    # Memory and connection bounds (see README: why these defaults).
    cache_bytes: int = DEFAULT_CACHE_BYTES
    tcp_max_connections: int = 1000
    tcp_max_per_client: int = 20
    tcp_write_timeout: float = 5.0
    tcp_idle_timeout: float = 10.0  # RFC 7766 §6.2.3: seconds a client connection may sit idle
    workers: int = 1  # resolver processes sharing the listen sockets (SO_REUSEPORT); "auto" = usable cores


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Endpoint | None = ("127.0.0.1", 9153)


@dataclass(frozen=True, slots=True)
class QueryLogConfig:
    path: Path | None = None
    only_blocked: bool = False
    mode: str = "0600"  # octal, of a newly created log file: it names every handset's lookups


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """`audit.path`: the append-only, hash-chained trail of exemption events (None: logs only)."""

    path: Path | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: Endpoint = ("127.0.0.1", 8080)
    mode: str = "regular"


@dataclass(frozen=True, slots=True)
class ProxyAuthConfig:
    """SSO in front of the console: the user name in `header`, believed only from `trusted_proxies`."""

    header: str = "X-Forwarded-User"
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """The admin console in the browser (off unless `enabled: true`)."""

    enabled: bool = False
    listen: Endpoint = ("127.0.0.1", 9155)
    users: Path | None = None  # the users file `blocker console add-user` writes
    requests: Path | None = None  # pending four-eyes requests (JSON); default beside the users file
    secure_cookies: bool = False  # set when the console is reached over HTTPS (TLS here or at a proxy)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates from this CA; the user is their commonName
    session_minutes: int = 480
    login_attempts: int = 5  # failed logins per user name or per address before a lockout
    lockout_seconds: int = 300
    proxy_auth: ProxyAuthConfig | None = None


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    block: tuple[str, ...]
    line: int = 0


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    addresses: tuple[IPNetwork, ...]
    group: str
    line: int = 0


@dataclass(frozen=True, slots=True)
class Exemption:
    """A time-limited grant of categories to one device, with its paper trail."""

    device: str
    allow: tuple[str, ...]
    approved_by: str
    reference: str
    reason: str
    expires: datetime
    starts: datetime | None = None  # optional: a grant approved ahead of the operation it is for
    file: str = ""
    line: int = 0

    def active(self, now: datetime) -> bool:
        return (self.starts is None or self.starts <= now) and now < self.expires


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    default_group: str = "standard"
    groups: dict[str, Group] = field(default_factory=lambda: default_groups())
    devices: tuple[Device, ...] = ()
    exemptions: tuple[Exemption, ...] = ()
    # `policy.exemptions_file`: exemptions kept in a file of their own (the one the commands edit).
    exemptions_file: Path | None = None
    expiry_warning_days: int = 14  # EXPIRY_WARNING_DAYS
    inventory: tuple[Path, ...] = ()  # device inventory files (CSV or YAML), see blocker/inventory.py


RADIUS_DEVICE_ATTRIBUTES = ("User-Name", "Calling-Station-Id", "Class")


@dataclass(frozen=True, slots=True)
class RadiusConfig:
    """`identity.radius_accounting`: where the VPN gateway's accounting stream arrives."""

    listen: Endpoint = ("0.0.0.0", 1813)
    secret_file: Path = Path("radius.secret")
    clients: tuple[IPNetwork, ...] = ()
    device_attribute: str = "User-Name"
    device_regex: str | None = None  # the device id is the first group (or the group named `device`)
    binding_ttl: float | None = None  # None: 3 x Acct-Interim-Interval, else one hour
    max_bindings: int = 500_000


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """`identity.store`: the Redis/Valkey shared by every replica for bindings."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "blocker"


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """`identity`: dynamic address -> device bindings (RADIUS accounting, snapshot, shared store)."""

    radius_accounting: RadiusConfig | None = None
    snapshot: Path | None = None
    store: StoreConfig | None = None
    vpn_networks: tuple[IPNetwork, ...] = ()  # queries from here with no identity are counted


@dataclass(frozen=True, slots=True)
class Config:
    dns: DnsConfig
    metrics: MetricsConfig
    blocklists: Path
    query_log: QueryLogConfig
    proxy: ProxyConfig
    policy: PolicyConfig
    identity: IdentityConfig = IdentityConfig()
    source: Path | None = None
    # Lines of the config file for the sections that later checks refer to.
    lines: dict[str, int] = field(default_factory=dict)
    console: ConsoleConfig = ConsoleConfig()
    audit: AuditConfig = AuditConfig()
    warnings: tuple[Problem, ...] = ()

    @property
    def source_name(self) -> str:
        return str(self.source) if self.source else "<embedded defaults>"


def default_groups() -> dict[str, Group]:
    return {
        "standard": Group("standard", SHIPPED_CATEGORIES),
        "comms-team": Group("comms-team", MESSAGING_CATEGORIES),
    }


def shipped_blocklists() -> Path:
    """The `blocklists/` folder installed with the package (or at the top of a checkout)."""
    here = Path(__file__).resolve().parent
    installed = here / "blocklists"  # where the wheel puts them (pyproject maps blocklists/ there)
    if installed.is_dir():
        return installed
    return here.parent / "blocklists"


def system_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[Endpoint, ...]:
    """The `nameserver` lines of resolv.conf, on port 53."""
    found: list[Endpoint] = []
    try:
        lines = resolv_conf.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            host = parts[1].split("%", 1)[0]
            try:
                ipaddress.ip_address(host)
            except ValueError:
                continue
            found.append((host, 53))
    return tuple(found)


def embedded_defaults() -> Config:
    """The configuration `blocker serve` runs without --config."""
    return Config(
        dns=DnsConfig(upstreams=system_upstreams()),
        metrics=MetricsConfig(),
        blocklists=shipped_blocklists(),
        query_log=QueryLogConfig(),
        proxy=ProxyConfig(),
        policy=PolicyConfig(),
    )


_TOP_KEYS = {"dns", "metrics", "blocklists", "query_log", "proxy", "policy", "audit", "console",
             "identity"}
_DNS_KEYS = {"listen", "upstreams", "allow_networks", "block_response", "block_ttl", "cache_size",
             "trusted_forwarders", "upstream_timeout", "upstream_0x20", "serve_stale", "rate_limit",
             "max_outstanding_per_client", "cache_bytes", "tcp_max_connections", "tcp_max_per_client",
             "tcp_write_timeout", "tcp_idle_timeout", "workers"}
_RATE_LIMIT_KEYS = {"qps", "burst", "action"}
RATE_LIMIT_ACTIONS = ("refused", "drop")
_POLICY_KEYS = {"default_group", "groups", "devices", "exemptions", "exemptions_file", "expiry_warning_days",
                "inventory"}
_IDENTITY_KEYS = {"radius_accounting", "snapshot", "store", "vpn_networks"}
_RADIUS_KEYS = {"listen", "secret_file", "clients", "device_attribute", "binding_ttl", "max_bindings"}
_DEVICE_KEYS = {"id", "addresses", "group"}
_EXEMPTION_KEYS = {"device", "allow", "approved_by", "reference", "reason", "expires", "starts"}


def load_config(path: Path | None, texts: dict[Path, str] | None = None) -> Config:
    """Read a config file (or the embedded defaults for None); raises ConfigError.

    `texts` stands in for the content of some files (by path): the exemption commands check the
    policy a change would give before they write it.
    """
    if path is None:
        return embedded_defaults()
    texts = texts or {}
    problems = Collector()
    warnings = Collector()
    file = str(path)
    root = compose(path, problems, texts.get(path))
    if problems.problems:
        raise ConfigError(problems.problems)
    read = Reader(file, problems)
    top = read.mapping(root, "config", _TOP_KEYS)
    base = path.parent
    lines = {key: node.start_mark.line + 1 for key, node in top.items()}
    config = Config(
        dns=_dns(read, top.get("dns"), warnings),
        metrics=_metrics(read, top.get("metrics")),
        blocklists=_blocklists_path(read, top.get("blocklists"), base),
        query_log=_query_log(read, top.get("query_log"), base),
        proxy=_proxy(read, top.get("proxy")),
        policy=_policy(read, top.get("policy"), lines, base, texts, warnings),
        identity=_identity(read, top.get("identity"), base),
        source=path,
        lines=lines,
        console=_console(read, top.get("console"), base),
        audit=_audit(read, top.get("audit"), base),
        warnings=tuple(warnings.problems),
    )
    if config.console.enabled and config.audit.path is None:
        read.error(top.get("console"), "console.enabled needs audit.path: every console view, request and "
                                       "approval is written to the audit trail")
    if problems.problems:
        raise ConfigError(problems.problems)
    return config


def _audit(read: Reader, node: yaml.Node | None, base: Path) -> AuditConfig:
    fields = read.mapping(node, "audit", {"path"})
    if "path" not in fields or (isinstance(fields["path"], yaml.ScalarNode)
                                and fields["path"].tag.endswith(":null")):
        return AuditConfig()
    text = read.string(fields["path"], "audit.path")
    return AuditConfig(base / text if text else None)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    try:
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def _endpoints(read: Reader, node: yaml.Node | None, where: str) -> tuple[Endpoint, ...]:
    out = []
    for item in read.sequence(node, where):
        endpoint = read.endpoint(item, f"{where} entry")
        if endpoint is not None:
            out.append(endpoint)
    return tuple(out)


def _networks(read: Reader, node: yaml.Node | None, where: str,
              warnings: Collector | None = None) -> tuple[IPNetwork, ...]:
    out = []
    for item in read.sequence(node, where):
        network = read.network(item, f"{where} entry")
        if network is not None:
            out.append(network)
            text = str(item.value).strip()
            if warnings is not None and "/" in text and text != network.with_prefixlen:
                # 10.8.0.9/24 is read as 10.8.0.0/24: 256 addresses where one was probably meant.
                warnings.add(read.file, item, f"{where}: '{text}' has host bits set: it means "
                                              f"{network.with_prefixlen} ({network.num_addresses} addresses)")
    return tuple(out)


def _dns(read: Reader, node: yaml.Node | None, warnings: Collector) -> DnsConfig:
    fields = read.mapping(node, "dns", _DNS_KEYS)
    defaults = DnsConfig()
    values: dict[str, object] = {}
    if "listen" in fields:
        values["listen"] = _endpoints(read, fields["listen"], "dns.listen")
        if not values["listen"]:
            read.error(fields["listen"], "dns.listen needs at least one address")
    if "upstreams" in fields:
        values["upstreams"] = _endpoints(read, fields["upstreams"], "dns.upstreams")
        if not values["upstreams"]:
            read.error(fields["upstreams"], "dns.upstreams needs at least one server")
        for _host, port in values["upstreams"]:  # type: ignore[attr-defined]
            if port == 0:
                read.error(fields["upstreams"], "dns.upstreams: port 0 is not a server port")
    else:
        values["upstreams"] = system_upstreams()
    if "allow_networks" in fields:
        values["allow_networks"] = _networks(read, fields["allow_networks"], "dns.allow_networks", warnings)
    if "trusted_forwarders" in fields:
        values["trusted_forwarders"] = _networks(read, fields["trusted_forwarders"], "dns.trusted_forwarders",
                                                 warnings)
    if "block_response" in fields:
        values["block_response"] = _block_response(read, fields["block_response"])
    if "block_ttl" in fields:
        ttl = read.integer(fields["block_ttl"], "dns.block_ttl", 0, 86400)
        values["block_ttl"] = defaults.block_ttl if ttl is None else ttl
    if "cache_size" in fields:
        size = read.integer(fields["cache_size"], "dns.cache_size", 0, 10_000_000)
        values["cache_size"] = defaults.cache_size if size is None else size
    if "upstream_timeout" in fields:
        timeout = read.number(fields["upstream_timeout"], "dns.upstream_timeout", 0.05)
        values["upstream_timeout"] = defaults.upstream_timeout if timeout is None else timeout
    if "upstream_0x20" in fields:
        flag = read.boolean(fields["upstream_0x20"], "dns.upstream_0x20")
        values["upstream_0x20"] = defaults.upstream_0x20 if flag is None else flag
    if "serve_stale" in fields:
        stale = read.number(fields["serve_stale"], "dns.serve_stale", 0.0)
        values["serve_stale"] = defaults.serve_stale if stale is None else stale
    if "max_outstanding_per_client" in fields:
        cap = read.integer(fields["max_outstanding_per_client"], "dns.max_outstanding_per_client", 0, 1_000_000)
        values["max_outstanding_per_client"] = defaults.max_outstanding_per_client if cap is None else cap
    if "rate_limit" in fields:
        values["rate_limit"] = _rate_limit(read, fields["rate_limit"])
    _dns_bounds(read, fields, values)
    return DnsConfig(**values)  # type: ignore[arg-type]


def _rate_limit(read: Reader, node: yaml.Node) -> RateLimit:
    fields = read.mapping(node, "dns.rate_limit", _RATE_LIMIT_KEYS)
    qps = read.number(fields["qps"], "dns.rate_limit.qps", 0.0) if "qps" in fields else None
    qps = qps or 0.0
    burst = read.number(fields["burst"], "dns.rate_limit.burst", 1.0) if "burst" in fields else None
    action = "refused"
    if "action" in fields:
        text = read.string(fields["action"], "dns.rate_limit.action")
        if text is not None and text not in RATE_LIMIT_ACTIONS:
            read.error(fields["action"], f"dns.rate_limit.action must be refused or drop, got '{text}'")
        elif text is not None:
            action = text
    return RateLimit(qps, burst if burst is not None else 2 * qps, action)


def _dns_bounds(read: Reader, fields: dict[str, yaml.Node], values: dict[str, object]) -> None:
    """The memory and connection bounds of the dns section."""
    defaults = DnsConfig()
    if "cache_bytes" in fields:
        size = _byte_size(read, fields["cache_bytes"], "dns.cache_bytes")
        values["cache_bytes"] = defaults.cache_bytes if size is None else size
    for key, low, high in (("tcp_max_connections", 1, 1_000_000), ("tcp_max_per_client", 1, 1_000_000)):
        if key in fields:
            number = read.integer(fields[key], f"dns.{key}", low, high)
            values[key] = getattr(defaults, key) if number is None else number
    if "tcp_write_timeout" in fields:
        timeout = read.number(fields["tcp_write_timeout"], "dns.tcp_write_timeout", 0.05)
        values["tcp_write_timeout"] = defaults.tcp_write_timeout if timeout is None else timeout
    if "tcp_idle_timeout" in fields:
        timeout = read.number(fields["tcp_idle_timeout"], "dns.tcp_idle_timeout", 0.05)
        values["tcp_idle_timeout"] = defaults.tcp_idle_timeout if timeout is None else timeout
    if "workers" in fields:
        node = fields["workers"]
        if isinstance(node, yaml.ScalarNode) and node.value == "auto":
            values["workers"] = usable_cores()
        else:
            number = read.integer(node, "dns.workers (a number or auto)", 1, MAX_WORKERS)
            values["workers"] = defaults.workers if number is None else number


_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def _byte_size(read: Reader, node: yaml.Node, where: str) -> int | None:
    """A size in bytes: a number, or a number with a unit (`64MiB`, `512k`, `1 GiB`; powers of 1024)."""
    written = node.value.strip() if isinstance(node, yaml.ScalarNode) else ""
    text = written.lower()
    number = text.rstrip("bgikm ")
    unit = text[len(number):].strip()
    if not number.isdigit() or unit not in _BYTE_UNITS:
        read.error(node, f"{where} must be a size in bytes such as 134217728 or 128MiB, got '{written}'")
        return None
    size = int(number) * _BYTE_UNITS[unit]
    if size > 64 * 1024**3:
        read.error(node, f"{where} must be at most 64GiB")
        return None
    return size


def _block_response(read: Reader, node: yaml.Node) -> BlockResponse:
    # The documented form is `block_response: null`, unquoted: YAML reads a null, so the word is taken as written.
    if isinstance(node, yaml.ScalarNode) and node.value == "null":
        return BlockResponse("null")
    text = read.string(node, "dns.block_response")
    if text is None:
        return BlockResponse()
    if text in ("nxdomain", "refused", "null"):
        return BlockResponse(text)
    if text.startswith("ip:"):
        ipv4 = ipv6 = None
        for part in text[3:].split(","):
            try:
                address = ipaddress.ip_address(part.strip())
            except ValueError:
                read.error(node, f"dns.block_response: '{part.strip()}' is not an IP address")
                return BlockResponse()
            if address.version == 4:
                ipv4 = str(address)
            else:
                ipv6 = str(address)
        return BlockResponse("ip", ipv4, ipv6)
    read.error(node, f"dns.block_response must be nxdomain, refused, null or ip:ADDR[,ADDR], got '{text}'")
    return BlockResponse()


def _metrics(read: Reader, node: yaml.Node | None) -> MetricsConfig:
    fields = read.mapping(node, "metrics", {"listen"})
    if "listen" not in fields:
        return MetricsConfig()
    listen = fields["listen"]
    if isinstance(listen, yaml.ScalarNode) and listen.tag.endswith(":null"):
        return MetricsConfig(None)
    return MetricsConfig(read.endpoint(listen, "metrics.listen") or MetricsConfig().listen)


def _blocklists_path(read: Reader, node: yaml.Node | None, base: Path) -> Path:
    if node is None:
        return base / "blocklists"
    text = read.string(node, "blocklists")
    return (base / text) if text else base / "blocklists"


def _query_log(read: Reader, node: yaml.Node | None, base: Path) -> QueryLogConfig:
    fields = read.mapping(node, "query_log", {"path", "only_blocked", "mode"})
    path = None
    if "path" in fields and not (isinstance(fields["path"], yaml.ScalarNode)
                                 and fields["path"].tag.endswith(":null")):
        text = read.string(fields["path"], "query_log.path")
        path = base / text if text else None
    only_blocked = False
    if "only_blocked" in fields:
        only_blocked = bool(read.boolean(fields["only_blocked"], "query_log.only_blocked"))
    mode = QueryLogConfig().mode
    if "mode" in fields:
        node = fields["mode"]
        text = node.value if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"') else None
        if text is None or not re.fullmatch(r"0?[0-7]{3}", text):
            read.error(node, "query_log.mode must be a quoted octal file mode such as \"0600\" or \"0640\"")
        else:
            mode = text
    return QueryLogConfig(path, only_blocked, mode)


def _proxy(read: Reader, node: yaml.Node | None) -> ProxyConfig:
    fields = read.mapping(node, "proxy", {"listen", "mode"})
    defaults = ProxyConfig()
    listen = defaults.listen
    if "listen" in fields:
        listen = read.endpoint(fields["listen"], "proxy.listen") or defaults.listen
    mode = defaults.mode
    if "mode" in fields:
        text = read.string(fields["mode"], "proxy.mode")
        if text is not None and text not in PROXY_MODES:
            read.error(fields["mode"], f"proxy.mode must be one of {', '.join(PROXY_MODES)}, got '{text}'")
        elif text is not None:
            mode = text
    return ProxyConfig(listen, mode)


_CONSOLE_KEYS = {"enabled", "listen", "users", "requests", "secure_cookies", "tls_cert", "tls_key", "tls_client_ca",
                 "session_minutes", "login_attempts", "lockout_seconds", "proxy_auth"}


def _console(read: Reader, node: yaml.Node | None, base: Path) -> ConsoleConfig:
    fields = read.mapping(node, "console", _CONSOLE_KEYS)
    if not fields:
        return ConsoleConfig()
    defaults = ConsoleConfig()
    values: dict[str, object] = {}
    for key in ("enabled", "secure_cookies"):
        if key in fields:
            flag = read.boolean(fields[key], f"console.{key}")
            values[key] = bool(flag)
    if "listen" in fields:
        values["listen"] = read.endpoint(fields["listen"], "console.listen") or defaults.listen
    for key in ("users", "requests", "tls_cert", "tls_key", "tls_client_ca"):
        if key in fields:
            text = read.string(fields[key], f"console.{key}")
            values[key] = base / text if text else None
    for key, low, high in (("session_minutes", 1, 10080), ("login_attempts", 1, 1000),
                           ("lockout_seconds", 1, 86400)):
        if key in fields:
            number = read.integer(fields[key], f"console.{key}", low, high)
            values[key] = getattr(defaults, key) if number is None else number
    if "proxy_auth" in fields:
        auth = read.mapping(fields["proxy_auth"], "console.proxy_auth", {"header", "trusted_proxies"})
        header = read.string(auth["header"], "console.proxy_auth.header") if "header" in auth else None
        proxies = _networks(read, auth.get("trusted_proxies"), "console.proxy_auth.trusted_proxies")
        if not proxies:
            read.error(fields["proxy_auth"], "console.proxy_auth needs trusted_proxies: the addresses of the "
                                             "proxy that sets the header (anyone else could send it)")
        values["proxy_auth"] = ProxyAuthConfig(header or ProxyAuthConfig.header, proxies)
    if values.get("enabled") and values.get("users") is None:
        read.error(node, "console.enabled needs console.users (the file `blocker console add-user` writes)")
    if (values.get("tls_cert") is None) != (values.get("tls_key") is None):
        read.error(node, "console: tls_cert and tls_key go together")
    if values.get("tls_client_ca") is not None and values.get("tls_cert") is None:
        read.error(fields["tls_client_ca"], "console.tls_client_ca needs tls_cert and tls_key (client "
                                            "certificates are checked in the console's own TLS)")
    if values.get("tls_cert") is not None and "secure_cookies" not in fields:
        values["secure_cookies"] = True
    if values.get("users") is not None and values.get("requests") is None:
        values["requests"] = values["users"].parent / "console-requests.json"  # type: ignore[attr-defined]
    return ConsoleConfig(**values)  # type: ignore[arg-type]


def _policy(read: Reader, node: yaml.Node | None, lines: dict[str, int], base: Path,
            texts: dict[Path, str], warnings: Collector) -> PolicyConfig:
    fields = read.mapping(node, "policy", _POLICY_KEYS)
    default_group = "standard"
    if "default_group" in fields:
        default_group = read.string(fields["default_group"], "policy.default_group") or default_group
        lines["policy.default_group"] = fields["default_group"].start_mark.line + 1
    groups = default_groups()
    if "groups" in fields:
        groups = {}
        for name, key_node, value in read.free_mapping(fields["groups"], "policy.groups"):
            group_fields = read.mapping(value, f"group '{name}'", {"block"})
            block = tuple(text for text, _ in read.strings(group_fields.get("block"), f"group '{name}' block"))
            groups[name] = Group(name, block, key_node.start_mark.line + 1)
            for text, item in read.strings(group_fields.get("block"), f"group '{name}' block"):
                lines[f"group:{name}:{text}"] = item.start_mark.line + 1
    if default_group not in groups:
        read.error(fields.get("default_group") or node, f"policy.default_group '{default_group}' is not a group")
    expiry_days = EXPIRY_WARNING_DAYS
    if "expiry_warning_days" in fields:
        days = read.integer(fields["expiry_warning_days"], "policy.expiry_warning_days", 0, 3650)
        expiry_days = expiry_days if days is None else days
    devices = _devices(read, fields.get("devices"), groups, warnings)
    exemptions = _exemptions(read, fields.get("exemptions"), lines)
    exemptions_file = None
    if "exemptions_file" in fields:
        text = read.string(fields["exemptions_file"], "policy.exemptions_file")
        if text:
            exemptions_file = base / text
            lines["policy.exemptions_file"] = fields["exemptions_file"].start_mark.line + 1
            exemptions += _exemptions_file(read, exemptions_file, fields["exemptions_file"], texts, lines)
    inventory: list[Path] = []
    if "inventory" in fields:
        lines["policy.inventory"] = fields["inventory"].start_mark.line + 1
        node_inventory = fields["inventory"]
        items = ([(read.string(node_inventory, "policy.inventory"), node_inventory)]
                 if isinstance(node_inventory, yaml.ScalarNode) else read.strings(node_inventory, "policy.inventory"))
        for text, _item in items:
            if text:
                inventory.append(base / text)
    return PolicyConfig(default_group, groups, devices, exemptions, exemptions_file, expiry_days,
                        tuple(inventory))


def _identity(read: Reader, node: yaml.Node | None, base: Path) -> IdentityConfig:
    fields = read.mapping(node, "identity", _IDENTITY_KEYS)
    radius = _radius(read, fields["radius_accounting"], base) if "radius_accounting" in fields else None
    snapshot = None
    if "snapshot" in fields and not _null(fields["snapshot"]):
        text = read.string(fields["snapshot"], "identity.snapshot")
        snapshot = base / text if text else None
    store = None
    if "store" in fields and not _null(fields["store"]):
        store_fields = read.mapping(fields["store"], "identity.store", {"url", "prefix"})
        defaults = StoreConfig()
        url = read.string(store_fields["url"], "identity.store.url") if "url" in store_fields else defaults.url
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://", "valkey://")):
            read.error(store_fields["url"], f"identity.store.url must be redis://HOST:PORT/DB, got '{url}'")
        prefix = (read.string(store_fields["prefix"], "identity.store.prefix")
                  if "prefix" in store_fields else defaults.prefix)
        store = StoreConfig((url or defaults.url).replace("valkey://", "redis://", 1), prefix or defaults.prefix)
    vpn = _networks(read, fields.get("vpn_networks"), "identity.vpn_networks")
    return IdentityConfig(radius, snapshot, store, vpn)


def _radius(read: Reader, node: yaml.Node, base: Path) -> RadiusConfig:
    where = "identity.radius_accounting"
    fields = read.mapping(node, where, _RADIUS_KEYS)
    defaults = RadiusConfig()
    for key in ("secret_file", "clients"):
        if key not in fields:
            read.error(node, f"{where} needs {key} (accounting is accepted only from listed gateways with "
                             "their shared secret)")
    listen = defaults.listen
    if "listen" in fields:
        text = read.string(fields["listen"], f"{where}.listen")
        if text is not None:
            try:
                ipaddress.ip_address(text.strip().strip("[]"))
                listen = (text.strip().strip("[]"), 1813)
            except ValueError:
                listen = read.endpoint(fields["listen"], f"{where}.listen") or defaults.listen
    secret_file = defaults.secret_file
    if "secret_file" in fields:
        text = read.string(fields["secret_file"], f"{where}.secret_file")
        secret_file = base / text if text else secret_file
    clients = _networks(read, fields.get("clients"), f"{where}.clients")
    if "clients" in fields and not clients:
        read.error(fields["clients"], f"{where}.clients needs at least one gateway address or network")
    attribute, regex = defaults.device_attribute, None
    if "device_attribute" in fields:
        attribute, regex = _device_attribute(read, fields["device_attribute"], f"{where}.device_attribute")
    ttl = None
    if "binding_ttl" in fields and not _null(fields["binding_ttl"]):
        ttl = read.number(fields["binding_ttl"], f"{where}.binding_ttl", 1.0)
    max_bindings = defaults.max_bindings
    if "max_bindings" in fields:
        max_bindings = read.integer(fields["max_bindings"], f"{where}.max_bindings", 1, 10_000_000) or max_bindings
    return RadiusConfig(listen, secret_file, clients, attribute, regex, ttl, max_bindings)


def _device_attribute(read: Reader, node: yaml.Node, where: str) -> tuple[str, str | None]:
    """`User-Name`, or `{attribute: User-Name, regex: '^(?P<device>[^@]+)@'}`."""
    names = ", ".join(RADIUS_DEVICE_ATTRIBUTES)
    regex = None
    if isinstance(node, yaml.MappingNode):
        fields = read.mapping(node, where, {"attribute", "regex"})
        if "attribute" not in fields:
            read.error(node, f"{where} needs attribute (one of {names})")
            return RadiusConfig().device_attribute, None
        attribute = read.string(fields["attribute"], f"{where}.attribute")
        if "regex" in fields:
            regex = read.string(fields["regex"], f"{where}.regex")
            if regex is not None:
                try:
                    compiled = re.compile(regex)
                except re.error as err:
                    read.error(fields["regex"], f"{where}.regex: {err}")
                    regex = None
                else:
                    if compiled.groups == 0:
                        read.error(fields["regex"], f"{where}.regex needs a group that captures the device id")
                        regex = None
        attr_node = fields["attribute"]
    else:
        attribute = read.string(node, where)
        attr_node = node
    if attribute is not None and attribute not in RADIUS_DEVICE_ATTRIBUTES:
        read.error(attr_node, f"{where} must be one of {names}, got '{attribute}'")
        attribute = None
    return attribute or RadiusConfig().device_attribute, regex


def _null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null") and node.style in (None, "")


def _exemptions_file(read: Reader, path: Path, where: yaml.Node, texts: dict[Path, str],
                     lines: dict[str, int]) -> tuple[Exemption, ...]:
    """The exemptions of `policy.exemptions_file`: a mapping with one key, `exemptions:`, a list."""
    if path not in texts and not path.is_file():
        read.error(where, f"policy.exemptions_file: file not found: {path}")
        return ()
    own = Reader(str(path), read.problems)
    root = compose(path, read.problems, texts.get(path))
    fields = own.mapping(root, "exemptions file", {"exemptions"})
    return _exemptions(own, fields.get("exemptions"), lines, "exemptions")


def _devices(read: Reader, node: yaml.Node | None, groups: dict[str, Group],
             warnings: Collector) -> tuple[Device, ...]:
    devices: list[Device] = []
    seen: set[str] = set()
    for item in read.sequence(node, "policy.devices"):
        fields = read.mapping(item, "device", _DEVICE_KEYS)
        missing = [key for key in ("id", "addresses", "group") if key not in fields]
        if missing:
            read.error(item, f"device needs {', '.join(missing)}")
            continue
        device_id = read.string(fields["id"], "device id")
        group = read.string(fields["group"], "device group")
        where = f"device '{device_id}' addresses" if device_id else "device addresses"
        addresses = _networks(read, fields["addresses"], where, warnings)
        if device_id is None or group is None:
            continue
        if device_id in seen:
            read.error(fields["id"], f"device '{device_id}' is listed twice")
            continue
        seen.add(device_id)
        if group not in groups:
            read.error(fields["group"], f"device '{device_id}': unknown group '{group}'")
            continue
        if not addresses:
            read.error(fields["addresses"], f"device '{device_id}' needs at least one address")
            continue
        devices.append(Device(device_id, addresses, group, item.start_mark.line + 1))
    return tuple(devices)


_REQUIRED = ("device", "allow", "approved_by", "reference", "reason", "expires")


def _exemptions(read: Reader, node: yaml.Node | None, lines: dict[str, int],
                where: str = "policy.exemptions") -> tuple[Exemption, ...]:
    """Every exemption that is whole; every problem of every exemption is recorded (none stops the rest)."""
    exemptions: list[Exemption] = []
    for item in read.sequence(node, where):
        before = len(read.problems.problems)
        fields = read.mapping(item, "exemption", _EXEMPTION_KEYS)
        missing = [key for key in _REQUIRED if key not in fields]
        if missing:
            read.error(item, f"exemption needs {', '.join(missing)} (no defaults: every grant is on record)")
        texts: dict[str, str | None] = {}
        for key in ("device", "approved_by", "reference", "reason"):
            if key in fields:
                value = read.string(fields[key], f"exemption {key}")
                texts[key] = value
                if value is not None and not value.strip():
                    read.error(fields[key], f"exemption {key} must not be empty")
        allow: tuple[str, ...] = ()
        if "allow" in fields:
            allow = tuple(text for text, _ in read.strings(fields["allow"], "exemption allow"))
            if not allow:
                read.error(fields["allow"], "exemption allow needs at least one category")
        expires = read.timestamp(fields["expires"], "exemption expires") if "expires" in fields else None
        starts = read.timestamp(fields["starts"], "exemption starts") if "starts" in fields else None
        if starts is not None and expires is not None and starts >= expires:
            read.error(fields["starts"], "exemption starts must be before expires")
        if len(read.problems.problems) > before or expires is None:
            continue
        exemptions.append(Exemption(texts["device"], allow, texts["approved_by"],  # type: ignore[arg-type]
                                    texts["reference"], texts["reason"],  # type: ignore[arg-type]
                                    expires, starts, read.file, item.start_mark.line + 1))
    return tuple(exemptions)
