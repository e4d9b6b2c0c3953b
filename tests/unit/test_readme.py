"""The README's promises: CI runs its test command, and its Python example works as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = code_blocks("bash")[1].strip()
    assert "pytest" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command


def test_python_example_runs(tmp_path):
    example = next(b for b in code_blocks("python") if "load_shard" in b).replace("/tmp/tiny-qwen3", str(tmp_path / "tiny-qwen3"))
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    # 2 layers x (keys + values) x 2 kv heads x 64 tokens x head_dim 24 x 4 bytes
    assert lines[0] == f"{2 * 2 * 2 * 64 * 24 * 4} bytes of cache for 64 tokens in layers 0:2"
    tokens = eval(lines[1])
    assert len(tokens) == 8 and all(0 <= t < 256 for t in tokens)
