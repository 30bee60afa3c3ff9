"""Clients that keep making mistakes wait for their answers.

Each client (by address) gets BURST error answers at once and RATE per second
after that; past its budget an error answer is held back (up to MAX_WAIT
seconds) before it is sent. A client that errs now and then never notices;
one sending garbage in a loop is slowed to RATE requests a second, so it
cannot take the CPU (and, in Python, the interpreter lock) from the engine
that decodes everyone else's answers.
"""

from __future__ import annotations

import asyncio
import time

RATE = 20.0  # error answers per second a client is allowed once its burst is spent
BURST = 40  # error answers a client may get at once: a test table, a buggy client's retries
MAX_WAIT = 1.0  # seconds an answer is held at most, however far past its budget the client is
MAX_CLIENTS = 4096  # addresses remembered; beyond this the ones back at a full budget are forgotten


class ErrorPacer:
    def __init__(self, rate: float = RATE, burst: int = BURST):
        self.rate, self.burst = rate, burst
        self.budgets: dict[str, tuple[float, float]] = {}  # address -> (errors left, when counted)

    def charge(self, client: str) -> float:
        """Count one error answer for `client`; the seconds it should wait before getting it."""
        now = time.monotonic()
        left, then = self.budgets.get(client, (self.burst, now))
        left = min(self.burst, left + (now - then) * self.rate) - 1
        self.budgets[client] = (left, now)
        if len(self.budgets) > MAX_CLIENTS:
            self._forget_the_idle(now)
        return 0.0 if left >= 0 else min(-left / self.rate, MAX_WAIT)

    async def pace(self, client: str) -> None:
        wait = self.charge(client)
        if wait:
            await asyncio.sleep(wait)

    def _forget_the_idle(self, now: float) -> None:
        for client, (left, then) in list(self.budgets.items()):
            if left + (now - then) * self.rate >= self.burst:
                del self.budgets[client]
