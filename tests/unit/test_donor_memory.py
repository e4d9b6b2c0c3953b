"""A donor checks memory before it serves: what a container may use, whether one layer fits, and
whether the cache budget asked for fits beside the weights. Each failure is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.serve import ServeOptions, pick_layers
from shards.device import DeviceInfo, _read_cgroup_memory, _within_cgroup_limit
from shards.errors import InsufficientMemoryError
from shards.loading import open_checkpoint
from tests.unit.test_device import FakeProbe

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def test_a_container_limit_bounds_the_free_memory(tmp_path):
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert _read_cgroup_memory(str(tmp_path)) == (4 * GiB, GiB)
    assert _within_cgroup_limit(20 * GiB, 64 * GiB, (4 * GiB, GiB)) == (3 * GiB, 4 * GiB)
    assert _within_cgroup_limit(2 * GiB, 64 * GiB, (4 * GiB, GiB)) == (2 * GiB, 4 * GiB)  # the host is tighter
    (tmp_path / "memory.max").write_text("max\n")
    assert _read_cgroup_memory(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("5")
    assert _read_cgroup_memory(str(v1)) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(8 * GiB))
    assert _read_cgroup_memory(str(v1)) == (8 * GiB, 5)
    assert _read_cgroup_memory(str(tmp_path / "absent")) is None


class LittleMemory(FakeProbe):
    def host_memory(self):
        return 2**20, 2**20


def test_placement_says_when_not_even_one_layer_fits(model_dir):
    ckpt = open_checkpoint(model_dir("llama"))
    info = DeviceInfo("cpu", "cpu", "CPU", 2**20, LittleMemory(gpus=[]))
    with pytest.raises(InsufficientMemoryError, match="not even one layer fits on cpu CPU") as caught:
        pick_layers(ServeOptions(model="m", cache_bytes=2**20), ckpt, ckpt.load_config(), "m", dht=None,
                    info=info, dtype=torch.float32)
    assert "1.0 MiB are free and 1.0 MiB of it would go to the KV cache" in str(caught.value)
    assert "--quant" in str(caught.value)


def test_a_cache_budget_beyond_the_free_memory_is_refused_at_start(model_dir):
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "serve", "--model", str(model_dir("llama")), "--layers", "0:2",
                          "--host", "127.0.0.1", "--cache-bytes", str(2**50), "--torch-threads", "1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mesh serve: a KV cache of 1048576.00 GiB does not fit: ")
    assert "lower --cache-tokens or --cache-bytes (about " in last and "Traceback" not in out.stderr
