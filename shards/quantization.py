"""int8 and nf4 weights through bitsandbytes, which is imported only when a quantized shard is asked for."""

from __future__ import annotations

import logging

import torch
from torch import nn

from shards.device import DeviceInfo
from shards.errors import DtypeNotSupportedError

QUANTIZATIONS = ("int8", "nf4")
# Routers are tiny, and their top-k decides which experts run: quantizing them would change routing.
KEEP_FULL_PRECISION = ("gate", "shared_expert_gate")


def check_quantization(quant: str | None, device: DeviceInfo) -> None:
    if quant is None:
        return
    if quant not in QUANTIZATIONS:
        raise DtypeNotSupportedError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if device.backend == "mps":
        raise DtypeNotSupportedError(f"{quant} needs bitsandbytes, which does not run on Apple MPS; use --dtype float16")
    _import_bitsandbytes()


class _DropRepeatedCastNotice(logging.Filter):
    """bitsandbytes logs a warning on every int8 matmul whose input is not fp16 (every step on a CPU);
    the cast is expected there, and the line would flood a donor's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def _import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise DtypeNotSupportedError(
            "int8/nf4 shards need bitsandbytes: pip install 'llm-mesh[quant]'"
        ) from None
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropRepeatedCastNotice) for f in logger.filters):
        logger.addFilter(_DropRepeatedCastNotice())
    return bitsandbytes


# bitsandbytes' CPU nf4 kernel packs output rows in groups of 32 and scales inputs in blocks of 64.
CPU_NF4_ROW_MULTIPLE = 32
NF4_BLOCK = 64


def quantize_block(block: nn.Module, quant: str, compute_dtype: torch.dtype, device: str, prefix: str = "") -> None:
    """Replace the block's linear layers (routers excepted) by bitsandbytes ones, in place, on `device`."""
    bnb = _import_bitsandbytes()
    targets = [(f"{prefix}{parent_name}.{name}".replace("..", ".").lstrip("."), parent, name, child)
               for parent_name, parent in block.named_modules()
               for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and name not in KEEP_FULL_PRECISION]
    if quant == "nf4" and torch.device(device).type == "cpu":
        for full_name, _, _, child in targets:
            if child.out_features % CPU_NF4_ROW_MULTIPLE or child.in_features % NF4_BLOCK:
                raise DtypeNotSupportedError(
                    f"nf4 on the CPU needs linear layers of a multiple of {CPU_NF4_ROW_MULTIPLE} outputs and "
                    f"{NF4_BLOCK} inputs; {full_name} is {child.in_features} -> {child.out_features}. "
                    "Use --quant int8 or no quantization"
                )
    for _, parent, name, child in targets:
        setattr(parent, name, _quantized_linear(bnb, child, quant, compute_dtype).to(device))


def _quantized_linear(bnb, linear: nn.Linear, quant: str, compute_dtype: torch.dtype) -> nn.Module:
    has_bias = linear.bias is not None
    weight = linear.weight.data
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer
