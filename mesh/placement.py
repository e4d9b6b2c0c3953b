"""Which layers a donor without `--layers` should serve: a pure function of what the swarm announces.

The swarm needs most the contiguous window whose weakest layer has the fewest replicas; among
equals, the one with the least total throughput; among those, the lowest start.
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.records import DonorRecord


def layer_coverage(records: Iterable[DonorRecord], num_layers: int) -> tuple[list[int], list[float]]:
    """Per layer: how many donors serve it, and their summed throughput."""
    replicas = [0] * num_layers
    throughput = [0.0] * num_layers
    for record in records:
        for layer in range(max(0, record.start), min(num_layers, record.end)):
            replicas[layer] += 1
            throughput[layer] += max(record.throughput, 0.0)
    return replicas, throughput


def choose_range(num_layers: int, capacity: int, records: Iterable[DonorRecord]) -> tuple[int, int]:
    """The half-open range of `capacity` layers (or all, if fewer) the swarm needs most."""
    if capacity <= 0:
        raise ValueError("this donor cannot hold a single layer (capacity 0)")
    width = min(capacity, num_layers)
    replicas, throughput = layer_coverage(records, num_layers)

    def need(start: int):
        window = range(start, start + width)
        return (min(replicas[i] for i in window), sum(replicas[i] for i in window),
                sum(throughput[i] for i in window), start)

    best = min(range(num_layers - width + 1), key=need)
    return best, best + width
