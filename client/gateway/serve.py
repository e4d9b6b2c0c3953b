"""`mesh gateway`: a MeshModel behind the OpenAI-compatible app, served by uvicorn."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GatewayOptions:
    model: str
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    model_name: str | None = None  # the model's name in the swarm, if not derived from `model`
    max_concurrency: int = 64
    route_timeout: float = 5.0
    request_timeout: float = 60.0


def build(options: GatewayOptions):
    from client.gateway.app import GatewaySettings, create_app
    from client.gateway.engine import Engine
    from client import MeshModel

    model = MeshModel.from_pretrained(options.model, initial_peers=options.initial_peers,
                                      model_name=options.model_name, route_timeout=options.route_timeout,
                                      request_timeout=options.request_timeout)
    if model.tokenizer is None:
        model.close()
        raise SystemExit(f"mesh gateway: {options.model} has no tokenizer; the OpenAI API speaks text, so the "
                         "gateway needs one (tokenizer.json or equivalent beside the model's config)")
    served = options.served_model_name or model.swarm.model_id
    settings = GatewaySettings(served_model_name=served, api_keys=list(options.api_keys))
    return create_app(Engine(model, options.max_concurrency), settings), model


def serve(options: GatewayOptions) -> int:
    import uvicorn

    app, model = build(options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # The first signal drains: streams in flight finish, then the cleanup below closes the DHT
            # node and the donors' sessions. Unlike uvicorn's own handler this does not re-raise the
            # signal afterwards, which would kill the process before that cleanup. A second signal
            # (Ctrl-C again) stops waiting for the streams; the cleanup still runs.
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", loop="asyncio")
    server = Server(config)
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else options.port
        # Printed once the port is bound: with --port 0 it is known only now.
        print(f"gateway for {app.state.settings.served_model_name} on http://{options.host}:{port}/v1", flush=True)
        print(f"MESH_GATEWAY_READY http://{options.host}:{port}/v1", flush=True)

    server.startup = startup
    try:
        server.run()
    finally:
        app.state.engine.close()
        model.close()
    return 0
