"""`mesh serve`: load a layer range, join the DHT, serve it until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field

import torch

from mesh.dht import fetch_records, start_dht, visible_addresses
from mesh.listener import ensure_port_free
from mesh.placement import choose_range
from mesh.records import model_id_for
from mesh.transport import install_fast_event_loop
from server.donor import Donor, DonorSettings, Heartbeat, ready_line
from server.handlers import process_memory
from server.host_memory import return_large_buffers_to_the_system
from server.throughput import measure_prompt_speed, measure_throughput
from shards.checkpoint import Checkpoint
from shards.device import DeviceInfo, choose_dtype, detect_device
from shards.errors import InsufficientMemoryError
from shards.loading import load_shard, open_checkpoint, parse_layers
from shards.shard import PREFILL_CHUNK_TOKENS

log = logging.getLogger("mesh.serve")
QUANT_BYTES_PER_PARAM = {"int8": 1.0, "nf4": 0.55}
CPU_DEFAULT_CACHE_SHARE = 0.25  # of available host memory, when no cache size is given
GPU_DEFAULT_CACHE_SHARE = 0.5  # of GPU memory left after the weights


@dataclass
class ServeOptions:
    model: str
    layers: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    model_name: str | None = None
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    quant: str | None = None
    host: str = "0.0.0.0"
    port: int = 0
    public_address: str | None = None
    dht_port: int = 0
    cache_tokens: int | None = None
    cache_bytes: int | None = None
    idle_timeout: float = 300.0
    announce_interval: float = 10.0
    max_batch: int = 64
    prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS
    torch_threads: int | None = None


def layer_bytes(ckpt: Checkpoint, prefix: str, dtype: torch.dtype, quant: str | None) -> int:
    """Bytes one layer will take once loaded, from the checkpoint's headers only."""
    names = [n for n in ckpt.weight_map if n.startswith(prefix)]
    params = 0
    for name in names:
        shape = ckpt.entry(name).shape
        count = 1
        for dim in shape:
            count *= dim
        params += count
    per_param = QUANT_BYTES_PER_PARAM[quant] if quant else torch.empty((), dtype=dtype).element_size()
    return int(params * per_param)


