"""Bits per byte of a base model on the train and validation splits, plus samples.

    python -m scripts.base_loss                    # newest base checkpoint
    torchrun --standalone --nproc_per_node=2 -m scripts.base_loss

Writes the "base-loss" section of the report card.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.checkpoint import CheckpointError, load_model
from nanochat.common import add_device_arg, compute_cleanup, compute_init, print0, setup_logging
from nanochat.flags import FlagParser
from nanochat.loss_eval import SAMPLE_PROMPTS, greedy_complete
from nanochat.loss_eval import corpus_bpb
from nanochat.report import write_section
from nanochat.runtime import ComputeSettings, add_compute_args, prepare_model
from nanochat.tokenizer import TokenizerError, get_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.base_loss", description="Bits per byte of a base model on train and validation data.")
    p.add_argument("--model-tag", default=None, help="checkpoint folder in base_checkpoints (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass (default %(default)s)")
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens to evaluate per split (default %(default)s)")
    add_device_arg(p)
    add_compute_args(p)
    p.add_argument("--data-dir", default=None, help="pretraining shard folder (default: the folder of the dataset prepare.sh fetched last)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    info = compute_init(args.device)
    try:
        tokenizer = get_tokenizer()
        model, meta = load_model("base", args.model_tag, args.step, device=info.device)
    except (CheckpointError, TokenizerError) as exc:
        print0(f"error: {exc}")
        compute_cleanup()
        return 2
    step_model = prepare_model(model, ComputeSettings(args.dtype, args.compile, args.activation_checkpointing), info.device)
    print0(f"evaluating {meta['model_tag']} step {meta['step']:,} on {args.split_tokens:,} tokens per split")
    seq_len = model.config.sequence_len
    results = {split: corpus_bpb(step_model, tokenizer, split, args.split_tokens, args.device_batch_size, seq_len, info, args.data_dir)
               for split in ("train", "val")}
    for split, bpb in results.items():
        print0(f"{split} bits per byte: {bpb:.4f}")
    samples = []
    if info.is_master:
        for prompt, completion in zip(SAMPLE_PROMPTS, greedy_complete(model, tokenizer, SAMPLE_PROMPTS, max_new_tokens=16)):
            samples.append(f"{prompt}{completion}")
            print0(f"sample | {prompt}{completion!r}")
        items = {"model": f"{meta['model_tag']} step {meta['step']}", "train bpb": results["train"], "val bpb": results["val"]}
        notes = "Samples (greedy):\n\n" + "\n".join(f"- {s!r}" for s in samples)
        print0(f"report section: {write_section('base-loss', 'Base model loss', items, notes)}")
    compute_cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
