"""A Gradio chat page in front of a running chat_service, through the OpenAI protocol.

    ./chat_service.sh &
    python web_chat.py                          # http://localhost:7860
    python web_chat.py --share                  # plus a temporary public gradio.live link
    python web_chat.py --url http://spark.local:8000/v1 --api-key KEY

The controls start from the service's defaults (GET /config) and the max-tokens slider stops at its model's
context (GET /v1/models), both read once when this page starts; 0 max tokens leaves the length to the service.

Needs the optional extra: pip install -e '.[gradio]'
"""

from __future__ import annotations

import argparse
import os
import sys

from nanochat.flags import FlagParser


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(description="Gradio chat page for a running nanochat service.")
    p.add_argument("--url", default="http://localhost:8000/v1", help="the service's OpenAI base URL (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY", "none"), help="bearer key if the service wants one (env NANOCHAT_API_KEY)")
    p.add_argument("--port", type=int, default=7860, help="port of this page (default %(default)s)")
    p.add_argument("--share", action="store_true", help="also publish a temporary public link through gradio.live")
    return p.parse_args(argv)


def history_messages(history: list) -> list[dict]:
    """Gradio's history (dicts with role/content) as plain OpenAI messages."""
    messages = []
    for turn in history:
        content = turn["content"] if isinstance(turn, dict) else turn
        role = turn["role"] if isinstance(turn, dict) else "user"
        if isinstance(content, str) and role in ("user", "assistant"):
            messages.append({"role": role, "content": content})
    return messages


def fetch_json(address: str, api_key: str) -> dict:
    """The JSON at `address`, or {} when the service is down, refuses, or is not nanochat."""
    import httpx

    try:
        return httpx.get(address, headers={"Authorization": f"Bearer {api_key}"}, timeout=5).raise_for_status().json()
    except (httpx.HTTPError, ValueError):
        return {}


def service_settings(url: str, api_key: str) -> dict:
    """Where the controls start: the service's sampling defaults and its model's context (None: unknown).
    The context comes from /v1/models, which any OpenAI-style proxy passes on; /config sits beside /v1."""
    config = fetch_json(url.removesuffix("/v1") + "/config", api_key)
    models = fetch_json(url + "/models", api_key).get("data") or [{}]
    return {"temperature": config.get("temperature", 0.8), "top_k": config.get("top_k", 50),  # chat_service's own defaults
            "max_tokens": config.get("max_tokens"), "context_length": models[0].get("context_length")}


def make_responder(url: str, api_key: str):
    """The streaming function behind the chat box: yields the growing answer, or one clear error line."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=60)

    def respond(message: str, history: list, temperature: float, top_k: int, max_tokens: int):
        messages = history_messages(history) + [{"role": "user", "content": message}]
        length = {"max_tokens": int(max_tokens)} if max_tokens else {}  # 0: the service's default length
        answer = ""
        try:
            stream = client.chat.completions.create(
                model="nanochat", messages=messages, stream=True, temperature=temperature,
                extra_body={"top_k": int(top_k)}, **length,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    yield answer
        except openai.APIConnectionError:
            yield f"Cannot reach the nanochat service at {url}. Start it with ./chat_service.sh (or pass --url)."
        except openai.APIStatusError as exc:
            yield f"The service refused the request ({exc.status_code}): {exc.message}"

    return respond


def build_app(url: str, api_key: str = "none"):
    import gradio as gr

    url = url.rstrip("/")
    service = service_settings(url, api_key)
    context = service["context_length"]
    default_length = f"{service['max_tokens']} tokens" if service["max_tokens"] else "until the model stops or the context is full"
    controls = [
        gr.Slider(0.0, 2.0, value=service["temperature"], step=0.05, label="temperature"),
        gr.Slider(0, max(200, service["top_k"]), value=service["top_k"], step=1, label="top-k (0: all)"),
        # the prompt takes at least one token; while the context is unknown, 2048 (base_train.py's default context)
        gr.Slider(0, context - 1 if context else 2048, value=0, step=1, label=f"max tokens (0: the service's default, {default_length})"),
    ]
    found = f"context {context} tokens" if context else "its context is unknown: start the service, then restart this page"
    return gr.ChatInterface(make_responder(url, api_key), additional_inputs=controls, title="nanochat",
                            description=f"Talking to {url} ({found})")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        app = build_app(args.url, args.api_key)
    except ImportError:
        print("error: gradio is not installed; pip install -e '.[gradio]'", file=sys.stderr)
        return 2
    app.launch(server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
