"""The `mesh` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_mesh(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


def test_help_is_fast_and_imports_no_role():
    script = "import sys, mesh.cli; mesh.cli.build_parser(); print(sorted(m for m in ('torch', 'shards') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    assert "check" in run_mesh("--help").stdout


def test_check_reports_identical_tokens(model_dir):
    out = run_mesh("check", "--model", str(model_dir("qwen3")), "--splits", "0:1,1:4,4:6", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "shards   0:1 1:4 4:6" in out.stdout
    assert "greedy   identical to transformers generate" in out.stdout


def test_check_reports_bad_input_clearly(model_dir):
    out = run_mesh("check", "--model", str(model_dir("qwen3")), "--splits", "0:4,4:9")
    assert out.returncode == 2
    assert "mesh check: layer range [4, 9) is outside the model, which has 6 layers" in out.stderr


def test_options_read_environment_variables(model_dir):
    import os

    env = {**os.environ, "MESH_MODEL": str(model_dir("qwen3")), "MESH_CHECK_SPLITS": "0:6", "MESH_DEVICE": "cpu",
           "MESH_CHECK_NEW_TOKENS": "4"}
    out = run_mesh("check", env=env)
    assert out.returncode == 0, out.stderr
    assert "shards   0:6" in out.stdout and "greedy   identical" in out.stdout


def test_donors_and_gateways_keep_idle_openmp_workers_from_spinning():
    from mesh.cli import BURST_GOMP_SPINCOUNT, quiet_idle_openmp

    environ = {}
    quiet_idle_openmp(environ)
    assert environ == {"GOMP_SPINCOUNT": BURST_GOMP_SPINCOUNT}
    for users in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        environ = dict(users)
        quiet_idle_openmp(environ)
        assert environ == users  # what the user chose wins
