"""Training plan: every hyperparameter that derives from others, computed in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Share of the steps over which the learning rate decays linearly to 0, after a flat start
# (nanochat's default at the time of the seed; not re-tuned here).
WARMDOWN_RATIO = 0.2


class PlanError(ValueError):
    """The requested sizes don't fit together; the message says how to fix them."""


@dataclass(frozen=True)
class TrainPlan:
    device_batch_size: int
    seq_len: int
    world_size: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    total_tokens: int
    tokens_per_param: float
    total_flops: float
    horizon_source: str
    warmdown_ratio: float

    def describe(self) -> list[str]:
        return [
            f"tokens per step: {self.total_batch_size:,} = {self.device_batch_size} rows x {self.seq_len} tokens "
            f"x {self.world_size} rank(s) x {self.grad_accum_steps} accumulation step(s)",
            f"steps: {self.num_iterations:,} ({self.horizon_source})",
            f"training tokens: {self.total_tokens:,} ({self.tokens_per_param:.1f} per parameter), "
            f"compute: {self.total_flops:.3e} FLOPs",
            f"learning rate: flat, then linear warmdown to 0 over the last {self.warmdown_ratio:.0%} of steps",
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def derive_plan(
    *,
    device_batch_size: int,
    seq_len: int,
    world_size: int,
    total_batch_size: int,
    num_params: int,
    flops_per_token: float,
    num_iterations: int = -1,
    target_flops: float = -1,
    target_param_data_ratio: float = 20,
    warmdown_ratio: float = WARMDOWN_RATIO,
) -> TrainPlan:
    """Batch geometry and the horizon: explicit steps > target FLOPs > tokens-per-parameter ratio."""
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size % per_pass:
        raise PlanError(
            f"--total-batch-size {total_batch_size:,} is not a multiple of device batch x seq len x ranks = "
            f"{device_batch_size} x {seq_len} x {world_size} = {per_pass:,}; pick sizes that divide it"
        )
    if num_iterations > 0:
        steps, source = num_iterations, "set by --num-iterations"
    elif target_flops > 0:
        steps = max(1, round(target_flops / (flops_per_token * total_batch_size)))
        source = f"from --target-flops {target_flops:.3e}"
    else:
        steps = max(1, round(target_param_data_ratio * num_params / total_batch_size))
        source = f"from {target_param_data_ratio:g} tokens per parameter (Chinchilla)"
    total_tokens = steps * total_batch_size
    return TrainPlan(
        device_batch_size=device_batch_size, seq_len=seq_len, world_size=world_size,
        total_batch_size=total_batch_size, grad_accum_steps=total_batch_size // per_pass,
        num_iterations=steps, total_tokens=total_tokens, tokens_per_param=total_tokens / num_params,
        total_flops=flops_per_token * total_tokens, horizon_source=source, warmdown_ratio=warmdown_ratio,
    )


def lr_multiplier(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """1.0 until the warmdown starts, then linearly down to 0 at the last step."""
    warmdown = round(warmdown_ratio * num_iterations)
    if warmdown <= 0 or step <= num_iterations - warmdown:
        return 1.0
    return max(0.0, (num_iterations - step) / warmdown)


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300) -> float:
    """Muon's momentum warms from `start` to `end` over the first `ramp_steps` steps."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end
