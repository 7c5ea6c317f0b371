"""How long a call may still take: the caller's gRPC deadline, bounded by the server's limits."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() value

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def for_call(cls, time_remaining: float | None, *, default: float, maximum: float) -> Deadline:
        """The caller's remaining time (``default`` when it set none), capped at ``maximum``."""
        seconds = default if time_remaining is None else time_remaining
        return cls.after(min(seconds, maximum))

    def remaining(self) -> float:
        return max(self.at - time.monotonic(), 0.0)
