"""Progress lines for long jobs: smoothed step time, elapsed time and ETA."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


class StepTimer:
    """Times steps; the ETA uses a smoothed step time that skips the first
    `warmup` steps (compilation and cache warm-up make them unrepresentative)."""

    def __init__(self, total_steps: int, first_step: int = 0, warmup: int = 2, beta: float = 0.9, elapsed: float = 0.0):
        self.total, self.step, self.warmup, self.beta = total_steps, first_step, warmup, beta
        self.first_step, self.elapsed = first_step, elapsed
        self.smoothed: float | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """End the current step; returns its duration in seconds."""
        dt = time.perf_counter() - self._t0
        self.elapsed += dt
        self.step += 1
        if self.step - self.first_step > self.warmup:
            self.smoothed = dt if self.smoothed is None else self.beta * self.smoothed + (1 - self.beta) * dt
        return dt

    def eta(self) -> str:
        per_step = self.smoothed
        if per_step is None:
            done = self.step - self.first_step
            per_step = self.elapsed / done if done else None
        return "?" if per_step is None else format_duration(per_step * (self.total - self.step))
