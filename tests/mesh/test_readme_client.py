"""The README's Python client example, run as written against a loopback swarm."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def client_example() -> str:
    readme = (ROOT / "README.md").read_text()
    return next(block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                if "MeshModel.from_pretrained" in block)


def test_readme_client_example_runs(local_swarm, model_dir):
    path = model_dir("llama")
    swarm = local_swarm(path, ["0:4", "4:6"])
    example = client_example()
    example = re.sub(r'initial_peers = \[.*?\]', f"initial_peers = {swarm.initial_peers!r}", example)
    example = example.replace('"Qwen/Qwen3-8B"', repr(str(path)))
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    greedy, sampled = eval(lines[0]), eval(lines[1])
    # Up to 16 tokens each: generation also stops at the model's end-of-sequence token.
    assert 0 < len(greedy) <= 16 and 0 < len(sampled) <= 16 and greedy != sampled
    streamed = [int(t) for t in lines[2:]]
    assert streamed == greedy[:len(streamed)] and len(streamed) == min(8, len(greedy))
