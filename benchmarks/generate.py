"""The same model, greedy, three ways: (a) transformers `generate` locally, (b) the project's own
shards locally, (c) through the mesh with 1, 2 and 4 donors on loopback.

Reports decode tokens/s, time to first token, prefill tokens/s, and the mesh's added latency per
hop per step (its step time minus the local shards' step time, divided by the hops), plus the ratio
mesh ÷ transformers. Local runs use every core; donors take turns in a chain, so each gets every
core too; the client keeps one thread.

Usage: python -m benchmarks.generate [--size tiny|mid] [--donors 1,2,4] [--new-tokens 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import command_line, save

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "mid": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=8, vocab_size=8192),
}
PROMPT = list(range(1, 129))


def rates(start: float, stamps: list[float], prompt_tokens: int) -> dict:
    """Time to first token, prefill tokens/s and decode tokens/s from token timestamps."""
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"ttft_ms": ttft * 1000, "prefill_tokens_per_s": prompt_tokens / ttft, "decode_tokens_per_s": decode,
            "step_ms": 1000 / decode}


def run_transformers(path: str, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt
                self.stamps.append(time.perf_counter())

        def end(self):
            pass

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(torch.tensor([PROMPT]), generation_config=config)  # warm-up
    streamer = Stamps()
    start = time.perf_counter()
    model.generate(torch.tensor([PROMPT]), generation_config=config, streamer=streamer)
    return rates(start, streamer.stamps, len(PROMPT))


def run_shards(path: str, new_tokens: int) -> dict:
    from shards import LocalPipeline, load_edges, load_shard

    pipe = LocalPipeline(load_edges(path), [load_shard(path)])
    pipe.greedy(PROMPT, 4)  # warm-up
    session = pipe.new_session(len(PROMPT) + new_tokens)
    start = time.perf_counter()
    logits = pipe.step([session], torch.tensor([PROMPT]))
    stamps = []
    for _ in range(new_tokens):
        token = int(logits[0].argmax())
        stamps.append(time.perf_counter())
        logits = pipe.step([session], torch.tensor([[token]]))
    return rates(start, stamps, len(PROMPT))


def run_mesh(path: str, donors: int, new_tokens: int, threads: int) -> dict:
    from client import MeshModel
    from mesh.launcher import LocalSwarm
    from shards.checkpoint import Checkpoint
    from shards.loading import even_splits

    layers = Checkpoint(path).load_config().num_hidden_layers
    with LocalSwarm(ready_timeout=300) as swarm:
        swarm.start_dht()
        swarm.start_donors(path, even_splits(layers, donors), "--torch-threads", str(threads),
                           "--announce-interval", "5")
        with MeshModel.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
            model.generate(PROMPT, max_new_tokens=4, stop_tokens=[])  # warm-up (connections, caches)
            start = time.perf_counter()
            stamps = [time.perf_counter() for _ in model.stream(PROMPT, max_new_tokens=new_tokens, stop_tokens=[])]
    return {**rates(start, stamps, len(PROMPT)), "donors": donors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--donors", default="1,2,4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of local runs and donors")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        from shards.random_model import save_random_model

        path = str(save_random_model("llama", Path(tmp) / f"{args.size}-llama", initializer_range=0.02,
                                     max_position_embeddings=4096, **SIZES[args.size]))
        rows = [{"way": "transformers generate", **run_transformers(path, args.new_tokens)},
                {"way": "local shards", **run_shards(path, args.new_tokens)}]
        torch.set_num_threads(1)  # the client only embeds, samples and runs the head
        for donors in (int(d) for d in args.donors.split(",")):
            rows.append({"way": f"mesh, {donors} donor(s)", **run_mesh(path, donors, args.new_tokens, args.threads)})
    reference, local = rows[0]["decode_tokens_per_s"], rows[1]["step_ms"]
    for row in rows:
        row["vs_transformers"] = row["decode_tokens_per_s"] / reference
        if "donors" in row:
            row["added_per_hop_ms"] = (row["step_ms"] - local) / row["donors"]
    command = command_line(argv, "benchmarks.generate")
    print(f"\ncommand: {command}\nmodel: {args.size} random llama {SIZES[args.size]}; prompt {len(PROMPT)} tokens, "
          f"{args.new_tokens} new; torch threads: {args.threads} (local, donors), 1 (mesh client)")
    print(f"{'way':<22} {'decode tok/s':>12} {'÷ transformers':>15} {'TTFT ms':>9} {'prefill tok/s':>14} "
          f"{'added/hop ms':>13}")
    for row in rows:
        added = f"{row['added_per_hop_ms']:>13.3f}" if "added_per_hop_ms" in row else f"{'-':>13}"
        print(f"{row['way']:<22} {row['decode_tokens_per_s']:>12.1f} {row['vs_transformers']:>15.3f} "
              f"{row['ttft_ms']:>9.1f} {row['prefill_tokens_per_s']:>14.0f} {added}")
    save(args.json, command, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
