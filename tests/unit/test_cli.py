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


@pytest.mark.parametrize("flag, value, message", [
    ("--prefill-chunk-tokens", "0", "must be above 0, got 0"),
    ("--announce-interval", "0", "must be above 0, got 0"),  # a record that expires as it is stored
    ("--cache-tokens", "-5", "must be above 0, got -5"),
    ("--torch-threads", "-2", "must be above 0, got -2"),
    ("--port", "70000", "a port is between 0 and 65535, got 70000"),
])
def test_serve_refuses_values_that_would_leave_a_broken_donor(flag, value, message):
    out = run_mesh("serve", "--model", "some/model", flag, value)
    assert out.returncode == 2 and f"argument {flag}: {message}" in out.stderr


def test_a_bad_environment_variable_is_named_when_used_and_never_breaks_help():
    import os

    env = {**os.environ, "MESH_PORT": "abc", "MESH_QUANT": "int4"}
    assert run_mesh("--help", env=env).returncode == 0
    assert run_mesh("serve", "--help", env=env).returncode == 0
    out = run_mesh("serve", "--model", "some/model", env=env)
    assert out.returncode == 2
    assert "MESH_PORT='abc': not a port number: 'abc'" in out.stderr
    assert "MESH_QUANT='int4': choose one of int8, nf4" in out.stderr
    out = run_mesh("serve", "--model", str(ROOT / "no-such-model"), "--port", "0", "--quant", "int8", env=env)
    assert "environment variable" not in out.stderr  # the command line overrides both variables


def test_ports_in_use_are_one_line_errors_before_any_loading():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        serve = run_mesh("serve", "--model", "no-such-model", "--host", "127.0.0.1", "--port", port)
        dht = run_mesh("dht", "--host", "127.0.0.1", "--port", port)
    assert serve.returncode == 2 and serve.stderr.strip() == (
        f"mesh serve: the data-plane port {port} is already in use on 127.0.0.1: stop what uses it, or choose "
        "another port (0 picks a free one)")
    assert dht.returncode == 2 and f"mesh dht: the DHT port {port} is already in use" in dht.stderr
    assert "Traceback" not in serve.stderr + dht.stderr


def test_a_port_left_in_time_wait_by_a_killed_donor_is_free_again():
    """A donor killed with connections open leaves them in TIME_WAIT for a minute; its restart on the
    same port must not be told the port is in use (the listener itself sets SO_REUSEADDR)."""
    import socket

    from mesh.listener import ensure_port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the side that closes first keeps the TIME_WAIT: here, the server's port
        client.recv(1)
        client.close()
        with pytest.raises(OSError, match="already in use"):
            ensure_port_free("127.0.0.1", port, "the data-plane")  # still listening: taken
    ensure_port_free("127.0.0.1", port, "the data-plane")


def test_dht_failures_are_one_line_errors():
    no_peers = run_mesh("status")
    assert no_peers.returncode == 2 and "mesh status: give --initial-peers" in no_peers.stderr
    malformed = run_mesh("status", "--initial-peers", "garbage", timeout=120)
    assert malformed.returncode == 2 and "Traceback" not in malformed.stderr
    assert malformed.stderr.startswith('mesh status: a malformed address (failed to parse multiaddr "garbage"')
    identity = run_mesh("dht", "--host", "127.0.0.1", "--identity", str(ROOT / "no-such-dir" / "key"), timeout=120)
    assert identity.returncode == 2 and "Traceback" not in identity.stderr
    assert "mesh dht: cannot start the DHT node: The directory" in identity.stderr


def test_log_level_sets_what_the_mesh_prints_and_running_twice_prints_once(monkeypatch, capsys):
    import logging

    from mesh.cli import main

    monkeypatch.delenv("MESH_MODEL", raising=False)
    log = logging.getLogger("mesh.donor")
    try:
        for level in ("info", "warning"):
            assert main(["serve", "--log-level", level]) == 2  # no model: stops after logging is set up
        log.info("not shown at warning")
        log.warning("shown once")
        err = capsys.readouterr().err
        assert "not shown" not in err
        assert err.count("mesh.donor: shown once") == 1  # level spelled WARNING, or WARN once hivemind is imported
    finally:
        for handler in list(logging.getLogger("mesh").handlers):
            if getattr(handler, "installed_by_mesh_cli", False):
                logging.getLogger("mesh").removeHandler(handler)
        logging.getLogger("mesh").setLevel(logging.NOTSET)


def test_a_log_level_that_does_not_exist_is_refused_with_the_choices():
    out = run_mesh("gateway", "--model", "m", "--log-level", "loud")
    assert out.returncode == 2
    assert "argument --log-level: invalid choice: 'loud' (choose from" in out.stderr
