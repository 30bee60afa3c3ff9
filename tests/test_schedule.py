"""The training plan and schedules derived from the flags."""

from __future__ import annotations

import pytest

import math

import torch

from nanochat.gpt import GPT, config_for_depth
from nanochat.schedule import (RECIPES, PlanError, derive_plan, lr_multiplier, muon_momentum, power_lines_batch,
                               weight_decay_multiplier)

BASE = dict(device_batch_size=32, seq_len=2048, world_size=1, total_batch_size=524288, num_params=561_000_000, flops_per_token=3.5e9)


def test_gradient_accumulation_and_chinchilla_horizon():
    plan = derive_plan(**BASE)
    assert plan.grad_accum_steps == 8
    assert plan.num_iterations == round(20 * 561_000_000 / 524288)
    assert plan.total_tokens == plan.num_iterations * 524288
    assert plan.tokens_per_param == pytest.approx(20, rel=1e-3)


def test_more_ranks_fewer_accumulation_steps():
    assert derive_plan(**{**BASE, "world_size": 8}).grad_accum_steps == 1
    with pytest.raises(PlanError, match="not a multiple"):
        derive_plan(**{**BASE, "device_batch_size": 24})


def test_horizon_precedence():
    assert derive_plan(**BASE, num_iterations=7, target_flops=1e20).num_iterations == 7
    by_flops = derive_plan(**BASE, target_flops=3.5e9 * 524288 * 100)
    assert by_flops.num_iterations == 100 and "target-flops" in by_flops.horizon_source


def test_lr_is_flat_then_decays_linearly_to_zero():
    values = [lr_multiplier(s, 100, 0.2) for s in range(101)]
    assert values[:81] == [1.0] * 81
    assert values[90] == pytest.approx(0.5) and values[100] == 0.0
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_multiplier(5, 10, 0.0) == 1.0


def test_muon_momentum_warms_up():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(10_000) == pytest.approx(0.95)


SMALL = dict(device_batch_size=4, seq_len=8, world_size=2, total_batch_size=128, num_params=1000, flops_per_token=6.0)


def test_plan_records_every_number_the_loop_reads():
    # the training loop and the report read these fields, so each must be the input or its product;
    # grad_accum_steps an int because the loop passes it to range()
    plan = derive_plan(**SMALL, num_iterations=1)
    assert plan.to_dict() == dict(
        device_batch_size=4, seq_len=8, world_size=2, total_batch_size=128, grad_accum_steps=2, num_iterations=1,
        total_tokens=128, tokens_per_param=0.128, total_flops=768.0, horizon_source="set by --num-iterations",
        warmdown_ratio=0.2,
    )
    assert type(plan.grad_accum_steps) is int


@pytest.mark.parametrize("flags,steps,source", [
    # 0 and -1 both mean "not set", so the next rule in line decides
    (dict(num_iterations=0, target_flops=6.0 * 128 * 3), 3, "target-flops"),
    (dict(target_flops=0), 156, "all parameters"),  # round(20 tokens per parameter x 1000 / 128)
    # horizons shorter than one step still train one step
    (dict(target_flops=1.0), 1, "target-flops"),
    (dict(target_param_data_ratio=0.01), 1, "all parameters"),
])
def test_unset_flags_fall_through_and_a_plan_has_at_least_one_step(flags, steps, source):
    plan = derive_plan(**SMALL, **flags)
    assert plan.num_iterations == steps and source in plan.horizon_source


def test_lr_reaches_zero_at_the_last_step_even_with_a_one_step_warmdown():
    assert lr_multiplier(9, 10, 0.1) == 1.0 and lr_multiplier(10, 10, 0.1) == 0.0


def test_weight_decay_ramps_linearly_to_zero():
    values = [weight_decay_multiplier(s, 10) for s in range(11)]
    assert values[0] == 1.0 and values[5] == pytest.approx(0.5) and values[10] == 0.0
    assert all(a - b == pytest.approx(0.1) for a, b in zip(values, values[1:]))


def test_horizon_says_which_parameter_count_it_uses():
    plan = derive_plan(**SMALL, target_param_data_ratio=10.5, param_count_name="matrices + head")
    assert plan.num_iterations == round(10.5 * 1000 / 128) and "10.5 tokens per parameter (matrices + head)" in plan.horizon_source


def _scaling_params(depth: int) -> int:
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, 65536))
    return model.scaling_params()


def test_power_lines_batch_is_anchored_at_depth_12_and_grows_as_tokens_to_the_0383():
    anchor = 10.5 * _scaling_params(12)
    assert power_lines_batch(anchor, anchor) == 2**19
    # the rule longhand: 2^19 x (D / D12)^0.383, rounded to a power of two in log space
    for depth in (4, 8, 16, 18, 20, 26, 32, 34):
        tokens = 10.5 * _scaling_params(depth)
        expected = 2 ** round(19 + 0.383 * math.log2(tokens / anchor))
        assert power_lines_batch(tokens, anchor) == expected
    # the docstring's table (our vocabulary 65,536, seq 2,048)
    assert [power_lines_batch(10.5 * _scaling_params(d), anchor) for d in (6, 8, 16, 18, 32, 34)] == [
        2**18, 2**19, 2**19, 2**20, 2**20, 2**21]


def test_the_two_recipes_differ_in_every_piece():
    new, old = RECIPES["2026"], RECIPES["2025-10"]
    assert (new.tokens_per_param, new.param_count, old.tokens_per_param, old.param_count) == (10.5, "scaling", 20, "all")
    assert all(getattr(new, f) != getattr(old, f) for f in new.__dataclass_fields__)
