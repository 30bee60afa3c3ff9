"""One compute-dtype path: bf16 training follows fp32 from the same init, the
training forward compiles without graph breaks, and the runtime flags choose
dtype, compilation and padded lengths as documented."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers
from nanochat.runtime import (CPU_COMPILE_MIN_STEPS, MIN_BUCKET, ComputeSettings, add_compute_args, bucket_length,
                              prepare_model, wants_compile)

CONFIG = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=128)


def batches(steps: int, rows: int = 4):
    g = torch.Generator().manual_seed(7)
    # a repeating pattern with noise, so the loss really falls within a few steps
    base = torch.arange(CONFIG.sequence_len + 1) % 37
    for _ in range(steps):
        noise = torch.randint(0, CONFIG.vocab_size, (rows, CONFIG.sequence_len + 1), generator=g)
        keep = torch.rand(rows, CONFIG.sequence_len + 1, generator=g) < 0.8
        ids = torch.where(keep, base.expand(rows, -1), noise)
        yield ids[:, :-1], ids[:, 1:]


def train(model, steps: int) -> tuple[list[float], dict]:
    optimizers = build_optimizers(model)
    losses, first_grads = [], {}
    for step, (x, y) in enumerate(batches(steps)):
        loss = model(x, y)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads


def test_bf16_training_follows_fp32_from_the_same_init():
    torch.manual_seed(0)
    fp32 = build_model(CONFIG, "cpu")
    bf16 = copy.deepcopy(fp32)
    bf16.compute_dtype = torch.bfloat16
    losses32, grads32 = train(fp32, 12)
    losses16, grads16 = train(bf16, 12)
    assert losses32[-1] < 0.8 * losses32[0]  # it learned, so agreement is not between two flat curves
    for a, b in zip(losses32, losses16):
        assert abs(a - b) <= 0.02 * a, (losses32, losses16)
    for name, g in grads32.items():
        assert grads16[name].dtype == torch.float32  # master weights and their gradients stay fp32
        if g.abs().sum() > 0:  # o_proj and fc2 start at zero and so do some of their inputs' gradients
            assert F.cosine_similarity(g.flatten(), grads16[name].flatten(), dim=0) > 0.99, name


def test_bf16_forward_keeps_the_residual_stream_and_cache_dtype():
    model = build_model(CONFIG, "cpu", torch.bfloat16)
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype, args[1].dtype)))
    logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)]  # block input, output, rotary table
    assert logits.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32


def test_training_forward_and_loss_compile_in_one_graph():
    """fullgraph=True raises on any graph break; aot_eager traces forward and
    backward like inductor does, in seconds instead of minutes on a CPU."""
    torch.manual_seed(0)
    model = build_model(CONFIG, "cpu", torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    (x, y), = batches(1)
    loss = compiled(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(x, y)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def parse(argv):
    p = argparse.ArgumentParser()
    add_compute_args(p)
    return p.parse_args(argv)


def test_compute_flags():
    assert parse([]).compile == "auto" and parse([]).dtype is None
    assert parse(["--no-compile"]).compile == "no"
    assert parse(["--dtype", "bfloat16", "--compile", "yes"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse(["--dtype", "float16"])
    assert wants_compile("auto", "cuda") and not wants_compile("auto", "cpu")
    assert wants_compile("auto", "cpu", CPU_COMPILE_MIN_STEPS) and not wants_compile("auto", "cpu", CPU_COMPILE_MIN_STEPS - 1)
    assert not wants_compile("no", "cuda") and wants_compile("yes", "cpu", 1)


def test_prepare_model_sets_the_dtype_and_compiles_only_when_asked():
    model = build_model(CONFIG, "cpu")
    assert prepare_model(model, ComputeSettings(dtype="bfloat16"), torch.device("cpu"), num_steps=10) is model
    assert model.compute_dtype == torch.bfloat16
    compiled = prepare_model(model, ComputeSettings(compile="yes"), torch.device("cpu"))
    assert compiled is not model and compiled._orig_mod is model and model.compute_dtype == torch.float32


@pytest.mark.parametrize("length, limit, expected", [(1, 2048, MIN_BUCKET), (64, 2048, 64), (65, 2048, 128),
                                                     (1000, 2048, 1024), (1500, 2048, 2048), (1500, 1800, 1800), (300, 200, 300)])
def test_bucket_length(length, limit, expected):
    assert bucket_length(length, limit) == expected
