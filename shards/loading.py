"""Load a shard (layers [start, end)) or the client's edges from a checkpoint, reading only their tensors.

Modules are built on the meta device (no memory), then filled block by block: read that block's
tensors, cast them to the compute dtype, move them to the device, and quantize if asked. Peak host
memory is therefore the loaded weights plus one block in flight.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shards.checkpoint import Checkpoint, Fetcher, hub_fetch
from shards.device import DeviceInfo, choose_dtype, detect_device
from shards.edges import ModelEdges
from shards.errors import LayerRangeError, MissingTensorError
from shards.families import Family, family_for
from shards.families.base import head_dim
from shards.quantization import check_quantization, quantize_block
from shards.rotary import RotaryEmbedding
from shards.shard import Shard


def parse_layers(spec: str | tuple[int, int] | None, num_layers: int) -> tuple[int, int]:
    """'10:20' (or (10, 20)) -> (10, 20), the half-open range [10, 20); '' or None -> every layer."""
    if spec is None or spec == "" or spec == ":":
        return 0, num_layers
    if isinstance(spec, str):
        start_text, sep, end_text = spec.partition(":")
        if not sep:
            raise LayerRangeError(f"layer range {spec!r} must look like START:END (half-open, e.g. 0:{num_layers})")
        try:
            start = int(start_text) if start_text.strip() else 0
            end = int(end_text) if end_text.strip() else num_layers
        except ValueError:
            raise LayerRangeError(f"layer range {spec!r} must be two integers START:END") from None
    else:
        start, end = spec
    if start >= end:
        raise LayerRangeError(
            f"layer range [{start}, {end}) is empty: the start must be less than the end "
            f"(half-open, e.g. {min(start, end)}:{max(start, end) + (start == end)} serves layers "
            f"{min(start, end)}..{max(start, end) - (start != end)})"
        )
    if not 0 <= start < end <= num_layers:
        raise LayerRangeError(
            f"layer range [{start}, {end}) is outside the model, which has {num_layers} layers "
            f"(valid ranges are within 0:{num_layers}, start < end)"
        )
    return start, end


def even_splits(num_layers: int, parts: int) -> list[str]:
    """'a:b' ranges that cover num_layers in `parts` contiguous pieces of near-equal size."""
    parts = max(1, min(parts, num_layers))
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def open_checkpoint(model: str | Path | Checkpoint, revision: str | None = None,
                    cache_dir: str | None = None, fetch: Fetcher = hub_fetch) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    return Checkpoint(model, revision=revision, cache_dir=cache_dir, fetch=fetch)


def load_shard(model: str | Path | Checkpoint, layers: str | tuple[int, int] | None = None, *,
               device: str | DeviceInfo | None = None, dtype: str | torch.dtype | None = None,
               quant: str | None = None, revision: str | None = None, cache_dir: str | None = None,
               fetch: Fetcher = hub_fetch) -> Shard:
    """Layers [start, end) of `model` (a local directory or hub id) on `device`, ready to run."""
    ckpt = open_checkpoint(model, revision, cache_dir, fetch)
    config = ckpt.load_config()
    family = family_for(config)
    start, end = parse_layers(layers, config.num_hidden_layers)
    info = device if isinstance(device, DeviceInfo) else detect_device(device)
    compute_dtype = choose_dtype(info, dtype)
    check_quantization(quant, info)

    with torch.device("meta"):
        blocks = [family.build_block(config, i) for i in range(start, end)]
    _check_tensors_present(ckpt, [(family.layer_prefix.format(i), b) for i, b in zip(range(start, end), blocks)])
    for layer, block in zip(range(start, end), blocks):
        staging = info.torch_device if quant is None else "cpu"  # bitsandbytes quantizes on its move to the device
        _fill(block, ckpt, family.layer_prefix.format(layer), compute_dtype, staging)
        if quant is not None:
            quantize_block(block, quant, compute_dtype, info.torch_device, family.layer_prefix.format(layer))
    rotary = RotaryEmbedding(config, head_dim(config), info.torch_device)
    return Shard(config, family, start, end, blocks, rotary, compute_dtype, info, quant).eval()


def load_edges(model: str | Path | Checkpoint, *, device: str | DeviceInfo | None = None,
               dtype: str | torch.dtype | None = None, revision: str | None = None,
               cache_dir: str | None = None, fetch: Fetcher = hub_fetch) -> ModelEdges:
    """The client's pieces (embeddings, final norm, LM head) of `model`; tied heads share the embedding."""
    ckpt = open_checkpoint(model, revision, cache_dir, fetch)
    config = ckpt.load_config()
    family = family_for(config)
    info = device if isinstance(device, DeviceInfo) else detect_device(device)
    compute_dtype = choose_dtype(info, dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or not ckpt.has(family.head_name)
    with torch.device("meta"):
        edges = ModelEdges(config, tied, info)
    names = {"embed_tokens.weight": family.embed_name, "norm.weight": family.norm_name}
    if not tied:
        names["lm_head.weight"] = family.head_name
    tensors = ckpt.read(names.values())
    state = {local: _cast(tensors[remote], compute_dtype, info.torch_device) for local, remote in names.items()}
    edges.load_state_dict(state, strict=False, assign=True)
    if tied:
        edges.lm_head.weight = edges.embed_tokens.weight
    return edges.eval()


def _check_tensors_present(ckpt: Checkpoint, prefixed_blocks: list[tuple[str, nn.Module]]) -> None:
    """Fail before reading anything if the checkpoint lacks a tensor the range needs."""
    for prefix, block in prefixed_blocks:
        for name in block.state_dict():
            if not ckpt.has(prefix + name):
                raise MissingTensorError(
                    f"checkpoint {ckpt.source!r} lacks tensor {prefix + name!r}, needed by this layer range"
                )


def _fill(block: nn.Module, ckpt: Checkpoint, prefix: str, dtype: torch.dtype, device: str) -> None:
    local_names = list(block.state_dict())
    tensors = ckpt.read(prefix + n for n in local_names)
    state = {n: _cast(tensors[prefix + n], dtype, device) for n in local_names}
    expected = {n: tuple(t.shape) for n, t in block.state_dict().items()}
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise MissingTensorError(
                f"tensor {prefix + name!r} in {ckpt.source!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {expected[name]}"
            )
    block.load_state_dict(state, assign=True)


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device)
