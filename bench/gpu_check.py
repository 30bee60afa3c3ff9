"""The one prepared GPU check: correctness of the bf16 and compiled paths, then
speed and memory at depth 20, then the two pretraining recipes at equal time, in one command.

    python bench/gpu_check.py --data DIR --tokenizer DIR   # on a GPU, full sizes (meant to take under 15 min on an
                                                           # H100/H200: ~9 before recipe_ab, ~6 for it; estimates)
    python bench/gpu_check.py --device cpu --smoke    # tiny sizes for every check, on CPU, in about a minute
    python bench/gpu_check.py --only chunked_loss,d20_decode    # rerun some checks
    python bench/gpu_check.py --only recipe_ab --data DIR --tokenizer DIR   # only the recipe A/B

Prints a header (device, torch, CUDA) and then one line per check, in this
order (the cheap correctness checks first, then depth 20, the recipe A/B last):

    STATUS name  seconds (running total)  figures

  bf16_matmul             8192^3 bf16 products: TFLOP/s, at least half the datasheet peak
                          where nanochat.hardware names one (needs nothing of the project)
  attention_kernel        which SDPA backend (flash, cuDNN, memory-efficient, math) a bf16
                          training forward + backward ran; on CUDA the math fallback FAILs
  bf16_vs_fp32            depth 4: the same init and batch trained N optimizer steps in
                          fp32 and in bf16; losses within 2%, step-1 gradient cosine > 0.99
  chunked_loss            nanochat.ops.head_loss against the plain soft-capped
                          cross-entropy on N x V logits: values and both gradients, fp32
                          and bf16, and the peak memory of each (the chunked one never
                          holds an (N, V) tensor)
  compiled_head           the compiled head loss against eager at 1, 4 and 16 chunks (depth
                          20 at batch 32 runs 16): values, gradients, compile seconds, and
                          peak memory no more than one chunk above eager's
  engine_vs_transformers  our Engine's bf16 greedy tokens == transformers' bf16 greedy
                          generate on the exported weights
  compile_vs_eager        depth 4, bf16: torch.compile's loss and gradients against eager,
                          and no graph breaks in the training forward + loss
  d20_eager_memory        depth 20, eager, batch 8: measured peak memory vs the fake-tensor
                          estimate (nanochat.memory.measure_training_memory)
  d20_decode              depth 20, bf16: Engine decode tokens/s at batch 1, 8, 32
  d20_compiled            depth 20, compiled, bf16, batch 32 and 16: tokens/s, MFU, and
                          measured peak memory vs the estimate
  recipe_ab               scripts.base_train --depth 12 --time-budget 2.5m twice, as
                          subprocesses, same seed and data: --recipe 2025-10, then 2026;
                          each one's final validation bpb, steps, tokens/s, and the ratio
                          new/old. PASS when both finish: the ratio is a figure to
                          record, not a criterion. SKIP without --data; without
                          --tokenizer one is trained from --data first

STATUS is PASS, FAIL or SKIP. Every result is also written to
bench/gpu_check.json (--out PATH) after each check, so a run cut short keeps
what it finished: the header, and per check its status, seconds, message
and figures (numbers only; what could not be measured is said in the
message). Exit status: 0 when no check FAILed, 1 when one did, 2 for bad
usage.

Peak memory is printed as allocated (what the tensors took, compared with the
estimates) beside reserved (the caching allocator's segments, what the driver sees).
The project is imported inside the checks, so the header and bf16_matmul run where
it does not import, and each check that needs it FAILs saying which import broke.
bench/device_run.py runs a subset of these on a borrowed machine (the device kit).

Everything but recipe_ab is made in-process (random weights, random or
rule-generated tokens, a tokenizer trained on generated text); recipe_ab
reads the text of --data and writes each run's whole log beside --out.
Nothing is downloaded. Each check runs in its own try/except, so one failure
does not stop the rest.

One file of ~1,000 lines on purpose: it is what someone with a rented GPU and
a few minutes copies, runs and reads, start to end, in the order it runs;
what the benches share is in bench/rivals.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.device_run import DONE_RE, STEP_RE, VAL_BPB_RE  # noqa: E402  (the standard library only)

# The project is imported inside the checks, never here: on a borrowed machine
# that lacks one of its dependencies the header, bf16_matmul and every check
# that does not need the missing piece still run, and the others FAIL saying
# which import broke.
if TYPE_CHECKING:
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

GIB = 2**30
DEFAULT_OUT = Path(__file__).with_name("gpu_check.json")
BF16 = torch.bfloat16

# Tolerances. bf16 keeps 8 significant bits (rounding error up to 2^-8, 0.4%); the
# loss is an fp32 mean over thousands of rows, so rounding mostly averages
# out, and 2% leaves room for 10 optimizer steps of drift between the runs.
BF16_LOSS_RTOL = 0.02
GRAD_COSINE_MIN = 0.99
# Compiled and eager bf16 run the same math but fuse and round at different
# points; 1% on the loss is well above that and well below a real bug.
COMPILE_LOSS_RTOL = 0.01
# head_loss vs the plain expression, (loss, gradient) relative error by dtype:
# the same arithmetic summed in another order (fp32), or with the bf16
# products rounded per chunk instead of per slice (bf16).
HEAD_TOLERANCES = {torch.float32: (1e-5, 1e-4), BF16: (1e-3, 2e-2)}
# The measured peak may exceed the estimate by this much at most: an estimate
# that is low lets a run start that then runs out of memory.
MEMORY_UNDERESTIMATE_MAX = 1.10
# chunked_loss draws weights so the logits have this spread: enough that the
# soft cap (15 tanh(x / 15)) bends them and its derivative is exercised.
LOGIT_STD = 5.0
# Bytes per logit the plain expression holds at its peak (in backward): the
# saved tanh and log-softmax outputs plus about three fp32 gradients in
# flight, and the compute-dtype matmul output; 7 fp32-sized tensors, rounded up.
PLAIN_BYTES_PER_LOGIT = 7 * 4
# bf16_matmul: the datasheet's dense peak is a ceiling no kernel reaches; large square
# cuBLAS products are commonly reported at 60-80% of it on an H100 (not yet measured on
# our machines). Below half, the card is throttled, shared or misconfigured, and every
# MFU figure after this check would mislead.
MATMUL_MIN_FRACTION = 0.5
# attention_kernel: the aten op each SDPA backend registers -> the name we print.
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
}
# engine_vs_transformers: a small GQA model taught a rule for this many steps.
EXPORT_SHAPE = dict(sequence_len=128, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
EXPORT_STEPS = 150
EXPORT_PROMPTS, EXPORT_PROMPT_LEN, EXPORT_NEW_TOKENS = 4, 8, 24


@dataclass(frozen=True)
class Sizes:
    """Every size the checks use: FULL on a GPU, SMOKE with --smoke."""

    depth: int  # bf16_vs_fp32 and compile_vs_eager
    vocab: int
    seq: int
    batch: int
    steps: int  # optimizer steps compared by bf16_vs_fp32
    loss_rows: int  # chunked_loss: N x V logits from a width-C input
    loss_vocab: int
    loss_width: int
    head_chunk_elements: int | None  # nanochat.ops.HEAD_CHUNK_ELEMENTS during chunked_loss and compiled_head (None: the library's)
    head_chunk_counts: tuple[int, ...]  # compiled_head: compiled vs eager at this many chunks of rows
    matmul_size: int  # bf16_matmul: n x n times n x n
    matmul_iters: int
    big_depth: int  # the d20_* checks
    big_vocab: int
    big_seq: int
    compiled_batches: tuple[int, ...]
    eager_batch: int
    warmup: int  # untimed training steps (the first compiles)
    timed: int
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_new_tokens: int
    ab_depth: int  # recipe_ab: the depth both recipes train at
    ab_budget: str  # --time-budget of each run
    ab_flags: tuple[str, ...]  # further base_train flags (model shape, batch)
    ab_eval_every: int
    ab_eval_tokens: int
    ab_vocab: int  # the tokenizer recipe_ab trains when no --tokenizer is given
    ab_tokenizer_chars: int
    ab_startup_s: int  # a run may take its budget plus this (interpreter, final save) before it counts as hung


FULL = Sizes(depth=4, vocab=8192, seq=512, batch=8, steps=10,
             loss_rows=65536, loss_vocab=65536, loss_width=1280, head_chunk_elements=None,
             # 16 chunks is what depth 20 at batch 32 x 2048 unrolls (nanochat/ops.py); an 8192^3 product is
             # 1.1 TFLOP, ~1.5 ms at 700 TFLOP/s: long beside its launch, and 200 of them (~0.3 s) beside the timer
             head_chunk_counts=(1, 4, 16), matmul_size=8192, matmul_iters=200,
             big_depth=20, big_vocab=65536, big_seq=2048, compiled_batches=(32, 16), eager_batch=8, warmup=3, timed=5,
             decode_batches=(1, 8, 32), decode_prompt=16, decode_new_tokens=128,
             # recipe_ab: depth 12 trains ~60 steps of 2^19 tokens in 2.5 min on an H100 (an estimate from ~400k
             # tok/s, not yet measured), so an evaluation every 20 steps gives about 3 before the last; 2^21
             # tokens each is ~2 s of forward passes, a few percent of the run
             ab_depth=12, ab_budget="2.5m", ab_flags=(), ab_eval_every=20, ab_eval_tokens=2**21,
             ab_vocab=65536, ab_tokenizer_chars=10**8, ab_startup_s=180)
# Smoke: the same code paths at toy sizes; the head's chunk is shrunk so
# head_loss still loops over several chunks (8 here, 16 at full size).
SMOKE = Sizes(depth=2, vocab=512, seq=64, batch=4, steps=10,
              loss_rows=2048, loss_vocab=1024, loss_width=64, head_chunk_elements=2**18,
              head_chunk_counts=(1, 4, 16), matmul_size=256, matmul_iters=5,
              big_depth=2, big_vocab=512, big_seq=128, compiled_batches=(4, 2), eager_batch=2, warmup=1, timed=2,
              decode_batches=(1, 2, 4), decode_prompt=8, decode_new_tokens=16,
              # a fixed batch: the 2025-10 recipe's 2^19 tokens per step would be one step of minutes on a CPU
              ab_depth=2, ab_budget="10s", ab_eval_every=100, ab_eval_tokens=1024, ab_vocab=300,
              ab_tokenizer_chars=10**6, ab_startup_s=60,
              ab_flags=("--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "8",
                        "--total-batch-size", "512"))


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    smoke: bool
    compile_backend: str
    workdir: Path = Path(".")
    data: Path | None = None  # recipe_ab: --data, a folder of parquet shards
    tokenizer: Path | None = None  # recipe_ab: --tokenizer, or None to train one
    log_dir: Path = Path(".")  # recipe_ab writes each run's whole log here (beside --out)


@dataclass
class Outcome:
    status: str  # PASS, FAIL or SKIP
    message: str  # the figures in words, one line
    figures: dict[str, float] = field(default_factory=dict)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def worst(statuses: list[str]) -> str:
    return "FAIL" if "FAIL" in statuses else "SKIP" if "SKIP" in statuses else "PASS"


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


# ---------------------------------------------------------------- shared pieces


def small_config(s: Sizes) -> GPTConfig:
    from nanochat.gpt import config_for_depth

    return config_for_depth(s.depth, s.vocab, max_seq_len=s.seq)


def big_config(s: Sizes) -> GPTConfig:
    from nanochat.gpt import config_for_depth

    return config_for_depth(s.big_depth, s.big_vocab, max_seq_len=s.big_seq)


def perturbed_model(config: GPTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> GPT:
    """build_model, then small noise on o_proj and fc2. They start at zero, which
    makes the step-1 gradients of q/k/v and fc1 exactly zero (their outputs
    meet zero weights), and comparing zeros would show nothing."""
    from nanochat.gpt import build_model

    torch.manual_seed(seed)
    model = build_model(config, device, dtype)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.normal_(0.0, 0.02)
            block.mlp.fc2.weight.normal_(0.0, 0.02)
    return model


def successor_table(vocab_size: int, seed: int) -> torch.Tensor:
    """A random next token for every ordinary token (a permutation; special
    tokens, the last ids, never occur): a rule a small model learns in a few
    steps, so losses fall and greedy choices win by clear margins."""
    from nanochat.conversation import SPECIAL_TOKENS

    ordinary = vocab_size - len(SPECIAL_TOKENS)
    return torch.randperm(ordinary, generator=torch.Generator().manual_seed(seed))


def follow(successor: torch.Tensor, rows: int, length: int, seed: int) -> torch.Tensor:
    """(rows, length) token ids from random starts, each the successor of the one before."""
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, successor.numel(), (rows,), generator=torch.Generator().manual_seed(seed))
    for t in range(1, length):
        tokens[:, t] = successor[tokens[:, t - 1]]
    return tokens


def inputs_targets(tokens: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def random_batch(vocab_size: int, rows: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (rows, seq + 1), generator=torch.Generator().manual_seed(0))
    return inputs_targets(tokens, device)


def gradients(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().float().clone() for name, p in model.named_parameters()}


def gradient_cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine similarity per parameter (in float64); two zero gradients agree."""
    cosines = {}
    for name in a:
        x, y = a[name].double().flatten(), b[name].double().flatten()
        nx, ny = x.norm(), y.norm()
        cosines[name] = 1.0 if nx == 0 and ny == 0 else float((x @ y) / (nx * ny).clamp_min(1e-300))
    return cosines


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def release_memory(device: torch.device) -> None:
    """What one check leaves behind must not count against the next one's memory,
    nor its compiled graphs against the next one's recompile limit."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Peak:
    """Peak CUDA memory during one call, in bytes."""

    allocated: int  # beyond what was allocated before: what the call's tensors took, comparable with an estimate
    allocated_total: int  # max_memory_allocated, everything live at the peak
    reserved: int  # max_memory_reserved: the caching allocator's segments, what the driver (and nvidia-smi) counts

    def words(self) -> str:
        return (f"peak allocated {gib(self.allocated)}, reserved {gib(self.reserved)} "
                f"({self.reserved / max(self.allocated_total, 1):.2f}x the {gib(self.allocated_total)} allocated in all)")

    def figures(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}peak_gib": self.allocated / GIB, f"{prefix}reserved_gib": self.reserved / GIB,
                f"{prefix}reserved_over_allocated": self.reserved / max(self.allocated_total, 1)}


def measure_peak(fn: Callable, device: torch.device) -> tuple[object, Peak | None]:
    """(fn(), its Peak; None on CPU, where torch keeps no such count)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    total = torch.cuda.max_memory_allocated(device)
    return result, Peak(total - before, total, torch.cuda.max_memory_reserved(device))


