"""Pretrain the base model.

    python -m scripts.base_train --depth 20
    python -m scripts.base_train --time-budget 60h
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train --depth 20

Every size derives from --depth (see nanochat.gpt.config_for_depth and
nanochat.schedule.derive_plan), or from a --time-budget, which measures the
step here and picks the depth whose compute-optimal run fills it
(nanochat.budget). The recipe (nanochat.schedule.RECIPES: horizon, batch,
Muon options, packing) is the 2026 one unless --recipe or a piece's own flag
says otherwise; the plan is printed before the first step.
Checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<model tag>/. Started
again, a run continues from the newest complete one with exactly the data an
uninterrupted run would have seen (nanochat.resume: --fresh starts over,
--resume insists on continuing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.budget import DepthCost, Probe, evaluation_seconds, parse_duration, plan_budget
from nanochat.checkpoint import stage_dir
from nanochat.common import add_device_arg, print0, setup_logging
from nanochat.dataloader import PACKINGS, PretrainLoader
from nanochat.fileio import atomic_write
from nanochat.energy import add_cost_args
from nanochat.flags import FlagParser
from nanochat.loss_eval import SAMPLE_PROMPTS, greedy_complete
from nanochat.gpt import GPT, build_model, config_for_depth
from nanochat.hardware import peak_flops
from nanochat.loss_eval import corpus_bpb
from nanochat.muon import ORTHOGONALIZERS
from nanochat.optim import MuonOptions, add_lr_args, batch_lr_scale, build_optimizers, learning_rates
from nanochat.report import write_section
from nanochat.shards import data_dir
from nanochat.resume import add_resume_args, decide as decide_resume, newest_meta
from nanochat.runtime import (BatchRequest, ComputeSettings, add_compute_args, add_memory_args, compile_model, fit_device_batch,
                              prepare_model, release_cached_memory, set_compute_dtype, wants_compile)
from nanochat.schedule import (BATCH_ANCHOR_DEPTH, BATCH_ANCHOR_TOKENS, DEFAULT_RECIPE, RECIPES, WARMDOWN_RATIO, PlanError,
                               derive_plan, power_lines_batch)
from nanochat.stages import STAGES
from nanochat.tokenizer import get_tokenizer
from nanochat.tracking import Tracker, add_run_arg
from nanochat.training import (Hooks, LoopSettings, Resumed, TrainLoop, add_checkpoint_args, cost_settings, resume_from,
                               run_guarded)



# Rows per forward pass when memory allows: nanochat's d20 setting on an 80 GB H100.
DEFAULT_DEVICE_BATCH = 32
DEFAULT_DEPTH = 20
PARAM_COUNTS = {"scaling": "matrices + head", "all": "all parameters"}
# The time budget's probe: untimed steps (compilation, warm-up), then timed ones.
PROBE_WARMUP, PROBE_STEPS = 2, 3
BUDGET_PLAN_FILE = "time_budget.json"  # in the base checkpoints folder: a restarted budget run keeps its plan


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.base_train", description="Pretrain the base model.")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=None, help=f"number of transformer layers; the width follows (default {DEFAULT_DEPTH}, or chosen by --time-budget)")
    m.add_argument("--aspect-ratio", type=int, default=64, help="width = depth x this, rounded up to a multiple of the head dim (default %(default)s)")
    m.add_argument("--head-dim", type=int, default=128, help="attention head dimension (default %(default)s)")
    m.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens (default %(default)s)")
    t = p.add_argument_group("batch and horizon")
    t.add_argument("--device-batch-size", type=int, default=None, help=f"rows per forward pass per GPU (default: {DEFAULT_DEVICE_BATCH}, or the largest power of two below it whose measured step fits in memory)")
    t.add_argument("--time-budget", default=None, help="pretrain for this long, evaluation included (90m, 2.5h, 3d): measures the "
                   "step here and picks the depth (unless --depth is given) and the steps that fill it")
    t.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step across all ranks (default: "
                   f"the Power-Lines rule, a power of two growing as horizon^0.383 from {BATCH_ANCHOR_TOKENS:,} at depth "
                   f"{BATCH_ANCHOR_DEPTH}; {BATCH_ANCHOR_TOKENS:,} in the 2025-10 recipe)")
    t.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; overrides the two below (default: derived)")
    t.add_argument("--target-flops", type=float, default=-1, help="train for this many FLOPs (default: off)")
    t.add_argument("--target-param-data-ratio", type=float, default=None, help="training tokens per parameter, counted as "
                   "--param-count says, used when no horizon is given (default: the recipe's, 10.5 per scaling parameter)")
    t.add_argument("--param-count", choices=PARAM_COUNTS, default=None, help="which parameters the ratio counts: scaling = "
                   "block matrices + head, no embedding (Kaplan-style); all (the 2025-10 recipe) (default: the recipe's)")
    o = p.add_argument_group("optimization (each defaults to the recipe's)")
    o.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE, help="the defaults of horizon, batch, Muon and packing: "
                   "2026 (the public nanochat log's) or 2025-10 (this project's before) (default %(default)s)")
    o.add_argument("--orthogonalizer", choices=ORTHOGONALIZERS, default=None, help="Muon's orthogonalisation")
    o.add_argument("--normuon", choices=("on", "off"), default=None, help="NorMuon's per-row normalisation of Muon's update")
    o.add_argument("--weight-decay", type=float, default=None, help="Muon's weight decay at width 768, scaled by (768/width)^2, "
                   "ramped linearly to 0 (2026: 0.2)")
    o.add_argument("--cautious-weight-decay", choices=("on", "off"), default=None,
                   help="decay only where the update and the weight agree in sign")
    o.add_argument("--packing", choices=PACKINGS, default=None, help="rows of documents: best-fit (each row starts "
                   "at a document, nothing padded) or concat (documents cut wherever the row ends)")
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
    r.add_argument("--data-dir", default=None, help="pretraining shard folder (default: the folder of the dataset prepare.sh fetched last)")
    add_memory_args(r)
    add_cost_args(r)
    return p.parse_args(argv)


def model_config(args, vocab_size: int, depth: int | None = None):
    return config_for_depth(depth or args.depth, vocab_size, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                            max_seq_len=args.max_seq_len)


def apply_recipe(args) -> None:
    """Fill every recipe flag left unset with the recipe's value, so the run's meta (and a resume's check) has them all."""
    recipe = RECIPES[args.recipe]
    for name in ("orthogonalizer", "weight_decay", "packing", "param_count"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    if args.target_param_data_ratio is None:
        args.target_param_data_ratio = recipe.tokens_per_param
    for name, value in (("normuon", recipe.normuon), ("cautious_weight_decay", recipe.cautious)):
        if getattr(args, name) is None:
            setattr(args, name, "on" if value else "off")
    if args.time_budget is not None and args.num_iterations > 0:
        raise PlanError("--time-budget sets the number of steps: leave out --num-iterations")


def meta_model(config) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def default_total_batch(args, vocab_size: int, tokens: float) -> int:
    """Tokens per step when none was given: the Power-Lines rule for a run of `tokens`, or the fixed 2^19."""
    if not RECIPES[args.recipe].power_lines_batch:
        return BATCH_ANCHOR_TOKENS
    anchor = meta_model(model_config(args, vocab_size, BATCH_ANCHOR_DEPTH))
    return power_lines_batch(tokens, args.target_param_data_ratio * anchor.counted_params(args.param_count))


def settle_settings(args, info, vocab: int, started: float) -> str | None:
    """Every setting the run's shape needs, filled in: the recipe's defaults, the data folder and the depth
    (from --time-budget when given, whose plan line is returned)."""
    apply_recipe(args)
    # read once: prepare.sh fetching another dataset meanwhile must not switch folders mid-run
    args.data_dir = str(args.data_dir or data_dir())
    budget = plan_time_budget(args, info, vocab, started) if args.time_budget else None
    args.depth = args.depth or DEFAULT_DEPTH
    return budget


def print_plan(model: GPT, plan, args, peak_source: str, budget: str | None) -> None:
    c, dtype = model.config, model.compute_dtype
    print0(f"model: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads ({c.n_kv_head} kv), vocab {c.vocab_size:,}, context {c.sequence_len}")
    counts = model.param_counts()
    print0(f"parameters: embedding {counts['embedding']:,}, matrices {counts['matrices']:,}, head {counts['lm_head']:,}; "
           f"total {counts['total']:,}, scaling (matrices + head) {model.scaling_params():,}")
    print0(f"FLOPs per token: {model.estimate_flops():.3e}; compute dtype {str(dtype).removeprefix('torch.')}; MFU peak: {peak_source}")
    for line in plan.describe():
        print0(line)
    print0(f"data: {args.data_dir}")
    print0(f"recipe {args.recipe}: {args.orthogonalizer}, NorMuon {args.normuon}, weight decay {args.weight_decay:g} "
           f"(cautious {args.cautious_weight_decay}), {args.packing} packing, learning rates x {lr_scale(args):.3f} for the batch")
    if budget:
        print0(budget)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_guarded(lambda info: train(args, info), device=args.device, seed=args.seed,
                       device_batch=lambda: args.device_batch_size or DEFAULT_DEVICE_BATCH)


def batch_request(args) -> BatchRequest:
    return BatchRequest(DEFAULT_DEVICE_BATCH, args.device_batch_size, args.auto_batch, args.ignore_memory_check, args.memory_limit)


def compute_settings(args) -> ComputeSettings:
    return ComputeSettings(args.dtype, args.compile, args.activation_checkpointing)


def muon_options(args) -> MuonOptions:
    return MuonOptions(orthogonalizer=args.orthogonalizer, normuon=args.normuon == "on", weight_decay=args.weight_decay,
                       cautious=args.cautious_weight_decay == "on")


def lr_scale(args) -> float:
    return batch_lr_scale(args.total_batch_size) if RECIPES[args.recipe].lr_batch_scaling else 1.0


def train(args, info) -> int:
    started = time.perf_counter()
    device = info.device
    tokenizer = get_tokenizer()
    vocab = tokenizer.get_vocab_size()
    budget = settle_settings(args, info, vocab, started)
    model = build_model(model_config(args, vocab), device)
    counted = model.counted_params(args.param_count)
    if args.total_batch_size is None:
        args.total_batch_size = default_total_batch(args, vocab, args.target_param_data_ratio * counted)
    tag_dir = stage_dir("base") / (args.model_tag or f"d{args.depth}")
    continuing = decide_resume(tag_dir, args.resume_mode, model.config.to_dict(), vars(args))
    if continuing and args.device_batch_size is None:  # the run's own batch, not a new measurement
        args.device_batch_size = continuing.get("args", {}).get("device_batch_size")
    set_compute_dtype(model, args.dtype, device)
    args.device_batch_size, memory_estimate = fit_device_batch(model, batch_request(args), args.max_seq_len, info, "base",
                                                               checkpoint_blocks=args.activation_checkpointing)
    plan = derive_plan(
        device_batch_size=args.device_batch_size, seq_len=args.max_seq_len, world_size=info.world_size,
        total_batch_size=args.total_batch_size, num_params=counted, flops_per_token=model.estimate_flops(),
        num_iterations=args.num_iterations, target_flops=args.target_flops,
        target_param_data_ratio=args.target_param_data_ratio, param_count_name=PARAM_COUNTS[args.param_count],
        warmdown_ratio=args.warmdown_ratio,
    )
    # a budget run compiles (or not) as its probe did, so the measured speed is the speed it trains at
    step_model = prepare_model(model, compute_settings(args), device, None if budget else plan.num_iterations)
    peak, peak_source = peak_flops(device, model.compute_dtype)
    print_plan(model, plan, args, peak_source, budget)
    rates = learning_rates(args.matrix_lr, args.embedding_lr, args.unembedding_lr)
    optimizers = build_optimizers(model, **rates, muon=muon_options(args), lr_scale=lr_scale(args),
                                  world_size=info.world_size)
    resumed = resume_from(tag_dir, model, optimizers, info) if continuing else Resumed()
    loader = PretrainLoader(
        tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device,
        rank=info.rank, world_size=info.world_size, state=resumed.data_state, directory=args.data_dir, packing=args.packing,
    )
    settings = LoopSettings(
        num_iterations=plan.num_iterations, grad_accum_steps=plan.grad_accum_steps, warmdown_ratio=plan.warmdown_ratio,
        eval_every=args.eval_every, sample_every=args.sample_every, save_every=args.save_every, keep_last=args.keep_last,
        cost=cost_settings(args.price_per_kwh, args.hardware_price, args.hardware_lifetime_years),
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
        write_train_section(model, plan, loop, PARAM_COUNTS[args.param_count])
    return code


def write_train_section(model, plan, loop, count_name: str) -> None:
    counts = model.param_counts()
    items = {"depth": model.config.n_layer, "width": model.config.n_embd, "parameters": model.num_params(),
             "embedding parameters": counts["embedding"], "matrix parameters": counts["matrices"],
             "head parameters": counts["lm_head"], "steps": plan.num_iterations, "tokens": plan.total_tokens,
             "tokens per parameter": round(plan.tokens_per_param, 2), "parameters counted": count_name,
             "training FLOPs": f"{plan.total_flops:.3e}", **{f"final {k}": v for k, v in loop.metrics.items()},
             "wall time (s)": round(loop.timer.elapsed, 1), **loop.energy_items()}
    write_section(STAGES["base"].train_section, STAGES["base"].title, items)


def plan_time_budget(args, info, vocab: int, started: float) -> str:
    """Set args.depth (unless given), args.num_iterations and args.total_batch_size from --time-budget; returns
    the plan's one line. A restarted run reads the plan it made (BUDGET_PLAN_FILE) instead of measuring again,
    so it continues the same model to the same step."""
    seconds = parse_duration(args.time_budget)
    saved_file = stage_dir("base") / BUDGET_PLAN_FILE
    # every rank must take the same path (the probes are collective): rank 0's file decides
    saved = _from_rank0(_read_saved_plan(saved_file, seconds, args) if info.is_master else None, info)
    if saved is not None and args.resume_mode != "fresh":
        args.depth, args.num_iterations, args.total_batch_size = saved["depth"], saved["num_iterations"], saved["total_batch_size"]
        return f"{saved['line']} (the plan this run made at its start)"

    def cost_of(depth: int) -> DepthCost:
        model = meta_model(model_config(args, vocab, depth))
        return DepthCost(depth, model.counted_params(args.param_count), model.estimate_flops())

    def batch_for(depth: int) -> int:
        return args.total_batch_size or default_total_batch(args, vocab, cost_of(depth).tokens(args.target_param_data_ratio))

    def eval_seconds(depth: int, tokens: float, speed: float) -> float:
        return evaluation_seconds(tokens, speed, batch_for(depth), args.eval_every, args.eval_tokens)

    fixed = args.depth
    plan = plan_budget(seconds, ratio=args.target_param_data_ratio, cost_of=cost_of,
                       probe=lambda depth: probe_depth(args, info, vocab, depth), eval_seconds=eval_seconds,
                       start_depth=fixed or 4, min_depth=fixed or 1, max_depth=fixed or 64,
                       spent_seconds=_slowest(time.perf_counter() - started, info))
    args.depth = plan.depth
    args.total_batch_size = batch_for(plan.depth)
    args.num_iterations = max(1, round(plan.train_tokens / args.total_batch_size))
    line = plan.line(args.time_budget, args.total_batch_size)
    if info.is_master:
        saved_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(saved_file, json.dumps({"budget_seconds": seconds, "depth": args.depth, "num_iterations": args.num_iterations,
                                             "total_batch_size": args.total_batch_size, "recipe": args.recipe,
                                             "model_tag": args.model_tag, "line": line, "plan": plan.to_dict()}, indent=2))
    return line


def _read_saved_plan(path: Path, seconds: float, args) -> dict | None:
    """The saved budget plan, when it is for this budget and recipe and its run has a checkpoint to continue."""
    try:
        saved = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (saved.get("budget_seconds") != seconds or saved.get("recipe") != args.recipe or saved.get("model_tag") != args.model_tag
            or (args.depth and saved.get("depth") != args.depth)):
        return None
    tag_dir = stage_dir("base") / (args.model_tag or f"d{saved.get('depth')}")
    return saved if tag_dir.is_dir() and newest_meta(tag_dir) is not None else None


def probe_depth(args, info, vocab: int, depth: int) -> Probe:
    """The real training step at `depth` (device batch fitted in memory, compiled as the run would be), timed on
    random tokens; tokens per second of all ranks, the slowest rank's, so every rank plans alike."""
    began = time.perf_counter()
    device = info.device
    model = build_model(model_config(args, vocab, depth), device)
    set_compute_dtype(model, args.dtype, device)
    batch, _ = fit_device_batch(model, batch_request(args), args.max_seq_len, info, "base", checkpoint_blocks=args.activation_checkpointing)
    compiled = wants_compile(args.compile, device.type, None)
    step_model = compile_model(model, args.max_seq_len) if compiled else model  # the run's own graph budget
    optimizers = build_optimizers(model, muon=muon_options(args), world_size=info.world_size)
    tokens = torch.randint(vocab, (batch, args.max_seq_len + 1), device=device)
    times = []
    for i in range(PROBE_WARMUP + PROBE_STEPS):
        _sync(device)
        t0 = time.perf_counter()
        step_model(tokens[:, :-1], tokens[:, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        _sync(device)
        if i >= PROBE_WARMUP:
            times.append(time.perf_counter() - t0)
    del step_model, model, optimizers, tokens
    release_cached_memory(device)
    # the slowest rank's speed and the longest probe, so that every rank plans the same next probe
    speed = -_slowest(-batch * args.max_seq_len * info.world_size / sorted(times)[len(times) // 2], info)
    took = _slowest(time.perf_counter() - began, info)
    print0(f"time budget: depth {depth} measured at {speed:,.0f} tok/s (device batch {batch}) in {took:.1f}s")
    return Probe(depth, speed, took)


def _slowest(value: float, info) -> float:
    """The largest value over all ranks."""
    if info.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _from_rank0(obj, info):
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
