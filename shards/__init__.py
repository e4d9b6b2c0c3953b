"""The compute core: run a half-open range [start, end) of a decoder model's layers on one device.

Map:
  device.py          backend (cuda, rocm, mps, cpu), dtype policy, free memory, descriptions
  checkpoint.py      a local directory or hub id; fetches and reads only the files and tensors asked for
  safetensors_io.py  reads chosen tensors from a .safetensors file without touching the others
  families/          one module per model_type: how it builds its blocks and names its tensors
  layers.py          the owned block code: RMSNorm, gated MLP, attention, decoder block
  moe.py             sparse mixture-of-experts MLP
  rotary.py          rotary position embeddings for per-token positions
  kv_cache.py        explicit per-session KV cache, sized in bytes before allocation
  shard.py           Shard: layers [start, end), batched steps over sessions of different lengths
  edges.py           ModelEdges: embeddings, final norm, LM head (the client's pieces)
  loading.py         load_shard / load_edges: meta construction, per-block reads, dtype, quantization
  quantization.py    int8 / nf4 through bitsandbytes, imported only when asked for
  pipeline.py        LocalPipeline: edges plus chained shards as one local model
  random_model.py    small random checkpoints for tests and demos
  errors.py          the errors above raise, each with a message that says what to do
"""

from shards.device import DeviceInfo, choose_dtype, detect_device, parse_dtype
from shards.errors import (
    CacheOverflowError,
    CheckpointError,
    DeviceError,
    DtypeNotSupportedError,
    LayerRangeError,
    MissingTensorError,
    ShardError,
    UnsupportedModelError,
)
from shards.families import family_for, supported_model_types
from shards.kv_cache import CacheSpec, KVCache
from shards.loading import load_edges, load_shard, parse_layers
from shards.pipeline import LocalPipeline
from shards.shard import Shard

__all__ = [
    "CacheOverflowError", "CacheSpec", "CheckpointError", "DeviceError", "DeviceInfo", "DtypeNotSupportedError",
    "KVCache", "LayerRangeError", "LocalPipeline", "MissingTensorError", "Shard", "ShardError",
    "UnsupportedModelError", "choose_dtype", "detect_device", "family_for", "load_edges", "load_shard",
    "parse_dtype", "parse_layers", "supported_model_types",
]