# ---------------------------------------------------------------- 0. the card: one bf16 matmul, the attention kernel


def check_bf16_matmul(ctx: Context) -> Outcome:
    """TFLOP/s of n x n bf16 products, against the card's datasheet peak where the project names one.
    Needs nothing of the project to measure, so it runs even where the project does not import."""
    s, device = ctx.sizes, ctx.device
    n = s.matmul_size
    a, b = (torch.randn(n, n, device=device, dtype=BF16) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=BF16)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel, the clocks rise
        torch.matmul(a, b, out=out)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(s.matmul_iters):
        torch.matmul(a, b, out=out)
    synchronize(device)
    seconds = time.perf_counter() - t0
    tflops = 2 * n**3 * s.matmul_iters / seconds / 1e12
    figures = {"tflops": tflops, "n": n, "seconds": seconds}
    message = f"{n} x {n} x {n} bf16, {s.matmul_iters} products: {tflops:,.1f} TFLOP/s"
    try:
        from nanochat.hardware import peak_flops

        peak, source = peak_flops(device, BF16)
    except Exception as err:  # the figure above stands without a peak to compare it with
        return Outcome("PASS", f"{message}; no peak to compare (project import failed: {type(err).__name__}: "
                               f"{first_line(err)})", figures)
    if peak is None:
        return Outcome("PASS", f"{message}; no datasheet peak for this device", figures)
    fraction = tflops * 1e12 / peak
    figures["fraction_of_peak"] = fraction
    return Outcome(verdict(fraction >= MATMUL_MIN_FRACTION),
                   f"{message} = {fraction:.0%} of {peak / 1e12:,.0f} ({source}; >= {MATMUL_MIN_FRACTION:.0%})", figures)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdpa_kernels(fn: Callable[[], object]) -> list[str]:
    """The scaled-dot-product-attention implementations fn() dispatched to, by the aten
    op each backend registers (the profiler records ops on the CPU side, so this works
    on every device)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ran = {event.key for event in prof.key_averages()}
    return sorted({kernel for op, kernel in SDPA_KERNELS.items() if op in ran})


def check_attention_kernel(ctx: Context) -> Outcome:
    """Which SDPA backend a bf16 training forward + backward ran at the real head dimension:
    the unfused math fallback is correct but several times slower and holds (T, T) scores,
    and torch takes it silently when no fused kernel accepts the shapes."""
    s, device = ctx.sizes, ctx.device
    config = small_config(s)
    model = perturbed_model(config, device, BF16)
    x, y = random_batch(config.vocab_size, s.batch, config.sequence_len, device)

    def step():
        model(x, y).backward()
        synchronize(device)

    step()  # warm-up, so first-call work does not decide what is recorded
    kernels = sdpa_kernels(step)
    message = (f"depth {s.depth}, head dim {config.n_embd // config.n_head}, {config.n_head} heads, "
               f"{config.n_kv_head} kv heads, seq {config.sequence_len}, bf16 forward + backward: "
               f"{', '.join(kernels) or 'no SDPA op recorded'}")
    fused = bool(kernels) and "math" not in kernels
    figures = {"fused": fused, "math": "math" in kernels}
    if device.type != "cuda":
        return Outcome(verdict(bool(kernels)), message + " (CPU: recorded, not judged)", figures)
    return Outcome(verdict(fused), message + (" (fused)" if fused else " (the unfused math fallback)"), figures)


# ---------------------------------------------------------------- 1. bf16 vs fp32


def train_steps(model: GPT, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of `steps` optimizer steps on one batch, and the gradients of the first."""
    from nanochat.optim import build_optimizers

    optimizers = build_optimizers(model)
    losses, first = [], {}
    for step in range(steps):
        loss = model(x, y)
        loss.backward()
        if step == 0:
            first = gradients(model)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first


