"""Added latency per hop per decode step, on loopback.

Starts a bootstrap DHT node and k donors that split the model's layers evenly, opens one session
through all of them, and times decode steps (hidden states in, hidden states out) at the client.
Each donor reports its own compute time for each step; what remains is what the mesh adds:

    added per hop = median over steps of (step time - sum of the donors' compute times) / k

With two donors or more, both ways of passing a step along are timed in alternating rounds over
the same swarm: relayed (the client carries each hop's output to the next donor) and forwarded
(each donor hands its output to the next; client/session.py).

In the same rounds it times the floor under those figures (bare_relay.py): the same number of
processes in a chain, each busy for as long as a donor computes, passing a frame of a step's size
and doing nothing else. On a machine where waking an idle process is slow (a VM whose idle vCPUs
halt), most of the added latency is there before any mesh code runs; "mesh - floor" is what the
mesh's own code costs per hop.

With --trace, donors time-stamp each step (received, answered) and the script also prints where
the added time goes: into the first donor, inside each donor outside its compute, between donors,
and back to the client, for the floor's relays too. The timestamps come from one monotonic clock
shared by the processes of this machine.

Usage: python -m benchmarks.hop_latency [--donors 1,2,4] [--steps 300] [--trace] [--model DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bare_relay import BareChain
from benchmarks.report import command_line, save

from client import MeshModel
from client.session import RemoteSession, SessionConfig
from mesh.launcher import LocalSwarm
from shards.loading import even_splits


# A step's frame beyond its tensor bytes: the 18-byte prefix and a JSON header of about this size.
FRAME_OVERHEAD = 200
WARM_UP_STEPS = 20  # sessions are opened for the timed steps, a 16-token prompt and these (open_session)
SEGMENTS = ("client to first donor", "in a donor, not computing", "donor to next donor", "last donor to client")


def open_session(model: MeshModel, steps: int, forwarding: bool, trace: bool) -> RemoteSession:
    session = RemoteSession(model.swarm, SessionConfig(max_length=steps + 64, forwarding=forwarding, trace=trace))
    session.open()
    session.step(model.edges.embed(torch.tensor([list(range(16))])))
    return session


def time_steps(session: RemoteSession, hidden: torch.Tensor, steps: int, samples: dict) -> None:
    """Decode steps (hidden states in, hidden states out) timed as a generation pays them."""
    for _ in range(steps):
        started = time.perf_counter()
        session.step(hidden)
        finished = time.perf_counter()
        total = finished - started
        samples["totals"].append(total)
        samples["added"].append(total - sum(span.last_compute_seconds for span in session.spans))
        if session.config.trace:
            samples["segments"].append(segments(session, started, finished))


def warm_up(session: RemoteSession, hidden: torch.Tensor, steps: int) -> float:
    """Untimed steps; the median of the donors' compute time per step (all hops together)."""
    compute = []
    for _ in range(steps):
        session.step(hidden)
        compute.append(sum(span.last_compute_seconds for span in session.spans))
    return statistics.median(compute)


def time_floor(chain: BareChain, payload: bytes, steps: int, samples: dict) -> None:
    """The same steps through the bare relays: everything but the relays' busy waits is added."""
    for _ in range(steps):
        started, finished, stamps = chain.step(payload)
        worked = [w for _, _, w in stamps]
        samples["totals"].append(finished - started)
        samples["added"].append(finished - started - sum(worked))
        pairs = [(received, sent) for received, sent, _ in stamps]
        samples["segments"].append(cut(pairs, worked, started, finished))


def segments(session: RemoteSession, started: float, finished: float) -> list[float]:
    """One traced step cut where the donors time-stamped it (seconds), as in SEGMENTS: the donors'
    and the gaps' figures are averages over the chain. Between two donors, a relayed step passes
    through the client, a forwarded one does not."""
    return cut([span.last_trace for span in session.spans], [span.last_compute_seconds for span in session.spans],
               started, finished)


def cut(stamps: list, busy: list[float], started: float, finished: float) -> list[float]:
    """SEGMENTS from each hop's (received, sent) stamps and its busy (computing) seconds."""
    inside = [sent - received - seconds for (received, sent), seconds in zip(stamps, busy)]
    gaps = [stamps[i + 1][0] - stamps[i][1] for i in range(len(stamps) - 1)]
    return [stamps[0][0] - started, statistics.fmean(inside), statistics.fmean(gaps) if gaps else float("nan"),
            finished - stamps[-1][1]]


