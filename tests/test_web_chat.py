"""web_chat.py: the Gradio app builds without serving, and its responder streams from a real service."""

from __future__ import annotations

import sys

import pytest

from serving import ROOT, SCRIPT_ANSWER, ServerProcess, free_port, make_served_model

sys.path.insert(0, str(ROOT))
gr = pytest.importorskip("gradio")
import web_chat  # noqa: E402


def test_builds_an_app_without_starting_a_server():
    app = web_chat.build_app("http://127.0.0.1:1/v1")
    assert isinstance(app, gr.Blocks)


def test_unreachable_service_gives_one_clear_message():
    respond = web_chat.make_responder(f"http://127.0.0.1:{free_port()}/v1", "none")
    replies = list(respond("hi", [], 0.0, 0, 16))
    assert len(replies) == 1 and "Cannot reach the nanochat service" in replies[0]


def test_streams_from_a_running_service(tmp_path):
    make_served_model(tmp_path)
    srv = ServerProcess(tmp_path)
    try:
        respond = web_chat.make_responder(srv.url + "/v1", "none")
        replies = list(respond("hi", [], 0.0, 0, 60))
        assert len(replies) > 1 and replies[-1] == SCRIPT_ANSWER
        assert all(replies[-1].startswith(r) for r in replies)  # each update extends the answer
        refused = list(respond("hi", [{"role": "user", "content": "x"}], 0.0, 0, 60))  # two user turns in a row
        assert refused[-1].startswith("The service refused the request (400)")
    finally:
        srv.close()
