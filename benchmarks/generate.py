"""The same model, greedy, three ways: (a) transformers `generate` locally, (b) the project's own
shards locally, (c) through the mesh with 1, 2 and 4 donors on loopback.

Reports decode tokens/s, time to first token, prefill tokens/s, and the mesh's added latency per
hop per step (its step time minus the local shards' step time, divided by the hops), plus the ratio
mesh ÷ transformers. Local runs use every core; donors take turns in a chain, so each gets every
core too; the client keeps one thread.

Runs are interleaved: each round runs (a), (b) and (c) back to back, and the ratios are medians of
per-round ratios, so that the machine's drift (tens of percent over minutes on a shared VM) does
not decide them.

Usage: python -m benchmarks.generate [--size tiny|mid] [--donors 1,2,4] [--new-tokens 64] [--rounds 3]
                                     [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
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


class TransformersRun:
    """(a) transformers `generate`, greedy, with a streamer that stamps each new token."""

    def __init__(self, path: str, new_tokens: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 quantization_config=None):
        from transformers import AutoModelForCausalLM, GenerationConfig

        # Loaded straight onto the device: an 8B model never passes through this process's memory.
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device,
                                                          quantization_config=quantization_config).eval()
        self.device = device
        self.model.generation_config.eos_token_id = None
        self.config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        self.model.generate(self.prompt(), generation_config=self.config)  # warm-up

    def prompt(self) -> torch.Tensor:
        return torch.tensor([PROMPT], device=self.device)

    def __call__(self) -> dict:
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.stamps, self.calls = [], 0

            def put(self, value):
                self.calls += 1
                if self.calls > 1:  # the first call carries the prompt
                    value.tolist()  # on a GPU: wait until the token exists
                    self.stamps.append(time.perf_counter())

            def end(self):
                pass

        streamer = Stamps()
        start = time.perf_counter()
        self.model.generate(self.prompt(), generation_config=self.config, streamer=streamer)
        return rates(start, streamer.stamps, len(PROMPT))

    def close(self) -> None:
        """Free the model's memory (on a GPU, before the mesh's donors load the same weights)."""
        import gc

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ShardsRun:
    """(b) the project's own shards and edges in this process, greedy."""

    def __init__(self, path: str, new_tokens: int):
        from shards import LocalPipeline, load_edges, load_shard

        self.pipe = LocalPipeline(load_edges(path), [load_shard(path)])
        self.new_tokens = new_tokens
        self.pipe.greedy(PROMPT, 4)  # warm-up

    def __call__(self) -> dict:
        session = self.pipe.new_session(len(PROMPT) + self.new_tokens)
        start = time.perf_counter()
        logits = self.pipe.step([session], torch.tensor([PROMPT]))
        stamps = []
        for _ in range(self.new_tokens):
            token = int(logits[0].argmax())
            stamps.append(time.perf_counter())
            logits = self.pipe.step([session], torch.tensor([[token]]))
        return rates(start, stamps, len(PROMPT))


class MeshRun:
    """(c) the mesh: a bootstrap node and `donors` donors on loopback, this process as the client."""

    def __init__(self, path: str, donors: int, new_tokens: int, threads: int, env: dict | None = None,
                 donor_args: tuple[str, ...] = (), client_options: dict | None = None):
        """`donor_args`: more `mesh serve` options (device, dtype, quant); `client_options`: more
        MeshModel.from_pretrained arguments (device, dtype)."""
        self.path, self.donors, self.new_tokens, self.threads = path, donors, new_tokens, threads
        self.env, self.donor_args, self.client_options = env, donor_args, client_options or {}

    def __enter__(self) -> "MeshRun":
        from client import MeshModel
        from mesh.launcher import LocalSwarm
        from shards.checkpoint import Checkpoint
        from shards.loading import even_splits

        layers = Checkpoint(self.path).load_config().num_hidden_layers
        self.swarm = LocalSwarm(ready_timeout=300).__enter__()
        try:
            self.swarm.start_dht()
            self.swarm.start_donors(self.path, even_splits(layers, self.donors), "--torch-threads", str(self.threads),
                                    "--announce-interval", "5", *self.donor_args, env=self.env)
            self.model = MeshModel.from_pretrained(self.path, initial_peers=self.swarm.initial_peers,
                                                   **self.client_options)
            self.model.generate(PROMPT, max_new_tokens=4, stop_tokens=[])  # warm-up (connections, caches)
        except BaseException:
            self.swarm.__exit__(None, None, None)
            raise
        return self

    def __call__(self) -> dict:
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in self.model.stream(PROMPT, max_new_tokens=self.new_tokens, stop_tokens=[])]
        return rates(start, stamps, len(PROMPT))

    def __exit__(self, *exc) -> None:
        try:
            self.model.close()
        finally:
            self.swarm.__exit__(*exc)


