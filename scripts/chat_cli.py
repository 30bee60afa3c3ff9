"""Chat with a model in the terminal.

    python -m scripts.chat_cli                  # the most advanced model there is (rl > sft > mid > base)
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one answer, then exit

Type `clear` for a new conversation, `quit` (or Ctrl-D) to leave; Ctrl-C stops
an answer that is being written.
"""

from __future__ import annotations

import argparse
import sys

from nanochat.checkpoint import CheckpointError, load_model
from nanochat.flags import add_model_args, device_and_dtype, warm_up
from nanochat.conversation import parts_from_shown
from nanochat.engine import Engine
from nanochat.flags import FlagParser
from nanochat.sampling import SamplingParams
from nanochat.tokenizer import TokenizerError, get_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.chat_cli", description="Chat with a model in the terminal.")
    add_model_args(p, temperature=0.6)
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    return p.parse_args(argv)


def answer(engine: Engine, tokenizer, messages: list[dict], params: SamplingParams) -> str:
    """Stream one reply to stdout; Ctrl-C stops it early. Returns the text shown."""
    request = engine.submit(tokenizer.render_for_completion({"messages": messages}), params)
    shown = []
    try:
        for event in request.events(engine.step):
            shown.append(event.text)
            print(event.text, end="", flush=True)
    except KeyboardInterrupt:
        request.cancel()
        for _ in request.events(engine.step):  # the next step ends it and frees its slot
            pass
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(shown)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args.device, args.dtype)
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
        tokenizer = get_tokenizer()
        model, meta = load_model(args.source, args.model_tag, args.step, device=device, dtype=dtype)
    except (CheckpointError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(model, tokenizer, max_batch=1, compile=args.compile)
    warm_up(engine)
    messages: list[dict] = []
    if args.prompt is not None:
        answer(engine, tokenizer, [{"role": "user", "content": args.prompt}], params)
        return 0
    print(f"nanochat ({meta['source']} {meta['model_tag']} step {meta['step']:,}); 'clear' starts over, 'quit' or Ctrl-D leaves")
    while True:
        try:
            text = input("\nYou: ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(type quit or press Ctrl-D to leave)")
            continue
        if text.lower() in ("quit", "exit"):
            return 0
        if text.lower() == "clear":
            messages = []
            print("(new conversation)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("Assistant: ", end="", flush=True)
        reply = answer(engine, tokenizer, messages, params)
        messages.append({"role": "assistant", "content": parts_from_shown(reply)})


if __name__ == "__main__":
    sys.exit(main())
