"""`mesh up` as the README runs it: a whole swarm on this machine, a real chat request, and nothing
left running afterwards."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries `tag` (children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:  # zombies are already dead
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_nothing_left(tag: str, grace: float = 20.0) -> None:
    """Every process started under `tag` exits within `grace` seconds (helpers may need a moment)."""
    deadline = time.monotonic() + grace
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left if Path(f"/proc/{pid}").exists()]


def mesh_command(readme_words: list[str]) -> list[str]:
    assert readme_words[0].endswith("bin/mesh")
    return [sys.executable, "-m", "mesh.cli", *readme_words[1:]]


def test_readme_first_command_runs_a_swarm_and_answers(tmp_path):
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[0].strip()
    up = shlex.split(first.split("&&")[-1])
    assert up[1] == "up" and "--ask" in up
    tag = f"MESH_TEST_TAG={uuid.uuid4().hex}"
    env = {**os.environ, "MESH_CACHE_DIR": str(tmp_path / "cache"), "MESH_TEST_TAG": tag}
    out = subprocess.run(mesh_command(up), capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "the mesh is up: an OpenAI-compatible endpoint at http://127.0.0.1:" in out.stdout
    answers = [line for line in out.stdout.splitlines() if line.startswith("answer: ")]
    assert len(answers) == 1 and len(answers[0]) > len("answer: ")
    assert "curl -s http://127.0.0.1:" in out.stdout
    assert_nothing_left(tag)


def test_mesh_up_with_a_local_model_and_three_donors(model_dir):
    tag = f"MESH_TEST_TAG={uuid.uuid4().hex}"
    env = {**os.environ, "MESH_TEST_TAG": tag}
    path = model_dir("qwen3")
    up = subprocess.Popen([sys.executable, "-u", "-m", "mesh.cli", "up", "--model", str(path), "--donors", "3",
                           "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env=env)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while not any(line.startswith("Ctrl-C stops") for line in lines):
            assert time.monotonic() < deadline and up.poll() is None, "\n".join(lines)
            lines.append(up.stdout.readline().rstrip("\n"))
        assert "starting 3 donor(s): layers 0:2 2:4 4:6 (loading weights) ..." in lines, lines
        dht = next(line.split()[1] for line in lines if line.startswith("DHT: "))
        status = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--initial-peers", dht],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert "6 layers, 3 donor(s), all layers served" in status.stdout, status.stdout + status.stderr
        for layers in ("0:2", "2:4", "4:6"):
            assert f"\n  {layers} " in status.stdout
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0
    assert_nothing_left(tag)
