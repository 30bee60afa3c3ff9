"""The argument parser of every entry point: argparse, also taking the original nanochat's spellings.

The original DGX Spark nanochat spelled multi-word flags with underscores and put
them after a `--`, as in its README:

    torchrun --standalone --nproc_per_node=1 -m scripts.base_train -- --depth=20 --device_batch_size=32

`FlagParser` accepts that as written. Before parsing, a long option whose name has
underscores becomes the hyphenated option it names (`--device_batch_size=32` ->
`--device-batch-size=32`), but only when the parser knows that option (or, as
argparse allows, an option it abbreviates); the value after `=` and every other
argument are left as they are. A parser that takes no positional arguments drops
every `--`, which can only have been a launcher's separator (torchrun removes a
leading one itself on Python 3.11, but `python -m scripts.base_train -- --depth=20`
keeps it, and `./sft.sh -d 20 -- --num_iterations=1` passes its own on); for one
that does, nothing after a `--` changes. `--help` and error messages name the
hyphenated spelling only.
"""

from __future__ import annotations

import argparse
import sys

import torch

from nanochat.common import DTYPES, add_device_arg, autodetect_device_type, compute_dtype


class FlagParser(argparse.ArgumentParser):
    def parse_known_args(self, argv=None, namespace=None):
        argv = sys.argv[1:] if argv is None else list(argv)
        return super().parse_known_args(self._canonical(argv), namespace)

    def _canonical(self, argv: list[str]) -> list[str]:
        takes_positionals = any(not action.option_strings for action in self._actions)
        out = []
        for i, arg in enumerate(argv):
            if arg == "--" and takes_positionals:
                return out + argv[i:]
            if arg != "--":
                out.append(self._hyphenated(arg))
        return out

    def _hyphenated(self, arg: str) -> str:
        name, eq, value = arg.partition("=")
        known = self._option_string_actions
        if not name.startswith("--") or "_" not in name or name in known:
            return arg
        dashed = "--" + name[2:].replace("_", "-")
        if dashed in known or (self.allow_abbrev and any(option.startswith(dashed) for option in known)):
            return dashed + eq + value
        return arg  # an option nobody knows is reported as the user typed it


# ---------------------------------------------------------------- flags of the scripts that load a model to talk to it

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


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The device --device names (else the autodetected one) and the dtype --dtype names (else the device's natural one)."""
    chosen = torch.device(autodetect_device_type(device))
    return chosen, compute_dtype(chosen.type, dtype)


def warm_up(engine) -> None:
    """With --compile, compile the decode step before the first answer, saying so on stderr."""
    if engine.decoder is not None:
        print(f"compiling the decode step for up to {engine.cache.slots} rows (once; --compile)...", file=sys.stderr, flush=True)
        engine.warm_up(lambda line: print(line, file=sys.stderr, flush=True))
