"""Inference speed, our Engine against transformers' generate() on the same weights, in one run.

    python bench/inference.py                      # a fresh depth-4 model, vocab 8192: the CPU config
    python bench/inference.py --source sft         # a trained checkpoint from $NANOCHAT_BASE_DIR
    python bench/inference.py --smoke              # seconds: the tests run this

Ours is the real Engine (nanochat/engine.py) that the chat CLI and the server
drive, through submit() and step(): sampling, stop checks and streaming text
included. The rival is transformers.NanoChatForCausalLM holding a copy of the
same weights (bench/rivals.py) and its generate(), what a user would run
instead. Both sides get the same prompts (random ordinary token ids, 8
different ones of one length, so a batch of 8 needs no padding), decode
greedily and make exactly --new-tokens per row: our engine's stop tokens are
cleared and transformers gets eos_token_id=None, so neither stops early.

Both sides are timed the same way, each figure the median of --repeats runs
after one warm-up, the sides interleaved so a busy machine slows them all:
- time to first token (TTFT): a whole generation of one new token per row
  (the prefill and the first pick); prefill tokens/s = batch * prompt / TTFT
- decode tokens/s = batch * (new - 1) / (time of the whole generation - TTFT)
At batch 8 ours prefills the 8 requests one after another (as the server
admits them) and then decodes them together; transformers prefills the
(8, prompt) batch in one forward pass.

transformers runs with cache_implementation="static", as the issue asks, and
with its default dynamic cache (--hf-cache picks): in eager mode on the 2-core
CPU neither is faster at everything, so the ratios name both. A cache that
fails to run is reported and dropped.

Last, a check that both compute the same model: the greedy tokens of the
first prompt, ours against each transformers cache, in fp32 (the timed runs'
tokens when --dtype is float32, else one more run of fp32 copies).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rivals import machine_line, profile_table, synthetic_tokenizer, transformers_model  # noqa: E402
from nanochat.checkpoint import CheckpointError  # noqa: E402
from nanochat.common import DTYPES, add_device_arg, autodetect_device_type, compute_dtype  # noqa: E402
from nanochat.compiled_decode import CompiledDecoder  # noqa: E402
from nanochat.conversation import SPECIAL_TOKENS  # noqa: E402
from nanochat.engine import Engine, collect  # noqa: E402
from nanochat.gpt import GPT, build_model, config_for_depth  # noqa: E402
from nanochat.sampling import SamplingParams  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402

BATCHES = (1, 8)
CACHES = {
    "static": ("static",),
    "dynamic": ("dynamic",),
    "static_compiled": ("static_compiled",),
    "both": ("static", "dynamic"),
    "all": ("static", "dynamic", "static_compiled"),
}
OURS = {"eager": ("eager",), "compiled": ("compiled",), "both": ("eager", "compiled")}  # our engine's decode step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"], help="load this stage's newest checkpoint (default: a fresh model)")
    p.add_argument("--depth", type=int, default=4, help="depth of the fresh model (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the fresh model (default %(default)s)")
    # 128 + 128: the full run (ours and two transformers caches, 3 repeats) stays well under 3 minutes on 2 cores
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of every row (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row, at least 2 (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, the median is kept (default %(default)s)")
    p.add_argument("--hf-cache", default="all", choices=list(CACHES),
                   help="transformers' KV cache: static, dynamic (its default), static_compiled (static, torch.compile'd), "
                        "both (static and dynamic) or all three (default %(default)s; --smoke: both)")
    p.add_argument("--ours", default="both", choices=list(OURS),
                   help="our engine's decode step: eager, compiled (nanochat.compiled_decode; minutes to compile on a "
                        "small CPU) or both (default %(default)s; --smoke runs the compiled step uncompiled)")
    add_device_arg(p)
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="compute dtype of both sides (default: bfloat16 on a GPU that runs it natively, float32 elsewhere)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per core; --smoke: 1)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's operator table of one generation of each side at each batch size")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (depth 1, vocab 512, 8 + 4 tokens, 1 repeat, 1 thread)")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.vocab_size, args.prompt_tokens, args.new_tokens, args.repeats = 1, 512, 8, 4, 1
        args.hf_cache = "both" if args.hf_cache == "all" else args.hf_cache
        # With every core's thread in each op, one busy core (a parallel test run)
        # stretches a millisecond step to ~100 ms; one thread keeps the smoke quick.
        args.threads = args.threads or 1
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2: decode speed is measured after the first token")
    if args.prompt_tokens < 1 or args.repeats < 1:
        p.error("--prompt-tokens and --repeats must be at least 1")
    return args


# ---------------------------------------------------------------- the model and prompts


@torch.no_grad()
def fresh_model(depth: int, vocab_size: int, device: torch.device) -> GPT:
    """A random model whose greedy choices are clear-cut, so two correct
    implementations pick the same tokens despite rounding differences.

    init_weights leaves o_proj and fc2 at zero (every block the identity) and
    lm_head at N(0, 0.001) (near-uniform logits, tiny argmax margins); noise
    on the first two makes attention and the MLP matter, and N(0, 0.3) on the
    head spreads the logits, as tests/test_hf_export.py's random_model does.
    """
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, vocab_size), device)
    for block in model.blocks:
        block.attn.o_proj.weight.normal_(0.0, 0.05)
        block.mlp.fc2.weight.normal_(0.0, 0.05)
    model.lm_head.weight.normal_(0.0, 0.3)
    return model.eval()


def setup(args, device) -> tuple[GPT, Tokenizer, str]:
    """(fp32 model, tokenizer, a description of it)."""
    if args.source:
        from nanochat.checkpoint import load_model
        from nanochat.tokenizer import get_tokenizer  # the one saved under $NANOCHAT_BASE_DIR/tokenizer

        model, meta = load_model(args.source, device=device)
        return model, get_tokenizer(), f"{meta['source']} {meta['model_tag']} step {meta['step']}"
    return fresh_model(args.depth, args.vocab_size, device), synthetic_tokenizer(args.vocab_size), f"fresh depth-{args.depth} model"


def in_dtype(model: GPT, dtype: torch.dtype) -> GPT:
    """`model` with its weights in `dtype`, as checkpoint.load_model serves it (a copy unless fp32)."""
    if dtype == torch.float32:
        return model
    other = copy.deepcopy(model).to(dtype=dtype)
    other.compute_dtype = dtype
    return other


def random_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` different prompts of ordinary (non-special) token ids."""
    ordinary = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, ordinary, (count, length), generator=gen).tolist()


