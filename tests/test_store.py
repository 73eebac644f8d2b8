"""Bindings shared through a real redis-server: two listeners mirror each other, and converge after the
store is killed and restarted empty."""

from __future__ import annotations

import time
from pathlib import Path

from helpers import free_port
from radius_tools import SECRET, RadiusListener, RedisServer, radclient


def listener_config(directory: Path, redis_url: str) -> Path:
    directory.mkdir()
    (directory / "radius.secret").write_text(SECRET + "\n")
    path = directory / "blocker.yaml"
    path.write_text(f"""\
identity:
  store: {{url: "{redis_url}", prefix: i11-test}}
  radius_accounting:
    listen: "127.0.0.1:0"
    secret_file: radius.secret
    clients: ["127.0.0.0/8"]
""")
    return path


def table(listener: RadiusListener) -> dict[str, str]:
    held: dict[str, str] = {}
    for event in list(listener.events):
        address, device = event["binding"][0], event["binding"][1]  # type: ignore[index]
        if event["op"] == "bind":
            held[address] = device
        elif held.get(address) == device:
            del held[address]
    return held


def wait_until(check: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def start(user: str, address: str, kind: str = "Start") -> dict[str, str]:
    return {"User-Name": user, "Acct-Status-Type": kind, "Framed-IP-Address": address, "NAS-Identifier": "gw"}


def test_two_replicas_share_bindings_and_converge(tmp_path: Path) -> None:
    redis = RedisServer(free_port()).start()
    a = RadiusListener(listener_config(tmp_path / "a", redis.url)).start()
    b = RadiusListener(listener_config(tmp_path / "b", redis.url)).start()
    try:
        a.wait_for_log("binding store .* in sync")
        b.wait_for_log("binding store .* in sync")
        assert radclient(a.port, start("MPS-1", "10.8.0.1"))
        sent = time.monotonic()
        assert wait_until(lambda: table(b).get("10.8.0.1") == "MPS-1", 1.0)
        assert time.monotonic() - sent < 1.0
        assert radclient(b.port, start("MPS-2", "10.8.0.2"))
        assert wait_until(lambda: table(a) == table(b) == {"10.8.0.1": "MPS-1", "10.8.0.2": "MPS-2"})

        redis.kill()
        a.wait_for_log("binding store .* lost")
        # While the store is down: accounting still binds locally, and both keep their tables.
        assert radclient(b.port, start("MPS-3", "10.8.0.3"))
        assert radclient(a.port, start("MPS-1", "10.8.0.1", "Stop"))
        assert table(a) == {"10.8.0.2": "MPS-2"}
        assert table(b) == {"10.8.0.1": "MPS-1", "10.8.0.2": "MPS-2", "10.8.0.3": "MPS-3"}

        redis.start()  # empty: it had no persistence
        expected = {"10.8.0.2": "MPS-2", "10.8.0.3": "MPS-3"}
        assert wait_until(lambda: table(a) == expected and table(b) == expected, 15.0), (table(a), table(b))
        assert radclient(a.port, start("MPS-4", "10.8.0.4"))
        assert wait_until(lambda: table(b).get("10.8.0.4") == "MPS-4", 1.0)
    finally:
        a.stop()
        b.stop()
        redis.kill()
