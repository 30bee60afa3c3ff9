"""The 2026 pretraining recipe against the October-2025 one, trained on a real corpus in one run.

    python bench/recipe.py --data ../shared/data/corpus                 # the whole comparison (hours on 2 cores)
    python bench/recipe.py --data ../shared/data/corpus --depths 1 2 --seeds 1 --large-minutes 2 --ablation-minutes 1
    python bench/recipe.py --data DIR --smoke                           # seconds: the tests run this

Runs the real pipeline in a scratch $NANOCHAT_BASE_DIR: ./prepare.sh --from DIR
(the last shard is validation) for a small tokenizer, then scripts.base_train as
a user would, once per row below; the figures are read from its log. The model
shape is small enough for a CPU to reach the whole compute-optimal horizon
(--aspect-ratio 32 --head-dim 32: width 32 per layer). Three parts, seed by seed:

1. Scaling series: each recipe trains every --depths to its own horizon (2026:
   10.5 tokens per scaling parameter and the Power-Lines batch; 2025-10: 20 per
   parameter and the fixed batch; "2026, fixed batch": the 2026 recipe at the
   2025-10 batch, since the Power-Lines rule, anchored at depth 12, is far from
   its anchor here). For each old run, the time a new recipe needs to reach the
   old run's final bpb is read off that recipe's runs (final bpb against
   training seconds, interpolated in log time): the ratio new / old time is
   the recipe's speed-up at equal quality (target <= 0.8).
2. A larger model (--large-depth) for --large-minutes per recipe: bpb at equal time.
3. Ablation at --ablation-depth, --ablation-minutes each: the 2026 recipe, then
   with each piece off in turn, bpb at equal time (the horizon is then set by the
   time, so it is not a piece here; it is what part 1 measures).

The old recipe's fixed batch is 2^19 tokens on a GPU; at CPU scale this bench
gives it --old-batch (16 rows of 256 tokens, what this project's CPU runs used),
never a size tuned for it to lose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rivals import machine_line  # noqa: E402

BPB_LINE = re.compile(r"step (\d+) \| validation bits per byte: ([0-9.]+)")
DONE_LINE = re.compile(r"training done: ([\d,]+) steps in (\S+);")
# each piece of the 2026 recipe and the flags that turn it back to the 2025-10 choice
PIECES = {
    "Power-Lines batch": None,  # filled from --old-batch: --total-batch-size
    "Polar Express": ["--orthogonalizer", "newton-schulz"],
    "NorMuon": ["--normuon", "off"],
    "cautious weight decay": ["--weight-decay", "0"],
    "best-fit packing": ["--packing", "concat"],
}

# the scaling series' recipes: (base_train --recipe, whether it trains at --old-batch)
SERIES = {"2025-10": ("2025-10", True), "2026": ("2026", False), "2026, fixed batch": ("2026", True)}


@dataclass
class Run:
    part: str
    recipe: str
    depth: int
    seed: int
    variant: str
    steps: int
    train_seconds: float
    wall_seconds: float
    final_bpb: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder of parquet shards with a text column (the last is validation)")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4], help="scaling series depths (default %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration (default %(default)s)")
    p.add_argument("--first-seed", type=int, default=1, help="seeds are first-seed, first-seed + 1, ... (default %(default)s)")
    p.add_argument("--large-depth", type=int, default=6, help="the larger model (default %(default)s)")
    p.add_argument("--large-minutes", type=float, default=10, help="its wall-clock per recipe and seed (default %(default)s)")
    p.add_argument("--ablation-depth", type=int, default=3, help="depth of the ablation (default %(default)s)")
    p.add_argument("--ablation-minutes", type=float, default=5, help="wall-clock per ablation run (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="context (default %(default)s)")
    p.add_argument("--device-batch", type=int, default=16, help="rows per forward pass (default %(default)s)")
    p.add_argument("--old-batch", type=int, default=None, help="the 2025-10 recipe's tokens per step (default: device batch x seq len)")
    p.add_argument("--eval-tokens", type=int, default=2**17, help="validation tokens per evaluation (default %(default)s)")
    p.add_argument("--parts", default="series,large,ablation", help="which parts to run (default %(default)s)")
    p.add_argument("--series", nargs="+", default=list(SERIES), choices=SERIES, help="the series' recipes (default: all)")
    p.add_argument("--out", default=None, help="also write every run and the summary as JSON here")
    p.add_argument("--smoke", action="store_true", help="about a minute: depth 1 only, tiny budgets, one seed, one ablated piece")
    args = p.parse_args(argv)
    if args.smoke:
        args.depths, args.seeds, args.large_depth, args.large_minutes = [1], 1, 1, 0.25
        args.ablation_depth, args.ablation_minutes, args.vocab_size, args.seq_len = 1, 0.25, 512, 64
        args.device_batch, args.eval_tokens, args.pieces = 4, 2048, list(PIECES)[:1]
    args.old_batch = args.old_batch or args.device_batch * args.seq_len
    args.pieces = getattr(args, "pieces", list(PIECES))
    # smoke: horizons of a few steps (both recipes alike), only so that every code path runs
    args.extra = ["--target-param-data-ratio", "0.3"] if args.smoke else []
    return args


def shape_flags(args, depth: int, seed: int) -> list[str]:
    return ["--depth", str(depth), "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", str(args.seq_len),
            "--device-batch-size", str(args.device_batch), "--eval-tokens", str(args.eval_tokens), "--eval-every", "0",
            "--sample-every", "0", "--save-every", "0", "--seed", str(seed)]


def seconds_of(text: str) -> float:
    """format_duration's 1d02h03m / 1h02m / 3m04s back to seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return float(sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([dhms])", text)))


