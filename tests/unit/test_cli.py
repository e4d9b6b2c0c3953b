"""The `mesh` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_serve_and_gateway_set_the_spin_count_before_torch_loads(command, monkeypatch):
    import os

    from mesh.cli import BURST_GOMP_SPINCOUNT, main

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MESH_MODEL"):
        monkeypatch.delenv(name, raising=False)
    assert main([command]) == 2  # no model: stops right after the spin count is set
    assert os.environ["GOMP_SPINCOUNT"] == BURST_GOMP_SPINCOUNT


def test_list_options_from_the_environment_combine_with_flags(monkeypatch):
    from mesh.cli import build_parser

    monkeypatch.setenv("MESH_API_KEYS", "alpha, beta")
    monkeypatch.setenv("MESH_INITIAL_PEERS", "/ip4/1.2.3.4/tcp/1/p2p/A,/ip4/5.6.7.8/tcp/2/p2p/B")
    args = build_parser().parse_args(["gateway", "--api-key", "gamma"])
    assert args.api_key == ["alpha", "beta", "gamma"]
    assert args.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/5.6.7.8/tcp/2/p2p/B"]


def test_serve_refuses_a_prefill_piece_of_no_tokens(capsys, monkeypatch):
    from mesh.cli import main

    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")  # main would set it in this process's environment
    assert main(["serve", "--model", "some/model", "--prefill-chunk-tokens", "0"]) == 2
    assert "--prefill-chunk-tokens must be at least 1, got 0" in capsys.readouterr().err
