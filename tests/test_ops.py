"""The memory-lean ops against the plain expressions they replace: values and
gradients, ignored targets, chunking at a 65,536 vocabulary, and what they
allocate and keep for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat import ops
from nanochat.gpt import GPTConfig, build_model

CAP = 15.0


def plain_losses(x, weight, targets, cap=CAP):
    """Per-row soft-capped cross-entropy through autograd, fp32 logits (what the model did before)."""
    logits = cap * torch.tanh(F.linear(x, weight.to(x.dtype)).float() / cap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")


def head_inputs(n, c, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, c, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return x, weight, targets


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ---------------------------------------------------------------- norm and MLP


def test_rms_norm_gradients_are_exact_in_float64():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.rms_norm(t, 1e-6), (x,))
    torch.testing.assert_close(ops.rms_norm(x, 1e-6), F.rms_norm(x, (16,), eps=1e-6))


def test_rms_norm_in_bf16_rounds_the_fp32_result_once():
    x = torch.randn(4, 64, 256) * 3
    expected = F.rms_norm(x, (256,), eps=1e-6).to(torch.bfloat16)
    torch.testing.assert_close(ops.rms_norm(x.to(torch.bfloat16), 1e-6), expected, atol=0.02, rtol=0.01)


def test_relu_squared_linear_gradients_are_exact_in_float64():
    h = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.relu_squared_linear, (h, w))
    torch.testing.assert_close(ops.relu_squared_linear(h, w), F.linear(F.relu(h).square(), w))


# ---------------------------------------------------------------- head and loss


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_head_loss_equals_the_plain_expression(dtype, tol):
    x, weight, targets = head_inputs(96, 32, 500, dtype)
    targets[::7] = -1
    weights = torch.rand(96, generator=torch.Generator().manual_seed(3))  # arbitrary per-row weights (RL advantages)
    ours = ops.head_loss(x, weight, targets, weights, CAP)
    plain = (plain_losses(x, weight, targets) * weights).sum()
    torch.testing.assert_close(ours, plain, atol=tol, rtol=tol)
    for mine, theirs in zip(grads_of(ours, x, weight), grads_of(plain, x, weight)):
        assert mine.dtype == theirs.dtype
        cosine = F.cosine_similarity(mine.float().flatten(), theirs.float().flatten(), dim=0)
        assert cosine > (1 - 1e-6 if dtype == torch.float32 else 0.999)
        torch.testing.assert_close(mine.float(), theirs.float(), atol=tol * mine.abs().max().item(), rtol=0)


def test_ignored_rows_get_no_loss_and_no_gradient():
    x, weight, targets = head_inputs(10, 16, 50)
    targets[[1, 4]] = -1
    loss = ops.head_loss(x, weight, targets, torch.ones(10), CAP)
    (grad_x,) = grads_of(loss, x)
    assert torch.all(grad_x[[1, 4]] == 0) and torch.all(grad_x[[0, 2, 3]].abs().sum(dim=1) > 0)


def test_all_ignored_batch_is_zero_loss_and_zero_gradients():
    x, weight, targets = head_inputs(8, 16, 50)
    targets[:] = -1
    loss = ops.head_loss(x, weight, targets, torch.ones(8), CAP)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads_of(loss, x, weight))
    assert torch.all(ops.head_losses(x.detach(), weight.detach(), targets, CAP) == 0)


def test_chunks_at_vocab_65536_match_the_plain_expression(monkeypatch):
    """64 rows per chunk, so 300 rows run as four full chunks and a partial one."""
    monkeypatch.setattr(ops, "HEAD_CHUNK_ELEMENTS", 64 * 65536)
    x, weight, targets = head_inputs(300, 8, 65536)
    targets[-3:] = -1
    counted = (targets != -1).sum()
    ours = ops.head_loss(x, weight, targets, torch.ones(300) / counted, CAP)
    plain = plain_losses(x, weight, targets).sum() / counted
    torch.testing.assert_close(ours, plain)
    for mine, theirs in zip(grads_of(ours, x, weight), grads_of(plain, x, weight)):
        torch.testing.assert_close(mine, theirs, atol=1e-7, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ops.head_losses(x, weight, targets, CAP), plain_losses(x, weight, targets))


class LargestAllocation(TorchDispatchMode):
    """The most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("use_ops", [True, False], ids=["head_loss", "plain"])
