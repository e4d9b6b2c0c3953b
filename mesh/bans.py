"""Temporary bans of donors that failed, with capped exponential backoff. Pure: the clock is passed in."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BanList:
    base_seconds: float = 1.0
    max_seconds: float = 60.0
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def ban(self, peer_id: str, now: float) -> float:
        """Ban `peer_id` after one more failure; returns the ban's length in seconds."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        length = min(self.base_seconds * 2 ** (failures - 1), self.max_seconds)
        self._until[peer_id] = now + length
        return length

    def succeeded(self, peer_id: str) -> None:
        """A donor that works again starts over from the base ban length next time."""
        self._failures.pop(peer_id, None)

    def banned(self, now: float) -> set[str]:
        return {peer for peer, until in self._until.items() if until > now}
