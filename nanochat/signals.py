"""Graceful stops: SIGINT/SIGTERM ask the training loop to checkpoint and exit."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from nanochat.common import print0


class StopRequest:
    """Set by SIGINT/SIGTERM inside its `with` block; `agreed()` makes every rank stop at the same step.

    Leaving the block puts back the handlers it replaced, so a caller that runs
    training in-process (a test, a notebook) gets its own Ctrl-C back.
    """

    def __init__(self):
        self.signum: int | None = None
        self._replaced: dict = {}

    def __enter__(self) -> StopRequest:
        self._replaced = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._replaced.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # a second Ctrl-C means: now
            raise KeyboardInterrupt
        self.signum = signum
        print0(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step (again to abort)")

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.signum is not None else 0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)
