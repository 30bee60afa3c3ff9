"""Pretrain the base model.

    python -m scripts.base_train --depth 20
    torchrun --standalone --nproc_per_node=2 -m scripts.base_train --depth 20

Every size derives from --depth (see nanochat.gpt.config_for_depth and
nanochat.schedule.derive_plan); the plan is printed before the first step.
Checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<model tag>/ and
`--resume` continues from the newest complete one with exactly the data an
uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from nanochat.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanochat.common import compute_cleanup, compute_dtype, compute_init, get_base_dir, print0, setup_logging
from nanochat.dataloader import PretrainLoader
from nanochat.generate import SAMPLE_PROMPTS, greedy_complete
from nanochat.gpt import GPT, build_model, config_for_depth
from nanochat.hardware import peak_flops
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizers
from nanochat.progress import StepTimer, format_duration
from nanochat.schedule import PlanError, derive_plan, lr_multiplier, muon_momentum
from nanochat.signals import StopRequest
from nanochat.tokenizer import TokenizerError, get_tokenizer
from nanochat.tracking import Tracker



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.base_train", description="Pretrain the base model.")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=20, help="number of transformer layers; the width follows (default %(default)s)")
    m.add_argument("--aspect-ratio", type=int, default=64, help="width = depth x this, rounded up to a multiple of the head dim (default %(default)s)")
    m.add_argument("--head-dim", type=int, default=128, help="attention head dimension (default %(default)s)")
    m.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens (default %(default)s)")
    t = p.add_argument_group("batch and horizon")
    t.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per GPU; lower it if memory runs out (default %(default)s)")
    t.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step across all ranks (default %(default)s)")
    t.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; overrides the two below (default: derived)")
    t.add_argument("--target-flops", type=float, default=-1, help="train for this many FLOPs (default: off)")
    t.add_argument("--target-param-data-ratio", type=float, default=20, help="training tokens per parameter, used when no horizon is given (default %(default)s)")
    o = p.add_argument_group("optimization")
    o.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate (default %(default)s)")
    o.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the embedding, before width scaling (default %(default)s)")
    o.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the head, before width scaling (default %(default)s)")
    o.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps over which the lr decays to 0 (default %(default)s)")
    e = p.add_argument_group("evaluation, checkpoints, logging")
    e.add_argument("--eval-every", type=int, default=250, help="validation bits-per-byte every N steps; 0 for only at the end (default %(default)s)")
    e.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation (default %(default)s)")
    e.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps; 0 for only at the end (default %(default)s)")
    e.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps; 0 for only at the end (default %(default)s)")
    e.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default %(default)s)")
    e.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    e.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of this model tag")
    e.add_argument("--run", default=None, help="wandb run name; no name, no wandb")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="override device autodetection")
    r.add_argument("--no-compile", action="store_true", help="do not torch.compile the model (compiled by default on CUDA)")
    r.add_argument("--seed", type=int, default=42, help="random seed for initialisation (default %(default)s)")
    r.add_argument("--data-dir", default=None, help="pretraining shard folder (default $NANOCHAT_BASE_DIR/base_data)")
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
    except torch.OutOfMemoryError:
        print0(
            f"error: out of memory at --device-batch-size {args.device_batch_size}; try {max(1, args.device_batch_size // 2)} "
            "(gradient accumulation keeps the total batch, so results stay comparable), then --resume"
        )
        return 3
    finally:
        compute_cleanup()


def train(args, info) -> int:
    device = info.device
    dtype = compute_dtype(device.type)
    tokenizer = get_tokenizer()
    token_bytes = tokenizer.token_bytes()
    model = build_model(model_config(args, tokenizer.get_vocab_size()), device)
    model_tag = args.model_tag or f"d{args.depth}"
    tag_dir = get_base_dir() / "base_checkpoints" / model_tag
    plan = derive_plan(
        device_batch_size=args.device_batch_size, seq_len=args.max_seq_len, world_size=info.world_size,
        total_batch_size=args.total_batch_size, num_params=model.num_params(), flops_per_token=model.estimate_flops(),
        num_iterations=args.num_iterations, target_flops=args.target_flops,
        target_param_data_ratio=args.target_param_data_ratio, warmdown_ratio=args.warmdown_ratio,
    )
    peak, peak_source = peak_flops(device, dtype)
    print_plan(model, plan, dtype, peak_source)
    optimizers = build_optimizers(
        model, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr, world_size=info.world_size
    )
    start_step, data_state, meta = 0, None, {}
    if args.resume:
        start_step, data_state, meta = resume(tag_dir, model, optimizers, info)
    loader = PretrainLoader(
        tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device,
        rank=info.rank, world_size=info.world_size, state=data_state, directory=args.data_dir,
    )
    step_model = model if args.no_compile or device.type != "cuda" else torch.compile(model)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    ctx = TrainContext(args, info, model, step_model, optimizers, loader, plan, tokenizer, token_bytes, autocast, tag_dir, peak)
    config = {"args": vars(args), "plan": plan.to_dict(), "model": model.config.to_dict()}
    ctx.tracker = Tracker(args.run, config, info.is_master)
    ctx.smooth_loss = meta.get("smooth_loss", 0.0)
    ctx.timer = StepTimer(plan.num_iterations, first_step=start_step, elapsed=meta.get("train_seconds", 0.0))
    try:
        return ctx.run(start_step)
    finally:
        loader.close()
        ctx.tracker.finish()


def resume(tag_dir, model, optimizers, info) -> tuple[int, dict, dict]:
    ckpt = load_checkpoint(tag_dir, rank=info.rank, device=info.device)
    saved_world = ckpt.meta.get("world_size", 1)
    if saved_world != info.world_size:
        raise CheckpointError(f"{ckpt.path} was written by {saved_world} rank(s); resume it with the same number (now {info.world_size})")
    model.load_state_dict(ckpt.model_state)
    for opt, state in zip(optimizers, ckpt.optim_state):
        opt.load_state_dict(state)
    print0(f"resumed from {ckpt.path} (step {ckpt.step:,})")
    return ckpt.step, ckpt.data_state, ckpt.meta


class TrainContext:
    """The pieces of one training run, and the loop over them."""

    def __init__(self, args, info, model, step_model, optimizers, loader, plan, tokenizer, token_bytes, autocast, tag_dir, peak):
        self.args, self.info, self.model, self.step_model = args, info, model, step_model
        self.optimizers, self.loader, self.plan, self.tokenizer = optimizers, loader, plan, tokenizer
        self.token_bytes, self.autocast, self.tag_dir, self.peak = token_bytes, autocast, tag_dir, peak
        self.flops_per_token = model.estimate_flops()
        self.metrics: dict = {}

    def run(self, start_step: int) -> int:
        stop = StopRequest()
        last = self.plan.num_iterations
        for step in range(start_step, last):
            self.train_step(step)
            done = step + 1
            if self._due(self.args.eval_every, done) and done < last:
                self.evaluate(done)
            if self._due(self.args.sample_every, done) and done < last:
                self.sample()
            if stop.agreed(self.info.device):
                self.save(done)
                print0(f"stopped at step {done:,}; continue with --resume")
                return stop.exit_code
            if self._due(self.args.save_every, done) and done < last:
                self.save(done)
        if start_step < last or not (self.tag_dir / f"step_{last:06d}").exists():
            self.save(last)  # before any final evaluation, so a crash there loses no training
        self.evaluate(last)
        self.sample()
        print0(f"training done: {last:,} steps in {format_duration(self.timer.elapsed)}; checkpoint in {self.tag_dir}")
        return 0

    @staticmethod
    def _due(every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    def train_step(self, step: int) -> None:
        self.timer.start()
        total = 0.0
        for _ in range(self.plan.grad_accum_steps):
            x, y = next(self.loader)
            with self.autocast:
                loss = self.step_model(x, y)
            (loss / self.plan.grad_accum_steps).backward()
            total += loss.detach()
        lrm = lr_multiplier(step, self.plan.num_iterations, self.plan.warmdown_ratio)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if "momentum" in group:
                    group["momentum"] = muon_momentum(step)
            opt.step()
        self.model.zero_grad(set_to_none=True)
        train_loss = (total / self.plan.grad_accum_steps).item()  # syncs, so the timer sees the real step time
        dt = self.timer.stop()
        self.log_step(step + 1, train_loss, lrm, dt)

    def log_step(self, done: int, train_loss: float, lrm: float, dt: float) -> None:
        beta = 0.9
        self.smooth_loss = beta * self.smooth_loss + (1 - beta) * train_loss
        debiased = self.smooth_loss / (1 - beta ** done)
        tok_per_s = self.plan.total_batch_size / dt
        mfu = f"{100 * self.flops_per_token * tok_per_s / (self.peak * self.info.world_size):.1f}%" if self.peak else "n/a"
        pct = 100 * done / self.plan.num_iterations
        print0(
            f"step {done:06d}/{self.plan.num_iterations:06d} ({pct:5.1f}%) | loss {debiased:.4f} | lrm {lrm:.3f} | "
            f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu} | elapsed {format_duration(self.timer.elapsed)} | eta {self.timer.eta()}"
        )
        self.tracker.log({"train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_per_s, "train/dt": dt}, step=done)

    def evaluate(self, step: int) -> None:
        rows = self.args.device_batch_size
        steps = max(1, self.args.eval_tokens // (rows * self.args.max_seq_len * self.info.world_size))
        val = PretrainLoader(
            self.tokenizer, rows, self.args.max_seq_len, "val", device=self.info.device, rank=self.info.rank,
            world_size=self.info.world_size, loop=False, directory=self.args.data_dir,
        )
        self.model.eval()
        try:
            bpb = evaluate_bpb(self.step_model, val, steps, self.token_bytes, self.autocast)
        finally:
            val.close()
            self.model.train()
        self.metrics["val_bpb"] = bpb
        print0(f"step {step:06d} | validation bits per byte: {bpb:.4f}")
        self.tracker.log({"val/bpb": bpb}, step=step)

    def sample(self) -> None:
        if not self.info.is_master:
            return
        self.model.eval()
        for prompt, completion in zip(SAMPLE_PROMPTS, greedy_complete(self.model, self.tokenizer, SAMPLE_PROMPTS, max_new_tokens=16)):
            print0(f"sample | {prompt}{completion!r}")
        self.model.train()

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        meta = {
            "model_config": self.model.config.to_dict(), "plan": self.plan.to_dict(), "args": vars(self.args),
            "metrics": self.metrics, "smooth_loss": self.smooth_loss, "train_seconds": self.timer.elapsed,
        }
        path = save_checkpoint(
            self.tag_dir, step, model_state=self.model.state_dict(), optim_state=[o.state_dict() for o in self.optimizers],
            data_state=self.loader.state_dict(), meta=meta, rank=self.info.rank, local_rank=self.info.local_rank,
            world_size=self.info.world_size, keep_last=self.args.keep_last,
        )
        print0(f"step {step:06d} | checkpoint saved to {path} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
