"""Training throughput: tokens/s, step time, MFU (GPU) and peak memory.

    python bench/train.py                               # depth 4, seq 256, batch 16 (the CPU reference config)
    python bench/train.py --depth 20 --seq-len 2048 --batch-size 32   # on a GPU

Each measurement runs the real model and optimizers (Muon + AdamW) on random
tokens for `--steps` timed steps after `--warmup` untimed ones. On CPU the
same configuration runs `--repeats` times (default 2) and the spread is
printed, because 2-core machines are noisy.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.common import DTYPES, autodetect_device_type, compute_dtype  # noqa: E402
from nanochat.gpt import build_model, config_for_depth  # noqa: E402
from nanochat.hardware import device_name, peak_flops  # noqa: E402
from nanochat.optim import build_optimizers  # noqa: E402

# karpathy/nanochat on the 2-core CPU VM, fp32, depth 4, vocab 8192, seq 256, 4096 tokens/step.
REFERENCE_CPU = {"depth": 4, "seq_len": 256, "batch_size": 16, "vocab_size": 8192, "tok_per_s": 3260}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="measurements of the same config (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="override device autodetection")
    p.add_argument("--compile", default="auto", choices=["auto", "yes", "no"], help="torch.compile the model (auto: on CUDA only)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="compute dtype (default: bfloat16 on a GPU that runs it natively, float32 elsewhere)")
    return p.parse_args(argv)


def measure(args, device: torch.device, dtype: torch.dtype, use_compile: bool) -> dict:
    torch.manual_seed(0)
    config = config_for_depth(args.depth, args.vocab_size, max_seq_len=args.seq_len)
    model = build_model(config, device, dtype)
    optimizers = build_optimizers(model)
    step_model = torch.compile(model) if use_compile else model
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()  # waits for the device
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tok_per_s = args.batch_size * args.seq_len / step
    peak, _ = peak_flops(device, dtype)
    return {
        "step_ms": 1000 * step,
        "tok_per_s": tok_per_s,
        "mfu": 100 * model.estimate_flops() * tok_per_s / peak if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
        "params": model.num_params(),
    }


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; process-wide


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(autodetect_device_type(args.device))
    dtype = compute_dtype(device.type, args.dtype)
    use_compile = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    repeats = args.repeats or (2 if device.type == "cpu" else 1)
    runs = [measure(args, device, dtype, use_compile) for _ in range(repeats)]
    print(f"device {device_name(device)}, {str(dtype).removeprefix('torch.')}, compile {'on' if use_compile else 'off'}, "
          f"depth {args.depth}, seq {args.seq_len}, batch {args.batch_size}, vocab {args.vocab_size:,}, {runs[0]['params']:,} parameters")
    print("| run | step (ms) | tokens/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        mfu = f"{r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {i} | {r['step_ms']:.1f} | {r['tok_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.2f} |")
    rates = [r["tok_per_s"] for r in runs]
    mean = statistics.mean(rates)
    if len(runs) > 1:
        print(f"spread: {100 * (max(rates) - min(rates)) / mean:.1f}% of the mean ({mean:,.0f} tokens/s)")
    ref = REFERENCE_CPU
    if device.type == "cpu" and (args.depth, args.seq_len, args.batch_size, args.vocab_size) == (ref["depth"], ref["seq_len"], ref["batch_size"], ref["vocab_size"]):
        print(f"vs the reference implementation's {ref['tok_per_s']:,} tokens/s on the 2-core VM: {mean / ref['tok_per_s']:.2f}x (target >= 1.20x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