# ---------------------------------------------------------------- the two sides


class OursSide:
    """Our Engine, driven the way the chat CLI drives it: submit, then step until done.
    decode: "eager", "compiled", or "step" (--smoke: the compiled path's step, run uncompiled)."""

    name = "ours"

    def __init__(self, model: GPT, tokenizer: Tokenizer, decode: str, warm: bool = True):
        self.cache, self.decode = "slots" if decode == "eager" else "slots_compiled", decode
        self.engine = Engine(model, tokenizer, max_batch=max(BATCHES), compile=decode == "compiled")
        if decode == "step":
            self.engine.decoder = CompiledDecoder(model, self.engine.cache, compile=False)
        if warm:  # else the compiled step is built on first use, for that batch size alone
            self.engine.warm_up()
        # A random model picks <|bos|> or <|assistant_end|> now and then; every
        # row must decode the full count, as transformers' does.
        self.engine.stop_tokens = set()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=new_tokens)
        requests = [self.engine.submit(p, params) for p in prompts]
        while self.engine.has_work():
            self.engine.step()
        return [collect(r)[0].tokens for r in requests]


class TransformersSide:
    """transformers' generate() on NanoChatForCausalLM, greedy, with one kind of KV cache."""

    name = "transformers"

    def __init__(self, model: GPT, dtype: torch.dtype, cache: str):
        self.model = transformers_model(model, dtype).eval()
        self.cache = cache
        self.device = next(model.parameters()).device
        self.compile_config = None
        if cache == "static_compiled":
            # generate() compiles the static-cache forward by itself on a GPU; on a CPU only when told
            # to, with the flag transformers keeps for that (the same inductor mode as ours)
            from transformers import CompileConfig

            self.compile_config = CompileConfig(mode="max-autotune-no-cudagraphs")
            self.compile_config._compile_all_devices = True

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,  # generate to max_new_tokens, whatever is picked
            pad_token_id=0,  # unused without padding; set so generate does not warn
            cache_implementation=None if self.cache == "dynamic" else "static",
            compile_config=self.compile_config,
        )
        return out[:, ids.size(1):].tolist()


