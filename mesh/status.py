"""`mesh status`: what the swarm announces, as a table. Pure formatting over records."""

from __future__ import annotations

from mesh.records import DonorRecord, ModelInfo
from mesh.routing import uncovered

HEADER = ("layers", "address", "backend", "dtype", "layer-steps/s", "free cache (tokens)", "config", "peer")


def format_status(models: list[ModelInfo], records_by_model: dict[str, list[DonorRecord]]) -> str:
    if not models:
        return "no models are announced in this swarm"
    blocks = []
    for info in models:
        records = sorted(records_by_model.get(info.model, []), key=lambda r: (r.start, r.end, r.address))
        blocks.append(f"{info.model}: {info.num_layers} layers, {len(records)} donor(s), "
                      f"{_coverage(records, info.num_layers)}\n{_table(records)}")
    return "\n\n".join(blocks)


def _coverage(records: list[DonorRecord], num_layers: int) -> str:
    """Coverage of the model; per config fingerprint when different models share the name, since a
    client chains only donors whose config equals its own."""
    variants = sorted({r.config for r in records if r.config})
    if len(variants) <= 1:
        return _covered(records, num_layers)
    parts = [f"config {v[:8]}: {_covered([r for r in records if r.config in ('', v)], num_layers)}" for v in variants]
    return (f"WARNING: {len(variants)} different models announce this name (each client uses only the donors "
            f"of its own config; give each model its own --model-name); " + "; ".join(parts))


def _covered(records: list[DonorRecord], num_layers: int) -> str:
    gaps = uncovered(records, 0, num_layers)
    return "all layers served" if not gaps else "UNCOVERED layers " + ", ".join(f"{a}:{b}" for a, b in gaps)


def _table(records: list[DonorRecord]) -> str:
    rows = [HEADER]
    rows += [(f"{r.start}:{r.end}", r.address, r.backend, f"{r.dtype} {r.quant}".strip(), f"{r.throughput:.0f}",
              str(r.free_cache_tokens), r.config[:8] or "-", r.peer_id[-12:]) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
