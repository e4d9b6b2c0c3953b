"""A serving donor's peak resident memory against what it should need: its weights plus its KV cache
budget, over the process's baseline (interpreter, libraries, DHT client, measured before loading).

Starts a bootstrap node and one donor for layers [0, L/2) with a cache budget, fills the budget with
sessions that each prefill their whole reservation, then reads the donor's own accounting
(`info`: weights, budget, baseline and peak RSS from /proc). Target (issue 6): peak - baseline <=
1.2 x (weights + cache budget).

Usage: python -m benchmarks.memory [--size tiny|mid] [--cache-tokens 2048] [--sessions 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.generate import SIZES, save_size_model
from benchmarks.report import command_line, save

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--cache-tokens", type=int, default=2048, help="the donor's cache budget, in tokens")
    parser.add_argument("--sessions", type=int, default=4,
                        help="sessions sharing the budget; each prefills its share in one request")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mesh.launcher import LocalSwarm
    from mesh.transport import Connection

    size = SIZES[args.size]
    layers = f"0:{size['num_hidden_layers'] // 2}"
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(ready_timeout=300) as swarm:
        path = save_size_model(args.size, Path(tmp) / f"{args.size}-llama",
                               max_position_embeddings=max(4096, args.cache_tokens))
        swarm.start_dht()
        [donor] = swarm.start_donors(path, [layers], "--torch-threads", "2", "--cache-tokens", str(args.cache_tokens))
        connections = [Connection.open("127.0.0.1", donor.port) for _ in range(args.sessions)]
        per_session = args.cache_tokens // args.sessions
        end = size["num_hidden_layers"] // 2
        for connection in connections:  # reserve the whole budget, and write every reserved token
            session = connection.request({"type": "open", "start": 0, "end": end, "max_length": per_session},
                                         timeout=60).header["session"]
            hidden = torch.randn(1, per_session, size["hidden_size"])
            connection.request({"type": "step", "session": session, "position": 0}, [hidden], timeout=600)
        info = connections[0].request({"type": "info"}, timeout=30).header
        for connection in connections:
            connection.close()
    expected = info["weight_bytes"] + info["cache_budget_bytes"]
    growth = info["peak_rss_bytes"] - info["baseline_rss_bytes"]
    result = {"size": args.size, "layers": layers, "weight_bytes": info["weight_bytes"],
              "cache_budget_bytes": info["cache_budget_bytes"], "baseline_rss_bytes": info["baseline_rss_bytes"],
              "peak_rss_bytes": info["peak_rss_bytes"], "peak_over_baseline_bytes": growth,
              "ratio": growth / expected}
    command = command_line(argv, "benchmarks.memory")
    mib = 2**20
    print(f"\ncommand: {command}\nmodel: {args.size} random llama, donor layers {layers}, fp32, "
          f"{args.sessions} session(s) filling a {args.cache_tokens}-token budget")
    print(f"{'weights MiB':>12} {'cache MiB':>10} {'baseline MiB':>13} {'peak MiB':>9} {'peak-baseline MiB':>18} "
          f"{'÷ (weights+cache)':>18}")
    print(f"{info['weight_bytes'] / mib:>12.1f} {info['cache_budget_bytes'] / mib:>10.1f} "
          f"{info['baseline_rss_bytes'] / mib:>13.1f} {info['peak_rss_bytes'] / mib:>9.1f} {growth / mib:>18.1f} "
          f"{result['ratio']:>18.3f}")
    save(args.json, command, [result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
