"""`mesh gateway` as a process: it starts, serves, and stops on SIGTERM."""

from __future__ import annotations

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
