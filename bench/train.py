"""Training throughput, ours against transformers' NanoChat in the same run.

    python bench/train.py                       # depth 4, seq 256, batch 16: the CPU config
    python bench/train.py --depth 20 --seq-len 2048 --batch-size 32   # on a GPU
    python bench/train.py --quality ../shared/data/corpus               # validation bpb at 100/200 steps
    python bench/train.py --smoke               # seconds: the tests run this

Both sides train the same architecture from the same weights on the same
random batch: ours with its own optimizers (Muon + AdamW) and loss, the rival
(transformers.NanoChatForCausalLM, what a user would pick instead) with
torch.optim.AdamW (fused where the device has it) and F.cross_entropy. Each
side runs eager and compiled (--compile both, the default) and keeps its
best; the ratio is best against best. The four are timed in turn, one step
each per round, so a drift in the machine's speed touches all of them. Peak
memory is what MemTracker counts for one step of each (tensors only, so the
two are comparable in one process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import _TOTAL_KEY

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rivals import machine_line, profile_table, transformers_model  # noqa: E402
from nanochat.common import DTYPES, add_device_arg, autodetect_device_type, compute_dtype  # noqa: E402
from nanochat.cpu_memory import keep_freed_memory  # noqa: E402
from nanochat.fake_step import PeakTracker  # noqa: E402
from nanochat.gpt import build_model, config_for_depth  # noqa: E402
from nanochat.hardware import peak_flops  # noqa: E402
from nanochat.optim import build_optimizers  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default %(default)s)")
    p.add_argument("--steps", type=int, default=15, help="timed rounds; each round times one step of every side and mode in turn (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each side and mode before the rounds, compilation included; the first is always untimed (default %(default)s)")
    add_device_arg(p)
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="compute dtype of both sides (default: bfloat16 on a GPU that runs it natively, float32 elsewhere)")
    p.add_argument("--compile", default="both", choices=["both", "yes", "no"], help="measure eager, compiled or both and keep each side's best (default %(default)s)")
    p.add_argument("--no-rival", action="store_true", help="measure only ours")
    p.add_argument("--quality", metavar="DIR", default=None, help="instead: train depth 4 for 200 steps on the corpus shards in DIR and print validation bpb (bench/quality.py)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also print torch.profiler's operator table of each side over STEPS eager steps (default: none)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (tiny model, eager, 2 steps)")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.seq_len, args.batch_size, args.vocab_size, args.steps, args.warmup, args.compile = 1, 32, 2, 256, 2, 1, "no"
    return args


def batch(args, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def ours(args, device, dtype):
    """(module to count FLOPs on, step function, tensors the step keeps) for our model."""
    torch.manual_seed(0)
    model = build_model(config_for_depth(args.depth, args.vocab_size, max_seq_len=args.seq_len), device, dtype)
    optimizers = build_optimizers(model)

    def step(run_model, x, y):
        loss = run_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    return model, step, [model, *optimizers]


def theirs(args, device, dtype):
    """The same for transformers' NanoChat, from our initial weights."""
    reference, _, _ = ours(args, device, torch.float32)
    model = transformers_model(reference, torch.float32)  # fp32 master weights; the forward runs under autocast in bf16
    del reference
    kind = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **kind)
    use_autocast = dtype != torch.float32

    def step(run_model, x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            logits = run_model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, [model, optimizer]


@dataclass
class Mode:
    """One side in one mode (eager or compiled), ready to step."""

    side: str
    mode: str
    step: Callable
    run_model: Callable
    model: torch.nn.Module
    tracked: list
    times: list[float] = field(default_factory=list)
    first_step_s: float = 0.0

    def once(self, x, y) -> float:
        t0 = time.perf_counter()
        self.step(self.run_model, x, y).item()  # .item() waits for the device
        return time.perf_counter() - t0


def build_modes(name, build, args, device, dtype) -> list[Mode]:
    model, step, tracked = build(args, device, dtype)
    modes = {"both": ("eager", "compiled"), "yes": ("compiled",), "no": ("eager",)}[args.compile]
    return [Mode(name, mode, step, torch.compile(model) if mode == "compiled" else model, model, tracked) for mode in modes]


def time_interleaved(modes: list[Mode], x, y, args) -> None:
    """Warm every mode up (compilation included), then time them one step each in turn, `args.steps`
    rounds: a machine whose speed drifts over minutes (a shared VM) slows every mode alike, where timing
    one mode after the other would hand the drift to whichever ran last."""
    for m in modes:
        m.first_step_s = m.once(x, y)
        for _ in range(args.warmup - 1):
            m.once(x, y)
    for _ in range(args.steps):
        for m in modes:
            m.times.append(m.once(x, y))


def report_side(side_modes: list[Mode], args, device, x, y) -> dict:
    results = []
    for m in side_modes:
        seconds = statistics.median(m.times)
        results.append({"side": m.side, "mode": m.mode, "step_ms": 1000 * seconds, "first_step_s": m.first_step_s,
                        "tok_per_s": args.batch_size * args.seq_len / seconds})
        print(f"  {m.side:<13} {m.mode:<9} {results[-1]['tok_per_s']:>10,.0f} tok/s  step {1000 * seconds:7.1f} ms  "
              f"(first step {m.first_step_s:.1f} s)")
    best = max(results, key=lambda r: r["tok_per_s"])
    plain = side_modes[0]  # its model is the uncompiled one whatever the mode
    if args.profile:
        print(f"  {plain.side}: torch.profiler, {args.profile} eager step(s), longest self time first")
        print(profile_table(lambda: plain.step(plain.model, x, y).item(), args.profile, device))
    best["peak_gib"] = tracked_peak_gib(plain.step, plain.model, plain.tracked, x, y)
    best["params"] = sum(p.numel() for p in plain.model.parameters())
    return best


def tracked_peak_gib(step, model, tracked, x, y) -> float:
    tracker = PeakTracker()
    tracker.track_external(*tracked, x, y)
    with tracker:
        step(model, x, y)
    return tracker.get_tracker_snapshot("peak")[x.device][_TOTAL_KEY] / 2**30


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(autodetect_device_type(args.device))
    if args.quality:
        from bench.quality import run_quality

        return run_quality(args.quality, device, *((2, 1, 512) if args.smoke else ()))
    dtype = compute_dtype(device.type, args.dtype)
    print(machine_line(device))
    if device.type == "cpu" and keep_freed_memory():
        # process-wide, as scripts.base_train runs: the rival in this process gets it too
        print("allocator: freed memory kept for reuse (nanochat.cpu_memory), for both sides")
    print(f"config: depth {args.depth}, seq {args.seq_len}, batch {args.batch_size}, vocab {args.vocab_size:,}, "
          f"{str(dtype).removeprefix('torch.')}, {args.steps} timed rounds after {max(args.warmup, 1)} warm-up step(s) each")
    sides = [("ours", ours)] + ([] if args.no_rival else [("transformers", theirs)])
    x, y = batch(args, device)
    per_side = [build_modes(name, build, args, device, dtype) for name, build in sides]
    time_interleaved([m for modes in per_side for m in modes], x, y, args)
    best = [report_side(modes, args, device, x, y) for modes in per_side]
    flops_per_token = build_model(config_for_depth(args.depth, args.vocab_size, max_seq_len=args.seq_len), "meta").estimate_flops()
    peak, _ = peak_flops(device, dtype)
    print("| side | best mode | tokens/s | step (ms) | MFU | peak tensors (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in best:
        mfu = f"{100 * flops_per_token * r['tok_per_s'] / peak:.1f}%" if peak else "n/a"
        print(f"| {r['side']} | {r['mode']} | {r['tok_per_s']:,.0f} | {r['step_ms']:.1f} | {mfu} | {r['peak_gib']:.2f} |")
    if len(best) == 2:
        print(f"ours / transformers: {best[0]['tok_per_s'] / best[1]['tok_per_s']:.2f}x tokens/s, "
              f"{best[0]['peak_gib'] / best[1]['peak_gib']:.2f}x peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
