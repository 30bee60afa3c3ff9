"""The chat page in real headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from served_model import FENCED_ANSWER, ServerProcess, make_served_model, make_slow_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


def serve(base, *args):
    srv = ServerProcess(base, *args)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("slow")
    make_slow_model(base)
    return base


@pytest.fixture(scope="module")
def slow_server(slow_model_dir):
    yield from serve(slow_model_dir, "--source", "base")


@pytest.fixture(scope="module")
def slow_server_single(slow_model_dir):
    """The slow model with one decoding slot and one queue place."""
    yield from serve(slow_model_dir, "--source", "base", "--max-batch", "1", "--max-queue", "1")


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    make_served_model(base)
    yield from serve(base)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A model with a 256-token context (less than a fixed max_tokens of 512 would need) that answers 'hi' with a code fence."""
    base = tmp_path_factory.mktemp("small")
    make_served_model(base, sequence_len=256, answer=FENCED_ANSWER)
    return base


@pytest.fixture(scope="module")
def small_server(small_model_dir):
    """Greedy and top-k 5 by default: values a page can only send if it took them from the server."""
    yield from serve(small_model_dir, "-t", "0", "-k", "5")


API_KEY = "sesame"


@pytest.fixture(scope="module")
def keyed_server(small_model_dir):
    yield from serve(small_model_dir, "-t", "0", "--api-key", API_KEY)


def set_setting(page, field: str, value: str) -> None:
    if not page.evaluate("document.querySelector('details.settings').open"):
        page.click("details.settings summary")
    page.fill(field, value)


def ask(page, text: str) -> None:
    """Type a question and send it with Enter."""
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_answered(page) -> None:
    page.wait_for_function("conversation.length === 2 && !document.getElementById('send').disabled", timeout=30000)


def wait_idle(page) -> None:
    """Until the answer asked for has arrived or failed: Send is enabled again."""
    page.wait_for_function("!document.getElementById('send').disabled", timeout=30000)


def error_shown(page) -> str:
    return page.text_content("#error", timeout=1000)


def answer_length(page) -> int:
    return page.evaluate("conversation.length > 1 ? conversation[conversation.length - 1].content.length : 0")


def test_type_stream_stop_new_chat(browser, slow_server):
    page = browser.new_page()
    page.goto(slow_server.url)
    set_setting(page, "#max-tokens", "1500")
    set_setting(page, "#temperature", "0")  # greedy: this answer is known to run long, so Stop always lands mid-answer
    ask(page, "hello world")
    page.wait_for_function("conversation.length === 2 && conversation[1].content.length > 0", timeout=30000)
    first = answer_length(page)
    page.wait_for_function(f"conversation[1].content.length > {first}", timeout=30000)  # tokens keep arriving
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_function("document.getElementById('stop').disabled", timeout=10000)
    stopped_at = answer_length(page)
    time.sleep(0.5)
    assert answer_length(page) == stopped_at
    deadline = time.time() + 5
    while httpx.get(slow_server.url + "/stats").json()["requests_in_flight"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(slow_server.url + "/stats").json()["requests_in_flight"] == 0
    assert page.locator(".message.user").count() == 1 and page.locator(".message.assistant").count() == 1
    assert page.locator(".regenerate").count() == 1
    page.click("#new-chat")
    assert page.locator("#messages .message").count() == 0
    page.close()


def test_edit_a_user_message_resends_it(browser, slow_server):
    page = browser.new_page()
    page.goto(slow_server.url)
    set_setting(page, "#max-tokens", "3")
    ask(page, "first question")
    wait_answered(page)
    page.click(".message.user .edit")
    page.fill(".message.user textarea", "second question")
    page.click(".save-edit")
    wait_answered(page)
    assert page.evaluate("conversation[0].content") == "second question"
    assert page.locator(".message.user .body").inner_text() == "second question"
    page.close()


def test_model_markup_is_shown_as_text(browser, tiny_server):
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(tiny_server.url)
    set_setting(page, "#temperature", "0")
    ask(page, "hi")
    wait_answered(page)
    body = page.locator(".message.assistant .body")
    assert "<script>alert('pwned')</script>" in body.inner_text()
    assert page.locator("#messages script").count() == 0 and dialogs == []
    assert body.locator("strong").inner_text() == "bold" and body.locator("code").inner_text() == "code"
    assert "sft" in page.inner_text("#model-info")
    page.close()


def test_phone_width_has_no_horizontal_scroll(browser, tiny_server):
    page = browser.new_page(viewport={"width": 375, "height": 700})
    page.goto(tiny_server.url)
    page.fill("#input", "hi " * 200)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.is_visible("#send") and page.is_visible("#new-chat")
    page.close()


def test_regenerate_replaces_the_last_answer(browser, tiny_server):
    page = browser.new_page()
    page.goto(tiny_server.url)
    set_setting(page, "#temperature", "0")
    ask(page, "hi")
    wait_answered(page)
    first = page.evaluate("conversation[1].content")
    page.evaluate("conversation[1].content = 'something else'")
    page.click(".regenerate")
    wait_answered(page)
    assert page.evaluate("conversation[1].content") == first
    assert page.locator(".message.assistant").count() == 1
    page.close()


def test_full_queue_is_refused_with_429(slow_server_single):
    url = slow_server_single.url
    body = {"messages": [{"role": "user", "content": "hello world"}], "temperature": 0, "max_tokens": 1500, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/chat/completions", json=body) as busy:
        lines = busy.iter_lines()  # keep a reference: a collected iterator closes the response (a disconnect)
        next(lines)  # the only slot is decoding
        waiting = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=120))
        waiting.start()  # takes the only queue place
        deadline = time.time() + 10
        while httpx.get(url + "/stats").json()["queue_depth"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        refused = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    waiting.join(timeout=120)
    assert httpx.get(url + "/health").status_code == 200


def test_small_model_answers_with_the_servers_defaults(browser, small_server):
    page = browser.new_page()
    page.goto(small_server.url)
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "hi")
    wait_idle(page)
    request = sent.value.post_data_json
    assert (request["temperature"], request["top_k"]) == (0, 5) and "max_tokens" not in request
    assert (page.input_value("#temperature"), page.input_value("#top-k"), page.input_value("#max-tokens")) == ("0", "5", "")
    assert error_shown(page) == "" and page.evaluate("conversation[1].content") == FENCED_ANSWER
    page.close()


