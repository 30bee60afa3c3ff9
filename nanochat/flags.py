"""The argument parser of every entry point: argparse, also taking the original nanochat's spellings.

The original DGX Spark nanochat spelled multi-word flags with underscores and put
them after a `--`, as in its README:

    torchrun --standalone --nproc_per_node=1 -m scripts.base_train -- --depth=20 --device_batch_size=32

`FlagParser` accepts that as written. Before parsing, a long option whose name has
underscores becomes the hyphenated option it names (`--device_batch_size=32` ->
`--device-batch-size=32`), but only when the parser knows that option (or, as
argparse allows, an option it abbreviates); the value after `=` and every other
argument are left as they are, and nothing after a `--` changes. A leading `--` is
dropped when the parser takes no positional arguments, so it can only have been a
launcher's separator (torchrun removes it itself on Python 3.11, but
`python -m scripts.base_train -- --depth=20` keeps it). `--help` and error messages
name the hyphenated spelling only.
"""

from __future__ import annotations

import argparse
import sys


class FlagParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._canonical(args), namespace)

    def _canonical(self, args: list[str]) -> list[str]:
        takes_positionals = any(not action.option_strings for action in self._actions)
        if args[:1] == ["--"] and not takes_positionals:
            args = args[1:]
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
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
