"""The `mesh` command: one entry point whose subcommands import their role only when chosen.

Every option has help text and an environment variable (shown in --help), so a donor's container
can be configured without a command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


# Processes that compute in bursts separated by network waits (donors between steps, the gateway's
# head between hops) should not leave OpenMP workers spinning after each burst: by default libgomp
# spins for about 300,000 iterations, long enough to steal the cores that the next donor in the
# chain needs when several share a machine: two donors on one 2-core machine decoded at 0.83x
# transformers' speed with the default, 0.88-1.05x with this count (benchmarks/RESULTS.md). With it,
# barriers inside a step still spin (their gaps are microseconds) and idle workers sleep between
# steps. Must be set before torch is imported; a value the user set, or OMP_WAIT_POLICY, wins.
BURST_GOMP_SPINCOUNT = "10000"


def quiet_idle_openmp(environ=os.environ) -> None:
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = BURST_GOMP_SPINCOUNT


def _option(parser: argparse.ArgumentParser, flag: str, env: str, help: str, default=None, **kwargs):
    """An option with an environment variable. A variable's value is checked like the option's
    (type, choices), but its error is reported only when the command runs (main), so that a bad
    variable never breaks `--help`."""
    value = os.environ.get(env)
    if value is None:
        value = default
    elif kwargs.get("action") == "append" or "nargs" in kwargs:
        value = value.replace(",", " ").split()  # a list option's variable: comma or space separated
    else:
        value = _from_environment(env, value, kwargs.get("type"), kwargs.get("choices"))
    parser.add_argument(flag, default=value, help=f"{help} [env: {env}]", **kwargs)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level_option(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--log-level", "MESH_LOG_LEVEL", "how much the mesh logs to stderr (donors replaced, "
            "sessions freed, layers chosen, ...)", "info", choices=LOG_LEVELS)


def _configure_logging(level: str | None) -> None:
    """The project's own log lines (loggers mesh.*) to stderr with a time; other libraries keep theirs.
    Records still propagate: a mesh process gives the root logger no handler, so nothing prints twice,
    and a program that called main() in-process (tests) still captures them."""
    if not isinstance(level, str):
        return
    logger = logging.getLogger("mesh")
    for previous in [h for h in logger.handlers if getattr(h, "installed_by_mesh_cli", False)]:
        logger.removeHandler(previous)  # main() run twice in one process must not print each line twice
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.installed_by_mesh_cli = True
    logger.addHandler(handler)
    logger.setLevel(level.upper())


class BadVariable:
    """The default of an option whose environment variable does not parse; an error if it is used
    (the option was not given on the command line)."""

    def __init__(self, message: str):
        self.message = message


def _from_environment(env: str, text: str, convert, choices):
    try:
        value = convert(text) if convert else text
    except (ValueError, argparse.ArgumentTypeError) as err:
        return BadVariable(f"{env}={text!r}: {err}")
    if choices is not None and value not in choices:
        return BadVariable(f"{env}={text!r}: choose one of {', '.join(map(str, choices))}")
    return value


def positive(convert):
    """An argparse type: `convert` (int or float) of a value above zero."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = f"positive {convert.__name__}"
    return parse


