"""The optimizers of a training run: AdamW for the embedding and the lm_head,
Muon (nanochat.muon) for the matrices inside the transformer blocks.

With several ranks, no DDP wrapper is needed: every rank runs backward on its
own micro-batches and calls step(); the optimizers average the gradients with
a reduce-scatter (each rank receives the average for the part it owns),
update that part, and all-gather the result so all ranks hold identical
weights. Optimizer state lives only with the owner, so state_dict() is per
rank (a checkpoint holds one optimizer file per rank) and must be loaded back
with the same world size.

Collectives used: reduce_scatter, all_gather, reduce_scatter_single (formerly
reduce_scatter_tensor) and all_gather_single (formerly
all_gather_into_tensor), all async. gloo in torch 2.13 supports every one of
them on CPU (in-place all-gathers included), so no fallback is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.muon import ORTHOGONALIZERS, DistMuon, Muon, grad_of

ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
MUON_MOMENTUM = 0.95  # the training loop warms it up from 0.85 by setting group["momentum"]
TUNED_AT_DIM = 768  # model width at which embedding_lr and unembedding_lr were tuned
# Learning rates as nanochat tuned them (the AdamW two at width TUNED_AT_DIM); every stage's flags default to these.
LEARNING_RATES = {"matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004}

# Pretraining's Muon weight decay at width TUNED_AT_DIM, scaled by (TUNED_AT_DIM / width)^2 and ramped
# linearly to 0 over the run: the public nanochat log (2026-01-10) found 0.2 at d12 and the optimum
# falling as 1/width^2 (d20: ~0.22 x (12/20)^2). Post-training stages use none.
PRETRAIN_WEIGHT_DECAY = 0.2
# Total batch at which LEARNING_RATES were tuned; another batch scales every rate by sqrt(B / this)
# (AdamW's square-root rule; "assumed the same for Muon, not studied carefully", nanochat's log).
TUNED_AT_BATCH = 2**19


@dataclass(frozen=True)
class MuonOptions:
    """How Muon updates its matrices (see nanochat.muon): the 2026 recipe's defaults, no weight decay."""

    orthogonalizer: str = "polar-express"
    normuon: bool = True
    weight_decay: float = 0.0  # at width TUNED_AT_DIM; build_optimizers scales it by (TUNED_AT_DIM / width)^2
    cautious: bool = True

    def __post_init__(self):
        if self.orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"unknown orthogonalizer {self.orthogonalizer!r}; choose from {', '.join(ORTHOGONALIZERS)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")


def batch_lr_scale(total_batch_size: int) -> float:
    """sqrt(total batch / TUNED_AT_BATCH): the learning rates' factor for another total batch."""
    return math.sqrt(total_batch_size / TUNED_AT_BATCH)


