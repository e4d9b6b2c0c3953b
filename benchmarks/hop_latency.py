"""Added latency per hop per decode step, on loopback.

Starts a bootstrap DHT node and k donors that split the model's layers evenly, opens one session
through all of them, and times decode steps (hidden states in, hidden states out) at the client.
Each donor reports its own compute time for each step; what remains is what the mesh adds:

    added per hop = median over steps of (step time - sum of the donors' compute times) / k

Usage: python -m benchmarks.hop_latency [--donors 1,2,4] [--steps 300] [--model DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import command_line, save

from client import MeshModel
from client.session import RemoteSession, SessionConfig
from mesh.launcher import LocalSwarm
from shards.loading import even_splits


def time_steps(model: MeshModel, steps: int):
    """Decode steps (hidden states in, hidden states out) timed as a generation pays them."""
    session = RemoteSession(model.swarm, SessionConfig(max_length=steps + 64))
    session.open()
    try:
        session.step(model.edges.embed(torch.tensor([list(range(16))])))
        hidden = model.edges.embed(torch.tensor([[7]]))
        totals, added = [], []
        for _ in range(steps):
            started = time.perf_counter()
            session.step(hidden)
            total = time.perf_counter() - started
            totals.append(total)
            added.append(total - sum(span.last_compute_seconds for span in session.spans))
        return totals, added, len(session.spans)
    finally:
        session.close()


def measure(model_dir: str, donors: int, steps: int, threads: int) -> dict:
    from shards.checkpoint import Checkpoint

    num_layers = Checkpoint(model_dir).load_config().num_hidden_layers
    with LocalSwarm() as swarm:
        swarm.start_dht()
        swarm.start_donors(model_dir, even_splits(num_layers, donors), "--torch-threads", str(threads),
                           "--announce-interval", "2")
        model = MeshModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            totals, added, hops = time_steps(model, steps)
        finally:
            model.close()
    # This machine is noisy (shared, 2 vCPUs): also report the quietest block of 50 steps.
    block = min(50, len(added))
    blocks = [statistics.median(added[i:i + block]) for i in range(0, len(added) - block + 1, block)]
    return {"donors": donors, "hops": hops, "step_ms": statistics.median(totals) * 1000,
            "added_per_hop_ms": statistics.median(added) / hops * 1000,
            "added_per_hop_p90_ms": sorted(added)[int(0.9 * len(added))] / hops * 1000,
            "added_per_hop_best_block_ms": min(blocks) / hops * 1000}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--donors", default="1,2,4", help="comma-separated donor counts")
    parser.add_argument("--steps", type=int, default=300, help="decode steps timed per configuration")
    parser.add_argument("--model", help="model directory (default: a tiny random Llama made for the run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each donor and the client")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from shards.random_model import save_random_model

            model_dir = str(save_random_model("llama", Path(tmp) / "tiny-llama", num_hidden_layers=8,
                                                    max_position_embeddings=4096))
        results = [measure(model_dir, int(k), args.steps, args.threads) for k in args.donors.split(",")]
    command = command_line(argv, "benchmarks.hop_latency")
    print(f"\ncommand: {command}\nthreads: torch {args.threads} per process; model: {args.model or 'tiny random llama, 8 layers'}")
    print(f"{'donors':>6} {'hops':>4} {'step ms':>8} {'added/hop ms: median':>21} {'p90':>6} {'quietest 50':>11}")
    for r in results:
        print(f"{r['donors']:>6} {r['hops']:>4} {r['step_ms']:>8.3f} {r['added_per_hop_ms']:>21.3f} "
              f"{r['added_per_hop_p90_ms']:>6.3f} {r['added_per_hop_best_block_ms']:>11.3f}")
    save(args.json, command, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
