"""The CORE metric of a base model: 22 in-context tasks, each centered by chance, averaged.

    python -m scripts.base_eval                          # newest base checkpoint, every example
    python -m scripts.base_eval --max-per-task 100       # a quick, deterministic subset
    torchrun --standalone --nproc_per_node=2 -m scripts.base_eval

Needs the eval bundle (`python -m nanochat.eval_bundle`, which ./prepare.sh runs).
Writes the "base-eval" section of the report card.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.checkpoint import CheckpointError, load_model
from nanochat.common import add_device_arg, compute_cleanup, compute_init, print0, setup_logging
from nanochat.core_eval import CoreResult, evaluate_core
from nanochat.eval_bundle import BUNDLE_ENV, BundleError, resolve_bundle_dir
from nanochat.flags import FlagParser
from nanochat.report import write_section
from nanochat.runtime import ComputeSettings, add_compute_args, prepare_model
from nanochat.tokenizer import TokenizerError, get_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.base_eval", description="CORE metric (DCLM) of a base model.")
    p.add_argument("--model-tag", default=None, help="checkpoint folder in base_checkpoints (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--max-per-task", type=int, default=None, help="evaluate only this many examples per task, the same ones every run (default: all)")
    p.add_argument("--bundle", default=None, help=f"unpacked eval bundle folder (default: ${BUNDLE_ENV}, else $NANOCHAT_BASE_DIR/eval_bundle)")
    add_device_arg(p)
    add_compute_args(p)
    args = p.parse_args(argv)
    if args.max_per_task is not None and args.max_per_task < 1:
        p.error("--max-per-task must be at least 1")
    return args


def results_table(result: CoreResult) -> str:
    """Markdown: one row per task, then CORE."""
    lines = ["| task | accuracy | centered |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {acc:.4f} | {result.centered[label]:.4f} |" for label, acc in result.accuracy.items()]
    lines.append(f"| **CORE** | | **{result.core:.4f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    info = compute_init(args.device)
    try:
        bundle = resolve_bundle_dir(args.bundle)
        tokenizer = get_tokenizer()
        model, meta = load_model("base", args.model_tag, args.step, device=info.device)
    except (BundleError, CheckpointError, TokenizerError) as exc:
        print0(f"error: {exc}")
        compute_cleanup()
        return 2
    step_model = prepare_model(model, ComputeSettings(args.dtype, args.compile, args.activation_checkpointing), info.device)
    subset = "all examples" if args.max_per_task is None else f"at most {args.max_per_task} examples per task"
    print0(f"CORE of {meta['model_tag']} step {meta['step']:,} ({subset}, {info.world_size} rank(s), bundle {bundle})")
    result = evaluate_core(step_model, tokenizer, bundle, args.max_per_task)
    print0(results_table(result))
    if info.is_master:
        items = {"model": f"{meta['model_tag']} step {meta['step']}", "examples per task": args.max_per_task or "all", "CORE": result.core}
        print0(f"report section: {write_section('base-eval', 'Base model CORE', items, results_table(result))}")
    compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
