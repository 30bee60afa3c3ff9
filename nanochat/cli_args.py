"""Command-line flags shared by the scripts that load a model to talk to it."""

from __future__ import annotations

import argparse
import sys

import torch

from nanochat.common import DTYPES, add_device_arg, autodetect_device_type, compute_dtype


def add_model_args(parser: argparse.ArgumentParser, temperature: float, max_tokens: int | None = 512) -> None:
    """--source/--model-tag/--step, the sampling defaults, --dtype and --device."""
    parser.add_argument("-s", "--source", default="auto", choices=["auto", "rl", "sft", "mid", "base"], help="which stage's model (default: the most advanced available)")
    parser.add_argument("--model-tag", default=None, help="model tag within the stage (default: the newest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("-t", "--temperature", type=float, default=temperature, help="sampling temperature, 0 for greedy (default %(default)s)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens, 0 for all (default %(default)s)")
    parser.add_argument("-m", "--max-tokens", type=int, default=max_tokens,
                        help="longest answer in tokens (default: " + (f"{max_tokens})" if max_tokens else "until the model stops or the context is full)"))
    parser.add_argument("-d", "--dtype", default=None, choices=list(DTYPES), help="weights and compute dtype (default: bfloat16 on a GPU that runs it natively, float32 elsewhere)")
    add_device_arg(parser)
    parser.add_argument("--compile", action="store_true",
                        help="decode through a compiled step (nanochat/compiled_decode.py): 2-3x the tokens/s on a small CPU, "
                             "after compiling it once per batch size at startup (about half a minute each on 2 cores)")


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(autodetect_device_type(args.device))
    return device, compute_dtype(device.type, args.dtype)


def warm_up(engine) -> None:
    """With --compile, compile the decode step before the first answer, saying so on stderr."""
    if engine.decoder is not None:
        print(f"compiling the decode step for up to {engine.cache.slots} rows (once; --compile)...", file=sys.stderr, flush=True)
        engine.warm_up(lambda line: print(line, file=sys.stderr, flush=True))
