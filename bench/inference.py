"""Inference speed with the KV cache: prefill tokens/s, and decode tokens/s at batch 1 and 8.

    python bench/inference.py                       # a fresh depth-4 model, vocab 8192 (the CPU reference config)
    python bench/inference.py --source base         # a trained checkpoint from $NANOCHAT_BASE_DIR

Decoding goes through the real Engine (sampling, stop checks, streaming text),
so the figures are what the chat CLI and server see. A model may stop on its
own before --new-tokens; rates count the tokens actually generated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.checkpoint import load_model  # noqa: E402
from nanochat.common import autodetect_device_type  # noqa: E402
from nanochat.engine import Engine, collect  # noqa: E402
from nanochat.gpt import build_model, config_for_depth  # noqa: E402
from nanochat.sampling import SamplingParams  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

# karpathy/nanochat's engine on the 2-core VM, depth 4, vocab 8192, fp32.
REFERENCE = {1: 230, 8: 1260}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"], help="load this stage's newest checkpoint (default: a fresh model)")
    p.add_argument("--depth", type=int, default=4, help="depth of the fresh model (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the fresh model (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length for the prefill measurement (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to decode per sequence (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement, the median is kept (default %(default)s)")
    p.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="override device autodetection")
    return p.parse_args(argv)


def byte_tokenizer_for(vocab_size: int) -> Tokenizer:
    """A tokenizer of the right size without training one: bytes plus synthetic two-byte merges."""
    ranks = {bytes([i]): i for i in range(256)}
    pairs = ((a, b) for a in range(32, 127) for b in range(32, 127))
    for rank, (a, b) in zip(range(256, vocab_size - len(SPECIAL_TOKENS)), pairs):
        ranks[bytes([a, b])] = rank
    return Tokenizer(ranks)


def setup(args, device):
    if args.source:
        from nanochat.tokenizer import get_tokenizer

        model, meta = load_model(args.source, device=device)
        return model, get_tokenizer(), f"{meta['source']} {meta['model_tag']} step {meta['step']}"
    torch.manual_seed(0)
    model = build_model(config_for_depth(args.depth, args.vocab_size), device).eval()
    return model, byte_tokenizer_for(args.vocab_size), f"fresh depth-{args.depth} model"


def timed(fn, repeats: int) -> tuple[float, int]:
    """Median seconds and the token count of fn() -> tokens."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        runs.append((time.perf_counter() - t0, tokens))
    seconds = statistics.median(r[0] for r in runs)
    return seconds, statistics.median(r[1] for r in runs)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(autodetect_device_type(args.device))
    model, tokenizer, what = setup(args, device)
    engine = Engine(model, tokenizer, max_batch=8)
    gen = torch.Generator().manual_seed(0)
    vocab = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(8)]
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=args.new_tokens, seed=0)
    prefill = SamplingParams(temperature=0, max_tokens=1)

    def decode(n_prompts: int, n_samples: int) -> int:
        requests = [engine.submit(p, params, n=n_samples) for p in prompts[:n_prompts]]
        while engine.has_work():
            engine.step()
        return sum(len(c.tokens) for r in requests for c in collect(r, n_samples))

    engine.generate(prompts[0], prefill)  # warm-up
    rows = [("prefill", 1, *timed(lambda: (engine.generate(prompts[0], prefill), args.prompt_tokens)[1], args.repeats))]
    rows.append(("decode", 1, *timed(lambda: decode(1, 1), args.repeats)))
    rows.append(("decode, 8 samples of one prompt", 8, *timed(lambda: decode(1, 8), args.repeats)))
    rows.append(("decode, 8 separate requests", 8, *timed(lambda: decode(8, 1), args.repeats)))
    print(f"{what} on {device}, {model.num_params():,} parameters, prompt {args.prompt_tokens} tokens, up to {args.new_tokens} new per sequence")
    print("| measurement | batch | tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    for name, batch, seconds, tokens in rows:
        print(f"| {name} | {batch} | {tokens:,.0f} | {seconds:.2f} | {tokens / seconds:,.0f} |")
    if device.type == "cpu" and not args.source and (args.depth, args.vocab_size) == (4, 8192):
        for name, batch, seconds, tokens in rows[1:]:
            print(f"{name}: {tokens / seconds / REFERENCE[batch]:.2f}x the reference's {REFERENCE[batch]:,} tokens/s at batch {batch} (target >= 1.20x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
