"""A time budget for pretraining: which depth, and how many steps, are compute-optimal for that many hours here.

For a fixed tokens-per-parameter ratio, the compute-optimal model for C FLOPs is
the one whose horizon (ratio x its parameters) costs C; parameters and tokens
both grow as ~C^0.5 (the public nanochat scaling sweep, log 2026-01-27). What a
budget in hours buys depends on this machine's speed, so it is measured: the
real training step is timed at a candidate depth (`probe`, given by the caller:
it builds the model, fits the device batch in memory and times a few steps),
its FLOP rate predicts the time of every other depth's horizon, the best
predicted depth is probed in turn, and so on until the choice stops moving
(at most MAX_PROBES probes). The chosen depth then trains for as many steps as
the budget holds after evaluation and the probes themselves, so its tokens per
parameter land near, not exactly at, the ratio.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable

from nanochat.progress import format_duration

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_PROBES = 3
MAX_DEPTH = 64
# An evaluation pass is a forward only: about a third of a training step's FLOPs per token.
EVAL_SPEEDUP = 3.0


class BudgetError(ValueError):
    """The budget is malformed or cannot hold any run; the message says what to change."""


def parse_duration(text: str) -> float:
    """Seconds in "90m", "2.5h", "3d", "45s" (a bare number is hours)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", str(text).lower())
    if not match:
        raise BudgetError(f"time budget {text!r} is not a duration: write it like 90m, 2.5h or 3d")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "h"]
    if seconds <= 0:
        raise BudgetError(f"time budget {text!r} must be more than zero")
    return seconds


@dataclass(frozen=True)
class DepthCost:
    """What a depth's compute-optimal run costs, from its config alone."""

    depth: int
    counted_params: int  # in the count the ratio uses
    flops_per_token: float

    def tokens(self, ratio: float) -> float:
        return ratio * self.counted_params


@dataclass(frozen=True)
class Probe:
    """One measured training step at a depth: tokens per second of the whole machine."""

    depth: int
    tokens_per_second: float
    seconds: float  # what the probe itself took (build, memory fit, compile, timed steps)


@dataclass(frozen=True)
class BudgetPlan:
    budget_seconds: float
    depth: int
    tokens_per_second: float
    train_tokens: int
    train_seconds: float
    eval_seconds: float
    probe_seconds: float
    probes: tuple[tuple[int, float], ...]  # (depth, tokens per second) in the order measured

    def line(self, budget_text: str, total_batch_size: int) -> str:
        tokens = f"{self.train_tokens / 1e9:.2f}B" if self.train_tokens >= 1e9 else f"{self.train_tokens / 1e6:.1f}M"
        return (f"time budget {budget_text}: depth {self.depth}, {tokens} tokens "
                f"({total_batch_size:,} per step), ~{format_duration(self.train_seconds)} at a measured "
                f"{self.tokens_per_second / 1e3:,.1f}k tok/s, {format_duration(self.eval_seconds)} for evaluation "
                f"({format_duration(self.probe_seconds)} spent measuring depths "
                + ", ".join(str(d) for d, _ in self.probes) + ")")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_budget(
    budget_seconds: float,
    *,
    ratio: float,
    cost_of: Callable[[int], DepthCost],
    probe: Callable[[int], Probe],
    eval_seconds: Callable[[int, float, float], float],
    start_depth: int = 4,
    min_depth: int = 1,
    max_depth: int = MAX_DEPTH,
    spent_seconds: float = 0.0,
) -> BudgetPlan:
    """Choose the depth and training tokens for `budget_seconds` of pretraining.

    cost_of(depth): that depth's parameter count and FLOPs per token.
    probe(depth): the real step measured at that depth.
    eval_seconds(depth, train_tokens, tokens_per_second): what evaluation during that run costs.
    spent_seconds: already gone before planning (start-up); the probes' own time is also taken off.
    """
    costs = {d: cost_of(d) for d in range(min_depth, max_depth + 1)}
    probes: dict[int, Probe] = {}

    def seconds_left() -> float:
        return budget_seconds - spent_seconds - sum(p.seconds for p in probes.values())

    def run_seconds(depth: int, flop_rate: float) -> float:
        """A depth's compute-optimal run, training and evaluation, at this FLOP rate."""
        cost = costs[depth]
        speed = flop_rate / cost.flops_per_token
        return cost.tokens(ratio) / speed + eval_seconds(depth, cost.tokens(ratio), speed)

    depth = min(max(start_depth, min_depth), max_depth)
    for _ in range(MAX_PROBES):
        probes[depth] = probe(depth)
        flop_rate = probes[depth].tokens_per_second * costs[depth].flops_per_token
        left = max(seconds_left(), 1.0)
        guess = min(costs, key=lambda d: abs(math.log(run_seconds(d, flop_rate) / left)))
        if guess in probes:
            depth = guess
            break
        depth = guess
    if depth not in probes:  # out of probes with a new guess: it is the run, so measure it
        probes[depth] = probe(depth)
    speed = probes[depth].tokens_per_second
    left = seconds_left()
    # the run's length and its evaluations depend on each other: a few rounds settle it
    eval_s = eval_seconds(depth, costs[depth].tokens(ratio), speed)
    for _ in range(3):
        if left - eval_s <= 0:
            raise BudgetError(
                f"a time budget of {format_duration(budget_seconds)} leaves nothing to train after measuring "
                f"({format_duration(sum(p.seconds for p in probes.values()))}) and evaluating "
                f"({format_duration(eval_s)}): give more time, or evaluate less (--eval-every 0, --eval-tokens)")
        eval_s = eval_seconds(depth, (left - eval_s) * speed, speed)
    train_seconds = max(left - eval_s, 0.0)
    return BudgetPlan(budget_seconds=budget_seconds, depth=depth, tokens_per_second=speed,
                      train_tokens=int(train_seconds * speed), train_seconds=train_seconds, eval_seconds=eval_s,
                      probe_seconds=sum(p.seconds for p in probes.values()),
                      probes=tuple((d, p.tokens_per_second) for d, p in probes.items()))


