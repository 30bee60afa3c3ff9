"""The GPT model: a decoder-only transformer in the NanoChat layout.

Weights map one-to-one onto HuggingFace transformers' NanoChat architecture
(see sharing/hf_export.py), so every convention below follows it:

- rotary position embeddings (theta 10000), no learned positions; the first
  half of each head is rotated against the second half
- rotary is applied to queries and keys BEFORE their RMSNorm (QK-norm); a
  rotation keeps the RMS, so the order only matters for bit-level agreement
- one parameter-free RMSNorm (eps 1e-6) after the token embedding, before
  attention, before the MLP and before the head
- grouped-query attention: n_kv_head key/value heads shared by n_head queries
- ReLU^2 MLP with 4x expansion; no biases anywhere
- untied embedding (wte) and head (lm_head); logits soft-capped at 15*tanh(x/15)

Precision: the parameters stay fp32 (the optimizers' master weights) and the
forward pass runs in one compute dtype, `GPT.compute_dtype`, on every device,
without autocast: the embedding output, residual stream, rotary tables,
attention inputs and KV cache are in it, and every matmul casts its weight
to it. Norm statistics and the loss accumulate in fp32 (nanochat.ops). So
what runs on CPU in bf16 is what runs on CUDA in bf16, and memory measured on
CPU is what CUDA holds.

Why one file of over 400 lines: the model reads top to bottom in one place (config,
blocks, forward, init), as nanoGPT's does; the memory-lean loss lives in nanochat/ops.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.ops import head_loss, head_losses, relu_squared_linear, rms_norm

# Rotary tables cover this many times the training length, so generation can
# run past it without recomputing anything.
ROTARY_LENGTH_FACTOR = 10

# The loss exponentiates capped logits without subtracting the row maximum,
# which stays finite in fp32 while vocab_size * exp(cap) < 3e38.
MAX_LOGIT_SOFTCAP = 50.0


@dataclass
class GPTConfig:
    """Model shape; sizes have no defaults because config_for_depth derives them."""

    sequence_len: int  # training context length
    vocab_size: int
    n_layer: int
    n_head: int  # query heads; head_dim = n_embd // n_head
    n_kv_head: int  # key/value heads, shared by n_head // n_kv_head query heads each
    n_embd: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    logit_softcap: float = 15.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0 < self.logit_softcap <= MAX_LOGIT_SOFTCAP:
            raise ValueError(f"logit_softcap={self.logit_softcap} must be in (0, {MAX_LOGIT_SOFTCAP}]")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def config_for_depth(
    depth: int,
    vocab_size: int,
    *,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    max_seq_len: int = 2048,
    n_kv_head: int | None = None,
) -> GPTConfig:
    """The model size as a function of depth alone: width ~ depth * aspect_ratio.

    The width is rounded UP to a whole number of heads, so head_dim stays fixed
    as the model grows and only the head count changes.
    """
    n_head = math.ceil(depth * aspect_ratio / head_dim)
    return GPTConfig(
        sequence_len=max_seq_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head or n_head,
        n_embd=n_head * head_dim,
    )


# ---------------------------------------------------------------- building blocks


def norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, eps)


# On CPU, x @ W.T for a few rows (decoding) and a much wider output (the
# head) runs 2-3x faster as (W @ x.T).T: torch 2.13 picks a slow kernel for
# that shape (8 x 256 @ 256 x 8192: 2.1 ms against 1.0 ms on the 2-core AMD
# EPYC; no gain at 1 row, mixed for square layers, none at training sizes;
# cuBLAS needs no help).
SKINNY_ROWS = (2, 64)
WIDE_OUTPUT = 8  # output features per input feature from which the head form wins


class Linear(nn.Linear):
    """nn.Linear (no bias) whose fp32 master weight is cast to the input's dtype,
    so the layer computes in the model's compute dtype without autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        rows = x.numel() // x.size(-1)
        wide = weight.size(0) >= WIDE_OUTPUT * weight.size(1)
        # compiled, inductor picks its own kernel for the plain form
        eager = not torch.compiler.is_compiling()
        if eager and x.device.type == "cpu" and wide and SKINNY_ROWS[0] <= rows <= SKINNY_ROWS[1]:
            flat = torch.mm(weight, x.reshape(rows, x.size(-1)).t()).t()
            return flat.contiguous().view(*x.shape[:-1], weight.size(0))
        return F.linear(x, weight)


