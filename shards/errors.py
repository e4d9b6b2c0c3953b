"""Errors raised by the compute core. Each message says what was wrong and what to do instead."""


class ShardError(Exception):
    """Base class for every error the shards package raises on purpose."""


class UnsupportedModelError(ShardError):
    """The checkpoint's architecture (model_type or a config option) has no block code here."""


class LayerRangeError(ShardError):
    """A requested layer range is empty, malformed or outside the model."""


class MissingTensorError(ShardError):
    """The checkpoint lacks a tensor (or a file) that the requested pieces need."""


class CheckpointError(ShardError):
    """The checkpoint cannot be found or read (no safetensors, corrupt header, missing config)."""


class DeviceError(ShardError):
    """The requested device does not exist on this machine."""


class DtypeNotSupportedError(ShardError):
    """The requested dtype or quantization cannot run on the chosen device."""


class CacheOverflowError(ShardError):
    """A step would write past the number of tokens reserved for a session's KV cache."""


class InsufficientMemoryError(ShardError):
    """The device has less free memory than the layers or the cache asked for need."""