def pick_layers(opts: ServeOptions, ckpt: Checkpoint, config, model_id: str, dht, info: DeviceInfo,
                dtype: torch.dtype) -> tuple[int, int]:
    if opts.layers:
        return parse_layers(opts.layers, config.num_hidden_layers)
    from shards.families import family_for

    per_layer = layer_bytes(ckpt, family_for(config).layer_prefix.format(0), dtype, opts.quant)
    free = info.free_memory() or 8 * 2**30
    reserve = opts.cache_bytes or int(free * (GPU_DEFAULT_CACHE_SHARE if info.is_gpu else CPU_DEFAULT_CACHE_SHARE))
    capacity = int((free * 0.9 - reserve) // max(per_layer, 1))
    if capacity < 1:
        raise InsufficientMemoryError(
            f"not even one layer fits on {info.describe(dtype)}: a layer takes {_size(per_layer)}, {_size(free)} "
            f"are free and {_size(reserve)} of it would go to the KV cache; free some memory, lower the cache "
            "(--cache-tokens, --cache-bytes), quantize (--quant), or give --layers explicitly")
    fingerprint = ckpt.fingerprint()
    records = [r for r in fetch_records(dht, model_id) if r.config in ("", fingerprint)]  # others: another model
    chosen = choose_range(config.num_hidden_layers, capacity, records)
    log.info("no --layers given: %d layer(s) fit; the swarm needs [%d, %d) most", capacity, *chosen)
    return chosen


def check_cache_fits(budget: int, shard, info: DeviceInfo) -> None:
    """Sessions allocate their cache when they open: a budget beyond the free memory would be found
    out hours later, by a session that crashes the donor. Refuse it now, with what would fit."""
    free = info.free_memory()
    if free is not None and budget > free:
        fits = shard.cache_spec.tokens_for(int(free * 0.9))
        raise InsufficientMemoryError(
            f"a KV cache of {_size(budget)} does not fit: {_size(free)} are free on {info.describe(shard.dtype)} "
            f"after loading the layers; lower --cache-tokens or --cache-bytes (about {fits} tokens would fit)")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def warn_if_the_name_is_taken(dht, model_id: str, fingerprint: str) -> None:
    """Another model announced under this name stays apart (clients compare config fingerprints), but
    the donor's owner most likely meant to join it or to pick another name: say so before loading."""
    others = sorted({r.config for r in fetch_records(dht, model_id) if r.config not in ("", fingerprint)})
    if others:
        print(f"warning: the swarm already serves a different model under the name {model_id!r} (config "
              f"fingerprint {', '.join(others)}; this one's is {fingerprint}). Clients of each model use only "
              f"its own donors; to avoid the confusion, give this model its own name with --model-name.",
              file=sys.stderr, flush=True)


def cache_budget(opts: ServeOptions, shard, info: DeviceInfo) -> int:
    if opts.cache_bytes:
        return opts.cache_bytes
    if opts.cache_tokens:
        return shard.cache_spec.nbytes(opts.cache_tokens)
    free = info.free_memory() or 2**30
    return int(free * (GPU_DEFAULT_CACHE_SHARE if info.is_gpu else CPU_DEFAULT_CACHE_SHARE))


def serve(opts: ServeOptions) -> int:
    return_large_buffers_to_the_system()
    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    ensure_port_free(opts.host, opts.port, "the data-plane")  # before minutes of loading, not after
    ckpt = open_checkpoint(opts.model, opts.revision)
    config = ckpt.load_config()
    fingerprint = ckpt.fingerprint()
    model_id = opts.model_name or model_id_for(opts.model)
    info = detect_device(opts.device)
    dtype = choose_dtype(info, opts.dtype)
    dht = start_dht(opts.initial_peers, host=opts.host, port=opts.dht_port)
    try:
        warn_if_the_name_is_taken(dht, model_id, fingerprint)
        start, end = pick_layers(opts, ckpt, config, model_id, dht, info, dtype)
        print(f"loading layers {start}:{end} of {model_id} on {info.describe(dtype)}", flush=True)
        baseline = process_memory("VmRSS")  # interpreter, libraries, DHT client: before any weight
        shard = load_shard(ckpt, (start, end), device=info, dtype=dtype, quant=opts.quant)
        budget = cache_budget(opts, shard, info)
        check_cache_fits(budget, shard, info)
        shard.prefill_chunk_tokens = opts.prefill_chunk_tokens
        throughput = measure_throughput(shard)
        public_host = opts.public_address or (opts.host if opts.host not in ("0.0.0.0", "::") else "127.0.0.1")
        settings = DonorSettings(model_id=model_id, host=opts.host, port=opts.port, public_host=public_host,
                                 cache_budget_bytes=budget, idle_timeout=opts.idle_timeout,
                                 announce_interval=opts.announce_interval, max_batch=opts.max_batch,
                                 revision=opts.revision or "main", fingerprint=fingerprint)
        donor = Donor(shard, settings, throughput, info.describe(dtype))
        donor.worker.pace.observe(*measure_prompt_speed(shard))
        donor.handlers.describe["baseline_rss_bytes"] = baseline
        install_fast_event_loop()
        asyncio.run(_run(donor, dht, config.num_hidden_layers, opts.announce_interval))
    finally:
        dht.shutdown()
    return 0


async def _run(donor: Donor, dht, num_layers: int, interval: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    address = await donor.start()
    heartbeat = Heartbeat(dht, donor, num_layers, interval)
    await loop.run_in_executor(None, heartbeat.start)
    print(f"serving layers {donor.shard.start}:{donor.shard.end} of {donor.settings.model_id} at {address}; "
          f"cache budget {donor.sessions.budget_bytes / 2**20:.0f} MiB; "
          f"{donor.throughput:.0f} layer-steps/s; prompts in pieces of up to {donor.worker.prompt_budget} tokens; "
          f"DHT {' '.join(visible_addresses(dht))}", flush=True)
    print(ready_line(donor, heartbeat.peer_id), flush=True)
    await stop.wait()
    print("shutting down: withdrawing the announcement, closing sessions", flush=True)
    await loop.run_in_executor(None, heartbeat.stop)
    await donor.stop()
    sys.stdout.flush()
