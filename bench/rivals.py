"""The independent implementation each benchmark runs beside ours: HuggingFace
transformers' NanoChat (the same architecture, so the same weights load into
both; see sharing/hf_export.py), built in memory from our model; plus what every bench prints first
(machine_line) and a tokenizer for fresh models (synthetic_tokenizer)."""

from __future__ import annotations

import platform
import subprocess

import torch

from nanochat.common import cpu_bf16_native
from nanochat.conversation import SPECIAL_TOKENS
from nanochat.gpt import GPT
from sharing.hf_export import architecture_fields, to_hf_state_dict
from nanochat.tokenizer import Tokenizer


def transformers_model(model: GPT, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """transformers' NanoChatForCausalLM holding a copy of `model`'s weights, in `dtype`."""
    import transformers

    config = transformers.NanoChatConfig(**architecture_fields(model.config), dtype=dtype)
    config._attn_implementation = attn_implementation
    with torch.device(next(model.parameters()).device):
        theirs = transformers.NanoChatForCausalLM(config)
    theirs.load_state_dict(to_hf_state_dict(model.state_dict(), model.config.n_layer))
    return theirs.to(dtype)


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer of exactly vocab_size tokens without training one: bytes, then
    printable two-byte pairs (benchmark speed does not depend on which tokens)."""
    ranks = {bytes([i]): i for i in range(256)}
    pairs = ((a, b) for a in range(32, 127) for b in range(32, 127))
    for rank, (a, b) in zip(range(256, vocab_size - len(SPECIAL_TOKENS)), pairs):
        ranks[bytes([a, b])] = rank
    return Tokenizer(ranks)


def profile_table(run, steps: int, device: torch.device, rows: int = 12) -> str:
    """torch.profiler's operator table over `steps` calls of run(), the ops that took longest first
    (self time: where the time goes, not which caller it goes through)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def machine_line(device: torch.device) -> str:
    """What the figures were measured on: CPU model and cores (lscpu), GPU, torch."""
    cpu = _lscpu_field("Model name") or platform.processor() or "unknown CPU"
    bf16 = cpu_bf16_native()
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"machine: {cpu}, {torch.get_num_threads()} threads / {_lscpu_field('CPU(s)') or '?'} CPUs"
            f"{' (native bf16)' if bf16 else ''}{gpu}; torch {torch.__version__}")


def _lscpu_field(name: str) -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None
