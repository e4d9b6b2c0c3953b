"""Concurrent sessions on one donor, through the Python client and through the gateway.

A bootstrap node and one donor serving every layer; N sessions generate at once (N threads of one
MeshModel, or N streaming requests to the gateway). Reports aggregate decode tokens/s, per-session
tokens/s, p50/p99 inter-token latency, and the donor's batch sizes. The ratio that matters:
aggregate tokens/s at 16 sessions ÷ a single session's.

Usage: python -m benchmarks.concurrency [--size tiny|mid] [--sessions 1,4,16,64] [--new-tokens 32]
       [--dtype float32[,bfloat16]] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.generate import SIZES, save_size_model
from benchmarks.report import command_line, save

PROMPT_TOKENS = 32


def prompt_of(session: int) -> list[int]:
    return [(7 * session + i) % 200 + 1 for i in range(PROMPT_TOKENS)]


def summarize(streams: list[list[float]], started: float, tokens: list[int] | None = None) -> dict:
    """Arrival times per session -> aggregate and per-session decode rates, inter-arrival latencies.

    `tokens`: how many tokens each stream carried, when an arrival can carry several (the gateway
    holds text back while a stop sequence or a UTF-8 character is incomplete); by default one each.
    """
    tokens = tokens or [len(s) for s in streams]
    weights = [n / len(s) for n, s in zip(tokens, streams)]  # tokens per arrival
    gaps = [b - a for stamps in streams for a, b in zip(stamps, stamps[1:])]
    first = min(s[0] for s in streams)
    last = max(s[-1] for s in streams)
    decoded = sum(n - 1 for n in tokens)
    per_session = [(n - 1) / (s[-1] - s[0]) for n, s in zip(tokens, streams) if len(s) > 1]
    gaps.sort()
    # Steady state: the window in which every session is decoding (prefills, which run one by one,
    # are over and no session has finished yet).
    window_start, window_end = max(s[0] for s in streams), min(s[-1] for s in streams)
    in_window = sum(w for s, w in zip(streams, weights) for t in s[1:] if window_start < t <= window_end)
    steady = in_window / (window_end - window_start) if window_end > window_start else None
    return {"sessions": len(streams), "aggregate_tokens_per_s": decoded / (last - first),
            "steady_tokens_per_s": steady, "steady_window_s": max(0.0, window_end - window_start),
            "per_session_tokens_per_s": statistics.median(per_session),
            "p50_inter_token_ms": gaps[len(gaps) // 2] * 1000, "p99_inter_token_ms": gaps[int(0.99 * (len(gaps) - 1))] * 1000,
            "wall_s": last - started}


def client_run(model, sessions: int, new_tokens: int) -> dict:
    streams: list[list[float]] = [[] for _ in range(sessions)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(sessions + 1)

    def one(index: int):
        prompt = prompt_of(index)
        barrier.wait()
        try:
            for _ in model.stream(prompt, max_new_tokens=new_tokens, stop_tokens=[]):
                streams[index].append(time.perf_counter())
        except BaseException as err:  # reported below, in the main thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {sessions} sessions failed; first: {errors[0]!r}")
    return summarize(streams, started)


def gateway_run(base_url: str, served: str, sessions: int, new_tokens: int) -> dict:
    import openai

    async def one(client, index, stamps) -> int:
        """Times the chunks that carry text; returns the tokens the stream carried (from its usage)."""
        stream = await client.completions.create(model=served, prompt=prompt_of(index), max_tokens=new_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    async def run():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
        streams = [[] for _ in range(sessions)]
        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, i, streams[i]) for i in range(sessions)))
        await client.close()
        return summarize(streams, started, list(tokens))

    return asyncio.run(run())


def shard_alone(path: str, counts: list[int], threads: int, context: int, dtype: str) -> dict[int, float]:
    """Decode tokens/s of the shard itself, one batched step over n sessions: the ceiling for the mesh."""
    from shards import load_shard

    torch.set_num_threads(threads)
    shard = load_shard(path, device="cpu", dtype=dtype)
    rates = {}
    for n in counts:
        caches = [shard.new_cache(context + 16) for _ in range(n)]
        for cache in caches:
            shard(torch.randn(1, context, shard.config.hidden_size, dtype=shard.dtype), [cache])
        step = torch.randn(n, 1, shard.config.hidden_size, dtype=shard.dtype)
        shard(step, caches)  # warm-up
        started = time.perf_counter()
        for _ in range(5):
            shard(step, caches)
        rates[n] = 5 * n / (time.perf_counter() - started)
    torch.set_num_threads(1)
    return rates


def donor_compute(port: int) -> dict:
    """The donor's compute statistics (its info reply's "compute")."""
    from mesh.transport import Connection

    connection = Connection.open("127.0.0.1", port)
    try:
        return connection.request({"type": "info"}, timeout=10).header["compute"]
    finally:
        connection.close()


def donor_batches(port: int) -> dict:
    return donor_compute(port)["batch_sizes"]


def measure_dtype(path: str, dtype: str, counts: list[int], args) -> list[dict]:
    """Every row for one donor compute dtype: its own swarm, stopped before the next dtype starts."""
    from client import MeshModel
    from mesh.launcher import LocalSwarm

    rows = []
    with LocalSwarm(ready_timeout=300) as swarm:
        swarm.start_dht()
        cache_tokens = max(counts) * (PROMPT_TOKENS + args.new_tokens) * 2
        [donor] = swarm.start_donors(path, [f"0:{SIZES[args.size]['num_hidden_layers']}"], "--torch-threads",
                                     str(args.threads), "--dtype", dtype, "--cache-tokens", str(cache_tokens))
        with MeshModel.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
            model.generate([1, 2, 3], max_new_tokens=2)  # warm-up
            for n in counts:
                before = donor_batches(donor.port)
                rows.append({"via": "python client", **client_run(model, n, args.new_tokens),
                             "batches": _diff(donor_batches(donor.port), before)})
        _, base_url = swarm.start_gateway(path, 0, "--served-model-name", "bench", "--max-concurrency",
                                          str(max(counts)))
        for n in counts:
            before = donor_batches(donor.port)
            rows.append({"via": "gateway", **gateway_run(base_url, "bench", n, args.new_tokens),
                         "batches": _diff(donor_batches(donor.port), before)})
        pace = {key: donor_compute(donor.port)[key] for key in ("prompt_tokens_per_second", "prompt_piece_tokens")}
    alone = shard_alone(path, counts, args.threads, PROMPT_TOKENS, dtype)  # the swarm is stopped by now
    rows += [{"via": "shard alone", "sessions": n, "aggregate_tokens_per_s": rate, "steady_tokens_per_s": rate,
              "per_session_tokens_per_s": rate / n,
              "p50_inter_token_ms": 1000 * n / rate, "p99_inter_token_ms": 1000 * n / rate, "batches": {str(n): 5}}
             for n, rate in alone.items()]
    for row in rows:
        row["dtype"] = dtype
        row["donor_prompt_pace"] = pace  # what the donor measured of its prompts (server/pacing.py)
        single = next(r for r in rows if r["via"] == row["via"] and r["sessions"] == counts[0])
        row["vs_single"] = row["aggregate_tokens_per_s"] / single["aggregate_tokens_per_s"]
        steady = row["steady_tokens_per_s"]
        row["steady_vs_single"] = None if steady is None else steady / single["aggregate_tokens_per_s"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--sessions", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the donor")
    parser.add_argument("--dtype", default="float32",
                        help="the donor's compute dtype, or several one after the other: float32,bfloat16 "
                             "(bfloat16 batches far better on CPUs with AMX)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    dtypes = args.dtype.split(",")
    unknown = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if unknown:
        parser.error(f"--dtype takes float32 and bfloat16, not {', '.join(unknown)}")
    torch.set_num_threads(1)
    counts = [int(n) for n in args.sessions.split(",")]
    from shards.demo_model import build_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The gateway answers in text, so the model gets the demo model's tokenizer (and its vocabulary size).
        tokenizer = build_tokenizer()
        path = save_size_model(args.size, Path(tmp) / f"{args.size}-llama", vocab_size=len(tokenizer))
        tokenizer.save_pretrained(path)
        for dtype in dtypes:
            rows += measure_dtype(path, dtype, counts, args)
    command = command_line(argv, "benchmarks.concurrency")
    print(f"\ncommand: {command}\nmodel: {args.size} random llama; prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new "
          f"per session; donor torch threads {args.threads}, client 1")
    print("aggregate: all decode tokens over the whole run; steady: while every session decodes (after the\n"
          "last prefill, before the first session ends); 'x single' divides by one session's aggregate rate\n"
          "in the same dtype; batch: the donor's decode batch size that carried the most tokens; gateway\n"
          "latencies are between text chunks (a chunk may carry several tokens), its token counts come from\n"
          "the stream's usage")
    print(f"{'dtype':<9} {'via':<14} {'sessions':>8} {'aggregate tok/s':>16} {'x single':>9} {'steady tok/s':>13} "
          f"{'x single':>9} {'per session':>12} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    for r in rows:
        weighted = {int(size): int(size) * count for size, count in r["batches"].items()}
        common = max(weighted.items(), key=lambda kv: kv[1])[0] if weighted else "-"
        steady = "-" if r["steady_tokens_per_s"] is None else f"{r['steady_tokens_per_s']:.1f}"
        steady_ratio = "-" if r["steady_vs_single"] is None else f"{r['steady_vs_single']:.2f}"
        print(f"{r['dtype']:<9} {r['via']:<14} {r['sessions']:>8} {r['aggregate_tokens_per_s']:>16.1f} "
              f"{r['vs_single']:>9.2f} {steady:>13} {steady_ratio:>9} {r['per_session_tokens_per_s']:>12.1f} "
              f"{r['p50_inter_token_ms']:>8.2f} {r['p99_inter_token_ms']:>8.2f} {common:>6}")
    for dtype in dtypes:
        pace = next(r["donor_prompt_pace"] for r in rows if r["dtype"] == dtype)
        print(f"donor in {dtype}: prompts at {pace['prompt_tokens_per_second']} tokens/s of compute, "
              f"in pieces of up to {pace['prompt_piece_tokens']} tokens")
    save(args.json, command, rows)
    return 0


def _diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


if __name__ == "__main__":
    sys.exit(main())