def test_head_loss_never_allocates_all_the_logits(monkeypatch, use_ops):
    monkeypatch.setattr(ops, "HEAD_CHUNK_ELEMENTS", 128 * 4096)
    n, v = 1024, 4096
    x, weight, targets = head_inputs(n, 16, v)
    with LargestAllocation() as probe:
        loss = ops.head_loss(x, weight, targets, torch.ones(n), CAP) if use_ops else plain_losses(x, weight, targets).sum()
        loss.backward()
    if use_ops:
        assert probe.largest <= 128 * v
    else:  # the probe sees what the plain expression allocates, so the bound above means something
        assert probe.largest >= n * v


# ---------------------------------------------------------------- what the model keeps


def saved_bytes(model, idx, targets) -> int:
    """Bytes of distinct storages autograd keeps for backward during one forward pass."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    return sum(storages.values())


def test_a_bf16_layer_keeps_eleven_widths_per_token():
    """Per layer and token, in bf16 (2 bytes): the attention norm's output (C),
    q, k, v as attention sees them (3C), its output (C), the MLP norm's output
    (C) and relu(fc1) (4C), plus one fp32 scale per norm row and attention's
    log-sum-exp: under 11 C x 2 bytes. Autograd through the plain expressions
    keeps about twice this (fp32 norm inputs, relu(h) and its square)."""
    C, B, T = 256, 2, 64
    configs = [GPTConfig(sequence_len=T, vocab_size=512, n_layer=n, n_head=2, n_kv_head=2, n_embd=C) for n in (1, 2)]
    idx = torch.randint(0, 512, (B, T))
    one, two = (saved_bytes(build_model(c, "cpu", torch.bfloat16), idx, idx) for c in configs)
    weight_copies = 12 * C * C * 2  # the layer's bf16 weights, kept for the input gradients
    per_token = (two - one - weight_copies) / (B * T)
    assert 10 * C * 2 <= per_token < 11 * C * 2


def test_activation_checkpointing_keeps_less_and_changes_no_gradient():
    config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    idx = torch.randint(0, 256, (2, 32))
    kept_plain = saved_bytes(model, idx, idx)
    model(idx, idx).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.checkpoint_blocks = True
    assert saved_bytes(model, idx, idx) < kept_plain / 2
    model(idx, idx).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


# ---------------------------------------------------------------- survivors of the mutation run (tests/MUTATION.md)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad_path", "function"])
@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_rms_norm_uses_the_eps_it_is_given(eps, requires_grad):
    # rows this small are where eps decides the output: an imported model's eps differs from ours
    x = (torch.randn(4, 32, dtype=torch.float64) * 1e-4).requires_grad_(requires_grad)
    expected = x.detach() / torch.sqrt(x.detach().square().mean(dim=-1, keepdim=True) + eps)
    torch.testing.assert_close(ops.rms_norm(x, eps).detach(), expected, rtol=1e-9, atol=0)


def test_rms_norm_of_bf16_with_grad_takes_its_statistics_in_fp32():
    x = (torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16).requires_grad_()
    xf = x.detach().double()
    once = (xf / torch.sqrt(xf.square().mean(dim=-1, keepdim=True) + 1e-6)).to(torch.bfloat16)  # rounded once, at the end
    y = ops.rms_norm(x, 1e-6)
    assert y.dtype == torch.bfloat16
    # bf16 statistics would be off by several bf16 steps in many places; fp32 ones by at most one
    steps = (y.detach().double() - once.double()).abs() / once.double().abs().clamp(min=1e-3) / 2**-8
    assert steps.max() <= 1.0


def test_head_loss_gradients_scale_with_the_incoming_gradient():
    # gradient accumulation divides each micro-batch's loss: the gradients must shrink with it
    x, weight, targets = head_inputs(24, 16, 40)
    loss = ops.head_loss(x, weight, targets, torch.ones(24), CAP)
    whole = grads_of(loss, x, weight)
    loss = ops.head_loss(x, weight, targets, torch.ones(24), CAP)
    quarter = torch.autograd.grad(loss, (x, weight), grad_outputs=torch.tensor(0.25))
    for full, scaled in zip(whole, quarter):
        torch.testing.assert_close(scaled, full * 0.25)


def test_head_losses_run_bf16_rows_against_the_fp32_master_weight():
    x, weight, targets = head_inputs(32, 16, 60, torch.bfloat16)
    targets[::5] = -1
    ours = ops.head_losses(x.detach(), weight.detach(), targets, CAP)
    torch.testing.assert_close(ours, plain_losses(x.detach(), weight.detach(), targets), atol=2e-2, rtol=2e-2)
    assert ours.dtype == torch.float32 and torch.all(ours[::5] == 0)