def train(args, env: dict, part: str, recipe: str, depth: int, seed: int, variant: str, extra: list[str],
          name: str | None = None) -> Run:
    tag = re.sub(r"[^\w.-]+", "_", f"{part}-{name or recipe}-{variant}-d{depth}-s{seed}")
    cmd = [sys.executable, "-m", "scripts.base_train", *shape_flags(args, depth, seed), "--recipe", recipe,
           "--model-tag", tag, *args.extra, *extra]
    print(f"  {part}: {name or recipe} {variant} depth {depth} seed {seed} ...", end="", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = done.stdout + done.stderr
    bpbs, finished = BPB_LINE.findall(log), DONE_LINE.search(log)
    if done.returncode or not bpbs or not finished:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{log[-3000:]}")
    run = Run(part, name or recipe, depth, seed, variant, int(finished.group(1).replace(",", "")), seconds_of(finished.group(2)),
              wall, float(bpbs[-1][1]))
    print(f" {run.steps} steps, {run.train_seconds:.0f}s training, bpb {run.final_bpb:.4f}", flush=True)
    return run


def time_to_reach(bpb: float, runs: list[Run]) -> float | None:
    """Training seconds at which the recipe's runs (final bpb against time) reach `bpb`, interpolated in log
    time between the two runs around it; None when it lies outside them."""
    points = sorted((r.train_seconds, r.final_bpb) for r in runs)
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if min(b0, b1) <= bpb <= max(b0, b1) and b0 != b1:
            frac = (b0 - bpb) / (b0 - b1)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
    if points and min(b for _, b in points) <= bpb:  # already reached by the shortest run that is at least as good
        return min(t for t, b in points if b <= bpb)
    return None


def mean(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


def series_summary(runs: list[Run]) -> list[str]:
    lines = ["| recipe | depth | steps | training s | final bpb (mean ± sd over seeds) |", "|---|---|---|---|---|"]
    names = list(dict.fromkeys(r.recipe for r in runs))
    for name in names:
        for depth in sorted({r.depth for r in runs}):
            rs = [r for r in runs if r.recipe == name and r.depth == depth]
            if rs:
                lines.append(f"| {name} | {depth} | {rs[0].steps:,} | {statistics.mean(r.train_seconds for r in rs):.0f} | "
                             f"{mean([r.final_bpb for r in rs])} |")
    for name in (n for n in names if n != "2025-10"):
        ratios = []
        for old in (r for r in runs if r.recipe == "2025-10"):
            reach = time_to_reach(old.final_bpb, [r for r in runs if r.recipe == name and r.seed == old.seed])
            if reach is not None:
                ratios.append(reach / old.train_seconds)
            lines.append(f"time for {name} to reach 2025-10's depth-{old.depth} bpb {old.final_bpb:.4f} (seed {old.seed}): "
                         + (f"{reach:.0f}s vs {old.train_seconds:.0f}s = {reach / old.train_seconds:.2f}x" if reach else
                            "not reached within the series (every run of it is worse)"))
        if ratios:
            lines.append(f"time ratio at equal quality ({name} / 2025-10): mean {statistics.mean(ratios):.2f}x over "
                         f"{len(ratios)} run(s) (target <= 0.80x)")
    return lines


def equal_time_summary(runs: list[Run], key) -> list[str]:
    lines = ["| run | steps | final bpb (mean ± sd over seeds) |", "|---|---|---|"]
    for name in dict.fromkeys(key(r) for r in runs):
        rs = [r for r in runs if key(r) == name]
        lines.append(f"| {name} | {rs[0].steps:,} | {mean([r.final_bpb for r in rs])} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"error: --data {args.data}: no such folder", file=sys.stderr)
        return 2
    parts = set(args.parts.split(","))
    print(machine_line(__import__("torch").device("cpu")))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; data {Path(args.data).resolve()}; vocab {args.vocab_size}, seq {args.seq_len}, "
          f"width 32 per layer; 2025-10 batch {args.old_batch:,} tokens")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="nanochat-recipe-") as base:
        env = {**os.environ, "NANOCHAT_BASE_DIR": base, "PYTHONUNBUFFERED": "1"}
        prepared = subprocess.run(["bash", "prepare.sh", "--from", str(Path(args.data).resolve()), "--vocab-size",
                                   str(args.vocab_size), "--offline", "--no-wandb"], cwd=ROOT, env=env, capture_output=True, text=True)
        if prepared.returncode:
            print(f"error: prepare.sh failed:\n{prepared.stdout[-2000:]}{prepared.stderr[-2000:]}", file=sys.stderr)
            return 1
        old_batch = ["--total-batch-size", str(args.old_batch)]
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if "series" in parts:
                for depth in args.depths:
                    for name in args.series:
                        recipe, fixed = SERIES[name]
                        runs.append(train(args, env, "series", recipe, depth, seed, "horizon", old_batch if fixed else [], name))
            if "large" in parts:
                budget = ["--time-budget", f"{args.large_minutes * 60:.0f}s"]
                for recipe in ("2025-10", "2026"):
                    runs.append(train(args, env, "large", recipe, args.large_depth, seed, "equal time",
                                      budget + (old_batch if recipe == "2025-10" else [])))
            if "ablation" in parts:
                budget = ["--time-budget", f"{args.ablation_minutes * 60:.0f}s"]
                runs.append(train(args, env, "ablation", "2026", args.ablation_depth, seed, "all pieces", budget))
                for piece in args.pieces:
                    flags = PIECES[piece]
                    runs.append(train(args, env, "ablation", "2026", args.ablation_depth, seed, f"without {piece}",
                                      budget + (flags or old_batch)))
    report = []
    if "series" in parts:
        report += ["", "## Scaling series: each recipe to its own horizon", *series_summary([r for r in runs if r.part == "series"])]
    if "large" in parts:
        large = [r for r in runs if r.part == "large"]
        report += ["", f"## Depth {args.large_depth}, {args.large_minutes:g} min per run: bpb at equal time",
                   *equal_time_summary(large, lambda r: r.recipe)]
    if "ablation" in parts:
        report += ["", f"## Ablation at depth {args.ablation_depth}, {args.ablation_minutes:g} min per run",
                   *equal_time_summary([r for r in runs if r.part == "ablation"], lambda r: r.variant)]
    print("\n".join(report))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": [asdict(r) for r in runs], "summary": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