def evaluation_seconds(train_tokens: float, tokens_per_second: float, total_batch_size: int, eval_every: int,
                       eval_tokens: int) -> float:
    """Validation passes during a run (one every eval_every steps, plus the last), each eval_tokens of
    forward passes at EVAL_SPEEDUP x the training speed."""
    steps = max(1, round(train_tokens / total_batch_size))
    passes = (steps // eval_every if eval_every > 0 else 0) + 1
    return passes * eval_tokens / (EVAL_SPEEDUP * tokens_per_second)


# The stages after pretraining, which a time budget does not cover, as measured in upstream nanochat's depth-20
# speedrun on 8xH100 (its report.md of 2025-11-11, the gaps between section timestamps): pretraining 172.57 min
# for 11,219,763,200 tokens, then CORE 3m42s, midtraining 10m02s, chat evaluation of mid 7m49s, SFT 2m26s,
# chat evaluation of SFT 6m48s. It did not run RL, so RL is not estimated here. Our mid and SFT mixtures are its
# mixtures, so they do the same work at any depth. Each stage is converted to the pretraining tokens that same
# machine would have trained in that time; the estimate assumes every stage's cost per token grows with the
# model as pretraining's does (forward and backward both scale with the parameters), which holds for the
# training stages and only roughly for evaluation, where generation is latency- rather than FLOP-bound.
UPSTREAM_PRETRAIN_TOKENS_PER_SECOND = 11_219_763_200 / (172.57 * 60)
UPSTREAM_LATER_MINUTES = {"CORE": 3 + 42 / 60, "mid": 10 + 2 / 60, "SFT": 2 + 26 / 60, "chat eval": (7 + 49 / 60 + 6 + 48 / 60) / 2}
# depths shown when the budget chooses: its choice depends on this machine's speed, measured only when pretraining starts
SHOWN_DEPTHS = (12, 20, 26)


def later_stage_tokens(chat_evals: int) -> float:
    """The stages after pretraining (CORE, mid, SFT, `chat_evals` chat evaluations; RL not counted), in
    pretraining tokens' worth of time: the time they took upstream x its pretraining speed."""
    minutes = sum(m for stage, m in UPSTREAM_LATER_MINUTES.items() if stage != "chat eval")
    minutes += chat_evals * UPSTREAM_LATER_MINUTES["chat eval"]
    return minutes * 60 * UPSTREAM_PRETRAIN_TOKENS_PER_SECOND


def later_stages_line(budget_text: str, pretrain_tokens: dict[int, float], *, with_rl: bool, depth_given: bool) -> str:
    """The speedrun's opening line for a time budget: what the budget leaves out, and how long that should take.

    pretrain_tokens: depth -> the tokens pretraining trains at that depth (the recipe's compute-optimal horizon).
    When the budget picks the depth it trains about those tokens in about the budget, so the later stages take
    (their tokens' worth / those tokens) x the budget; a depth the budget keeps (depth_given) is only compared
    with its own horizon."""
    seconds = parse_duration(budget_text)
    extra = later_stage_tokens(chat_evals=3 if with_rl else 2)
    shares = []
    for depth, tokens in pretrain_tokens.items():
        share = extra / tokens
        # a kept depth trains for the budget, not to its horizon: only the share of its horizon is known
        shares.append(f"{share:.0%} of the time a compute-optimal depth-{depth} pretraining takes here" if depth_given
                      else f"+{share:.0%} of the budget ({format_duration(share * seconds)}) if it picks depth {depth}")
    stages = "CORE, midtraining, SFT, RL and chat evaluation" if with_rl else "CORE, midtraining, SFT and chat evaluation"
    source = "upstream nanochat's measured depth-20 run" + (", which had no RL: RL is not counted" if with_rl else "")
    return (f"time budget {budget_text} covers pretraining with its evaluations; {stages} come after it: about "
            f"{extra / 1e9:.1f}B pretraining tokens' worth of time ({source}), so " + ", ".join(shares)
            + (" (a bigger model makes them a smaller share)" if len(shares) > 1 else ""))


def compute_optimal_tokens(depth: int, vocab_size: int) -> float:
    """The default recipe's horizon at this depth: its tokens per parameter x the parameters it counts."""
    import torch

    from nanochat.gpt import GPT, config_for_depth
    from nanochat.schedule import DEFAULT_RECIPE, RECIPES

    recipe = RECIPES[DEFAULT_RECIPE]
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, vocab_size))
    return recipe.tokens_per_param * model.counted_params(recipe.param_count)


