"""`mesh gateway` as a process: it starts, serves, and stops on SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import signal
import time

import httpx

from mesh.launcher import LocalSwarm


def test_mesh_gateway_command(demo_swarm, demo_model):
    swarm = LocalSwarm(ready_timeout=120)
    swarm.initial_peers = demo_swarm.initial_peers
    try:
        process, base_url = swarm.start_gateway(str(demo_model), 0, "--served-model-name", "demo",
                                                "--api-key", "k1", "--api-key", "k2")
        assert httpx.get(base_url.removesuffix("/v1") + "/health", timeout=30).json() == {"status": "ok"}
        reply = httpx.post(base_url + "/completions", headers={"Authorization": "Bearer k2"}, timeout=60,
                           json={"model": "demo", "prompt": "Hello", "max_tokens": 3}).json()
        assert reply["usage"]["completion_tokens"] >= 1
        assert httpx.get(base_url + "/models", headers={"Authorization": "Bearer k3"}).status_code == 401
    finally:
        swarm.stop()
    assert process.popen.returncode == 0  # SIGTERM: a clean shutdown


def test_second_interrupt_stops_the_gateway_without_waiting_for_streams(demo_swarm, demo_model):
    """Ctrl-C drains the streams in flight; Ctrl-C again stops at once (still exit code 0)."""
    swarm = LocalSwarm(ready_timeout=120)
    swarm.initial_peers = demo_swarm.initial_peers
    try:
        process, base_url = swarm.start_gateway(str(demo_model), 0, "--served-model-name", "demo")
        request = {"model": "demo", "prompt": "Hello", "max_tokens": 2000, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", base_url + "/completions", json=request, timeout=60) as reply:
            chunks = reply.iter_lines()
            lines.append(next(line for line in chunks if line.startswith("data:")))
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
            time.sleep(0.5)
            os.killpg(process.pid, signal.SIGINT)
            try:
                lines.extend(chunks)
            except httpx.HTTPError:
                pass  # the connection went down mid-stream
        process.popen.wait(timeout=10)
    finally:
        swarm.stop()
    assert process.popen.returncode == 0
    assert "data: [DONE]" not in lines  # the stream did not run to its end first
