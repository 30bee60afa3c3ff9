"""A Gradio chat page in front of a running chat_service, through the OpenAI protocol.

    ./chat_service.sh &
    python web_chat.py                          # http://localhost:7860
    python web_chat.py --share                  # plus a temporary public gradio.live link
    python web_chat.py --url http://spark.local:8000/v1 --api-key KEY

Needs the optional extra: pip install -e '.[gradio]'
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gradio chat page for a running nanochat service.")
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


def make_responder(url: str, api_key: str):
    """The streaming function behind the chat box: yields the growing answer, or one clear error line."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=60)

    def respond(message: str, history: list, temperature: float, top_k: int, max_tokens: int):
        messages = history_messages(history) + [{"role": "user", "content": message}]
        answer = ""
        try:
            stream = client.chat.completions.create(
                model="nanochat", messages=messages, stream=True, temperature=temperature,
                max_tokens=int(max_tokens), extra_body={"top_k": int(top_k)},
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

    controls = [
        gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="temperature"),
        gr.Slider(0, 200, value=50, step=1, label="top-k (0: all)"),
        gr.Slider(16, 2048, value=512, step=16, label="max tokens"),
    ]
    return gr.ChatInterface(make_responder(url, api_key), additional_inputs=controls, title="nanochat",
                            description=f"Talking to {url}")


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