def test_code_fence_is_shown_as_code(browser, small_server):
    page = browser.new_page()
    page.goto(small_server.url)
    ask(page, "hi")
    wait_idle(page)
    body = page.locator(".message.assistant .body")
    assert body.locator("pre code").text_content() == "print('hi')\n"
    assert body.locator("p").all_inner_texts() == ["Run this:", "Done."]
    page.close()


def test_second_question_in_the_same_chat(browser, small_server):
    page = browser.new_page()
    page.goto(small_server.url)
    ask(page, "hi")
    wait_idle(page)
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "and again?")
    wait_idle(page)
    assert sent.value.post_data_json["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": FENCED_ANSWER},
                                                     {"role": "user", "content": "and again?"}]
    assert error_shown(page) == "" and page.evaluate("conversation.length") == 4 and page.evaluate("conversation[3].content")
    assert page.locator(".message.assistant").count() == 2
    page.close()


def test_a_key_is_asked_for_then_used(browser, keyed_server):
    page = browser.new_page()
    page.goto(keyed_server.url)
    with page.expect_response("**/v1/chat/completions") as refused:
        ask(page, "hi")
    wait_idle(page)
    assert refused.value.status == 401 and "API key" in error_shown(page)
    assert page.is_visible("#api-key")
    assert page.input_value("#input") == "hi" and page.evaluate("conversation.length") == 0  # ready to send again
    page.fill("#api-key", API_KEY)
    page.press("#input", "Enter")
    wait_idle(page)
    assert error_shown(page) == "" and page.evaluate("conversation[1].content") == FENCED_ANSWER
    page.close()


def test_errors_are_shown_and_the_chat_goes_on(browser, small_server):
    page = browser.new_page()
    page.goto(small_server.url)
    too_long = "hello world " * 300
    ask(page, too_long)
    wait_idle(page)
    assert "the model's context is 256" in error_shown(page)
    assert page.input_value("#input") == too_long.strip() and page.locator("#messages .message").count() == 0
    set_setting(page, "#max-tokens", "100000")
    ask(page, "hi")
    wait_idle(page)
    assert page.input_value("#max-tokens") == "255"  # no prompt leaves more
    assert "max_tokens=255 does not fit" in error_shown(page)
    set_setting(page, "#max-tokens", "")
    page.press("#input", "Enter")
    wait_idle(page)
    assert error_shown(page) == "" and page.evaluate("conversation[1].content") == FENCED_ANSWER
    page.close()


def test_training_curves_in_the_model_info(browser, small_server, small_model_dir, tmp_path):
    from nanochat.curves import MetricsLog, draw

    log = MetricsLog(tmp_path / "metrics.jsonl", keep_through=0)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 3.0 / step, "tok_per_s": 1000.0 * step})
    png = draw(log.path, "sft d2", small_model_dir / "report" / "curves-sft.png")
    page = browser.new_page()
    try:
        page.goto(small_server.url)
        page.wait_for_selector("#curves summary", state="visible", timeout=15000)  # hidden while there are none
        page.click("#curves summary")
        page.wait_for_function("document.querySelectorAll('#curve-images img').length === 1 && "
                               "document.querySelector('#curve-images img').naturalWidth > 100", timeout=15000)
        assert page.get_attribute("#curve-images img", "alt") == "curves-sft.png"
    finally:
        page.close()
        png.unlink()
