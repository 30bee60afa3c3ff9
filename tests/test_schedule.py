"""The training plan and schedules derived from the flags."""

from __future__ import annotations

import pytest

from nanochat.schedule import PlanError, derive_plan, lr_multiplier, muon_momentum

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
