"""Read chosen tensors from a .safetensors file, and nothing else.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw bytes. We read the header and then `readinto` each wanted
tensor's range straight into its destination buffer: no mmap, so bytes of tensors we skip are never
touched and resident memory grows by exactly what we keep.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from shards.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit; a larger value means a corrupt file


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's entry in the file, without reading any tensor data."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is not a safetensors file (header length {header_len})")
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has a corrupt safetensors header: {err}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    data_start = 8 + header_len
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: unsupported or malformed entry for tensor {name!r}: {meta}") from None
        entries[name] = TensorEntry(dtype, shape, data_start + begin, end - begin)
    return entries


def read_tensors(path: Path, names: list[str], entries: dict[str, TensorEntry] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors from one file, each in its stored dtype, on the CPU."""
    entries = entries if entries is not None else read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name in names:
            entry = entries[name]
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            expected = tensor.numel() * tensor.element_size()
            if expected != entry.nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} has {entry.nbytes} bytes, its shape needs {expected}")
            f.seek(entry.offset)
            got = f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            if got != entry.nbytes:
                raise CheckpointError(f"{path} is truncated: tensor {name!r} needs {entry.nbytes} bytes, read {got}")
            out[name] = tensor
    return out
