"""A loopback swarm on the demo model, and gateways served by uvicorn in threads on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mesh.launcher import LocalSwarm

API_KEY = "test-key"
SERVED = "demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningGateway:
    def __init__(self, app, model):
        import uvicorn

        self.app, self.model = app, model
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def sdk(self, api_key: str = API_KEY, **kwargs):
        import openai

        options = {"_strict_response_validation": True, "max_retries": 0, "timeout": 120, **kwargs}
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **options)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.engine.close()
        self.model.close()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    from shards.demo_model import save_demo_model

    return save_demo_model(tmp_path_factory.mktemp("demo") / "mesh-demo-llama")


@pytest.fixture(scope="module")
def demo_swarm(demo_model):
    swarm = LocalSwarm(ready_timeout=180)
    swarm.start_dht()
    swarm.start_donors(str(demo_model), ["0:4", "4:8"], "--torch-threads", "1", "--announce-interval", "1",
                       "--cache-tokens", "20000")
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def start_gateway():
    """start_gateway(GatewayOptions) -> RunningGateway; all stopped when the module ends."""
    from client.gateway.serve import build

    running: list[RunningGateway] = []

    def start(options):
        app, model = build(options)
        gateway = RunningGateway(app, model)
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        gateway.stop()


@pytest.fixture(scope="module")
def gateway(demo_swarm, demo_model, start_gateway):
    """The gateway most tests talk to: the demo swarm, served as SERVED, behind API_KEY."""
    from client.gateway.serve import GatewayOptions

    return start_gateway(GatewayOptions(model=str(demo_model), initial_peers=demo_swarm.initial_peers,
                                        served_model_name=SERVED, api_keys=[API_KEY], route_timeout=30))


@pytest.fixture(scope="module")
def sdk(gateway):
    """The real openai SDK, strict response validation, no retries."""
    return gateway.sdk()
