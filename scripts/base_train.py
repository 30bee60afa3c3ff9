"""Pretrain the base model.

    python -m scripts.base_train --depth 20
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train --depth 20

Every size derives from --depth (see nanochat.gpt.config_for_depth and
nanochat.schedule.derive_plan); the plan is printed before the first step.
Checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<model tag>/. Started
again, a run continues from the newest complete one with exactly the data an
uninterrupted run would have seen (nanochat.resume: --fresh starts over,
--resume insists on continuing).
"""

from __future__ import annotations

import argparse
import sys

import torch

from nanochat.checkpoint import CheckpointError, stage_dir
from nanochat.common import add_device_arg, compute_cleanup, compute_init, print0, setup_logging
from nanochat.dataloader import PretrainLoader
from nanochat.energy import add_cost_args
from nanochat.flags import FlagParser
from nanochat.generate import SAMPLE_PROMPTS, greedy_complete
from nanochat.gpt import GPT, build_model, config_for_depth
from nanochat.hardware import peak_flops
from nanochat.loss_eval import corpus_bpb
from nanochat.optim import add_lr_args, build_optimizers, learning_rates
from nanochat.report import write_section
from nanochat.resume import add_resume_args, decide as decide_resume
from nanochat.runtime import MemoryRefusal, add_compute_args, add_memory_args, fit_device_batch, prepare_model, set_compute_dtype
from nanochat.schedule import WARMDOWN_RATIO, PlanError, derive_plan
from nanochat.stages import STAGES
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tracking import Tracker, add_run_arg
from nanochat.training import Hooks, LoopSettings, Resumed, TrainLoop, add_checkpoint_args, cost_settings, resume_from



# Rows per forward pass when memory allows: nanochat's d20 setting on an 80 GB H100.
DEFAULT_DEVICE_BATCH = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.base_train", description="Pretrain the base model.")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=20, help="number of transformer layers; the width follows (default %(default)s)")
    m.add_argument("--aspect-ratio", type=int, default=64, help="width = depth x this, rounded up to a multiple of the head dim (default %(default)s)")
    m.add_argument("--head-dim", type=int, default=128, help="attention head dimension (default %(default)s)")
    m.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens (default %(default)s)")
    t = p.add_argument_group("batch and horizon")
    t.add_argument("--device-batch-size", type=int, default=None, help=f"rows per forward pass per GPU (default: {DEFAULT_DEVICE_BATCH}, or the largest power of two below it whose measured step fits in memory)")
    t.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step across all ranks (default %(default)s)")
    t.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; overrides the two below (default: derived)")
    t.add_argument("--target-flops", type=float, default=-1, help="train for this many FLOPs (default: off)")
    t.add_argument("--target-param-data-ratio", type=float, default=20, help="training tokens per parameter, used when no horizon is given (default %(default)s)")
    o = p.add_argument_group("optimization")
    add_lr_args(o)
    o.add_argument("--warmdown-ratio", type=float, default=WARMDOWN_RATIO, help="fraction of steps over which the lr decays to 0 (default %(default)s)")
    e = p.add_argument_group("evaluation, checkpoints, logging")
    e.add_argument("--eval-every", type=int, default=250, help="validation bits-per-byte every N steps; 0 for only at the end (default %(default)s)")
    e.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation (default %(default)s)")
    e.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps; 0 for only at the end (default %(default)s)")
    add_checkpoint_args(e, save_every=1000, keep_last=3)
    e.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    add_resume_args(e)
    add_run_arg(e)
    r = p.add_argument_group("runtime")
    add_device_arg(r)
    add_compute_args(r)
    r.add_argument("--seed", type=int, default=42, help="random seed for initialisation (default %(default)s)")
    r.add_argument("--data-dir", default=None, help="pretraining shard folder (default $NANOCHAT_BASE_DIR/base_data)")
    add_memory_args(r)
    add_cost_args(r)
    return p.parse_args(argv)


def model_config(args, vocab_size: int):
    return config_for_depth(args.depth, vocab_size, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len)


