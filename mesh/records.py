"""What a donor announces in the DHT, and the DHT keys. The only module that knows the key layout.

Records are small JSON-able dicts with a schema version. Readers keep the fields they know and
ignore the rest, so donors of different versions coexist in one swarm; a record that lacks a
required field or has a wrong type is skipped, never fatal.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

RECORD_VERSION = 1
KEY_PREFIX = "mesh/v1"
MODELS_KEY = f"{KEY_PREFIX}/models"  # subkey: model id -> ModelInfo


def model_key(model_id: str) -> str:
    """The DHT key under which every donor of `model_id` announces itself (subkey: its peer id)."""
    return f"{KEY_PREFIX}/model/{model_id}"


def model_id_for(source: str) -> str:
    """A swarm-wide name for a model: a hub id as is, a local directory by its last path component."""
    text = source.rstrip("/")
    if "/" in text and (text.startswith(("/", ".", "~")) or text.count("/") > 1):
        text = text.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._/-]", "_", text)


@dataclass(frozen=True)
class DonorRecord:
    """One donor serving layers [start, end) of one model."""

    model: str
    start: int
    end: int
    peer_id: str
    address: str  # "host:port" of the direct data plane
    backend: str = "cpu"
    dtype: str = "float32"
    throughput: float = 0.0  # layer-steps per second for one decode token (1 / seconds per layer)
    free_cache_tokens: int = 0  # tokens of a full-range session the donor can still reserve
    revision: str = "main"
    protocol: int = 1
    version: int = RECORD_VERSION
    device: str = ""  # human-readable, e.g. "cuda NVIDIA RTX 4090 24.0GiB bf16"
    config: str = ""  # fingerprint of the model's config.json (shards.checkpoint); "" from older donors
    quant: str = ""  # weight quantization ("nf4", "int8"), "" when the weights are in `dtype`

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "DonorRecord | None":
        """The record, or None if `data` is not a usable record (unknown fields are ignored)."""
        if not isinstance(data, dict):
            return None
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            record = cls(**values)
        except TypeError:  # a required field is missing
            return None
        types_ok = (isinstance(record.config, str) and isinstance(record.quant, str)
                    and isinstance(record.start, int) and isinstance(record.end, int) and 0 <= record.start < record.end
                    and isinstance(record.address, str) and ":" in record.address
                    and isinstance(record.throughput, (int, float)) and isinstance(record.free_cache_tokens, int))
        return record if types_ok else None


@dataclass(frozen=True)
class ModelInfo:
    """Announced beside the donor records so that `mesh status` can list models without knowing them."""

    model: str
    num_layers: int

    @classmethod
    def from_dict(cls, data) -> "ModelInfo | None":
        if isinstance(data, dict) and isinstance(data.get("model"), str) and isinstance(data.get("num_layers"), int):
            return cls(data["model"], data["num_layers"])
        return None
