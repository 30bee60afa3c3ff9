"""The GPT model: shapes, loss, masking, GQA, KV cache, sizing and accounting."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, build_model, config_for_depth, norm
from nanochat.kv_slots import SlotKVCache

VOCAB = 256


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
    return GPTConfig(**{**fields, **overrides})


def make_model(config: GPTConfig | None = None, seed: int = 0, perturb: bool = True) -> GPT:
    """An initialised model; `perturb` makes the zero-initialised projections nonzero so blocks matter."""
    torch.manual_seed(seed)
    model = GPT(config or tiny_config())
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.o_proj.weight.normal_(0.0, 0.05)
                block.mlp.fc2.weight.normal_(0.0, 0.05)
            model.lm_head.weight.normal_(0.0, 0.3)
    return model


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- forward and loss


def test_logits_and_loss_shapes():
    model = make_model()
    idx = random_ids(3, 20)
    logits = model(idx)
    assert logits.shape == (3, 20, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() < model.config.logit_softcap
    assert model(idx, idx).shape == ()
    with torch.no_grad():
        assert model(idx, idx, loss_reduction="none").shape == (3, 20)
    with pytest.raises(ValueError, match="loss_weights"):  # per-token losses carry no gradient
        model(idx, idx, loss_reduction="none")
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, idx, loss_reduction="sum")


def test_loss_and_gradients_match_cross_entropy_of_the_logits():
    """The fused loss equals plain cross-entropy over the soft-capped logits, in value and gradient."""
    model = make_model()
    idx, targets = random_ids(2, 24), random_ids(2, 24, seed=2)
    targets[0, :5] = -1
    loss = model(idx, targets)
    loss.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for fused, expected in zip(fused_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-4)


def test_per_token_loss_masks_ignored_targets():
    model = make_model()
    idx, targets = random_ids(2, 16), random_ids(2, 16, seed=2)
    targets[0, 3:9] = -1
    targets[1, -1] = -1
    with torch.no_grad():
        per_token = model(idx, targets, loss_reduction="none")
    ignored = targets == -1
    assert torch.all(per_token[ignored] == 0)
    assert torch.all(per_token[~ignored] > 0)
    torch.testing.assert_close(model(idx, targets), per_token[~ignored].mean())


def test_future_tokens_do_not_change_earlier_logits():
    model = make_model()
    idx = random_ids(1, 20)
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_weights():
    gqa = make_model(tiny_config(n_head=4, n_kv_head=2))
    full = GPT(tiny_config(n_head=4, n_kv_head=4))
    state = gqa.state_dict()
    group = 4 // 2
    head_dim = gqa.config.head_dim
    for name, weight in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = weight.view(-1, head_dim, weight.size(1))  # (n_kv_head, head_dim, n_embd)
            state[name] = heads.repeat_interleave(group, dim=0).flatten(0, 1)
    full.load_state_dict(state)
    idx = random_ids(2, 20)
    torch.testing.assert_close(full(idx), gqa(idx), atol=1e-5, rtol=0)


def test_fresh_model_blocks_are_identity_maps():
    """o_proj and fc2 start at zero, so the logits depend only on the embedding and the head."""
    model = make_model(perturb=False)
    idx = random_ids(2, 10)
    eps, cap = model.config.norm_eps, model.config.logit_softcap
    residual = norm(model.wte(idx), eps)
    expected = cap * torch.tanh(model.lm_head(norm(residual, eps)) / cap)
    torch.testing.assert_close(model(idx), expected)


def test_tiny_model_overfits_a_fixed_batch():
    model = make_model(tiny_config(n_embd=64, n_head=2, n_kv_head=1), perturb=False)
    idx = random_ids(4, 32)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


# ---------------------------------------------------------------- KV cache


def decode_with_cache(model: GPT, idx: torch.Tensor, chunks: list[int], max_len: int) -> torch.Tensor:
    """Logits for idx, computed as prefill chunks of the given sizes (row by row, as the engine
    admits requests) followed by one token at a time for all rows together."""
    rows, cache = idx.size(0), SlotKVCache(model.config, slots=idx.size(0), max_len=max_len)
    prefilled = []
    for r in range(rows):
        start, pieces = 0, []
        for size in chunks:
            pieces.append(model(idx[r : r + 1, start : start + size], kv_cache=cache.prefill_view([r])))
            start += size
        prefilled.append(torch.cat(pieces, dim=1))
    logits = [torch.cat(prefilled, dim=0)]
    active = torch.ones(rows, dtype=torch.bool)
    for t in range(sum(chunks), idx.size(1)):
        logits.append(model(idx[:, t : t + 1], kv_cache=cache.decode_view(rows, active)))
    assert cache.lengths.tolist() == [idx.size(1)] * rows
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("chunks", [[7], [5, 6], [1]], ids=["prefill", "chunked-prefill", "decode-only"])
def test_kv_cache_matches_uncached_logits(chunks):
    model = make_model()
    idx = random_ids(2, 16)
    expected = model(idx)
    with torch.no_grad():
        cached = decode_with_cache(model, idx, chunks, max_len=20)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)


def test_generation_runs_past_the_training_length():
    model = make_model(tiny_config(sequence_len=8))
    idx = random_ids(1, 30)
    with torch.no_grad():
        cached = decode_with_cache(model, idx, [10], max_len=30)
    torch.testing.assert_close(cached, model(idx), atol=1e-5, rtol=0)


def test_kv_cache_release_and_overflow():
    model = make_model()
    cache = SlotKVCache(model.config, slots=1, max_len=6)
    idx = random_ids(1, 6)
    with torch.no_grad():
        first = model(idx, kv_cache=cache.prefill_view([0]))
        cache.release(0)
        torch.testing.assert_close(model(idx, kv_cache=cache.prefill_view([0])), first)
        with pytest.raises(ValueError, match="reached the cache's 6 tokens"):
            model(idx[:, :1], kv_cache=cache.decode_view(1, torch.ones(1, dtype=torch.bool)))
        with pytest.raises(ValueError, match="exceeds the cache's 6"):
            model(idx[:, :1], kv_cache=cache.prefill_view([0]))


# ---------------------------------------------------------------- sizing and accounting


@pytest.mark.parametrize(
    "depth, kwargs, n_embd, n_head",
    [
        (4, {}, 256, 2),
        (20, {}, 1280, 10),
        (3, {"aspect_ratio": 50}, 256, 2),  # 150 rounds up to 2 heads of 128
        (5, {"aspect_ratio": 100, "head_dim": 64}, 512, 8),  # 500 -> 512
    ],
)
def test_config_for_depth(depth, kwargs, n_embd, n_head):
    config = config_for_depth(depth, 1000, max_seq_len=512, **kwargs)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (depth, n_embd, n_head, n_head)
    assert (config.vocab_size, config.sequence_len) == (1000, 512)


def test_config_for_depth_grouped_kv_heads():
    config = config_for_depth(20, 1000, n_kv_head=5)
    assert (config.n_head, config.n_kv_head, config.head_dim) == (10, 5, 128)
    with pytest.raises(ValueError, match="does not divide"):
        config_for_depth(20, 1000, n_kv_head=3)


def test_config_dict_round_trip():
    config = tiny_config()
    data = json.loads(json.dumps(config.to_dict()))
    assert GPTConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown GPTConfig fields: bogus"):
        GPTConfig.from_dict({**data, "bogus": 1})


def test_parameter_groups_cover_every_parameter_once():
    model = GPT(tiny_config())
    groups = model.parameter_groups()
    assert set(groups) == {"matrix", "embedding", "lm_head"}
    grouped = [p for params in groups.values() for p in params]
    assert len(grouped) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert groups["embedding"] == [model.wte.weight] and groups["lm_head"] == [model.lm_head.weight]
    assert len(groups["matrix"]) == 6 * model.config.n_layer and all(p.dim() == 2 for p in groups["matrix"])


def test_param_counts_and_flops_by_hand():
    config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = GPT(config)
    # per layer: q 64x64, k and v 32x64 (one kv head of 32), o 64x64, fc1 256x64, fc2 64x256
    per_layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 2 * (256 * 64)
    counts = model.param_counts()
    assert counts == {
        "embedding": 256 * 64,
        "matrices": 2 * per_layer,
        "lm_head": 256 * 64,
        "total": 256 * 64 + 2 * per_layer + 256 * 64,
    }
    assert model.num_params() == counts["total"]
    attention = 12 * 2 * 2 * 32 * 32  # 12 * n_layer * n_head * head_dim * sequence_len
    assert model.estimate_flops() == 6 * (2 * per_layer + 256 * 64) + attention


def test_meta_device_construction_then_init_weights():
    config = tiny_config()
    torch.manual_seed(5)
    model = build_model(config, "cpu")  # meta device, to_empty, init_weights
    reference = GPT(config)
    torch.manual_seed(5)
    reference.init_weights()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(model.cos, reference.cos, rtol=0, atol=0)
    idx = random_ids(1, 12)
    torch.testing.assert_close(model(idx), reference(idx))


def test_init_weights_statistics():
    model = make_model(config_for_depth(2, 512, head_dim=64, max_seq_len=16), perturb=False)
    bound = 3**0.5 * model.config.n_embd**-0.5
    assert abs(model.wte.weight.std().item() - 1.0) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    for block in model.blocks:
        assert block.attn.q_proj.weight.abs().max() <= bound and block.mlp.fc1.weight.abs().max() <= bound
        assert not block.attn.o_proj.weight.any() and not block.mlp.fc2.weight.any()


def test_logits_at_one_position_per_row_and_the_skinny_cpu_matmul_match_the_full_pass():
    """Prefill asks for each row's last prompt token only; decode-sized inputs take Linear's (W @ x.T).T path."""
    model = make_model()
    idx = random_ids(2, 20)
    full = model(idx)
    at = model(idx, logits_at=torch.tensor([19, 7]))  # row 1 as if padded after its 8th token
    torch.testing.assert_close(at, torch.stack((full[0, 19:], full[1, 7:8])), atol=1e-5, rtol=1e-5)
    one_row = model(idx[:1])  # 20 rows: the skinny path in the head (256 outputs for 128 inputs is not wide)
    torch.testing.assert_close(one_row, full[:1], atol=1e-5, rtol=1e-5)
    layer = GPT(tiny_config(vocab_size=2048)).lm_head  # 2048 outputs for 128 inputs: wide
    x = torch.randn(3, 5, layer.in_features)  # 15 rows, within SKINNY_ROWS
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