def rotary_tables(length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (length, head_dim // 2), fp32
    (the model casts the slice it uses to its compute dtype)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of x's last dim; x is (B, T, H, D), cos/sin (T, 1, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps = config.norm_eps
        self.q_proj = Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        pos = 0
        if kv_cache is not None:
            pos = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)
        return self.merge(attend(q, k, v, pos))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D) and keys (B, H_kv, T, D), rotated and normalised, and values (B, H_kv, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q = norm(apply_rotary(q, cos, sin), self.eps).transpose(1, 2)
        k = norm(apply_rotary(k, cos, sin), self.eps).transpose(1, 2)
        return q, k, v.transpose(1, 2)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, H, T, D) back into the residual stream (B, T, C)."""
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
    """Causal attention of T_new queries at positions pos.. over all T_total keys so far.

    q is (B, H, T_new, D); k, v are (B, H_kv, T_total, D). `pos` is the number
    of tokens cached before these, either shared (int) or per row (a (B,)
    tensor, when sequences of different lengths decode together); keys past a
    row's own length are masked out.
    """
    t_new, t_total = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if isinstance(pos, torch.Tensor):
        query_pos = pos[:, None] + torch.arange(t_new, device=q.device)  # (B, T_new)
        key_pos = torch.arange(t_total, device=q.device)
        mask = key_pos[None, None, None, :] <= query_pos[:, None, :, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if t_new == t_total:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if t_new == 1:  # one new token sees everything cached before it
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # chunked prefill: causal, shifted by the pos tokens already cached
    query_pos = torch.arange(pos, pos + t_new, device=q.device).unsqueeze(1)
    key_pos = torch.arange(t_total, device=q.device).unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_pos <= query_pos, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc1 = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.fc2 = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_squared_linear(self.fc1(x), self.fc2.weight.to(x.dtype))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.eps = config.norm_eps
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(norm(x, self.eps), cos, sin, kv_cache)
        return x + self.mlp(norm(x, self.eps))


# ---------------------------------------------------------------- the model


class GPT(nn.Module):
    """Token ids -> soft-capped next-token logits, or the loss against targets.

    GPT(config) leaves the weights at torch defaults: call init_weights(), or
    use build_model(config, device, compute_dtype).

    compute_dtype: what the forward pass computes in (see the module doc).
    checkpoint_blocks: recompute each block in backward instead of keeping its
    activations (a third more matmul FLOPs, for models that do not fit otherwise).
    """

    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.checkpoint_blocks = False
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # Derived from the config, so kept out of the state dict; init_weights
        # rebuilds them after construction on the meta device.
        cos, sin = self._rotary_tables(device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rotary_tables(ROTARY_LENGTH_FACTOR * c.sequence_len, c.head_dim, c.rope_theta, device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (and the rotary tables) in place.

        - wte ~ N(0, 1): the embedding is RMS-normalised right away, so its scale
          is irrelevant to the forward pass; unit variance keeps its updates
          relatively small.
        - lm_head ~ N(0, 0.001): near-uniform predictions at the start.
        - q/k/v and MLP fc1 ~ U(-a, a), a = sqrt(3) / sqrt(n_embd): unit-variance
          outputs for unit-RMS inputs (a uniform's std is a / sqrt(3)).
        - o_proj and fc2 start at zero, so every block starts as the identity
          and the residual stream is the normalised embedding.
        """
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) * self.config.n_embd**-0.5
        for block in self.blocks:
            for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.fc1):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.o_proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)
        self.cos, self.sin = self._rotary_tables(device=self.lm_head.weight.device)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        loss_weights: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) in fp32, or the cross-entropy loss when targets are given.

        targets: (B, T) token ids, -1 where no loss is wanted. loss_reduction
        "mean" averages over the counted tokens; "none" gives the (B, T) losses
        (0 where ignored), for evaluation only (no gradient: the head computes
        its gradient in the forward pass, which needs to know how the losses
        are combined). loss_weights (B, T) instead gives sum(weights * losses),
        with gradient (policy-gradient losses).
        kv_cache: see KVCache; idx then holds the tokens after the kv_cache.pos
        already cached ones, and the cache is advanced by T.
        logits_at: (B,) one position per row whose logits alone are wanted, as (B, 1, V): a prefill
        needs only each prompt's last token, and right-padded prompts end at different positions.
        """
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
        x = self.hidden_states(idx, kv_cache)
        cap, head = self.config.logit_softcap, self.lm_head.weight
        if targets is None:
            if logits_at is not None:
                x = x[torch.arange(x.size(0), device=x.device), logits_at][:, None]
            return self.logits(x)
        x, flat_targets = x.flatten(0, 1), targets.flatten()
        if loss_weights is not None:
            return head_loss(x, head, flat_targets, loss_weights.flatten(), cap)
        if loss_reduction == "none":
            if torch.is_grad_enabled() and x.requires_grad:
                raise ValueError("loss_reduction='none' gives no gradient; pass loss_weights to weight the losses")
            return head_losses(x, head, flat_targets, cap).view_as(targets)
        # clamp: a batch where every target is ignored adds 0 to the loss, not NaN
        counted = (flat_targets != -1).sum().clamp(min=1)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return head_losses(x, head, flat_targets, cap).sum() / counted
        return head_loss(x, head, flat_targets, torch.ones_like(flat_targets, dtype=torch.float32) / counted, cap)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-capped fp32 logits of final hidden states x (..., C)."""
        cap = self.config.logit_softcap
        return cap * torch.tanh(self.lm_head(x).float() / cap)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The normalised final residual stream (B, T, C), in the compute dtype."""
        T = idx.size(1)
        x = norm(self.wte(idx).to(self.compute_dtype), self.config.norm_eps)
        cos, sin = self._rotary_slice(0 if kv_cache is None else kv_cache.pos, T, x.dtype)
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.blocks:
            x = checkpoint(block, x, cos, sin, use_reentrant=False) if recompute else block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x, self.config.norm_eps)

    def _rotary_slice(self, pos: int | torch.Tensor, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions pos..pos+T, shaped (T, 1, head_dim/2) to broadcast over
        rows and heads, or (B, T, 1, head_dim/2) when pos is a per-row (B,) tensor."""
        last = (int(pos.max()) if isinstance(pos, torch.Tensor) else pos) + T
        if last > self.cos.size(0):
            raise ValueError(f"position {last} is past the rotary tables ({self.cos.size(0)} positions)")
        if isinstance(pos, torch.Tensor):
            return self.rotary_rows(pos[:, None] + torch.arange(T, device=pos.device), dtype)
        return tuple(table[pos : pos + T, None, :].to(dtype) for table in (self.cos, self.sin))

    def rotary_rows(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, 1, head_dim/2) at (B, T) positions (unchecked: the caller bounds them)."""
        return tuple(table[positions][:, :, None, :].to(dtype) for table in (self.cos, self.sin))

    # ------------------------------------------------------------ accounting

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer treatment: block matrices (Muon), embedding, head."""
        groups = {
            "matrix": list(self.blocks.parameters()),
            "embedding": [self.wte.weight],
            "lm_head": [self.lm_head.weight],
        }
        assert all(p.dim() == 2 for p in groups["matrix"]), "every block parameter is expected to be a matrix"
        grouped = [id(p) for group in groups.values() for p in group]
        assert sorted(grouped) == sorted(id(p) for p in self.parameters()), "groups must cover each parameter once"
        return groups

    def param_counts(self) -> dict[str, int]:
        groups = self.parameter_groups()
        counts = {
            "embedding": _numel(groups["embedding"]),
            "matrices": _numel(groups["matrix"]),
            "lm_head": _numel(groups["lm_head"]),
        }
        counts["total"] = sum(counts.values())
        return counts

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def scaling_params(self) -> int:
        """The parameters a training horizon is counted in (Kaplan et al. style): the
        block matrices plus the lm_head, not the embedding, which is a lookup. With
        this count the public nanochat scaling sweep (log, 2026-01-27; 1e18..1e19
        FLOPs) found parameters and tokens both growing as ~C^0.5 and a stable
        optimum near 10.5 tokens per parameter."""
        counts = self.param_counts()
        return counts["matrices"] + counts["lm_head"]

    def counted_params(self, count: str) -> int:
        """The parameters a tokens-per-parameter ratio is in: "scaling" (scaling_params) or "all"."""
        if count not in ("scaling", "all"):
            raise ValueError(f"parameter count must be 'scaling' or 'all', got {count!r}")
        return self.scaling_params() if count == "scaling" else self.num_params()

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward), the nanochat convention.

        A weight costs one multiply-add (2 FLOPs) per token forward and two
        backward (gradients of input and weight): 6 per parameter. The
        embedding is a lookup, not a matmul, so it is left out. Attention's
        QK^T and AV add 2 * 2 * head_dim FLOPs per head per key forward, 12 *
        head_dim with backward, over all sequence_len keys: the causal mask,
        which halves the real work, is ignored, as nanochat does.
        """
        c = self.config
        matmul_params = self.num_params() - self.wte.weight.numel()
        attention = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
        return float(6 * matmul_params + attention)


def build_model(config: GPTConfig, device: torch.device | str, compute_dtype: torch.dtype = torch.float32) -> GPT:
    """A freshly initialised GPT on device, fp32 weights computing in compute_dtype.
    It is laid out on the meta device first, so the weights are allocated once,
    where they will live."""
    with torch.device("meta"):
        model = GPT(config, compute_dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model


def _numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------- inference cache


class KVCache(Protocol):
    """What GPT.forward needs of a cache of keys and values (nanochat.kv_slots provides it).

    `pos`: tokens already stored, one int for every row or a (B,) tensor of
    per-row counts. forward calls update() once per layer, with the new keys
    and values (B, n_kv_head, T, head_dim) in the compute dtype, getting back
    all of that layer's keys and values so far; then advance(T) once.
    """

    pos: int | torch.Tensor

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, num_tokens: int) -> None: ...
