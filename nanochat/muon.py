"""Muon: momentum SGD whose step for each weight matrix is orthogonalised.

The momentum of a matrix's gradient is dominated by a few directions.
Replacing it with the nearest semi-orthogonal matrix (same singular vectors,
every singular value near 1) gives the rare directions as large a step as the
dominant ones. Only meant for the 2-D matrices inside the transformer blocks;
the embedding and the lm_head belong to AdamW (see nanochat.optim).

Three upgrades of 2026, each a group option so an A/B can turn it off (the
public nanochat log, 2026-01-10, validated the last two piece by piece as gains
and the first as in the noise): Polar Express coefficients instead of the fixed
quintic, NorMuon's per-row normalisation of the orthogonalised update, and
cautious weight decay.

`Muon` runs in one process. `DistMuon` shards the work over ranks without
needing DDP: each rank owns whole matrices (Newton-Schulz needs a matrix in
one piece), keeps their momentum, and updates only them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from nanochat.common import bf16_supported, cpu_bf16_native

# Coefficients of the quintic a*x + b*x^3 + c*x^5 applied to each singular
# value. Chosen to lift small singular values as fast as possible, not to
# converge to exactly 1: after 5 steps they land roughly in [0.7, 1.2], which
# trains as well as an exact orthogonalisation at a fraction of the cost.
# The October-2025 recipe's iteration ("newton-schulz").
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al., arXiv:2505.16932): a different quintic for each
# iteration, each the minimax-optimal one for the interval the singular values
# are in by then, so they converge to ~1 instead of oscillating in [0.7, 1.2].
# These five are the paper's method run for 5 iterations from a lower bound of
# 1e-3 with its bf16 safety margins, as modded-nanogpt and nanochat use them;
# the input is divided by 1.02 x its Frobenius norm for the same margin.
# The public nanochat log (2026-01-10) measured it "in the noise" on its own.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_MARGIN = 1.02

ORTHOGONALIZERS = ("polar-express", "newton-schulz")

# NorMuon (Li et al., arXiv:2510.05491): EMA rate of each row's mean squared update.
NORMUON_BETA2 = 0.95


def orthogonalize(matrix: torch.Tensor, method: str = "polar-express", steps: int = 5,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise `matrix` (its last two dims), computing in `dtype`.

    method: "polar-express" (a quintic per iteration, the last one repeated past
    five steps) or "newton-schulz" (one fixed quintic).
    """
    if method not in ORTHOGONALIZERS:
        raise ValueError(f"unknown orthogonalizer {method!r}; choose from {', '.join(ORTHOGONALIZERS)}")
    x = matrix.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide side, so the Gram matrix x @ x.mT is the smaller one
    # The Frobenius norm bounds the spectral norm, so every singular value
    # starts in [0, 1], where both iterations are known to behave.
    if method == "polar-express":
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_MARGIN + 1e-6)
        coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]
    else:
        x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        coeffs = [NEWTON_SCHULZ_COEFFS] * steps
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def newton_schulz_dtype(device_type: str) -> torch.dtype:
    """bf16 wherever matmuls run it natively (the loose iteration needs no more), whatever
    the model computes in: GPUs from Ampere, and CPUs with AVX512-BF16 or AMX, where the
    iteration for a depth-4 model's matrices takes a third of its fp32 time (151 -> 53 ms
    per step on Xeon-3, 2026-12-02). fp32 where bf16 is emulated."""
    if bf16_supported(device_type) or (device_type == "cpu" and cpu_bf16_native()):
        return torch.bfloat16
    return torch.float32


def aspect_scale(param: torch.Tensor) -> float:
    """sqrt(max(1, rows/cols)): an orthogonalised tall matrix has smaller
    entries (RMS 1/sqrt(rows)); this gives it the per-entry step size of a
    square matrix with the same fan-in (RMS 1/sqrt(cols))."""
    return math.sqrt(max(1.0, param.size(-2) / param.size(-1)))


def normalize_rows_(update: torch.Tensor, second_moment: torch.Tensor, beta2: float = NORMUON_BETA2) -> torch.Tensor:
    """NorMuon's variance reduction, in place: each row (output neuron) of the
    orthogonalised update is divided by the root of its running mean square
    (`second_moment`, shape (rows, 1), updated here), then the whole update is
    rescaled to its Frobenius norm before, so only the balance between rows
    changes, not the step's size."""
    norm_before = update.norm()
    second_moment.lerp_(update.square().mean(dim=-1, keepdim=True), 1 - beta2)
    update.mul_(second_moment.clamp_min(1e-10).rsqrt())
    return update.mul_(norm_before / update.norm().clamp_min(1e-10))