# ---------------------------------------------------------------- timing


@dataclass
class Measurement:
    side: str
    cache: str
    batch: int
    first: list[float] = field(default_factory=list)  # seconds to the first token, per run
    whole: list[float] = field(default_factory=list)  # seconds for all the new tokens, per run
    tokens: list[list[int]] = field(default_factory=list)  # the last run's new tokens, per row

    def ttft(self) -> float:
        return statistics.median(self.first)

    def prefill_rate(self, prompt_tokens: int) -> float:
        return self.batch * prompt_tokens / self.ttft()

    def decode_rate(self, new_tokens: int) -> float:
        """Tokens/s after the first; nan if noise made the whole run look no longer than TTFT."""
        decode_seconds = statistics.median(self.whole) - self.ttft()
        return self.batch * (new_tokens - 1) / decode_seconds if decode_seconds > 0 else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(side, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple[float, list[list[int]]]:
    """(seconds, new tokens per row), checking that every row made all of them."""
    sync(device)
    t0 = time.perf_counter()
    tokens = side.generate(prompts, new_tokens)
    sync(device)
    seconds = time.perf_counter() - t0
    short = [len(row) for row in tokens if len(row) != new_tokens]
    if short:
        raise RuntimeError(f"{side.name} ({side.cache}) made {short} tokens in some rows, not {new_tokens}: stopping was not disabled")
    return seconds, tokens


def measure_batch(sides: list, prompts: list[list[int]], args, device: torch.device) -> list[Measurement]:
    """TTFT and whole-generation times for every side at one batch size, interleaved."""
    results = [Measurement(s.name, s.cache, len(prompts)) for s in sides]
    for side in sides:  # warm-up: kernels, allocator, transformers' first-call setup and compiles (both lengths)
        side.generate(prompts, 1)
        side.generate(prompts, args.new_tokens)
    for _ in range(args.repeats):
        for side, result in zip(sides, results):
            result.first.append(timed_generation(side, prompts, 1, device)[0])
            seconds, result.tokens = timed_generation(side, prompts, args.new_tokens, device)
            result.whole.append(seconds)
    return results


def working_rivals(model: GPT, dtype: torch.dtype, caches: tuple[str, ...], prompt: list[int]) -> list[TransformersSide]:
    """A TransformersSide per cache that generates at all. A failing one is
    reported and dropped; a failing static cache falls back to the dynamic one
    when that was not asked for anyway."""
    sides, todo = [], list(caches)
    while todo:
        cache = todo.pop(0)
        side = TransformersSide(model, dtype, cache)
        try:
            side.generate([prompt], 2)
        except Exception as err:  # the rival's bug must not hide our figures
            fallback = cache == "static" and "dynamic" not in caches
            todo += ["dynamic"] if fallback else []
            print(f"transformers with the {cache} cache failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  f"{'falling back to the dynamic cache' if fallback else 'dropped'}")
            continue
        sides.append(side)
    return sides


# ---------------------------------------------------------------- report


def print_table(results: list[Measurement], args) -> None:
    print("| side | cache | batch | prefill tok/s | TTFT ms | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.side} | {r.cache} | {r.batch} | {r.prefill_rate(args.prompt_tokens):,.0f} | "
              f"{1000 * r.ttft():.1f} | {r.decode_rate(args.new_tokens):,.0f} |")


def print_ratios(results: list[Measurement], args) -> None:
    """`ours / transformers <what> at batch B: N.NNx (static cache), ...`, one line per figure and
    batch, for our best side (named when there are two)."""
    figures = {"decode": lambda r: r.decode_rate(args.new_tokens), "prefill": lambda r: r.prefill_rate(args.prompt_tokens)}
    for what, rate in figures.items():
        for batch in BATCHES:
            ours = max((r for r in results if r.side == "ours" and r.batch == batch), key=rate)
            theirs = [r for r in results if r.side == "transformers" and r.batch == batch]
            parts = [f"{rate(ours) / rate(t):.2f}x ({t.cache} cache)" for t in theirs]
            print(f"ours / transformers {what} at batch {batch}: {', '.join(parts)}; ours best with {ours.cache}")


def print_profiles(sides: list, prompts: list[list[int]], args, device: torch.device) -> None:
    for batch in BATCHES:
        for side in sides:
            print(f"{side.name} ({side.cache} cache), batch {batch}: torch.profiler over one generation "
                  f"(prefill + {args.new_tokens - 1} decode steps), longest self time first")
            print(profile_table(lambda: side.generate(prompts[:batch], args.new_tokens), 1, device))


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@torch.no_grad()
def greedy_margin(model: GPT, prompt: list[int], answer: list[int]) -> float:
    """The smallest gap between the best and second-best logit along a greedy answer:
    how much rounding it would take to flip a choice."""
    ids = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    top2 = model(ids)[0, len(prompt) - 1 : -1].topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def fp32_tokens(model: GPT, tokenizer: Tokenizer, sides: list, prompt: list[int], new_tokens: int) -> dict[str, list[int]]:
    """Greedy tokens of `prompt` from fp32 copies of every side, keyed by cache."""
    out = {}
    for side in sides:
        if side.name == "ours":
            # one prompt: only its batch size is compiled, not every size the timed run warmed up
            copy_ = OursSide(model, tokenizer, side.decode, warm=False)
        else:
            copy_ = TransformersSide(model, torch.float32, side.cache)
        out[side.cache] = copy_.generate([prompt], new_tokens)[0]
    return out


def print_greedy_check(tokens: dict[str, list[int]], margin: float) -> None:
    """`greedy tokens of prompt 1, fp32, ours vs transformers (static cache): identical (N tokens)`,
    per cache, against our eager engine (or the compiled one when it alone ran)."""
    reference = "slots" if "slots" in tokens else "slots_compiled"
    ours = tokens[reference]
    for cache, theirs in tokens.items():
        if cache == reference:
            continue
        at = first_difference(ours, theirs)
        verdict = f"identical ({len(ours)} tokens)" if at is None else f"DIFFERENT from token {at + 1} of {len(ours)}"
        other = "ours" if cache.startswith("slots") else "transformers"
        print(f"greedy tokens of prompt 1, fp32, ours ({reference}) vs {other} ({cache} cache): {verdict}")
    print(f"smallest greedy logit margin along our answer: {margin:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(autodetect_device_type(args.device))
    dtype = compute_dtype(device.type, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(device))
    try:
        fp32_model, tokenizer, what = setup(args, device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    model = in_dtype(fp32_model, dtype)
    prompts = random_prompts(tokenizer, max(BATCHES), args.prompt_tokens)
    print(f"{what}, {model.num_params():,} parameters, {str(dtype).removeprefix('torch.')} on {device}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new per row, greedy, stopping disabled, "
          f"median of {args.repeats}")
    rivals = working_rivals(model, dtype, CACHES[args.hf_cache], prompts[0])
    if not rivals:
        print("no transformers cache worked: nothing to compare against")
        return 1
    decodes = OURS[args.ours]
    if args.smoke and "compiled" in decodes:
        print("smoke: our compiled decode step runs uncompiled (inductor would take minutes)")
        decodes = tuple("step" if d == "compiled" else d for d in decodes)
    sides = [OursSide(model, tokenizer, decode) for decode in decodes] + rivals
    results = [m for batch in BATCHES for m in measure_batch(sides, prompts[:batch], args, device)]
    print_table(results, args)
    print_ratios(results, args)
    if args.profile:
        print_profiles(sides, prompts, args, device)
    if dtype == torch.float32:
        tokens = {r.cache: r.tokens[0] for r in results if r.batch == 1}
    else:
        tokens = fp32_tokens(fp32_model, tokenizer, sides, prompts[0], args.new_tokens)
    print_greedy_check(tokens, greedy_margin(fp32_model, prompts[0], next(iter(tokens.values()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