def port(text):
    """An argparse type: a TCP port, 0 for any free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, got {value}")
    return value


def _add_check(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="run a model as chained shards on this device and compare it with transformers",
        description="Load the model's edges and a chain of layer ranges on this device, decode greedily, "
                    "and compare logits and tokens with transformers. Without --model, the embedded demo "
                    "model is built (once, cached) so the check works offline.")
    _option(parser, "--model", "MESH_MODEL", "local model directory or hub id (default: embedded tiny model)")
    _option(parser, "--shards", "MESH_CHECK_SHARDS", "split the layers evenly into this many shards", 2,
            type=positive(int))
    _option(parser, "--splits", "MESH_CHECK_SPLITS", "explicit half-open layer ranges, e.g. 0:3,3:6")
    _option(parser, "--device", "MESH_DEVICE", "auto, cuda[:N], rocm[:N], mps or cpu", "auto")
    _option(parser, "--dtype", "MESH_DTYPE", "auto, bfloat16, float16 or float32", "auto")
    _option(parser, "--quant", "MESH_QUANT", "quantize the shards' weights: int8 or nf4", choices=["int8", "nf4"])
    _option(parser, "--new-tokens", "MESH_CHECK_NEW_TOKENS", "tokens to generate", 16, type=positive(int))
    _option(parser, "--no-compare", "MESH_CHECK_NO_COMPARE", "skip the comparison with transformers (any "
            "non-empty value)", action="store_true")
    parser.set_defaults(run=_run_check)


def _run_check(args) -> int:
    from shards.errors import ShardError
    from shards.selfcheck import format_report, run_check

    splits = [s.strip() for s in args.splits.split(",")] if args.splits else None
    try:
        report = run_check(args.model, shards=args.shards, splits=splits, device=args.device, dtype=args.dtype,
                           quant=args.quant, new_tokens=args.new_tokens, compare=not args.no_compare)
    except ShardError as err:
        print(f"mesh check: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if report.reference_tokens is not None and report.tokens != report.reference_tokens and not args.quant:
        return 1
    return 0


PEER_FILE_WAIT = 120.0  # seconds to wait for an @file of peers to appear (containers starting together)


def _peers(value) -> list[str]:
    """Peer addresses from a list or a space/comma separated string; "@FILE" reads them from FILE
    (as written by `mesh dht --address-file`), waiting for it to appear."""
    if not value:
        return []
    if isinstance(value, list):
        value = " ".join(value)
    peers = []
    for item in value.replace(",", " ").split():
        peers.extend(_read_peer_file(item[1:]) if item.startswith("@") else [item])
    return peers


def _read_peer_file(path: str) -> list[str]:
    import time

    deadline = time.monotonic() + PEER_FILE_WAIT
    while True:
        try:
            with open(path) as f:
                peers = f.read().split()
            if peers:
                return peers
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"mesh: no peer addresses in {path} after {PEER_FILE_WAIT:.0f}s")
        time.sleep(0.5)


def _add_dht(subparsers) -> None:
    parser = subparsers.add_parser("dht", help="run a bootstrap DHT node that donors and clients join",
                                   description="Run a DHT node and print the addresses others join with "
                                               "(pass them as --initial-peers).")
    _option(parser, "--host", "MESH_DHT_HOST", "interface to listen on", "0.0.0.0")
    _option(parser, "--port", "MESH_DHT_PORT", "TCP port (0 picks a free one)", 0, type=port)
    _option(parser, "--announce-host", "MESH_DHT_ANNOUNCE_HOST", "public IP to announce, if behind NAT")
    _option(parser, "--initial-peers", "MESH_INITIAL_PEERS", "other DHT nodes to join (space separated)",
            nargs="*")
    _option(parser, "--identity", "MESH_DHT_IDENTITY",
            "file holding this node's private key, so its peer id (and, with a fixed --port, its address) "
            "survives restarts (created if absent)")
    _option(parser, "--address-file", "MESH_DHT_ADDRESS_FILE",
            "also write the join addresses to this file (others can pass --initial-peers @FILE)")
    parser.set_defaults(run=_run_dht)


def _run_dht(args) -> int:
    import signal
    import threading

    from mesh.dht import start_dht, visible_addresses

    dht = start_dht(_peers(args.initial_peers), host=args.host, port=args.port, identity_path=args.identity,
                    announce_host=args.announce_host)
    addresses = visible_addresses(dht)
    print("DHT node running. Join it with:")
    for address in addresses:
        print(f"  --initial-peers {address}")
    if args.address_file:
        tmp = f"{args.address_file}.tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(addresses) + "\n")
        os.replace(tmp, args.address_file)  # readers never see a half-written file
    print("MESH_DHT_READY " + " ".join(addresses), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    dht.shutdown()
    return 0


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="donate this device: serve a range of a model's layers",
                                   description="Load layers [a, b) of a model and serve them to the swarm. "
                                               "Without --layers, measure this device and take the range the "
                                               "swarm needs most.")
    _option(parser, "--model", "MESH_MODEL", "hub id or local directory of the model", required=False)
    _option(parser, "--layers", "MESH_LAYERS", "half-open layer range a:b, e.g. 10:20 serves layers 10..19")
    _option(parser, "--initial-peers", "MESH_INITIAL_PEERS", "DHT addresses to join (from `mesh dht`)", nargs="*")
    _option(parser, "--model-name", "MESH_MODEL_NAME", "name of the model in the swarm (default: hub id or "
            "directory name)")
    _option(parser, "--revision", "MESH_REVISION", "hub revision (branch, tag or commit)")
    _option(parser, "--device", "MESH_DEVICE", "auto, cuda[:N], rocm[:N], mps or cpu", "auto")
    _option(parser, "--dtype", "MESH_DTYPE", "auto, bfloat16, float16 or float32", "auto")
    _option(parser, "--quant", "MESH_QUANT", "quantize weights: int8 or nf4", choices=["int8", "nf4"])
    _option(parser, "--host", "MESH_HOST", "interface for the data plane and DHT", "0.0.0.0")
    _option(parser, "--port", "MESH_PORT", "data-plane TCP port (0 picks a free one)", 0, type=port)
    _option(parser, "--dht-port", "MESH_DHT_PORT", "DHT TCP port (0 picks a free one)", 0, type=port)
    _option(parser, "--public-address", "MESH_PUBLIC_ADDRESS", "host or IP others dial for the data plane")
    _option(parser, "--cache-tokens", "MESH_CACHE_TOKENS", "KV cache budget in tokens of the whole range",
            type=positive(int))
    _option(parser, "--cache-bytes", "MESH_CACHE_BYTES", "KV cache budget in bytes", type=positive(int))
    _option(parser, "--idle-timeout", "MESH_IDLE_TIMEOUT", "close sessions idle this many seconds", 300.0,
            type=positive(float))
    _option(parser, "--announce-interval", "MESH_ANNOUNCE_INTERVAL", "seconds between DHT heartbeats", 10.0,
            type=positive(float))
    _option(parser, "--max-batch", "MESH_MAX_BATCH", "most decode steps run as one batch", 64, type=positive(int))
    _option(parser, "--prefill-chunk-tokens", "MESH_PREFILL_CHUNK_TOKENS", "a longer prompt runs in pieces of "
            "at most this many tokens, with other sessions' decode steps in between (bounds its working memory); "
            "new prompts beyond this many tokens wait for the next batch of decode steps; a donor too slow "
            "to compute this many in about 2 s takes fewer", 512,
            type=positive(int))
    _option(parser, "--torch-threads", "MESH_TORCH_THREADS", "CPU threads for torch (share the cores "
            "when several processes run on one machine)", type=positive(int))
    _log_level_option(parser)
    parser.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    quiet_idle_openmp()
    from server.serve import ServeOptions, serve
    from shards.errors import ShardError

    if not args.model:
        print("mesh serve: --model (or MESH_MODEL) is required", file=sys.stderr)
        return 2
    options = ServeOptions(
        model=args.model, layers=args.layers, initial_peers=_peers(args.initial_peers), model_name=args.model_name,
        revision=args.revision, device=args.device, dtype=args.dtype, quant=args.quant, host=args.host,
        port=args.port, public_address=args.public_address, dht_port=args.dht_port, cache_tokens=args.cache_tokens,
        cache_bytes=args.cache_bytes, idle_timeout=args.idle_timeout, announce_interval=args.announce_interval,
        max_batch=args.max_batch, prefill_chunk_tokens=args.prefill_chunk_tokens, torch_threads=args.torch_threads)
    try:
        return serve(options)
    except ShardError as err:
        print(f"mesh serve: {err}", file=sys.stderr)
        return 2


def _add_status(subparsers) -> None:
    parser = subparsers.add_parser("status", help="show models, donors, their ranges and uncovered layers",
                                   description="Join the swarm's DHT as a client and print, per model, its "
                                               "donors (range, address, backend, dtype, throughput, free "
                                               "cache) and the layers no donor serves.")
    _option(parser, "--initial-peers", "MESH_INITIAL_PEERS", "DHT addresses to join", nargs="*")
    _option(parser, "--model", "MESH_MODEL", "only this model (swarm name)")
    parser.set_defaults(run=_run_status)


def _run_status(args) -> int:
    from mesh.dht import fetch_models, fetch_records, start_dht
    from mesh.records import ModelInfo, model_id_for
    from mesh.status import format_status

    peers = _peers(args.initial_peers)
    if not peers:
        print("mesh status: give --initial-peers (or MESH_INITIAL_PEERS): the address of a DHT node of the "
              "swarm, as `mesh dht` printed it", file=sys.stderr)
        return 2
    dht = start_dht(peers, client_mode=True)
    try:
        models = fetch_models(dht)
        if args.model:
            wanted = model_id_for(args.model)
            known = [m.model for m in models]
            models = [m for m in models if m.model == wanted] or [ModelInfo(wanted, 0)]
        records = {m.model: fetch_records(dht, m.model) for m in models}
        if args.model and not records[wanted]:
            print(f"mesh status: no donor announces {wanted!r} in this swarm; announced: "
                  f"{', '.join(known) or 'none'}", file=sys.stderr)
            return 1
        models = [m if m.num_layers else ModelInfo(m.model, max((r.end for r in records[m.model]), default=0))
                  for m in models]
        print(format_status(models, records))
    finally:
        dht.shutdown()
    return 0


def _add_gateway(subparsers) -> None:
    parser = subparsers.add_parser("gateway", help="serve an OpenAI-compatible /v1 API backed by the swarm",
                                   description="An OpenAI-compatible HTTP endpoint (chat, completions, "
                                               "streaming) whose model runs on the swarm.")
    _option(parser, "--model", "MESH_MODEL", "hub id or local directory of the model (config, tokenizer and "
            "the embedding/head weights are read here)")
    _option(parser, "--initial-peers", "MESH_INITIAL_PEERS", "DHT addresses to join", nargs="*")
    _option(parser, "--host", "MESH_GATEWAY_HOST", "interface to listen on", "127.0.0.1")
    _option(parser, "--port", "MESH_GATEWAY_PORT", "HTTP port (0 picks a free one)", 8000, type=port)
    _option(parser, "--api-key", "MESH_API_KEYS", "require this bearer key (repeatable; env: comma separated)",
            action="append")
    _option(parser, "--served-model-name", "MESH_SERVED_MODEL_NAME", "the model id clients send "
            "(default: the swarm name of --model)")
    _option(parser, "--model-name", "MESH_MODEL_NAME", "name of the model in the swarm, if not derived from --model")
    _option(parser, "--max-concurrency", "MESH_MAX_CONCURRENCY", "generations run at once", 64,
            type=positive(int))
    _option(parser, "--route-timeout", "MESH_ROUTE_TIMEOUT", "seconds to wait for a route before answering 503",
            5.0, type=positive(float))
    _log_level_option(parser)
    parser.set_defaults(run=_run_gateway)


def _run_gateway(args) -> int:
    quiet_idle_openmp()
    from client.gateway.serve import GatewayOptions, serve

    if not args.model:
        print("mesh gateway: --model (or MESH_MODEL) is required", file=sys.stderr)
        return 2
    return serve(GatewayOptions(model=args.model, initial_peers=_peers(args.initial_peers), host=args.host,
                                port=args.port, api_keys=args.api_key or [],
                                served_model_name=args.served_model_name, model_name=args.model_name,
                                max_concurrency=args.max_concurrency, route_timeout=args.route_timeout))


def _add_up(subparsers) -> None:
    parser = subparsers.add_parser("up", help="run a whole swarm on this machine: bootstrap, donors, gateway",
                                   description="Start a bootstrap node, donors that split the model evenly, and "
                                               "the OpenAI-compatible gateway, all on 127.0.0.1; Ctrl-C stops "
                                               "them all. Without --model, a small embedded demo model is built "
                                               "(once, cached) so this works offline.")
    _option(parser, "--model", "MESH_MODEL", "hub id or local directory (default: the embedded demo model)")
    _option(parser, "--donors", "MESH_UP_DONORS", "number of donors to split the layers between", 2,
            type=positive(int))
    _option(parser, "--port", "MESH_GATEWAY_PORT", "gateway HTTP port (0 picks a free one)", 8000, type=port)
    _option(parser, "--served-model-name", "MESH_SERVED_MODEL_NAME", "model id for clients (default: the "
            "model's swarm name)")
    _option(parser, "--ask", "MESH_UP_ASK", "send this chat message through the gateway, print the answer, "
            "and stop")
    parser.set_defaults(run=_run_up)


def _run_up(args) -> int:
    from mesh.records import model_id_for
    from mesh.up import run_up
    from shards.checkpoint import Checkpoint
    from shards.errors import ShardError
    from shards.loading import even_splits

    model = args.model
    if not model:
        from shards.demo_model import demo_model_dir

        print("preparing the embedded demo model (built on first use, then cached) ...", flush=True)
        model = str(demo_model_dir())
    try:
        num_layers = Checkpoint(model).load_config().num_hidden_layers
    except ShardError as err:
        print(f"mesh up: {err}", file=sys.stderr)
        return 2
    name = args.served_model_name or model_id_for(model)
    return run_up(model, even_splits(num_layers, args.donors), args.port, name, args.ask)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="A peer-to-peer LLM inference mesh.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_dht(subparsers)
    _add_serve(subparsers)
    _add_status(subparsers)
    _add_gateway(subparsers)
    _add_up(subparsers)
    _add_check(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    bad = [value.message for value in vars(args).values() if isinstance(value, BadVariable)]
    if bad:
        parser.error(f"bad environment variable: {'; '.join(bad)}")
    _configure_logging(getattr(args, "log_level", None))
    from mesh.dht import DHTError

    try:
        return args.run(args)
    except (DHTError, OSError) as err:  # the machine or the network, not the program: one line, no traceback
        print(f"mesh {args.command}: {err.strerror if isinstance(err, OSError) and err.strerror else err}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