def run_rounds(path: str, donor_counts: list[int], new_tokens: int, threads: int, rounds: int,
               donor_env: dict | None = None) -> list[dict]:
    """Every round runs (a), (b) and (c) back to back, so each ratio compares runs minutes apart at
    most: this machine's speed drifts by tens of percent over a few minutes."""
    transformers, shards = TransformersRun(path, new_tokens), ShardsRun(path, new_tokens)
    reference_runs: list[dict] = []
    shard_pairs: list[tuple[dict, dict]] = []
    mesh_rows = []
    for donors in donor_counts:
        mesh_pairs = []
        with MeshRun(path, donors, new_tokens, threads, donor_env) as mesh:
            for _ in range(rounds):
                torch.set_num_threads(threads)
                reference = transformers()
                reference_runs.append(reference)
                shard_pairs.append((shards(), reference))
                torch.set_num_threads(1)  # the client only embeds, samples and runs the head
                mesh_pairs.append((mesh(), reference))
        mesh_rows.append({**summarize(f"mesh, {donors} donor(s)", mesh_pairs), "donors": donors})
    return [summarize("transformers generate", [(run, run) for run in reference_runs]),
            summarize("local shards", shard_pairs), *mesh_rows]


def summarize(way: str, pairs: list[tuple[dict, dict]]) -> dict:
    """Medians over the rounds; the ratio is the median of per-round ratios (paired, same round)."""
    runs = [run for run, _ in pairs]
    return {"way": way, "rounds": len(runs),
            **{key: statistics.median(run[key] for run in runs) for key in runs[0]},
            "vs_transformers": statistics.median(run["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
                                                 for run, ref in pairs),
            "vs_transformers_per_round": [round(run["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3)
                                          for run, ref in pairs]}


def save_size_model(size: str, directory: Path, **overrides) -> str:
    """The benchmarks' random Llama of a named size (SIZES), saved to `directory`."""
    from shards.random_model import save_random_model

    settings = {"initializer_range": 0.02, "max_position_embeddings": 4096, **SIZES[size], **overrides}
    return str(save_random_model("llama", directory, **settings))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--donors", default="1,2,4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a), (b), (c) per donor count")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of local runs and donors")
    parser.add_argument("--donor-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the donors, e.g. OMP_WAIT_POLICY=PASSIVE (repeatable)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    donor_env = dict(item.split("=", 1) for item in args.donor_env)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_size_model(args.size, Path(tmp) / f"{args.size}-llama")
        rows = run_rounds(path, [int(d) for d in args.donors.split(",")], args.new_tokens, args.threads, args.rounds,
                          donor_env)
    local = rows[1]["step_ms"]
    for row in rows:
        if "donors" in row:
            row["added_per_hop_ms"] = (row["step_ms"] - local) / row["donors"]
    command = command_line(argv, "benchmarks.generate")
    print(f"\ncommand: {command}\nmodel: {args.size} random llama {SIZES[args.size]}; prompt {len(PROMPT)} tokens, "
          f"{args.new_tokens} new; torch threads: {args.threads} (local, donors), 1 (mesh client); "
          f"{args.rounds} round(s) of every way per donor count, medians; ratios paired within a round"
          + (f"; donor environment {donor_env}" if donor_env else ""))
    print(f"{'way':<22} {'runs':>4} {'decode tok/s':>12} {'÷ transformers':>15} {'per round':>22} {'TTFT ms':>9} "
          f"{'prefill tok/s':>14} {'added/hop ms':>13}")
    for row in rows:
        added = f"{row['added_per_hop_ms']:>13.3f}" if "added_per_hop_ms" in row else f"{'-':>13}"
        per_round = ",".join(f"{r:.2f}" for r in row["vs_transformers_per_round"][:6])
        print(f"{row['way']:<22} {row['rounds']:>4} {row['decode_tokens_per_s']:>12.1f} {row['vs_transformers']:>15.3f} "
              f"{per_round:>22} {row['ttft_ms']:>9.1f} {row['prefill_tokens_per_s']:>14.0f} {added}")
    save(args.json, command, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