def measure(model_dir: str, donors: int, steps: int, threads: int, trace: bool = False,
            rounds: int = 5) -> list[dict]:
    """Both ways of passing a step along (relayed by the client, forwarded donor to donor) and the
    bare relays' floor, in alternating rounds, so that all three see the same machine load."""
    from shards.checkpoint import Checkpoint

    num_layers = Checkpoint(model_dir).load_config().num_hidden_layers
    modes = ["relayed", "forwarded"] if donors > 1 else ["relayed"]  # one hop: nothing to forward
    with LocalSwarm() as swarm:
        swarm.start_dht()
        swarm.start_donors(model_dir, even_splits(num_layers, donors), "--torch-threads", str(threads),
                           "--announce-interval", "2")
        model = MeshModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            sessions = {mode: open_session(model, steps, mode == "forwarded", trace) for mode in modes}
            hidden = model.edges.embed(torch.tensor([[7]]))
            samples = {mode: {"totals": [], "added": [], "segments": []} for mode in [*modes, "floor"]}
            per_round = max(1, steps // rounds)
            compute = warm_up(sessions[modes[-1]], hidden, WARM_UP_STEPS)
            with BareChain(donors, work_seconds=compute / donors) as chain:
                payload = bytes(hidden.numel() * hidden.element_size() + FRAME_OVERHEAD)
                for _ in range(rounds):
                    for mode in modes:
                        time_steps(sessions[mode], hidden, per_round, samples[mode])
                    time_floor(chain, payload, per_round, samples["floor"])
            for mode in modes:
                if sessions[mode].forwarding != (mode == "forwarded"):
                    raise RuntimeError(f"the {mode} session fell back to relaying: the numbers would be mislabelled")
                sessions[mode].close()
        finally:
            model.close()
    return [summarize(donors, mode, samples[mode]) for mode in [*modes, "floor"]]


def summarize(donors: int, mode: str, samples: dict) -> dict:
    hops = donors  # one hop per donor: each serves its own slice of the layers
    totals, added = samples["totals"], samples["added"]
    # This machine is noisy (shared, 2 vCPUs): also report the quietest block of 50 steps.
    block = min(50, len(added))
    blocks = [statistics.median(added[i:i + block]) for i in range(0, len(added) - block + 1, block)]
    row = {"donors": donors, "mode": mode, "hops": hops, "step_ms": statistics.median(totals) * 1000,
           "added_per_hop_ms": statistics.median(added) / hops * 1000,
           "added_per_hop_p90_ms": sorted(added)[int(0.9 * len(added))] / hops * 1000,
           "added_per_hop_best_block_ms": min(blocks) / hops * 1000}
    if samples["segments"]:
        row["segments_us"] = {name: round(statistics.median(step[i] for step in samples["segments"]) * 1e6, 1)
                              for i, name in enumerate(SEGMENTS) if not (hops == 1 and i == 2)}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--donors", default="1,2,4", help="comma-separated donor counts")
    parser.add_argument("--steps", type=int, default=300, help="decode steps timed per configuration")
    parser.add_argument("--model", help="model directory (default: a tiny random Llama made for the run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each donor and the client")
    parser.add_argument("--trace", action="store_true",
                        help="donors time-stamp every step: also print where the added time goes (median us)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from shards.random_model import save_random_model

            model_dir = str(save_random_model("llama", Path(tmp) / "tiny-llama", num_hidden_layers=8,
                                                    max_position_embeddings=4096))
        results = [row for k in args.donors.split(",")
                   for row in measure(model_dir, int(k), args.steps, args.threads, args.trace)]
    command = command_line(argv, "benchmarks.hop_latency")
    print(f"\ncommand: {command}\nthreads: torch {args.threads} per process; model: {args.model or 'tiny random llama, 8 layers'}")
    print(f"{'donors':>6} {'mode':>9} {'step ms':>8} {'added/hop ms: median':>21} {'p90':>6} {'quietest 50':>11} "
          f"{'forwarded/relayed':>17} {'mesh - floor':>12}")
    by_mode = {(r["donors"], r["mode"]): r for r in results}
    for r in results:
        ratio = (r["added_per_hop_ms"] / by_mode[r["donors"], "relayed"]["added_per_hop_ms"]
                 if r["mode"] == "forwarded" else None)
        over_floor = (r["added_per_hop_ms"] - by_mode[r["donors"], "floor"]["added_per_hop_ms"]
                      if r["mode"] != "floor" else None)
        print(f"{r['donors']:>6} {r['mode']:>9} {r['step_ms']:>8.3f} {r['added_per_hop_ms']:>21.3f} "
              f"{r['added_per_hop_p90_ms']:>6.3f} {r['added_per_hop_best_block_ms']:>11.3f} "
              f"{'' if ratio is None else f'{ratio:.2f}':>17} {'' if over_floor is None else f'{over_floor:.3f}':>12}")
        r["forwarded_over_relayed"], r["over_floor_ms"] = ratio, over_floor
    print("floor: bare processes in the same chain, busy as long as the donors compute, passing the bytes only")
    if args.trace:
        print(f"\nwhere the added time goes, median us per step ({'; '.join(SEGMENTS[1:3])}: averaged over the chain;"
              f" the floor's relays stand for the donors)")
        print(f"{'donors':>6} {'mode':>9} " + " ".join(f"{name:>26}" for name in SEGMENTS))
        for r in results:
            cells = [r["segments_us"].get(name) for name in SEGMENTS]
            print(f"{r['donors']:>6} {r['mode']:>9} " + " ".join(f"{'-' if c is None else c:>26}" for c in cells))
    save(args.json, command, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
