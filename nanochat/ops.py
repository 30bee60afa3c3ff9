"""The model's memory-lean operations: each keeps for backward only what its
backward needs, and recomputes cheap elementwise work instead of saving it.

At depth 20, batch 32 x 2048 and a 65,536-token vocabulary, autograd through
the plain expressions keeps about twice the activations these do:
- F.rms_norm on bf16 input saves an fp32 copy of the input (torch 2.13); the
  gradient can be had from the output and one fp32 scale per row instead, and
  the output is saved by the next matmul anyway.
- relu(h)^2 followed by a matmul saves h, relu(h) and relu(h)^2 (three 4x-wide
  tensors); relu(h) alone gives back both the square and its derivative.
- the head and soft-capped loss hold (B*T, V) logits, their fp32 copy and the
  fp32 gradient: 40 GiB. head_loss never holds more than one chunk of rows.

All three compute in the dtype of their input (the model's compute dtype) and
accumulate statistics in fp32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Rows of logits the head materialises at once: 2^28 fp32 values (1 GiB) per
# chunk, so 4,096 rows at vocab 65,536 and 16 chunks at batch 32 x 2048; big
# enough that each chunk's three matmuls stay efficient.
HEAD_CHUNK_ELEMENTS = 2**28
# On CPU at most 2^22 (16 MiB of fp32) per chunk: below glibc's 32 MiB ceiling for
# serving allocations from the heap, so with nanochat.cpu_memory the chunks reuse
# freed memory instead of a fresh mmap (and a page fault per 4 KiB) each step.
# Depth 4, vocab 8,192, 4,096 rows (bench/README.md, "Training"): the head's fwd + bwd
# 331 ms against 341-391 ms at 2^19-2^24, and a training step's page faults ~80,000 -> ~0.
CPU_HEAD_CHUNK_ELEMENTS = 2**22


class RMSNorm(torch.autograd.Function):
    """x / sqrt(mean(x^2) + eps) over the last dim, statistics in fp32.

    Saves the output and the fp32 per-row scale r: with y = x * r,
    dx = r * (dy - y * mean(dy * y)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        xf = _at_least_fp32(x)
        scale = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
        y = (xf * scale).to(x.dtype)
        ctx.save_for_backward(y, scale)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, scale = ctx.saved_tensors
        yf, dyf = _at_least_fp32(y), _at_least_fp32(dy)
        dx = scale * (dyf - yf * (dyf * yf).mean(dim=-1, keepdim=True))
        return dx.to(dy.dtype), None


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.element_size() >= 4 else x.float()


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return RMSNorm.apply(x, eps)
    # nothing kept for backward: torch's fused kernel (which also upcasts bf16 to fp32
    # for the statistics) is ~3x faster than the Function's separate steps on CPU
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class ReluSquaredLinear(torch.autograd.Function):
    """relu(h)^2 @ weight.T, keeping only relu(h): the square is recomputed in
    backward for the weight gradient, and d relu(h)^2 / dh = 2 relu(h)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r = F.relu(h)
        ctx.save_for_backward(r, weight)
        return F.linear(r.square(), weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        r, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.size(-1))
        grad_weight = grad_rows.t() @ r.square().reshape(-1, r.size(-1))
        grad_h = (grad_out @ weight).mul_(r).mul_(2)
        return grad_h, grad_weight


def relu_squared_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ReluSquaredLinear.apply(h, weight)


@contextlib.contextmanager
def head_chunk_elements(gpu: int | None = None, cpu: int | None = None):
    """Set HEAD_CHUNK_ELEMENTS (gpu) and/or CPU_HEAD_CHUNK_ELEMENTS (cpu) for a while; the
    head reads them at each call. For measurements and checks, not for training."""
    global HEAD_CHUNK_ELEMENTS, CPU_HEAD_CHUNK_ELEMENTS
    saved = HEAD_CHUNK_ELEMENTS, CPU_HEAD_CHUNK_ELEMENTS
    HEAD_CHUNK_ELEMENTS, CPU_HEAD_CHUNK_ELEMENTS = gpu or HEAD_CHUNK_ELEMENTS, cpu or CPU_HEAD_CHUNK_ELEMENTS
    try:
        yield
    finally:
        HEAD_CHUNK_ELEMENTS, CPU_HEAD_CHUNK_ELEMENTS = saved


def _chunk_rows(vocab_size: int, device: torch.device) -> int:
    elements = HEAD_CHUNK_ELEMENTS if device.type != "cpu" else min(HEAD_CHUNK_ELEMENTS, CPU_HEAD_CHUNK_ELEMENTS)
    return max(1, elements // vocab_size)


# The (rows, V) chunks below are touched as few times as possible: on a CPU
# each pass over one is memory-bound and costs about as much as a cheap matmul.


def _squashed_logits(x: torch.Tensor, weight: torch.Tensor, cap: float) -> torch.Tensor:
    """tanh(logits / cap) in fp32 for rows x: a fresh tensor, modified in place later."""
    return F.linear(x, weight).float().div_(cap).tanh_()


def _exp_capped(squashed: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(cap * squashed), its row sums). Capped logits lie in [-cap, cap] and
    cap <= 50 (gpt.MAX_LOGIT_SOFTCAP), so exp needs no max subtraction in fp32."""
    exp = torch.mul(squashed, cap).exp_()
    return exp, exp.sum(dim=-1)


def _row_losses(squashed: torch.Tensor, sum_exp: torch.Tensor, safe_targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Cross-entropy per row: log-sum-exp minus the target's capped logit."""
    return sum_exp.log() - cap * squashed.gather(1, safe_targets[:, None]).squeeze(1)


class HeadLoss(torch.autograd.Function):
    """sum_i w_i * cross_entropy(cap * tanh(x_i @ weight.T / cap), target_i), the
    gradients computed in the same pass, a chunk of rows at a time.

    The gradient of a weighted sum is known up to the incoming scalar before
    backward runs, so forward computes it while each chunk's logits exist and
    backward only scales it: the head's three matmuls run once each, as with
    autograd, and only (N, C) + (V, C) gradients are kept instead of (N, V)
    tensors. `weight` is the fp32 master weight (its gradient stays fp32);
    the matmuls run in x's dtype. Row weights are 0 where the target is ignored.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, row_weights, cap: float):
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        compute_weight = weight.to(x.dtype)
        step = _chunk_rows(weight.size(0), x.device)
        for start in range(0, x.size(0), step):
            xs, ts, ws = x[start : start + step], targets[start : start + step], row_weights[start : start + step, None]
            squashed = _squashed_logits(xs, compute_weight, cap)
            exp, sum_exp = _exp_capped(squashed, cap)
            total = total + (ws.squeeze(1) * _row_losses(squashed, sum_exp, ts, cap)).sum()
            # d/d capped = w * (softmax - one_hot(target)), softmax = exp / sum_exp
            grad = exp.mul_(ws / sum_exp[:, None])
            grad.scatter_add_(1, ts[:, None], -ws)
            # d capped / d logits = 1 - tanh^2, applied as grad - grad * tanh^2
            grad.addcmul_(grad, squashed.square_(), value=-1)
            del squashed, exp  # freed before the compute-dtype copy: one fp32 chunk less at the peak
            grad = grad.to(x.dtype)
            grad_x[start : start + step] = grad @ compute_weight
            grad_weight += (grad.t() @ xs).float()
        ctx.save_for_backward(grad_x, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), grad_weight * grad_total, None, None, None


def head_losses(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-row losses (fp32, 0 where target is -1) without gradients, a chunk at a time."""
    valid = targets != -1
    safe = torch.where(valid, targets, 0)
    step = _chunk_rows(weight.size(0), x.device)
    compute_weight = weight.to(x.dtype)
    parts = []
    for s in range(0, x.size(0), step):
        squashed = _squashed_logits(x[s : s + step], compute_weight, cap)
        parts.append(_row_losses(squashed, _exp_capped(squashed, cap)[1], safe[s : s + step], cap))
    return torch.where(valid, torch.cat(parts), 0.0)


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor, cap: float) -> torch.Tensor:
    """The weighted loss sum of HeadLoss; x (N, C), targets (N,) with -1 ignored, row_weights (N,)."""
    valid = targets != -1
    safe = torch.where(valid, targets, 0)
    return HeadLoss.apply(x, weight, safe, torch.where(valid, row_weights.float(), 0.0), cap)
