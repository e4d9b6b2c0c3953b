"""On a GPU: local transformers generate (eager, no compile) against the mesh with 2 donors on the
same GPU, for an 8B-class Llama with random weights, in bf16 and in nf4.

Reports decode tokens/s, the ratio mesh ÷ local, time to first token, and the share of memory
bandwidth each achieves: a decode step reads every weight once, so weight bytes per token times
tokens per second is the bandwidth it uses, set against a device-to-device copy measured in the
same run (the most this GPU's memory moves in practice).

Runs only where CUDA or ROCm is present (ROCm builds of torch answer through torch.cuda too) and
says so and exits elsewhere. `--size tiny --device cpu` runs the same code on a tiny model, which
is how CI keeps this script from rotting; its numbers mean nothing.

The local model and the donors do not share the GPU: the local runs come first and free their
memory, then the donors load, so that a 24 GB card can run the 8B model in nf4.

Usage: python -m benchmarks.gpu [--size 8b|tiny] [--quant none,nf4] [--new-tokens 64] [--rounds 3]
                                [--device cuda] [--model-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.generate import PROMPT, SIZES as CPU_SIZES, MeshRun, TransformersRun
from benchmarks.report import command_line, save

# Llama 3.1 8B's shape (hidden 4096, 32 layers, grouped-query attention 32/8, vocab 128256).
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=16384, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                tie_word_embeddings=False)
SIZES = {"8b": LLAMA_8B, "tiny": {**CPU_SIZES["tiny"], "max_position_embeddings": 1024}}
SHARD_BYTES = 4 * 2**30  # safetensors files of the written checkpoint, as hub checkpoints split them
WEIGHT_STD = 0.02


def write_random_checkpoint(size: str, directory: Path, dtype: torch.dtype, device: str, seed: int = 0) -> Path:
    """A random Llama of `size` in `dtype`, written tensor by tensor (an 8B model never exists whole in
    memory): config.json, safetensors files and their index, as a hub checkpoint has them. Reused
    when `directory` already holds one of this size, dtype and seed."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from shards.random_model import random_config

    dtype_name = str(dtype).removeprefix("torch.")
    marker, written = directory / "random-checkpoint.txt", f"{size} {dtype_name} seed {seed}"
    if marker.exists() and marker.read_text() == written:
        return directory
    config = random_config("llama", **SIZES[size], dtype=dtype_name)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    groups = _group_by_bytes(shapes, dtype.itemsize)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    for index, names in enumerate(groups):
        filename = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _random_tensor(name, shapes[name], dtype, device, generator) for name in names}
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(torch.Size(shape).numel() for shape in shapes.values()) * dtype.itemsize
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(directory)
    marker.write_text(written)
    return directory


def _group_by_bytes(shapes: dict[str, tuple], itemsize: int) -> list[list[str]]:
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * itemsize
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return groups + ([current] if current else [])


def _random_tensor(name: str, shape: tuple, dtype: torch.dtype, device: str, generator) -> torch.Tensor:
    if len(shape) == 1:  # the RMS norms' scales
        return torch.ones(shape, dtype=dtype)
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * WEIGHT_STD
    return values.to(dtype).cpu()