def check_bf16_vs_fp32(ctx: Context) -> Outcome:
    s = ctx.sizes
    x, y = inputs_targets(follow(successor_table(s.vocab, seed=1), s.batch, s.seq + 1, seed=2), ctx.device)
    reference = perturbed_model(small_config(s), ctx.device, torch.float32)
    low = copy.deepcopy(reference)  # the same fp32 master weights, computing in bf16
    low.compute_dtype = BF16
    losses32, grads32 = train_steps(reference, x, y, s.steps)
    losses16, grads16 = train_steps(low, x, y, s.steps)
    max_rel = max(abs(b - a) / abs(a) for a, b in zip(losses32, losses16))
    cosines = gradient_cosines(grads32, grads16)
    worst_param = min(cosines, key=cosines.get)
    ok = max_rel <= BF16_LOSS_RTOL and cosines[worst_param] > GRAD_COSINE_MIN
    message = (f"depth {s.depth}, {s.steps} steps on one batch: loss fp32 {losses32[0]:.4f} -> {losses32[-1]:.4f}, "
               f"bf16 {losses16[0]:.4f} -> {losses16[-1]:.4f}, max relative diff {max_rel:.3%} (<= {BF16_LOSS_RTOL:.0%}); "
               f"min step-1 gradient cosine {cosines[worst_param]:.5f} ({worst_param}; > {GRAD_COSINE_MIN})")
    figures = {"loss_first_fp32": losses32[0], "loss_last_fp32": losses32[-1], "loss_last_bf16": losses16[-1],
               "max_loss_rel_diff": max_rel, "min_grad_cosine": cosines[worst_param]}
    return Outcome(verdict(ok), message, figures)


# ---------------------------------------------------------------- 2. compiled vs eager


