"""Find a checkpoint (local directory or hub id) and read only the tensors asked for.

A hub checkpoint is fetched file by file: config.json, the safetensors index, and then only the
weight files that hold a wanted tensor. A donor serving layers 10:20 of a large model therefore
never downloads, opens or reads the files of other layers.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from shards.errors import CheckpointError, MissingTensorError
from shards.safetensors_io import TensorEntry, read_header, read_tensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Config keys that say how a checkpoint was saved, not what the model computes: a model re-saved in
# bf16 or by a newer transformers must keep its fingerprint.
_NOT_PART_OF_THE_MODEL = {"_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype",
                          "use_cache", "_attn_implementation", "_attn_implementation_autoset"}


def config_fingerprint(config_path: str | Path) -> str:
    """A short hash of what config.json says about the model's shapes and math. Donors announce it and
    clients route only to donors whose fingerprint equals their own, so two different models that
    happen to share a swarm name are never chained together. Fine-tunes of one base model share a
    config, hence a fingerprint: they need distinct swarm names (`--model-name`)."""
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {config_path}: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    kept = {key: value for key, value in config.items() if key not in _NOT_PART_OF_THE_MODEL}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# fetch(repo_id, filename, revision, cache_dir) -> local path, or None when the hub has no such file
Fetcher = Callable[[str, str, str | None, str | None], Path | None]


def hub_fetch(repo_id: str, filename: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """Download one file of a hub repository into the local cache (or find it there)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except EntryNotFoundError:
        return None
    except Exception as err:  # network, auth, unknown repo: say which file and why
        raise CheckpointError(f"cannot fetch {filename!r} of {repo_id!r} from the hub: {err}") from None


class Checkpoint:
    """One model's files: its config and the map from tensor names to the files that hold them."""

    def __init__(self, source: str | Path, revision: str | None = None, cache_dir: str | None = None,
                 fetch: Fetcher = hub_fetch):
        self.source = str(source)
        self.revision = revision
        self.cache_dir = cache_dir
        self._fetch = fetch
        self._local_dir = self._resolve_local_dir(source)
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        self.config_path = self._file(CONFIG_FILE, required=True)
        self._weight_map: dict[str, str] | None = None

    @staticmethod
    def _resolve_local_dir(source: str | Path) -> Path | None:
        path = Path(source).expanduser()
        if path.is_dir():
            return path
        text = str(source)
        looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1 or path.exists()
        if looks_like_path:
            raise CheckpointError(f"model directory {text!r} does not exist (or is not a directory)")
        return None  # a hub id such as "org/name"

    @property
    def directory(self) -> Path:
        """Where the checkpoint's files are (for a hub id: the local snapshot folder)."""
        return self._local_dir if self._local_dir is not None else self.config_path.parent

    def fingerprint(self) -> str:
        return config_fingerprint(self.config_path)

    def load_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.directory)
        except (ValueError, KeyError, OSError) as err:
            raise CheckpointError(f"cannot read the config of {self.source!r}: {err}") from None

    def _file(self, filename: str, required: bool = False) -> Path | None:
        if self._local_dir is not None:
            path = self._local_dir / filename
            found = path if path.is_file() else None
        else:
            found = self._fetch(self.source, filename, self.revision, self.cache_dir)
        if found is None and required:
            raise CheckpointError(f"{self.source!r} has no {filename}")
        return found

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> file name; read on first use, so a bad config is reported before any weight file."""
        if self._weight_map is None:
            self._weight_map = self._read_weight_map()
        return self._weight_map

    def _read_weight_map(self) -> dict[str, str]:
        index = self._file(INDEX_FILE)
        if index is not None:
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
        single = self._file(SINGLE_FILE)
        if single is None:
            raise CheckpointError(
                f"{self.source!r} has no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}); "
                "convert the checkpoint with save_pretrained(..., safe_serialization=True)"
            )
        self._headers[SINGLE_FILE] = read_header(single)
        return {name: SINGLE_FILE for name in self._headers[SINGLE_FILE]}

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def entry(self, name: str) -> TensorEntry:
        """Dtype and shape of a tensor (reads only the header of the file that holds it)."""
        filename = self._require([name])[name]
        return self._header(filename)[name]

    def _require(self, names: Iterable[str]) -> dict[str, str]:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MissingTensorError(f"checkpoint {self.source!r} lacks tensor(s) {shown}")
        return {n: self.weight_map[n] for n in names}

    def _local_path(self, filename: str) -> Path:
        path = self._file(filename)
        if path is None:
            raise MissingTensorError(
                f"checkpoint {self.source!r} names {filename} in its index, but the file is missing"
            )
        return path

    def _header(self, filename: str) -> dict[str, TensorEntry]:
        if filename not in self._headers:
            self._headers[filename] = read_header(self._local_path(filename))
        return self._headers[filename]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors in their stored dtype on the CPU, reading only the files that hold them."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, filename in self._require(list(names)).items():
            by_file[filename].append(name)
        out: dict[str, torch.Tensor] = {}
        for filename, file_names in by_file.items():
            header = self._header(filename)
            absent = [n for n in file_names if n not in header]
            if absent:
                raise MissingTensorError(f"{filename} of {self.source!r} does not contain {absent[0]!r} as its index claims")
            out.update(read_tensors(self._local_path(filename), file_names, header))
        return out
