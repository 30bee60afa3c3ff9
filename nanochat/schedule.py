"""Training plan: every hyperparameter that derives from others, computed in one place."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Share of the steps over which the learning rate decays linearly to 0, after a flat start
# (nanochat's default at the time of the seed; not re-tuned here).
WARMDOWN_RATIO = 0.2

# Power Lines (Bergsma et al., arXiv:2505.13738): the best total batch grows as D^0.383 with the
# training tokens D. Anchored where nanochat tuned it: 2^19 tokens at depth 12's horizon.
POWER_LINES_EXPONENT = 0.383
BATCH_ANCHOR_DEPTH = 12
BATCH_ANCHOR_TOKENS = 2**19


@dataclass(frozen=True)
class Recipe:
    """How pretraining turns a depth into a run: horizon, batch and optimizer choices.
    Every field is also a base_train flag, so an A/B can turn one piece off."""

    tokens_per_param: float
    param_count: str  # "scaling" (GPT.scaling_params: matrices + head) or "all" (every parameter)
    power_lines_batch: bool  # total batch from the horizon; else BATCH_ANCHOR_TOKENS
    lr_batch_scaling: bool  # learning rates x sqrt(batch / 2^19)
    orthogonalizer: str
    normuon: bool
    weight_decay: float  # Muon's, at width 768
    cautious: bool
    packing: str


RECIPES = {
    # The public nanochat log's 2026 changes (its scaling sweep, Power Lines, Muon upgrades, BOS-aligned best-fit packing).
    "2026": Recipe(tokens_per_param=10.5, param_count="scaling", power_lines_batch=True, lr_batch_scaling=True,
                   orthogonalizer="polar-express", normuon=True, weight_decay=0.2, cautious=True, packing="best-fit"),
    # What this project trained with until December 2026: Chinchilla's 20 tokens per (every) parameter,
    # 2^19 tokens per step, the quintic Newton-Schulz, no weight decay, documents concatenated into rows.
    "2025-10": Recipe(tokens_per_param=20, param_count="all", power_lines_batch=False, lr_batch_scaling=False,
                      orthogonalizer="newton-schulz", normuon=False, weight_decay=0.0, cautious=False, packing="concat"),
}
DEFAULT_RECIPE = "2026"


def power_lines_batch(tokens: float, anchor_tokens: float) -> int:
    """The total batch (a power of two) for a run of `tokens` training tokens, when a run of
    `anchor_tokens` (depth 12's horizon at the same ratio) trains best at 2^19. With our vocabulary
    of 65,536 at seq 2,048: 2^18 at depth 3-6, 2^19 at 7-16, 2^20 at 17-33, 2^21 from 34 (the public log,
    with its own parameter counts, has 2^18 at depth 8 and 2^21 from 32)."""
    raw = BATCH_ANCHOR_TOKENS * (tokens / anchor_tokens) ** POWER_LINES_EXPONENT
    return 2 ** round(math.log2(raw))


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
    param_count_name: str = "all parameters",
    warmdown_ratio: float = WARMDOWN_RATIO,
) -> TrainPlan:
    """Batch geometry and the horizon: explicit steps > target FLOPs > tokens-per-parameter ratio.
    `num_params` is the count the ratio is in, `param_count_name` says which it is."""
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
        source = f"from {target_param_data_ratio:g} tokens per parameter ({param_count_name})"
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


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Weight decay ramps linearly from its full value at step 0 to 0 at the last step (nanochat's log, 2026-01-10)."""
    return max(0.0, 1.0 - step / max(1, num_iterations))


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300) -> float:
    """Muon's momentum warms from `start` to `end` over the first `ramp_steps` steps."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end