def loss_and_gradients(step_model, model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = step_model(x, y)
    loss.backward()
    grads = gradients(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def check_compile_vs_eager(ctx: Context) -> Outcome:
    s = ctx.sizes
    model = perturbed_model(small_config(s), ctx.device, BF16)
    x, y = inputs_targets(follow(successor_table(s.vocab, seed=1), s.batch, s.seq + 1, seed=2), ctx.device)
    explained = torch._dynamo.explain(model)(x, y)
    torch._dynamo.reset()  # explain's traces must not stand in for the compile below
    eager_loss, eager_grads = loss_and_gradients(model, model, x, y)
    compiled = torch.compile(model, backend=ctx.compile_backend, dynamic=False)
    compiled_loss, compiled_grads = loss_and_gradients(compiled, model, x, y)
    rel = abs(compiled_loss - eager_loss) / abs(eager_loss)
    cosines = gradient_cosines(eager_grads, compiled_grads)
    worst_param = min(cosines, key=cosines.get)
    breaks = explained.graph_break_count
    ok = rel <= COMPILE_LOSS_RTOL and cosines[worst_param] > GRAD_COSINE_MIN and breaks == 0
    backend = ctx.compile_backend
    if backend != "inductor":
        backend += " (CPU smoke: inductor takes ~40 s per compile on 2 cores; this checks tracing, not codegen)"
    reasons = f" {[str(r.reason) for r in explained.break_reasons][:3]}" if breaks else ""
    message = (f"depth {s.depth}, backend {backend}: loss eager {eager_loss:.5f} compiled {compiled_loss:.5f} "
               f"(relative diff {rel:.2e} <= {COMPILE_LOSS_RTOL}); min gradient cosine {cosines[worst_param]:.5f} "
               f"({worst_param}; > {GRAD_COSINE_MIN}); graph breaks in forward + loss: {breaks} (== 0){reasons}")
    figures = {"loss_eager": eager_loss, "loss_compiled": compiled_loss, "loss_rel_diff": rel,
               "min_grad_cosine": cosines[worst_param], "graph_breaks": breaks}
    return Outcome(verdict(ok), message, figures)


# ---------------------------------------------------------------- 3. chunked loss


def head_inputs(ctx: Context, rows: int, dtype: torch.dtype, seed: int = 0):
    """(x, weight, targets, row weights) for the head loss: every 16th target ignored, weights 1/counted."""
    s, device = ctx.sizes, ctx.device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, s.loss_width, device=device, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(s.loss_vocab, s.loss_width, device=device, generator=gen).mul_(LOGIT_STD / math.sqrt(s.loss_width))
    weight.requires_grad_()
    targets = torch.randint(0, s.loss_vocab, (rows,), device=device, generator=gen)
    targets[::16] = -1  # ignored rows must count neither in the loss nor in the gradients
    row_weights = torch.full((rows,), 1.0 / int((targets != -1).sum()), device=device)
    return x, weight, targets, row_weights


def head_step(fn: Callable, inputs: tuple, cap: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss, grad x, grad weight) of one forward + backward of fn, the gradients taken off the inputs."""
    x, weight, _, _ = inputs
    loss = fn(*inputs, cap)
    loss.backward()
    grads = x.grad, weight.grad
    x.grad = weight.grad = None
    return loss.item(), *grads


def plain_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, counted: int, cap: float, rows: int) -> float:
    """The mean soft-capped cross-entropy as autograd sees it written out: the
    matmul in x's dtype, cap and loss in fp32; `rows` rows at a time when
    (N, V) at once would not fit. One expression, so no local keeps a tensor."""
    total = 0.0
    for start in range(0, x.size(0), rows):
        part = F.cross_entropy(cap * torch.tanh(F.linear(x[start : start + rows], weight.to(x.dtype)).float() / cap),
                               targets[start : start + rows], ignore_index=-1, reduction="sum") / counted
        part.backward()
        total += part.item()
    return total


def plain_slice_rows(rows: int, vocab: int, device: torch.device) -> int:
    """All rows at once where they fit in 80% of the free GPU memory, else halves."""
    if device.type != "cuda":
        return rows
    free, _ = torch.cuda.mem_get_info(device)
    while rows > 1 and rows * vocab * PLAIN_BYTES_PER_LOGIT > 0.8 * free:
        rows //= 2
    return rows


def compare_head_loss(ctx: Context, dtype: torch.dtype) -> dict:
    from nanochat import ops

    s, device, cap = ctx.sizes, ctx.device, small_config(ctx.sizes).logit_softcap  # the model's cap, 15
    inputs = head_inputs(ctx, s.loss_rows, dtype)
    x, weight, targets, _ = inputs
    counted = int((targets != -1).sum())
    (chunked, *chunked_grads), chunked_peak = measure_peak(lambda: head_step(ops.head_loss, inputs, cap), device)
    rows = plain_slice_rows(s.loss_rows, s.loss_vocab, device)
    plain, plain_peak = measure_peak(lambda: plain_loss(x, weight, targets, counted, cap, rows), device)
    return {"loss_rel": abs(chunked - plain) / abs(plain), "grad_x_rel": relative_error(chunked_grads[0], x.grad),
            "grad_w_rel": relative_error(chunked_grads[1], weight.grad), "chunked_peak": chunked_peak,
            "plain_peak": plain_peak, "plain_slices": math.ceil(s.loss_rows / rows)}


def check_chunked_loss(ctx: Context) -> Outcome:
    from nanochat import ops

    s = ctx.sizes
    full_logits = s.loss_rows * s.loss_vocab * 4  # one (N, V) fp32 tensor
    statuses, words, figures = [], [], {}
    with ops.head_chunk_elements(gpu=s.head_chunk_elements):
        chunks = math.ceil(s.loss_rows / ops._chunk_rows(s.loss_vocab, ctx.device))  # as head_loss chunks (CPU: capped)
        for dtype in (torch.float32, BF16):
            r = compare_head_loss(ctx, dtype)
            loss_tol, grad_tol = HEAD_TOLERANCES[dtype]
            ok = r["loss_rel"] <= loss_tol and max(r["grad_x_rel"], r["grad_w_rel"]) <= grad_tol
            name = str(dtype).removeprefix("torch.")
            text = (f"{name}: loss rel {r['loss_rel']:.1e} (<= {loss_tol:.0e}), grad x {r['grad_x_rel']:.1e}, "
                    f"grad W {r['grad_w_rel']:.1e} (<= {grad_tol:.0e})")
            figures.update({f"loss_rel_{name}": r["loss_rel"], f"grad_x_rel_{name}": r["grad_x_rel"],
                            f"grad_w_rel_{name}": r["grad_w_rel"]})
            if r["chunked_peak"] is None:
                text += ", peak memory n/a (CPU)"
            else:
                chunked, plain = r["chunked_peak"], r["plain_peak"]
                ok = ok and chunked.allocated < full_logits
                text += (f", chunked {chunked.words()} vs plain {plain.words()} "
                         f"(in {r['plain_slices']} slice(s); one (N,V) fp32 = {gib(full_logits)})")
                figures.update({**chunked.figures(f"chunked_{name}_"), **plain.figures(f"plain_{name}_")})
            statuses.append(verdict(ok))
            words.append(text)
    figures.update({"rows": s.loss_rows, "vocab": s.loss_vocab, "chunks": chunks})
    message = f"N={s.loss_rows:,} x V={s.loss_vocab:,}, C={s.loss_width}, {chunks} chunks; " + "; ".join(words)
    return Outcome(worst(statuses), message, figures)


def compiled_vs_eager_head(ctx: Context, rows: int, chunk_rows: int) -> dict:
    """nanochat.ops.head_loss eager and compiled (a fresh compile: dynamic=False specialises on the
    rows, as training does) on the same bf16 inputs: errors, compile seconds and both peaks."""
    from nanochat import ops

    device, cap = ctx.device, small_config(ctx.sizes).logit_softcap
    inputs = head_inputs(ctx, rows, BF16)
    (eager, *eager_grads), eager_peak = measure_peak(lambda: head_step(ops.head_loss, inputs, cap), device)
    torch._dynamo.reset()
    compiled_fn = torch.compile(ops.head_loss, backend=ctx.compile_backend, dynamic=False)
    t0 = time.perf_counter()
    head_step(compiled_fn, inputs, cap)  # the compile; its own allocations are not the graph's
    synchronize(device)
    compile_s = time.perf_counter() - t0
    (compiled, *compiled_grads), compiled_peak = measure_peak(lambda: head_step(compiled_fn, inputs, cap), device)
    return {"loss_rel": abs(compiled - eager) / abs(eager), "grad_x_rel": relative_error(compiled_grads[0], eager_grads[0]),
            "grad_w_rel": relative_error(compiled_grads[1], eager_grads[1]), "compile_s": compile_s,
            "eager_peak": eager_peak, "compiled_peak": compiled_peak,
            "chunk_bytes": chunk_rows * ctx.sizes.loss_vocab * 4}


def check_compiled_head(ctx: Context) -> Outcome:
    """The compiled head loss against eager at 1, 4 and 16 chunks of rows: the chunk loop unrolls
    into the graph, so a count that compiles wrongly, or keeps every chunk's logits alive, shows
    only at that count (depth 20 at batch 32 x 2048 runs 16)."""
    from nanochat import ops

    s = ctx.sizes
    loss_tol, grad_tol = HEAD_TOLERANCES[BF16]  # eager and compiled bf16 differ as chunked and plain do, in rounding
    statuses, words, figures = [], [], {}
    with ops.head_chunk_elements(gpu=s.head_chunk_elements):
        chunk_rows = ops._chunk_rows(s.loss_vocab, ctx.device)
        for chunks in s.head_chunk_counts:
            r = compiled_vs_eager_head(ctx, chunks * chunk_rows, chunk_rows)
            ok = r["loss_rel"] <= loss_tol and max(r["grad_x_rel"], r["grad_w_rel"]) <= grad_tol
            text = (f"{chunks} chunk(s): loss rel {r['loss_rel']:.1e}, grad x {r['grad_x_rel']:.1e}, "
                    f"grad W {r['grad_w_rel']:.1e}, compile {r['compile_s']:.1f} s")
            figures.update({f"c{chunks}_loss_rel": r["loss_rel"], f"c{chunks}_grad_x_rel": r["grad_x_rel"],
                            f"c{chunks}_grad_w_rel": r["grad_w_rel"], f"c{chunks}_compile_s": r["compile_s"]})
            eager_peak, compiled_peak = r["eager_peak"], r["compiled_peak"]
            if compiled_peak is not None:
                # a compiled graph may hold one chunk more in flight than eager; one that keeps
                # every chunk's logits grows with the count and fails here
                ok = ok and compiled_peak.allocated <= eager_peak.allocated + r["chunk_bytes"]
                text += f"; compiled {compiled_peak.words()}; eager {eager_peak.words()}"
                figures.update({**compiled_peak.figures(f"c{chunks}_compiled_"), **eager_peak.figures(f"c{chunks}_eager_")})
            statuses.append(verdict(ok))
            words.append(text)
            release_memory(ctx.device)
    message = (f"V={s.loss_vocab:,}, C={s.loss_width}, {chunk_rows:,} rows per chunk, bf16, backend {ctx.compile_backend}, "
               f"tolerances {loss_tol:.0e} / {grad_tol:.0e}: " + "; ".join(words))
    return Outcome(worst(statuses), message, figures)


# ---------------------------------------------------------------- 4. engine vs transformers


def generated_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer of exactly vocab_size ids trained on made-up words, about a
    second at 65,536: vocab_size distinct words, each used ~10 times, give BPE
    more than enough pairs that occur twice."""
    from nanochat.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(vocab_size)]
    texts = [" ".join(rng.choices(words, k=200)) for _ in range(max(300, vocab_size // 20))]
    return Tokenizer.train_from_iterator(texts, vocab_size)


def export_config() -> GPTConfig:
    from nanochat.gpt import GPTConfig

    return GPTConfig(**EXPORT_SHAPE)


def rule_trained_model(device: torch.device, successor: torch.Tensor) -> GPT:
    """EXPORT_SHAPE taught the successor rule with AdamW, so its greedy choices
    win by margins far above bf16 rounding and two implementations cannot
    disagree by a near tie."""
    from nanochat.gpt import build_model

    torch.manual_seed(0)
    model = build_model(export_config(), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(EXPORT_STEPS):
        x, y = inputs_targets(follow(successor, 16, 65, seed=100 + step), device)
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def transformers_greedy(hf_model, prompt: list[int], new_tokens: int, stops: list[int], device: torch.device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, eos_token_id=stops, pad_token_id=stops[0])
    tokens = out[0, len(prompt):].tolist()
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]  # the engine drops its stop token


@torch.no_grad()
def greedy_margin(model: GPT, prompt: list[int], answer: list[int], device: torch.device) -> float:
    """The smallest gap between the best and second-best logit along our greedy answer."""
    logits = model(torch.tensor([prompt + answer], device=device))[0, len(prompt) - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def check_engine_vs_transformers(ctx: Context) -> Outcome:
    try:
        import transformers
    except ImportError:
        return Outcome("SKIP", "transformers is not installed", {})
    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar would break up our lines
    from nanochat.engine import Engine
    from nanochat.sampling import SamplingParams
    from sharing.hf_export import export_hf

    device = ctx.device
    successor = successor_table(EXPORT_SHAPE["vocab_size"], seed=5)
    model = rule_trained_model(device, successor).to(BF16)  # bf16 weights, as `chat_service -d bfloat16` runs
    model.compute_dtype = BF16
    tokenizer = generated_tokenizer(EXPORT_SHAPE["vocab_size"])
    folder = export_hf(model, tokenizer, ctx.workdir / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=BF16).to(device).eval()
    engine = Engine(model, tokenizer, max_batch=1)
    stops = sorted(engine.stop_tokens)
    prompts = follow(successor, EXPORT_PROMPTS, EXPORT_PROMPT_LEN, seed=7).tolist()
    mismatches, compared, on_rule, margins = 0, 0, 0, []
    for prompt in prompts:
        [ours] = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=EXPORT_NEW_TOKENS))
        theirs = transformers_greedy(hf_model, prompt, EXPORT_NEW_TOKENS, stops, device)
        mismatches += ours.tokens != theirs
        compared += len(ours.tokens)
        chain = prompt[-1:] + ours.tokens
        on_rule += sum(int(successor[a]) == b for a, b in zip(chain, chain[1:]) if a < successor.numel())
        margins.append(greedy_margin(model, prompt, ours.tokens, device) if ours.tokens else 0.0)
    message = (f"{len(prompts)} prompts x {EXPORT_NEW_TOKENS} new tokens, bf16, transformers {transformers.__version__}: "
               f"{len(prompts) - mismatches}/{len(prompts)} identical ({compared} tokens ours); "
               f"{on_rule / max(compared, 1):.0%} follow the taught rule; min greedy logit margin {min(margins):.3f}")
    figures = {"prompts": len(prompts), "mismatched_prompts": mismatches, "tokens_compared": compared,
               "rule_fraction": on_rule / max(compared, 1), "min_greedy_margin": min(margins)}
    return Outcome(verdict(mismatches == 0 and compared > 0), message, figures)


# ---------------------------------------------------------------- 5-6. depth-20 training: speed and memory


@dataclass
class Estimate:
    total: int | None  # bytes, with the estimator's overhead allowance
    tensors: int | None  # bytes, without it: what max_memory_allocated can be compared with
    status: str  # "ok", "SKIP" or "FAIL"
    note: str


def memory_estimate(config: GPTConfig, batch: int, seq: int, dtype: torch.dtype) -> Estimate:
    """nanochat.memory.measure_training_memory (the step run on fake tensors),
    imported here: another module owns it and it may not exist yet."""
    try:
        from nanochat.memory import measure_training_memory
    except ImportError:
        return Estimate(None, None, "SKIP", "SKIP (estimate unavailable)")
    try:
        estimate = measure_training_memory(config, batch, seq, dtype, world_size=1, stage="base")
    except Exception as err:  # a broken estimator fails this item, not the measurement beside it
        return Estimate(None, None, "FAIL", f"FAIL (estimate raised {type(err).__name__}: {first_line(err)})")
    tensors = estimate.total - estimate.parts().get("overhead", 0)
    return Estimate(estimate.total, tensors, "ok", f"{gib(estimate.total)} (tensors {gib(tensors)})")


def timed_training(ctx: Context, config: GPTConfig, batch: int, compiled: bool) -> dict:
    """Real steps (model, Muon + AdamW) on random tokens: seconds, tokens/s, MFU, peak."""
    from nanochat.gpt import build_model
    from nanochat.hardware import peak_flops
    from nanochat.optim import build_optimizers

    s, device = ctx.sizes, ctx.device
    release_memory(device)

    def run() -> dict:
        model = build_model(config, device, BF16)
        optimizers = build_optimizers(model)
        step_model = torch.compile(model, backend=ctx.compile_backend, dynamic=False) if compiled else model
        x, y = random_batch(config.vocab_size, batch, config.sequence_len, device)
        times = []
        for _ in range(s.warmup + s.timed):
            t0 = time.perf_counter()
            loss = step_model(x, y)
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            loss.item()  # waits for the device
            times.append(time.perf_counter() - t0)
        return {"first_step_s": times[0], "step_s": statistics.median(times[s.warmup :]), "flops": model.estimate_flops()}

    result, peak = measure_peak(run, device)
    tok_per_s = batch * config.sequence_len / result["step_s"]
    peak_rate, _ = peak_flops(device, BF16)
    mfu = result["flops"] * tok_per_s / peak_rate if peak_rate else None
    return {"tok_per_s": tok_per_s, "mfu": mfu, "step_s": result["step_s"], "first_step_s": result["first_step_s"], "peak": peak}


def measure_training(ctx: Context, batch: int, compiled: bool) -> dict:
    config = big_config(ctx.sizes)
    run = {"batch": batch, "estimate": memory_estimate(config, batch, config.sequence_len, BF16)}
    try:
        run.update(timed_training(ctx, config, batch, compiled))
    except torch.OutOfMemoryError as err:
        run["oom"] = first_line(err)
    release_memory(ctx.device)
    return run


def memory_verdict(measured: int | None, estimate: Estimate) -> tuple[str, str]:
    """(status, words) of a measured peak against the estimate."""
    if estimate.status != "ok":
        shown = f"measured {gib(measured)}" if measured is not None else "measured n/a (CPU)"
        return estimate.status, f"{shown}, estimate {estimate.note}"
    if measured is None:
        return "PASS", f"measured n/a (CPU), estimate {estimate.note}"
    ratio = measured / estimate.total
    ok = ratio <= MEMORY_UNDERESTIMATE_MAX
    return verdict(ok), (f"measured {gib(measured)}, estimate {estimate.note}: measured/estimate {ratio:.2f} "
                         f"(<= {MEMORY_UNDERESTIMATE_MAX}), measured/tensors {measured / estimate.tensors:.2f}")


def describe_run(run: dict) -> tuple[str, str, dict]:
    """(status, words, figures) of one measure_training run."""
    b, est = run["batch"], run["estimate"]
    figures = {f"b{b}_estimate_gib": est.total / GIB} if est.total is not None else {}
    if "oom" in run:
        return "FAIL", f"batch {b}: out of memory ({run['oom'][:120]}); estimate {est.note}", figures
    peak: Peak | None = run["peak"]
    status, memory_words = memory_verdict(peak and peak.allocated, est)
    mfu = f"MFU {run['mfu']:.1%}" if run["mfu"] is not None else "MFU n/a"
    figures.update({f"b{b}_tok_per_s": run["tok_per_s"], f"b{b}_step_ms": 1000 * run["step_s"],
                    f"b{b}_first_step_s": run["first_step_s"]})
    if run["mfu"] is not None:
        figures[f"b{b}_mfu"] = run["mfu"]
    if peak is not None:
        figures.update(peak.figures(f"b{b}_"))
        memory_words += f"; {peak.words()}"
        if est.total is not None:
            figures[f"b{b}_peak_over_estimate"] = peak.allocated / est.total
    words = (f"batch {b}: {run['tok_per_s']:,.0f} tok/s, {mfu}, step {1000 * run['step_s']:.0f} ms "
             f"(first {run['first_step_s']:.1f} s); {memory_words}")
    return status, words, figures


def training_outcome(ctx: Context, runs: list[dict], label: str, memory_only: bool) -> Outcome:
    statuses, words, figures = [], [], {}
    for run in runs:
        status, text, figs = describe_run(run)
        # where only memory is checked, an unavailable estimate leaves nothing to check
        statuses.append(status if memory_only or status == "FAIL" else "PASS")
        words.append(text)
        figures.update(figs)
    s = ctx.sizes
    head = f"depth {s.big_depth}, vocab {s.big_vocab:,}, seq {s.big_seq}, {label}, {s.warmup} warmup + {s.timed} timed steps; "
    return Outcome(worst(statuses), head + "; ".join(words), figures)


def check_d20_eager_memory(ctx: Context) -> Outcome:
    run = measure_training(ctx, ctx.sizes.eager_batch, compiled=False)
    return training_outcome(ctx, [run], "eager bf16", memory_only=True)


def check_d20_compiled(ctx: Context) -> Outcome:
    runs = [measure_training(ctx, batch, compiled=True) for batch in ctx.sizes.compiled_batches]
    return training_outcome(ctx, runs, f"compiled ({ctx.compile_backend}) bf16", memory_only=False)


# ---------------------------------------------------------------- 7. decode through the Engine


def check_d20_decode(ctx: Context) -> Outcome:
    from nanochat.conversation import SPECIAL_TOKENS
    from nanochat.engine import Engine
    from nanochat.gpt import build_model
    from nanochat.sampling import SamplingParams

    s, device = ctx.sizes, ctx.device
    config = big_config(s)
    torch.manual_seed(0)
    model = build_model(config, device).to(dtype=BF16).eval()  # bf16 weights, as checkpoint.load_model serves
    model.compute_dtype = BF16
    engine = Engine(model, generated_tokenizer(config.vocab_size), max_batch=max(s.decode_batches),
                    max_len=s.decode_prompt + s.decode_new_tokens + 1)
    # A random model picks <|bos|> or <|assistant_end|> now and then; every row
    # should decode the full count, so nothing stops it early.
    engine.stop_tokens = set()
    ordinary = config.vocab_size - len(SPECIAL_TOKENS)
    prompt = torch.randint(0, ordinary, (s.decode_prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4))  # warm-up: kernels, allocator
    params = SamplingParams(temperature=0, max_tokens=s.decode_new_tokens)
    words, figures, complete = [], {}, True
    for batch in s.decode_batches:
        t0 = time.perf_counter()
        completions = engine.generate(prompt, params, n=batch)  # one prefill, copied to the other rows
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.tokens) for c in completions)
        complete = complete and tokens == batch * s.decode_new_tokens
        words.append(f"batch {batch}: {tokens / seconds:,.0f} tok/s ({tokens} tokens in {seconds:.2f} s)")
        figures.update({f"b{batch}_tok_per_s": tokens / seconds, f"b{batch}_tokens": tokens})
    message = (f"depth {s.big_depth}, vocab {s.big_vocab:,}, bf16, prompt {s.decode_prompt}, {s.decode_new_tokens} new tokens "
               f"per row, greedy, stop tokens ignored (prefill included): " + "; ".join(words))
    if not complete:
        message += f"; some rows stopped before {s.decode_new_tokens} tokens"
    return Outcome(verdict(complete), message, figures)


# ---------------------------------------------------------------- 8. the two pretraining recipes, at equal time


RECIPE_AB = (("old", "2025-10"), ("new", "2026"))
AB_SEED = 42
TAIL_LINES = 6  # of a failed run's output, in the FAIL message (the whole output is in its log)


def tail(output: str) -> str:
    """The last lines of a child's output on one line, as every check's message is (a traceback's ^^^ markers left out)."""
    lines = [line.strip() for line in output.splitlines() if set(line) - set(" ^~")]
    return " // ".join(lines[-TAIL_LINES:]) or "(no output)"


@dataclass
class RecipeRun:
    recipe: str
    code: int | None  # None: it ran past its time limit
    seconds: float
    output: str
    log: Path

    def figures(self) -> dict:
        """Final validation bpb, evaluations, steps and the median step's tokens/s, read from the log."""
        evaluations = VAL_BPB_RE.findall(self.output)
        done = DONE_RE.search(self.output)
        speeds = [float(tok.replace(",", "")) for _, _, tok, _ in STEP_RE.findall(self.output)]
        if not evaluations or not done or not speeds:
            return {}
        # the first step compiles; the median of the rest is the speed the run trained at
        return {"bpb": float(evaluations[-1][1]), "evaluations": len(evaluations), "steps": int(done.group(1).replace(",", "")),
                "tok_per_s": statistics.median(speeds[1:] or speeds), "seconds": self.seconds}

    def failure(self) -> str:
        if self.code is None:
            why = f"was stopped after {self.seconds:.0f} s, past its budget and start-up allowance"
        elif self.code:
            why = f"exited {self.code}"
        else:
            why = "finished without a final validation bpb, a 'training done' line or a step's tok/s"
        return f"recipe {self.recipe} {why} (log {self.log}): {tail(self.output)}"


def ab_data_missing() -> str:
    """What to pass when recipe_ab has no --data: the message names this machine's prepared folders when there are any."""
    message = ("needs real text: pass --data DIR (a folder of parquet shards shard_00000.parquet, ... with a `text` "
               "column, at least 2, the last is validation) and --tokenizer DIR (a folder as python -m scripts.tok_train "
               "writes it; left out, one is trained from --data)")
    try:
        from nanochat.common import get_base_dir
        from nanochat.shards import data_dir, list_shards

        prepared, tokenizer = data_dir(), get_base_dir() / "tokenizer"
    except Exception:  # only a hint; the message above stands without it
        return message
    if len(list_shards(prepared)) >= 2:
        message += f"; this machine has: --data {prepared}" + (f" --tokenizer {tokenizer}" if tokenizer.is_dir() else "")
    return message


def child_env(ctx: Context, base: Path) -> dict:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1"}
    if ctx.smoke and ctx.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # as smoke_threads, for the same reason
    return env


def run_logged(ctx: Context, cmd: list[str], base: Path, log: Path, timeout: float) -> tuple[int | None, float, str]:
    """(exit code or None when it ran past `timeout`, seconds, output) of a child in the repository root; the
    output, stdout and stderr interleaved, is also written to `log`."""
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=child_env(ctx, base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        code, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as err:
        code, output = None, err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(output)
    return code, time.perf_counter() - t0, output


def ab_tokenizer(ctx: Context) -> tuple[Path | None, str]:
    """(the tokenizer folder, words on where it came from): --tokenizer, or one trained here from --data's
    train shards (None and the reason when that failed)."""
    if ctx.tokenizer is not None:
        return ctx.tokenizer, f"tokenizer {ctx.tokenizer}"
    s, base = ctx.sizes, ctx.workdir / "recipe_ab" / "tokenizer"
    log = ctx.log_dir / "gpu_check.recipe_ab.tok_train.log"
    cmd = [sys.executable, "-m", "scripts.tok_train", "--data-dir", str(ctx.data), "--vocab-size", str(s.ab_vocab),
           "--max-chars", str(s.ab_tokenizer_chars)]
    code, seconds, output = run_logged(ctx, cmd, base, log, timeout=600)
    if code != 0:
        return None, f"training a tokenizer on {ctx.data} failed (log {log}): {tail(output)}"
    return base / "tokenizer", f"a {s.ab_vocab:,}-token tokenizer trained here on up to {s.ab_tokenizer_chars:,} characters in {seconds:.0f} s"


def train_recipe(ctx: Context, recipe: str, tokenizer: Path) -> RecipeRun:
    """scripts.base_train with this recipe for the budget, in a fresh $NANOCHAT_BASE_DIR holding a copy of the tokenizer."""
    from nanochat.budget import parse_duration

    s = ctx.sizes
    base = ctx.workdir / "recipe_ab" / recipe
    shutil.copytree(tokenizer, base / "tokenizer")
    cmd = [sys.executable, "-m", "scripts.base_train", "--recipe", recipe, "--depth", str(s.ab_depth), *s.ab_flags,
           "--time-budget", s.ab_budget, "--seed", str(AB_SEED), "--data-dir", str(ctx.data), "--device", ctx.device.type,
           "--eval-every", str(s.ab_eval_every), "--eval-tokens", str(s.ab_eval_tokens), "--sample-every", "0",
           "--save-every", "0"]
    log = ctx.log_dir / f"gpu_check.recipe_ab.{recipe}.log"
    code, seconds, output = run_logged(ctx, cmd, base, log, timeout=parse_duration(s.ab_budget) + s.ab_startup_s)
    return RecipeRun(recipe, code, seconds, output, log)


def check_recipe_ab(ctx: Context) -> Outcome:
    if ctx.data is None:
        return Outcome("SKIP", ab_data_missing())
    tokenizer, source = ab_tokenizer(ctx)
    if tokenizer is None:
        return Outcome("FAIL", source)
    s, runs = ctx.sizes, {}

    def flat() -> dict:  # {"bpb_old": ..., "steps_new": ...}
        return {f"{key}_{label}": value for label, found in runs.items() for key, value in found.items()}

    for label, recipe in RECIPE_AB:
        run = train_recipe(ctx, recipe, tokenizer)
        runs[label] = run.figures() if run.code == 0 else {}
        if not runs[label]:  # the other recipe alone would compare with nothing: not started
            return Outcome("FAIL", run.failure(), flat())
    old, new = runs["old"], runs["new"]
    figures = flat()
    figures.update({"bpb_ratio_new_over_old": new["bpb"] / old["bpb"], "bpb_diff_new_minus_old": new["bpb"] - old["bpb"]})

    def words(recipe: str, f: dict) -> str:
        return (f"{recipe} {f['bpb']:.4f} bpb ({f['steps']:,} steps, {f['tok_per_s']:,.0f} tok/s, "
                f"{f['evaluations']} evaluations, {f['seconds']:.0f} s)")

    message = (f"depth {s.ab_depth}, --time-budget {s.ab_budget} each, seed {AB_SEED}, data {ctx.data}, {source}: "
               f"{words(RECIPE_AB[0][1], old)} vs {words(RECIPE_AB[1][1], new)}; "
               f"new/old {figures['bpb_ratio_new_over_old']:.4f} ({figures['bpb_diff_new_minus_old']:+.4f} bpb); "
               f"logs in {ctx.log_dir}")
    return Outcome("PASS", message, figures)


# ---------------------------------------------------------------- running


CHECKS: list[tuple[str, Callable[[Context], Outcome]]] = [
    ("bf16_matmul", check_bf16_matmul),
    ("attention_kernel", check_attention_kernel),
    ("bf16_vs_fp32", check_bf16_vs_fp32),
    ("chunked_loss", check_chunked_loss),
    ("compiled_head", check_compiled_head),
    ("engine_vs_transformers", check_engine_vs_transformers),
    ("compile_vs_eager", check_compile_vs_eager),
    ("d20_eager_memory", check_d20_eager_memory),
    ("d20_decode", check_d20_decode),
    ("d20_compiled", check_d20_compiled),
    ("recipe_ab", check_recipe_ab),
]


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def numeric_figures(figures: dict) -> dict:
    """Only numbers belong in figures (bools become ints). A NaN or infinity is
    kept, written as NaN/Infinity, so a broken figure shows rather than vanishes."""
    return {k: (int(v) if isinstance(v, bool) else v) for k, v in figures.items() if isinstance(v, (int, float))}


def run_check(name: str, fn: Callable[[Context], Outcome], ctx: Context, started: float) -> dict:
    t0 = time.perf_counter()
    try:
        outcome = fn(ctx)
    except Exception as err:  # one failing check must not stop the others
        traceback.print_exc(file=sys.stderr)
        outcome = Outcome("FAIL", f"{type(err).__name__}: {first_line(err)}")
    try:
        release_memory(ctx.device)
    except Exception as err:  # e.g. a device error surfacing at synchronize
        outcome = Outcome("FAIL", f"{outcome.message}; cleanup raised {type(err).__name__}: {first_line(err)}", outcome.figures)
    seconds = time.perf_counter() - t0
    total = time.perf_counter() - started
    print(f"{outcome.status:<4} {name:<22} {seconds:6.1f} s (total {total:6.1f} s)  {outcome.message}", flush=True)
    return {"name": name, "status": outcome.status, "seconds": round(seconds, 2), "message": outcome.message,
            "figures": numeric_figures(outcome.figures)}


def installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(ctx: Context) -> dict:
    """Versions and the device, from torch and package metadata; the project's
    own words (device name, MFU peak) only where it imports."""
    device = ctx.device
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "sizes": "smoke" if ctx.smoke else "full", "compile backend": ctx.compile_backend}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu memory": gib(props.total_memory), "compute capability": f"{props.major}.{props.minor}",
                     "cudnn": str(torch.backends.cudnn.version()), "tf32 matmul": str(torch.backends.cuda.matmul.allow_tf32)})
    for distribution in ("triton", "transformers"):
        info[distribution] = installed_version(distribution)
    try:
        from nanochat.hardware import device_name, peak_flops

        info["device"] = device_name(device)
        info["bf16 peak for MFU"] = peak_flops(device, BF16)[1]
    except Exception as err:  # the checks that need the project will say so too; the header still prints
        info["project"] = f"import failed: {type(err).__name__}: {first_line(err)}"
    return info