def main(argv=None) -> int:
    """`check DURATION`: exit 2 with the reason when it is not one (for the stage scripts, before anything runs).
    `later-stages DURATION [--depth N] [--skip-rl] [--tiny]`: speedrun.sh's opening line for a time budget."""
    import sys

    from nanochat.flags import FlagParser

    p = FlagParser(prog="python -m nanochat.budget", description="Time budget helpers for the stage scripts.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="exit 2 with the reason when DURATION is not one").add_argument("duration")
    later = sub.add_parser("later-stages", help="what the budget leaves out, and how long that should take")
    later.add_argument("duration")
    later.add_argument("--depth", type=int, default=None, help="the depth pretraining keeps (default: the budget chooses)")
    later.add_argument("--vocab-size", type=int, default=65536, help="the tokenizer's vocabulary (default %(default)s)")
    later.add_argument("--skip-rl", action="store_true", help="the speedrun stops after SFT")
    later.add_argument("--tiny", action="store_true", help="speedrun --tiny: its later stages are cut short, not estimated")
    args = p.parse_args(argv)
    try:
        parse_duration(args.duration)
        if args.command == "later-stages":
            if args.tiny:
                print(f"time budget {args.duration} covers pretraining with its evaluations; the --tiny later stages "
                      "(CORE, mid, SFT, RL, chat evaluation) are cut to a few minutes in all, not estimated")
            else:
                depths = (args.depth,) if args.depth else SHOWN_DEPTHS
                print(later_stages_line(args.duration, {d: compute_optimal_tokens(d, args.vocab_size) for d in depths},
                                        with_rl=not args.skip_rl, depth_given=args.depth is not None))
    except BudgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