# torch 2.13 renamed these collectives and deprecates the old names.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.AdamW's update rule, in place, on any tensor (here a flat shard)."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
    state["step"] += 1
    beta1, beta2 = group["betas"]
    lr, step = group["lr"], state["step"]
    param.mul_(1 - lr * group["weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
    param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def flat_padded(tensor: torch.Tensor, numel: int) -> torch.Tensor:
    """`tensor` flattened and zero-padded to `numel` entries: a view of the
    tensor itself when no padding is needed, else a padded copy."""
    flat = tensor.view(-1)
    return flat if flat.numel() == numel else F.pad(flat, (0, numel - flat.numel()))


class DistAdamW(torch.optim.Optimizer):
    """AdamW sharded over the ranks of the default process group.

    Every tensor is flattened and cut into world_size equal slices (zero-padded
    at the end when its size does not divide); rank r owns slice r of every
    tensor. Slicing each tensor, rather than handing out whole ones, keeps the
    work and the state balanced although there are only two big tensors.
    The padding's gradient and weight are zero, so AdamW leaves it at zero.
    """

    def __init__(self, params, lr: float = 1e-3, betas=ADAMW_BETAS, eps: float = ADAMW_EPS, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        # All reductions are queued first so they overlap with the updates below.
        reductions = []
        for group in self.param_groups:
            for p in group["params"]:
                grad_slice = p.new_empty(math.ceil(p.numel() / world))
                padded_grad = flat_padded(grad_of(p), grad_slice.numel() * world)
                # SUM then divide, since gloo on older torch rejects ReduceOp.AVG.
                reductions.append((group, p, grad_slice, _reduce_scatter_single(grad_slice, padded_grad, async_op=True)))
        gathers = []
        for group, p, grad_slice, work in reductions:
            work.wait()
            size = grad_slice.numel()
            flat = flat_padded(p, size * world)
            mine = flat[rank * size : (rank + 1) * size]
            adamw_update_(mine, grad_slice.div_(world), self.state[p], group)
            gathers.append((p, flat, _all_gather_single(flat, mine, async_op=True)))
        for p, flat, work in gathers:
            work.wait()
            if flat.numel() != p.numel():  # a padded copy: write the real part back
                p.copy_(flat[: p.numel()].view_as(p))


def add_lr_args(group, init_lr_frac: float | None = None) -> None:
    """The learning-rate flags of a training stage; a stage that continues a model passes the default
    of --init-lr-frac, the fraction of these rates it starts from."""
    times = ""
    if init_lr_frac is not None:
        group.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="learning rates as a fraction of pretraining's (default %(default)s)")
        times = ", times --init-lr-frac"
    group.add_argument("--matrix-lr", type=float, default=LEARNING_RATES["matrix_lr"], help=f"Muon learning rate{times} (default %(default)s)")
    for name, what in (("embedding", "the embedding"), ("unembedding", "the head")):
        group.add_argument(f"--{name}-lr", type=float, default=LEARNING_RATES[f"{name}_lr"],
                           help=f"AdamW lr of {what} at width {TUNED_AT_DIM}, scaled by width{times} (default %(default)s)")


def learning_rates(matrix_lr: float, embedding_lr: float, unembedding_lr: float, init_lr_frac: float = 1.0) -> dict[str, float]:
    """build_optimizers' learning-rate arguments from add_lr_args' values."""
    rates = {"matrix_lr": matrix_lr, "embedding_lr": embedding_lr, "unembedding_lr": unembedding_lr}
    return {name: rate * init_lr_frac for name, rate in rates.items()}


def build_optimizers(
    model,
    *,
    embedding_lr: float = LEARNING_RATES["embedding_lr"],
    unembedding_lr: float = LEARNING_RATES["unembedding_lr"],
    matrix_lr: float = LEARNING_RATES["matrix_lr"],
    muon: MuonOptions = MuonOptions(),
    lr_scale: float = 1.0,
    world_size: int = 1,
) -> list[torch.optim.Optimizer]:
    """[AdamW for the embedding and lm_head, Muon for the block matrices].

    `model.parameter_groups()` says which parameter goes where. The AdamW
    learning rates scale as (n_embd / 768) ** -0.5, since wider models need
    smaller steps there; every rate is multiplied by `lr_scale` (batch_lr_scale
    for a total batch other than the tuned one). Weight decay applies to the
    Muon matrices only, scaled by (768 / n_embd)^2 (AdamW takes none). With
    world_size > 1 (process group initialised) the sharded DistAdamW and
    DistMuon are used. Every group records `initial_lr` and
    `initial_weight_decay`, so a schedule can set value = initial x multiplier.
    """
    groups = model.parameter_groups()
    check_covers_each_parameter_once(model, groups)
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
        raise RuntimeError(f"world_size={world_size} needs an initialised process group of that size")
    width = model.config.n_embd
    dim_scale = (width / TUNED_AT_DIM) ** -0.5
    adam_groups = [
        dict(params=list(groups["embedding"]), lr=embedding_lr * dim_scale * lr_scale),
        dict(params=list(groups["lm_head"]), lr=unembedding_lr * dim_scale * lr_scale),
    ]
    adam_options = dict(betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)
    muon_options = dict(lr=matrix_lr * lr_scale, momentum=MUON_MOMENTUM, orthogonalizer=muon.orthogonalizer,
                        normuon=muon.normuon, cautious=muon.cautious,
                        weight_decay=muon.weight_decay * (TUNED_AT_DIM / width) ** 2)
    if world_size > 1:
        optimizers = [DistAdamW(adam_groups, **adam_options), DistMuon(groups["matrix"], **muon_options)]
    else:
        fused = groups["embedding"][0].is_cuda
        optimizers = [torch.optim.AdamW(adam_groups, fused=fused, **adam_options), Muon(groups["matrix"], **muon_options)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
            group["initial_weight_decay"] = group["weight_decay"]
    return optimizers


def check_covers_each_parameter_once(model, groups: dict) -> None:
    """A parameter missing from the groups would silently never train; one in
    two groups would be updated twice."""
    grouped = [id(p) for name in ("matrix", "embedding", "lm_head") for p in groups[name]]
    if sorted(grouped) != sorted(id(p) for p in model.parameters()):
        raise ValueError("parameter_groups() must name every model parameter exactly once")