def print_plan(model: GPT, plan, dtype, peak_source: str) -> None:
    c = model.config
    print0(f"model: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads ({c.n_kv_head} kv), vocab {c.vocab_size:,}, context {c.sequence_len}")
    print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in model.param_counts().items()))
    print0(f"FLOPs per token: {model.estimate_flops():.3e}; compute dtype {str(dtype).removeprefix('torch.')}; MFU peak: {peak_source}")
    for line in plan.describe():
        print0(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    info = compute_init(args.device, seed=args.seed)
    try:
        return train(args, info)
    except (PlanError, TokenizerError, CheckpointError, FileNotFoundError) as exc:
        print0(f"error: {exc}")
        return 2
    except MemoryRefusal as exc:
        print0(f"error: {exc}")
        return 3
    except torch.OutOfMemoryError:
        batch = args.device_batch_size or DEFAULT_DEVICE_BATCH
        print0(
            f"error: out of memory at --device-batch-size {batch}; run again with --device-batch-size {max(1, batch // 2)} "
            "(gradient accumulation keeps the total batch, so results stay comparable): it continues from the last checkpoint"
        )
        return 3
    finally:
        compute_cleanup()


def train(args, info) -> int:
    device = info.device
    tokenizer = get_tokenizer()
    model = build_model(model_config(args, tokenizer.get_vocab_size()), device)
    tag_dir = stage_dir("base") / (args.model_tag or f"d{args.depth}")
    continuing = decide_resume(tag_dir, args.resume_mode, model.config.to_dict(), vars(args))
    if continuing and args.device_batch_size is None:  # the run's own batch, not a new measurement
        args.device_batch_size = continuing.get("args", {}).get("device_batch_size")
    set_compute_dtype(model, args, device)
    args.device_batch_size, memory_estimate = fit_device_batch(model, args, DEFAULT_DEVICE_BATCH, args.max_seq_len, info, "base")
    plan = derive_plan(
        device_batch_size=args.device_batch_size, seq_len=args.max_seq_len, world_size=info.world_size,
        total_batch_size=args.total_batch_size, num_params=model.num_params(), flops_per_token=model.estimate_flops(),
        num_iterations=args.num_iterations, target_flops=args.target_flops,
        target_param_data_ratio=args.target_param_data_ratio, warmdown_ratio=args.warmdown_ratio,
    )
    step_model = prepare_model(model, args, device, plan.num_iterations)
    peak, peak_source = peak_flops(device, model.compute_dtype)
    print_plan(model, plan, model.compute_dtype, peak_source)
    optimizers = build_optimizers(model, **learning_rates(args), world_size=info.world_size)
    resumed = resume_from(tag_dir, model, optimizers, info) if continuing else Resumed()
    loader = PretrainLoader(
        tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device,
        rank=info.rank, world_size=info.world_size, state=resumed.data_state, directory=args.data_dir,
    )
    settings = LoopSettings(
        num_iterations=plan.num_iterations, grad_accum_steps=plan.grad_accum_steps, warmdown_ratio=plan.warmdown_ratio,
        eval_every=args.eval_every, sample_every=args.sample_every, save_every=args.save_every, keep_last=args.keep_last,
        cost=cost_settings(args),
    )
    meta = {"model_config": model.config.to_dict(), "plan": plan.to_dict(), "args": vars(args)}
    hooks = Hooks(evaluate=lambda step: {"val_bpb": validation_bpb(args, info, step_model, tokenizer, step)},
                  sample=lambda: print_samples(model, tokenizer, info))
    tracker = Tracker(args.run, {"args": vars(args), "plan": plan.to_dict(), "model": model.config.to_dict()}, info.is_master)
    loop = TrainLoop(model=model, step_model=step_model, optimizers=optimizers, batches=loader, settings=settings, info=info,
                     tag_dir=tag_dir, meta=meta, hooks=hooks, tracker=tracker, peak_flops=peak, resumed=resumed,
                     memory_estimate=memory_estimate)
    try:
        code = loop.run()
    finally:
        loader.close()
        tracker.finish()
    if code == 0 and info.is_master:
        write_train_section(model, plan, loop)
    return code


def write_train_section(model, plan, loop) -> None:
    items = {"depth": model.config.n_layer, "width": model.config.n_embd, "parameters": model.num_params(),
             "steps": plan.num_iterations, "tokens": plan.total_tokens, "tokens per parameter": round(plan.tokens_per_param, 2),
             "training FLOPs": f"{plan.total_flops:.3e}", **{f"final {k}": v for k, v in loop.metrics.items()},
             "wall time (s)": round(loop.timer.elapsed, 1), **loop.energy_items()}
    write_section(STAGES["base"].train_section, STAGES["base"].title, items)


def validation_bpb(args, info, model, tokenizer, step: int) -> float:
    bpb = corpus_bpb(model, tokenizer, "val", args.eval_tokens, args.device_batch_size, args.max_seq_len, info, args.data_dir)
    print0(f"step {step:06d} | validation bits per byte: {bpb:.4f}")
    return bpb


def print_samples(model, tokenizer, info) -> None:
    if not info.is_master:
        return
    model.eval()
    for prompt, completion in zip(SAMPLE_PROMPTS, greedy_complete(model, tokenizer, SAMPLE_PROMPTS, max_new_tokens=16)):
        print0(f"sample | {prompt}{completion!r}")
    model.train()


if __name__ == "__main__":
    sys.exit(main())