def copy_bandwidth(device: str, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves, counting what it reads and what it writes."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _synchronize(device)
    elapsed = time.perf_counter() - started
    del source, target
    return 2 * nbytes * repeats / elapsed


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def weight_bytes_per_token(model) -> int:
    """Bytes of the weights one decode step reads: every parameter except the input embedding, of
    which a step reads one row (unless the head shares it). Quantized weights count as stored."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)


def quantization_config(quant: str, compute_dtype: torch.dtype):
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def measure(path: str, quant: str, device: str, dtype: torch.dtype, new_tokens: int, rounds: int,
            bandwidth: float) -> list[dict]:
    """Local rounds first, then the mesh's (module docstring: they do not share the GPU)."""
    local = TransformersRun(path, new_tokens, device=device, dtype=dtype,
                            quantization_config=quantization_config(quant, dtype))
    weight_bytes = weight_bytes_per_token(local.model)
    local_runs = [local() for _ in range(rounds)]
    local.close()
    dtype_name = str(dtype).removeprefix("torch.")
    donor_args = ("--device", device, "--dtype", dtype_name, "--cache-tokens", str(2 * (len(PROMPT) + new_tokens) + 64),
                  *(("--quant", quant) if quant != "none" else ()))
    with MeshRun(path, 2, new_tokens, threads=min(4, os.cpu_count() or 1), donor_args=donor_args,
                 client_options={"device": device, "dtype": dtype_name}) as mesh:
        mesh_runs = [mesh() for _ in range(rounds)]
    local_rate = statistics.median(run["decode_tokens_per_s"] for run in local_runs)
    rows = []
    for way, runs in (("transformers generate (eager)", local_runs), ("mesh, 2 donors", mesh_runs)):
        rate = statistics.median(run["decode_tokens_per_s"] for run in runs)
        rows.append({"quant": quant, "way": way, "rounds": rounds, "decode_tokens_per_s": rate,
                     "vs_local": rate / local_rate, "ttft_ms": statistics.median(run["ttft_ms"] for run in runs),
                     "weight_bytes_per_token": weight_bytes, "weights_gb_per_s": weight_bytes * rate / 1e9,
                     "share_of_copy_bandwidth": weight_bytes * rate / bandwidth})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--quant", default=None, help="comma-separated: none, nf4 (default: both where bitsandbytes "
                                                      "is installed and the device is a GPU)")
    parser.add_argument("--device", default="cuda", help="cuda[:N] (ROCm too); cpu only with --size tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", help="write the random checkpoint here and reuse it on later runs "
                                            "(default: a temporary directory)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA or ROCm device here; nothing to measure "
              "(--size tiny --device cpu runs the script's code on a tiny model)")
        return 0
    if args.device == "cpu" and args.size != "tiny":
        parser.error("--device cpu is for --size tiny only (it checks the script, not a GPU)")
    quants = (args.quant or default_quants(args.device)).split(",")
    if not set(quants) <= {"none", "nf4"}:
        parser.error(f"--quant takes none and nf4, not {args.quant!r}")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.model_dir or Path(tmp) / f"{args.size}-llama")
        path = str(write_random_checkpoint(args.size, directory, dtype, args.device))
        bandwidth = copy_bandwidth(args.device, nbytes=2**30 if args.device != "cpu" else 2**26)
        rows = [row for quant in quants
                for row in measure(path, quant, args.device, dtype, args.new_tokens, args.rounds, bandwidth)]
    print_table(argv, args, bandwidth, rows)
    save(args.json, command_line(argv, "benchmarks.gpu"), rows)
    return 0


def default_quants(device: str) -> str:
    if device == "cpu":
        return "none"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes is not installed: nf4 skipped (pip install 'llm-mesh[quant]')")
        return "none"
    return "none,nf4"


def print_table(argv, args, bandwidth: float, rows: list[dict]) -> None:
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"\ncommand: {command_line(argv, 'benchmarks.gpu')}")
    print(f"device: {name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write, measured in this run); "
          f"model: {args.size} random llama in {args.dtype}; prompt {len(PROMPT)} tokens, {args.new_tokens} new; "
          f"{args.rounds} round(s) each, medians")
    print(f"{'quant':<6} {'way':<30} {'decode tok/s':>12} {'÷ local':>8} {'TTFT ms':>8} {'weights GB/token':>16} "
          f"{'weights GB/s':>12} {'share of copy bw':>16}")
    for row in rows:
        print(f"{row['quant']:<6} {row['way']:<30} {row['decode_tokens_per_s']:>12.1f} {row['vs_local']:>8.3f} "
              f"{row['ttft_ms']:>8.1f} {row['weight_bytes_per_token'] / 1e9:>16.3f} {row['weights_gb_per_s']:>12.1f} "
              f"{row['share_of_copy_bandwidth']:>16.2f}")


if __name__ == "__main__":
    sys.exit(main())
