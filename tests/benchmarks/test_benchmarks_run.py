"""Every benchmark runs at its tiny size in CI, so none of them rots. (Numbers are not asserted here:
this machine is shared and noisy; benchmarks/RESULTS.md has the measured figures.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(script: str, *args: str, tmp_path) -> dict:
    out_file = tmp_path / f"{script}.json"
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args, "--json", str(out_file)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "command: python" in out.stdout
    return json.loads(out_file.read_text())


def test_hop_latency_benchmark(tmp_path):
    result = run_benchmark("hop_latency", "--steps", "20", "--donors", "1,2", "--trace", tmp_path=tmp_path)
    rows = result["results"]
    assert [(r["donors"], r["mode"]) for r in rows] == [(1, "relayed"), (1, "floor"), (2, "relayed"),
                                                         (2, "forwarded"), (2, "floor")]
    assert all(r["step_ms"] > 0 and r["added_per_hop_ms"] > 0 for r in rows)
    assert rows[3]["forwarded_over_relayed"] > 0
    # the floor: bare relays busy as long as the donors compute, so their steps take longer than what they add
    floors = [r for r in rows if r["mode"] == "floor"]
    assert all(r["step_ms"] > r["added_per_hop_ms"] * r["hops"] for r in floors)
    assert all(r["over_floor_ms"] == r["added_per_hop_ms"] - next(f for f in floors if f["donors"] == r["donors"])["added_per_hop_ms"]
               for r in rows if r["mode"] != "floor")
    # where the time goes: every segment time-stamped (no gap between donors with one donor)
    assert len(rows[0]["segments_us"]) == 3 and len(rows[3]["segments_us"]) == 4 and len(rows[4]["segments_us"]) == 4
    assert all(value > 0 for r in rows for value in r["segments_us"].values())


def test_bare_relay_floor_on_its_own(tmp_path):
    result = run_benchmark("bare_relay", "--hops", "1,2", "--steps", "20", "--work-us", "300", tmp_path=tmp_path)
    rows = result["results"]
    assert [r["hops"] for r in rows] == [1, 2] and all(r["work_us"] == 300 for r in rows)
    # a crossing is one of hops + 1 per step, so the added time per hop is at least one crossing's worth
    assert all(r["crossing_us"] > 0 and r["added_per_hop_ms"] * 1000 >= r["crossing_us"] for r in rows)


def test_transport_benchmark(tmp_path):
    result = run_benchmark("transport", "--sizes", "8192,1048576", "--seconds", "0.2", tmp_path=tmp_path)
    rows = {r["bytes"]: r for r in result["results"]}
    assert set(rows) == {8192, 1048576}
    assert all(r["mesh_rtt_ms"] > 0 and r["libp2p_rtt_ms"] > 0 for r in rows.values())


def test_generate_benchmark(tmp_path):
    result = run_benchmark("generate", "--size", "tiny", "--donors", "1", "--new-tokens", "8", "--rounds", "1", tmp_path=tmp_path)
    ways = [r["way"] for r in result["results"]]
    assert ways == ["transformers generate", "local shards", "mesh, 1 donor(s)"]
    assert all(r["decode_tokens_per_s"] > 0 for r in result["results"])


def test_concurrency_benchmark(tmp_path):
    result = run_benchmark("concurrency", "--size", "tiny", "--sessions", "1,4", "--new-tokens", "6",
                           "--dtype", "float32,bfloat16", tmp_path=tmp_path)
    rows = [(r["dtype"], r["via"], r["sessions"]) for r in result["results"]]
    per_dtype = [("python client", 1), ("python client", 4), ("gateway", 1), ("gateway", 4),
                 ("shard alone", 1), ("shard alone", 4)]
    assert rows == [(dtype, *row) for dtype in ("float32", "bfloat16") for row in per_dtype]
    assert all(r["aggregate_tokens_per_s"] > 0 for r in result["results"])


def test_memory_benchmark(tmp_path):
    [result] = run_benchmark("memory", "--size", "tiny", "--cache-tokens", "256", tmp_path=tmp_path)["results"]
    assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0
    assert result["weight_bytes"] > 0 and result["cache_budget_bytes"] > 0


def test_long_prompt_benchmark(tmp_path):
    rows = run_benchmark("long_prompt", "--size", "tiny", "--prompt-tokens", "256", "--prompts", "2", "--chunk", "32",
                         "--rounds", "1", tmp_path=tmp_path)["results"]
    assert [(r["prefill_chunk"], r["prompts"]) for r in rows] == [("32 tokens", 2), ("paced only", 2)]
    assert all(r["prompt_s"] > 0 and r["longest_step_ms"] > 0 for r in rows)
    assert rows[0]["steps_during"] >= 1  # in pieces of 32 tokens, the decoding session steps meanwhile


def test_cold_path_benchmark(tmp_path):
    rows = run_benchmark("cold_path", "--repeats", "20", "--pause-ms", "0.5", tmp_path=tmp_path)["results"]
    assert {r["operation"] for r in rows} >= {"header: orjson.loads", "payload -> StepBuffer.load (copy)"}
    assert all(r["warm_us"] > 0 and r["cold_us"] > 0 for r in rows)


def test_connect_burst_benchmark(tmp_path):
    result = run_benchmark("connect_burst", "--clients", "8", "--turn-ms", "20", "--rounds", "1", tmp_path=tmp_path)
    rows = result["results"]
    assert [r["server"] for r in rows] == ["mesh listener", "loop.create_server"]
    assert all(r["failed"] == 0 and r["first_reply_max_ms"] >= r["first_reply_p50_ms"] > 0 for r in rows)
    assert rows[0]["slowest_first_reply_vs_listener"] == 1.0


def test_gpu_benchmark_runs_its_code_on_cpu(tmp_path):
    """The gpu benchmark's code, on a tiny model on the CPU (its GPU figures are in RESULTS.md)."""
    result = run_benchmark("gpu", "--size", "tiny", "--device", "cpu", "--new-tokens", "6", "--rounds", "1",
                           "--model-dir", str(tmp_path / "model"), tmp_path=tmp_path)
    rows = result["results"]
    assert [(r["quant"], r["way"]) for r in rows] == [("none", "transformers generate (eager)"),
                                                      ("none", "mesh, 2 donors")]
    assert rows[0]["vs_local"] == 1.0 and rows[1]["vs_local"] > 0
    # weights read per token: every bf16 parameter but the input embedding (the tiny model's head is its own)
    from benchmarks.gpu import SIZES
    s = SIZES["tiny"]
    d, i, v, layers = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
    assert rows[0]["weight_bytes_per_token"] == 2 * (layers * per_layer + d + v * d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run")
def test_gpu_benchmark_without_a_gpu_says_so():
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--size", "tiny"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0
    assert "no CUDA or ROCm device here" in out.stdout
