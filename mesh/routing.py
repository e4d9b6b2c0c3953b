"""Routing as a pure function: donor records and measured latencies in, a chain of hops out.

The chain minimises the expected time of one decode step: for every hop, its round trip plus its
compute (layers / throughput). Layers are graph nodes 0..L; a donor serving [s, e) gives edges
i -> j for s <= i < j <= e. Dijkstra over at most L + 1 nodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.records import DonorRecord

DEFAULT_RTT = 0.002  # seconds assumed for a donor we have not measured yet
DEFAULT_THROUGHPUT = 100.0  # layer-steps/s assumed for a donor that announced none


@dataclass(frozen=True)
class Hop:
    donor: DonorRecord
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.donor.address}[{self.start}:{self.end})"


class NoRouteError(Exception):
    """No chain covers the requested layers; `missing` lists the uncovered [start, end) ranges."""

    def __init__(self, model: str, missing: list[tuple[int, int]], detail: str = "", note: str = ""):
        self.model = model
        self.missing = missing
        self.detail = detail
        self.note = note
        ranges = ", ".join(f"{a}:{b}" for a, b in missing)
        hint = " ".join(f"`mesh serve --model {model} --layers {a}:{b} --initial-peers ...`" for a, b in missing)
        super().__init__(f"no donor serves layers {ranges} of {model}{detail}; start one with {hint}{note}")

    def with_note(self, note: str) -> "NoRouteError":
        """The same error with something appended, e.g. what the last donor tried answered."""
        return NoRouteError(self.model, self.missing, self.detail, f"{self.note}. {note}")


def hop_cost(donor: DonorRecord, layers: int, rtt: dict[str, float]) -> float:
    throughput = donor.throughput if donor.throughput > 0 else DEFAULT_THROUGHPUT
    return rtt.get(donor.peer_id, DEFAULT_RTT) + layers / throughput


def uncovered(records: Iterable[DonorRecord], start: int, end: int) -> list[tuple[int, int]]:
    """Maximal ranges within [start, end) that no record serves."""
    covered = [False] * (end - start)
    for record in records:
        for layer in range(max(start, record.start), min(end, record.end)):
            covered[layer - start] = True
    gaps, gap_start = [], None
    for offset, is_covered in enumerate(covered + [True]):
        if not is_covered and gap_start is None:
            gap_start = start + offset
        elif is_covered and gap_start is not None:
            gaps.append((gap_start, start + offset))
            gap_start = None
    return gaps


def find_chain(model: str, records: Iterable[DonorRecord], start: int, end: int, *,
               rtt: dict[str, float] | None = None, banned: Iterable[str] = (),
               min_free_tokens: int = 0) -> list[Hop]:
    """The fastest chain of hops covering layers [start, end), or NoRouteError naming the gaps."""
    rtt = rtt or {}
    banned = set(banned)
    usable = [r for r in records if r.peer_id not in banned and r.free_cache_tokens >= min_free_tokens
              and r.start < end and r.end > start]
    best: dict[int, float] = {start: 0.0}
    previous: dict[int, tuple[int, DonorRecord]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, layer = heapq.heappop(queue)
        if layer == end:
            break
        if cost > best.get(layer, float("inf")):
            continue
        for donor in usable:
            if not donor.start <= layer < donor.end:
                continue
            for stop in range(layer + 1, min(donor.end, end) + 1):
                candidate = cost + hop_cost(donor, stop - layer, rtt)
                if candidate < best.get(stop, float("inf")):
                    best[stop] = candidate
                    previous[stop] = (layer, donor)
                    heapq.heappush(queue, (candidate, stop))
    if end not in best:
        gaps = uncovered(usable, start, end)
        detail = ""
        if not gaps:  # every layer is served, yet no chain: should not happen with contiguous spans
            gaps = [(start, end)]
        excluded = [r for r in records if r not in usable]
        if excluded and uncovered(records, start, end) != gaps:
            detail = " with free cache (other donors are full or temporarily banned)"
        raise NoRouteError(model, gaps, detail)
    hops = []
    layer = end
    while layer != start:
        prev, donor = previous[layer]
        hops.append(Hop(donor, prev, layer))
        layer = prev
    return hops[::-1]