def muon_update_(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One Muon step for `param`, in place, from its (already averaged) gradient."""
    momentum = group["momentum"]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad)
    buf = state["momentum_buffer"]
    # The EMA form keeps the buffer on the gradient's scale; its constant
    # factor versus textbook SGD momentum vanishes in the normalisation.
    buf.lerp_(grad, 1 - momentum)
    nesterov = grad.lerp(buf, momentum)
    update = orthogonalize(nesterov, group["orthogonalizer"], group["ns_steps"], newton_schulz_dtype(param.device.type)).float()
    if group["normuon"]:
        if "row_second_moment" not in state:
            state["row_second_moment"] = torch.zeros(param.size(-2), 1, dtype=torch.float32, device=param.device)
        normalize_rows_(update, state["row_second_moment"])
    lr, decay = group["lr"], group["weight_decay"]
    if decay and group["cautious"]:
        # Cautious weight decay (arXiv:2510.12402): decay only the entries the
        # update already moves toward zero (update and weight of one sign).
        param.sub_(param * (update * param > 0) * (lr * decay))
    elif decay:
        param.mul_(1 - lr * decay)
    param.add_(update.to(param.dtype), alpha=-lr * aspect_scale(param))


def grad_of(param: torch.Tensor) -> torch.Tensor:
    """The parameter's gradient; a missing one is an error rather than a skip,
    because the distributed optimizers need every rank to send every gradient."""
    if param.grad is None:
        raise RuntimeError(f"parameter of shape {tuple(param.shape)} has no gradient; call backward() before step()")
    return param.grad


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Each group has lr, momentum and weight_decay
    (decoupled; the training loop may change all three between steps), ns_steps,
    orthogonalizer (see ORTHOGONALIZERS), normuon (per-row variance
    reduction) and cautious (weight decay only where the update agrees)."""

    def __init__(
        self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5,
        orthogonalizer: str = "polar-express", normuon: bool = True, cautious: bool = True,
    ):
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"unknown orthogonalizer {orthogonalizer!r}; choose from {', '.join(ORTHOGONALIZERS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                                      orthogonalizer=orthogonalizer, normuon=normuon, cautious=cautious))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D matrices, got a parameter of shape {tuple(p.shape)}")

    def __setstate__(self, state: dict) -> None:
        # A state saved before the 2026 options existed was trained with none of them.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("orthogonalizer", "newton-schulz"), ("normuon", False), ("cautious", False)):
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                muon_update_(p, grad_of(p), self.state[p], group)


def same_shape_blocks(params: list[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of up to `size` same-shaped parameters, in a fixed
    order, so every rank forms the same blocks."""
    by_shape: dict[torch.Size, list[torch.Tensor]] = {}
    for p in params:
        by_shape.setdefault(p.shape, []).append(p)
    for same in by_shape.values():
        for start in range(0, len(same), size):
            yield same[start : start + size]


class DistMuon(Muon):
    """Muon sharded over the ranks of the default process group.

    Each group's matrices are cut into blocks of world_size same-shaped ones
    (the last block may be short); in every block, rank r owns matrix r. A step
    reduce-scatters the block's gradients (the owner receives the average),
    the owner updates its matrix, and an all-gather hands the result to every
    rank. Momentum therefore lives on the owner only: state_dict() is per rank.
    """

    @torch.no_grad()
    def step(self) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        # All reductions are queued first so they overlap with the updates below.
        reductions = []
        for group in self.param_groups:
            for block in same_shape_blocks(group["params"], world):
                padding = [torch.zeros_like(block[0]) for _ in range(world - len(block))]
                mine = torch.empty_like(block[0])
                # SUM then divide, since gloo on older torch rejects ReduceOp.AVG.
                work = dist.reduce_scatter(mine, [grad_of(p) for p in block] + padding, async_op=True)
                reductions.append((group, block, mine, work))
        gathers = []
        for group, block, mine, work in reductions:
            work.wait()
            slots = block + [torch.empty_like(block[0]) for _ in range(world - len(block))]
            if rank < len(block):
                muon_update_(block[rank], mine.div_(world), self.state[block[rank]], group)
            gathers.append(dist.all_gather(slots, slots[rank], async_op=True))
        for work in gathers:
            work.wait()
