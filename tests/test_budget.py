"""The time budget: durations, and the depth search against a machine whose speed the test defines."""

from __future__ import annotations

import math

import pytest

from nanochat.budget import BudgetError, DepthCost, Probe, evaluation_seconds, parse_duration, plan_budget


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("2.5h", 9000), ("3d", 259200), ("45s", 45), ("2", 7200),
                                          (" 1.5H ", 5400), (".5m", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10x", "-3h", "0m", "1h30m", "abc"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(BudgetError, match="90m|more than zero"):
        parse_duration(text)


def cost_of(depth: int) -> DepthCost:
    """A model family like ours: parameters ~ depth^3 (width ~ depth), FLOPs 6 per parameter per token."""
    params = 12 * (64 * depth) ** 2 * depth + 65536 * 64 * depth
    return DepthCost(depth, params, 6.0 * params)


class Machine:
    """Runs at `flops` FLOP/s, a little better on bigger models (as GPUs do); records what was probed."""

    def __init__(self, flops: float, probe_seconds: float = 10.0):
        self.flops, self.probe_seconds, self.probed = flops, probe_seconds, []

    def speed(self, depth: int) -> float:
        return self.flops * (1 + depth / 40) / cost_of(depth).flops_per_token

    def probe(self, depth: int) -> Probe:
        self.probed.append(depth)
        return Probe(depth, self.speed(depth), self.probe_seconds)


def no_eval(depth, tokens, speed):
    return 0.0


@pytest.mark.parametrize("hours", [1, 10, 60, 200])
def test_the_chosen_depth_is_the_one_whose_optimal_run_fits_the_budget(hours):
    machine = Machine(1e15)
    budget = hours * 3600
    plan = plan_budget(budget, ratio=10.5, cost_of=cost_of, probe=machine.probe, eval_seconds=no_eval)
    # longhand: every depth's compute-optimal run time at its own speed; the best is the closest (log) to the budget
    left = budget - plan.probe_seconds
    run = {d: 10.5 * cost_of(d).counted_params / machine.speed(d) for d in range(1, 65)}
    best = min(run, key=lambda d: abs(math.log(run[d] / left)))
    assert plan.depth == best
    assert plan.tokens_per_second == machine.speed(best)
    # the whole budget is used: probes + training (+ no evaluation here)
    assert plan.probe_seconds + plan.train_seconds == pytest.approx(budget)
    assert plan.train_tokens == pytest.approx(plan.train_seconds * machine.speed(best), rel=1e-6)
    # and its tokens per parameter land near the ratio (depths are discrete)
    assert 10.5 / 1.6 < plan.train_tokens / cost_of(best).counted_params < 10.5 * 1.6
    assert best in machine.probed and len(machine.probed) <= 4


def test_more_time_buys_a_bigger_model():
    depths = [plan_budget(h * 3600, ratio=10.5, cost_of=cost_of, probe=Machine(1e15).probe, eval_seconds=no_eval).depth
              for h in (1, 8, 64)]
    assert depths[0] < depths[1] < depths[2]


def test_evaluation_and_probes_come_out_of_the_budget():
    machine = Machine(1e15, probe_seconds=60)

    def eval_seconds(depth, tokens, speed):
        return 0.05 * tokens / speed  # a twentieth of the training time

    plan = plan_budget(10 * 3600, ratio=10.5, cost_of=cost_of, probe=machine.probe, eval_seconds=eval_seconds,
                       spent_seconds=30)
    assert plan.eval_seconds == pytest.approx(0.05 * plan.train_seconds, rel=1e-3)
    assert 30 + plan.probe_seconds + plan.train_seconds + plan.eval_seconds == pytest.approx(10 * 3600, rel=1e-3)
    assert plan.probe_seconds == 60 * len(machine.probed)


def test_a_fixed_depth_only_sets_the_horizon():
    machine = Machine(1e15)
    plan = plan_budget(3600, ratio=10.5, cost_of=cost_of, probe=machine.probe, eval_seconds=no_eval,
                       start_depth=12, min_depth=12, max_depth=12)
    assert plan.depth == 12 and machine.probed == [12]
    assert plan.train_tokens == pytest.approx((3600 - 10) * machine.speed(12), rel=1e-6)


def test_a_budget_the_probes_use_up_is_refused():
    with pytest.raises(BudgetError, match="nothing to train"):
        plan_budget(15, ratio=10.5, cost_of=cost_of, probe=Machine(1e15, probe_seconds=10).probe, eval_seconds=no_eval)


def test_the_plan_line_names_depth_tokens_speed_and_evaluation():
    plan = plan_budget(60 * 3600, ratio=10.5, cost_of=cost_of, probe=Machine(1e15).probe,
                       eval_seconds=lambda d, t, s: 3600.0)
    line = plan.line("60h", 2**20)
    assert line.startswith(f"time budget 60h: depth {plan.depth}, ")
    assert f"{plan.train_tokens / 1e9:.2f}B tokens" in line and "k tok/s" in line and "1h00m for evaluation" in line
    small = plan_budget(600, ratio=10.5, cost_of=cost_of, probe=Machine(1e12).probe, eval_seconds=no_eval)
    assert f"{small.train_tokens / 1e6:.1f}M tokens" in small.line("10m", 2**16)  # under a billion: in millions


def test_evaluation_seconds_counts_passes():
    # 100 steps, an evaluation every 25 -> 4 + the last = 5 passes of 3,000 tokens at 3 x 1,000 tok/s
    assert evaluation_seconds(100 * 64, 1000.0, 64, 25, 3000) == pytest.approx(5.0)
    assert evaluation_seconds(100 * 64, 1000.0, 64, 0, 3000) == pytest.approx(1.0)


def test_later_stages_are_upstreams_measured_minutes_at_its_pretraining_speed():
    from datetime import datetime

    from nanochat.budget import later_stage_tokens

    # upstream nanochat's depth-20 report (2025-11-11): section timestamps, and its pretraining's tokens and minutes
    t = {k: datetime.strptime(v, "%H:%M:%S") for k, v in {"loss": "12:20:17", "core": "12:23:59", "mid": "12:34:01",
                                                          "eval mid": "12:41:50", "sft": "12:44:16", "eval sft": "12:51:04"}.items()}
    minutes = {stage: (t[stage] - t[before]).seconds / 60 for stage, before in
               [("core", "loss"), ("mid", "core"), ("eval mid", "mid"), ("sft", "eval mid"), ("eval sft", "sft")]}
    speed = 11_219_763_200 / (172.57 * 60)
    two_evals = sum(minutes.values()) * 60 * speed
    assert later_stage_tokens(chat_evals=2) == pytest.approx(two_evals)
    # a third evaluation (of RL) costs the mean of the two measured ones
    assert later_stage_tokens(chat_evals=3) - two_evals == pytest.approx((minutes["eval mid"] + minutes["eval sft"]) / 2 * 60 * speed)


def test_later_stages_line_states_their_share_of_the_budget():
    from nanochat.budget import later_stage_tokens, later_stages_line

    extra = later_stage_tokens(chat_evals=3)
    line = later_stages_line("10h", {12: 2 * extra, 20: 8 * extra}, with_rl=True, depth_given=False)
    # the later stages take extra / tokens of the budget: half of 10h at the small depth, an eighth at the big one
    assert "+50% of the budget (5h00m) if it picks depth 12" in line and "+12% of the budget (1h15m) if it picks depth 20" in line
    assert line.startswith("time budget 10h covers pretraining") and "RL is not counted" in line
    kept = later_stages_line("10h", {12: 4 * later_stage_tokens(chat_evals=2)}, with_rl=False, depth_given=True)
    assert "25% of the time a compute-optimal depth-12 pretraining takes here" in kept and "RL" not in kept


def test_budget_command_checks_durations():
    from nanochat.budget import main

    assert main(["check", "2.5h"]) == 0
    assert main(["check", "1h30m"]) == 2
    assert main(["later-stages", "90m", "--tiny"]) == 0
