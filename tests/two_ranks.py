"""Run a test's body on two spawned gloo ranks, as torchrun would on one machine.

    on_two_ranks(body, *args)   # body(rank, port, *args) in each of two processes, joined

A failure (an assertion included) on either rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_ranks(body, *args) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(body, args=(free_port(), *args), nprocs=2, join=True, start_method="spawn")
