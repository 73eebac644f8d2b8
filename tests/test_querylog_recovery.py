"""The query log recovers: a full disk (a real 64 KiB tmpfs) is counted and retried, writing resumes
when space returns, and the file follows rotation by SIGHUP (even with a broken config) and without
it. Real `blocker serve`, queried with dnspython."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import standard_config
from helpers import Blocker, Knot, metric_value, rcode_text, require_tool


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = require_tool("mount")
    umount = require_tool("umount")
    point = tmp_path / "disk"
    point.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run([umount, "-l", str(point)], check=False)


def poll(condition: object, within: float, what: str) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {within}s: {what}")


def lines(path: Path) -> list[dict[str, object]]:
    """The file's complete lines, each of which must be whole JSON (on a full disk the last one may
    still be waiting for its end)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def logged(path: Path, name: str) -> bool:
    return any(record["name"] == name for record in lines(path))


def test_full_disk_is_counted_retried_and_writing_resumes(knot: Knot, tmp_path: Path, small_disk: Path) -> None:
    log_path = small_disk / "queries.jsonl"
    config = standard_config(tmp_path, [knot.endpoint], policy=f'query_log:\n  path: "{log_path}"\n')
    server = Blocker(config).start()
    filler = small_disk / "filler"
    try:
        assert rcode_text(server.query("first.tiktok.com")) == "NXDOMAIN"
        poll(lambda: logged(log_path, "first.tiktok.com"), 5, "the first query logged")
        assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
        # Fill the disk, then keep asking: the writer meets ENOSPC.
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 512):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        i = 0
        deadline = time.monotonic() + 10
        while metric_value(server.metrics(), "blocker_querylog_errors_total") == 0:
            assert time.monotonic() < deadline, "no write error counted"
            for _ in range(20):
                assert rcode_text(server.query(f"full{i}.tiktok.com")) == "NXDOMAIN"  # answers go on
                i += 1
        errors = metric_value(server.metrics(), "blocker_querylog_errors_total")
        server.wait_for_log(r"query log .*No space left on device; retrying")
        # Space comes back: what waited is written, then what is asked now.
        filler.unlink()
        assert rcode_text(server.query("after.tiktok.com")) == "NXDOMAIN"
        poll(lambda: logged(log_path, "after.tiktok.com"), 10, "writing resumed after space returned")
        records = lines(log_path)  # every line whole JSON (json.loads raised otherwise)
        names = [r["name"] for r in records]
        assert "full0.tiktok.com" in names and names.index("full0.tiktok.com") < names.index("after.tiktok.com")
        server.wait_for_log(r"query log .*: writing again")
        assert metric_value(server.metrics(), "blocker_querylog_errors_total") >= errors
    finally:
        assert server.stop() == 0
    assert not [line for line in server.lines if "Traceback" in line]


def test_rotation_is_followed_with_a_broken_config_and_without_sighup(knot: Knot, tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "queries.jsonl"
    config = standard_config(tmp_path, [knot.endpoint], policy=f'query_log:\n  path: "{log_path}"\n')
    good = config.read_text()
    server = Blocker(config).start()
    try:
        assert rcode_text(server.query("one.tiktok.com")) == "NXDOMAIN"
        poll(lambda: logged(log_path, "one.tiktok.com"), 5, "the first query logged")
        # logrotate moves the file and signals while an admin's edit has broken the config.
        rotated = log_path.with_suffix(".jsonl.1")
        os.rename(log_path, rotated)
        config.write_text(good + "dns_typo: 1\n")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"reload \(SIGHUP\) rejected", after=mark)
        assert rcode_text(server.query("two.tiktok.com")) == "NXDOMAIN"
        poll(lambda: logged(log_path, "two.tiktok.com"), 5, "a new file after SIGHUP with a broken config")
        assert not logged(rotated, "two.tiktok.com")
        assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
        # Moved away with no signal at all: the writer notices by itself.
        os.rename(log_path, log_path.with_suffix(".jsonl.2"))
        assert rcode_text(server.query("three.tiktok.com")) == "NXDOMAIN"
        poll(lambda: logged(log_path, "three.tiktok.com"), 5, "a new file after a rotation without SIGHUP")
    finally:
        assert server.stop() == 0