def write_results(path: Path, info: dict, results: list[dict], total: float) -> None:
    """Written aside and renamed, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"header": info, "total_seconds": round(total, 1), "checks": results}
    aside = path.with_name(path.name + ".tmp")
    aside.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(aside, path)


def parse_args(argv=None) -> argparse.Namespace:
    names = ", ".join(name for name, _ in CHECKS)
    p = argparse.ArgumentParser(description="The one prepared GPU check: correctness of the bf16 and compiled paths, then speed and memory at depth 20.")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for every check, seconds on a CPU (the full sizes need a GPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON of all results (default: %(default)s)")
    p.add_argument("--only", default=None, help=f"comma-separated checks to run, in the usual order (default: all of {names})")
    p.add_argument("--data", type=Path, default=None, help="recipe_ab: a folder of parquet shards (a `text` column, at least 2; "
                   "the last is validation); without it recipe_ab is skipped")
    p.add_argument("--tokenizer", type=Path, default=None, help="recipe_ab: a tokenizer folder as python -m scripts.tok_train "
                   "writes it (default: train one from --data's train shards)")
    return p.parse_args(argv)


def selected_checks(only: str | None) -> list[tuple[str, Callable[[Context], Outcome]]]:
    if not only:
        return CHECKS
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    unknown = wanted - {name for name, _ in CHECKS}
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(sorted(unknown))}; known: {', '.join(n for n, _ in CHECKS)}")
    return [(name, fn) for name, fn in CHECKS if name in wanted]


def make_context(args: argparse.Namespace) -> Context:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; on CPU run with --device cpu --smoke")
    if device.type == "cpu" and not args.smoke:
        raise ValueError("the full sizes need a GPU (depth 20 at batch 32 would take hours on a CPU); on CPU add --smoke")
    # inductor needs ~40 s per compile on a 2-core CPU, too slow for a smoke run
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    check_ab_folders(args.data, args.tokenizer)
    return Context(device, SMOKE if args.smoke else FULL, args.smoke, backend, data=args.data and args.data.resolve(),
                   tokenizer=args.tokenizer and args.tokenizer.resolve(), log_dir=args.out.resolve().parent)


def check_ab_folders(data: Path | None, tokenizer: Path | None) -> None:
    """A mistyped --data or --tokenizer is refused before any check runs, not found minutes later."""
    if data is not None and len(list(data.glob("shard_*.parquet"))) < 2:
        raise ValueError(f"--data {data} holds no shard_NNNNN.parquet files or only one; recipe_ab needs at least 2 "
                         "(the last is validation)")
    if tokenizer is not None and not tokenizer.is_dir():
        raise ValueError(f"--tokenizer {tokenizer} is not a folder; give the one python -m scripts.tok_train writes "
                         "($NANOCHAT_BASE_DIR/tokenizer), or leave it out to train one from --data")


@contextlib.contextmanager
def smoke_threads(ctx: Context):
    """One torch thread for a smoke run on CPU, restored after (main may run in-process):
    toy matrices gain nothing from threads, and while another process holds a
    core each op's hand-off between two threads was measured at ~100x the op."""
    threads = torch.get_num_threads()
    if ctx.smoke and ctx.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ctx, checks = make_context(args), selected_checks(args.only)
    except ValueError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    info = header(ctx)
    for key, value in info.items():
        print(f"{key}: {value}")
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir, smoke_threads(ctx):
        ctx.workdir = Path(workdir)
        for name, fn in checks:
            results.append(run_check(name, fn, ctx, started))
            write_results(args.out, info, results, time.perf_counter() - started)
    counts = {status: sum(r["status"] == status for r in results) for status in ("PASS", "FAIL", "SKIP")}
    total = time.perf_counter() - started
    print(f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in {total:.1f} s; results in {args.out}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
