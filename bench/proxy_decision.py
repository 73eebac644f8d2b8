"""The proxy addon's decision cost with a 1,000,000-name include: `decide` (what the addon runs for
every CONNECT, ClientHello and request) against `explain` (what `blocker check` runs).

Usage: python3 bench/proxy_decision.py [--names 1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blocker.clients import identify
from blocker.clock import Clock
from blocker.policy import decide, explain, load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lists = Path(tmp) / "lists"
        lists.mkdir()
        names = [f"host{i}.bulk.example" for i in range(args.names)]
        (lists / "bulk.txt").write_text("\n".join(names) + "\n")
        (lists / "bulk.yaml").write_text("name: bulk\ndomains: []\ninclude: [bulk.txt]\n")
        config = Path(tmp) / "blocker.yaml"
        config.write_text(f'blocklists: "{lists}"\npolicy:\n  groups:\n    standard: {{block: [bulk]}}\n'
                          'dns:\n  upstreams: ["127.0.0.1:9"]\n')
        started = time.perf_counter()
        policy = load_policy(config)
        print(f"load: {time.perf_counter() - started:.2f} s for {args.names:,} names")
        client = identify(policy, "127.0.0.9")
        now = Clock().now()
        sample = names[-10_000:] + [f"www{i}.unlisted.example" for i in range(10_000)]
        started = time.perf_counter()
        for name in sample:
            decide(policy, client, name, now)
        per = (time.perf_counter() - started) / len(sample) * 1e6
        print(f"decide (the proxy's decision): {per:.1f} µs per name over {len(sample):,} names")
        started = time.perf_counter()
        for name in names[-5:]:
            explain(policy, client, name, now)
        per = (time.perf_counter() - started) / 5 * 1e3
        print(f"explain (blocker check, reads the include to find the line): {per:.0f} ms per name")


if __name__ == "__main__":
    main()
