"""`mesh status`: what the swarm announces, as a table. Pure formatting over records."""

from __future__ import annotations

from mesh.records import DonorRecord, ModelInfo
from mesh.routing import uncovered


def format_status(models: list[ModelInfo], records_by_model: dict[str, list[DonorRecord]]) -> str:
    if not models:
        return "no models are announced in this swarm"
    blocks = []
    for info in models:
        records = sorted(records_by_model.get(info.model, []), key=lambda r: (r.start, r.end, r.address))
        gaps = uncovered(records, 0, info.num_layers)
        coverage = "all layers served" if not gaps else "UNCOVERED layers " + ", ".join(f"{a}:{b}" for a, b in gaps)
        rows = [("layers", "address", "backend", "dtype", "layer-steps/s", "free cache (tokens)", "peer")]
        rows += [(f"{r.start}:{r.end}", r.address, r.backend, r.dtype, f"{r.throughput:.0f}",
                  str(r.free_cache_tokens), r.peer_id[-12:]) for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
        blocks.append(f"{info.model}: {info.num_layers} layers, {len(records)} donor(s), {coverage}\n{table}")
    return "\n\n".join(blocks)
