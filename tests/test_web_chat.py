"""web_chat.py: the Gradio app builds without serving, and its controls and responder follow a real service."""

from __future__ import annotations

import sys

import pytest

from served_model import ROOT, SCRIPT_ANSWER, ServerProcess, free_port, make_served_model

sys.path.insert(0, str(ROOT))
gr = pytest.importorskip("gradio")
import web_chat  # noqa: E402


@pytest.fixture(scope="module")
def small_service(tmp_path_factory):
    """A model with a 256-token context under sampling defaults the page can only show if it read them (greedy, top-k 5)."""
    base = tmp_path_factory.mktemp("small")
    make_served_model(base, sequence_len=256)
    srv = ServerProcess(base, "-t", "0", "-k", "5")
    yield srv
    srv.close()


def test_builds_an_app_without_starting_a_server():
    app = web_chat.build_app(f"http://127.0.0.1:{free_port()}/v1")
    assert isinstance(app, gr.Blocks) and "context is unknown" in app.description


def test_unreachable_service_gives_one_clear_message():
    respond = web_chat.make_responder(f"http://127.0.0.1:{free_port()}/v1", "none")
    replies = list(respond("hi", [], 0.0, 0, 16))
    assert len(replies) == 1 and "Cannot reach the nanochat service" in replies[0]


def test_streams_from_a_running_service(small_service):
    respond = web_chat.make_responder(small_service.url + "/v1", "none")
    replies = list(respond("hi", [], 0.0, 0, 60))
    assert len(replies) > 1 and replies[-1] == SCRIPT_ANSWER
    assert all(replies[-1].startswith(r) for r in replies)  # each update extends the answer
    refused = list(respond("hi", [{"role": "user", "content": "x"}], 0.0, 0, 60))  # two user turns in a row
    assert refused[-1].startswith("The service refused the request (400)")


def test_controls_start_from_the_service_and_stay_within_its_context(small_service):
    app = web_chat.build_app(small_service.url + "/v1/")
    temperature, top_k, max_tokens = app.additional_inputs
    assert (temperature.value, top_k.value) == (0, 5)
    assert max_tokens.value == 0 and max_tokens.maximum == 255
    respond = web_chat.make_responder(small_service.url + "/v1", "none")
    assert list(respond("hi", [], temperature.value, top_k.value, max_tokens.value))[-1] == SCRIPT_ANSWER  # 0: no max_tokens sent
