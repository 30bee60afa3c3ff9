"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1, the `openai` client, httpx."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from openai import OpenAI

from served_model import SCRIPT_ANSWER, ServerProcess, make_served_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    make_served_model(base)
    return base


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--max-batch", "8", "--max-messages", "6", "--max-message-chars", "400", "--max-total-chars", "1000")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


HI = [{"role": "user", "content": "hi"}]


def test_openai_client_non_streaming(client):
    resp = client.chat.completions.create(model="nanochat", messages=HI, temperature=0, max_tokens=60)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == SCRIPT_ANSWER
    assert choice.finish_reason == "stop" and resp.object == "chat.completion" and resp.model == "nanochat"
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_reassembles_to_the_same_answer(client):
    messages = [{"role": "user", "content": "tell me about the world"}]
    whole = client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=40)
    stream = client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0


def test_n_samples_seed_and_stop(client):
    resp = client.chat.completions.create(model="nanochat", messages=HI, temperature=1.0, n=3, seed=7, max_tokens=20)
    again = client.chat.completions.create(model="nanochat", messages=HI, temperature=1.0, n=3, seed=7, max_tokens=20)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [c.message.content for c in again.choices]
    stopped = client.chat.completions.create(model="nanochat", messages=HI, temperature=0, stop=["alert"], max_tokens=60)
    assert stopped.choices[0].message.content == "<script>" and stopped.choices[0].finish_reason == "stop"
    top_k_ext = client.chat.completions.create(model="nanochat", messages=HI, temperature=1.5, max_tokens=60, extra_body={"top_k": 1})
    assert top_k_ext.choices[0].message.content == SCRIPT_ANSWER


def test_models_health_stats(server, client):
    client.chat.completions.create(model="nanochat", messages=HI, max_tokens=3)  # its own, whatever ran before
    models = client.models.list()
    assert [m.id for m in models.data] == ["nanochat"]
    meta = httpx.get(server.url + "/v1/models").json()["data"][0]["metadata"]
    assert meta["source"] == "sft" and meta["step"] == 200 and meta["parameters"] > 0
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    stats = httpx.get(server.url + "/stats").json()
    for key in ("uptime_seconds", "requests_served", "requests_in_flight", "queue_depth", "tokens_generated", "recent_tokens_per_second", "model"):
        assert key in stats
    assert stats["requests_served"] >= 1 and stats["tokens_generated"] > 0 and stats["model"]["device"] == "cpu"
    served = stats["requests_served"]
    client.chat.completions.create(model="nanochat", messages=HI, max_tokens=3)  # whole
    list(client.chat.completions.create(model="nanochat", messages=HI, max_tokens=3, stream=True))  # streamed
    assert httpx.get(server.url + "/stats").json()["requests_served"] == served + 2  # each answer counted once


def _chat(**fields):
    return {"model": "nanochat", "messages": HI, **fields}


MALFORMED = [
    ("not json", "POST", "/v1/chat/completions", b"{not json", 400),
    ("truncated json", "POST", "/v1/chat/completions", b'{"messages": [', 400),
    ("json array", "POST", "/v1/chat/completions", [1, 2], 400),
    ("json string", "POST", "/v1/chat/completions", "hello", 400),
    ("empty body", "POST", "/v1/chat/completions", b"", 400),
    ("no messages", "POST", "/v1/chat/completions", {"model": "nanochat"}, 400),
    ("messages not a list", "POST", "/v1/chat/completions", _chat(messages="hi"), 400),
    ("empty messages", "POST", "/v1/chat/completions", _chat(messages=[]), 400),
    ("too many messages", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 3 + HI), 400),
    ("unknown role", "POST", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("missing content", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user"}]), 400),
    ("content wrong type", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": 42}]), 400),
    ("content too long", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x" * 401}]), 400),
    ("total too long", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x" * 390}, {"role": "assistant", "content": "y" * 390}, {"role": "user", "content": "z" * 390}]), 400),
    ("empty user message", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "   "}]), 400),
    ("ends with assistant", "POST", "/v1/chat/completions", _chat(messages=HI + [{"role": "assistant", "content": "yo"}]), 400),
    ("two users in a row", "POST", "/v1/chat/completions", _chat(messages=HI + HI), 400),
    ("only a system message", "POST", "/v1/chat/completions", _chat(messages=[{"role": "system", "content": "be nice"}]), 400),
    ("an image", "POST", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]), 400),
    ("a tool call", "POST", "/v1/chat/completions", _chat(messages=HI + [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}] + HI), 400),
    ("a tool message", "POST", "/v1/chat/completions", _chat(messages=HI + [{"role": "tool", "content": "4", "tool_call_id": "1"}]), 400),
    ("temperature too high", "POST", "/v1/chat/completions", _chat(temperature=2.5), 400),
    ("temperature negative", "POST", "/v1/chat/completions", _chat(temperature=-0.1), 400),
    ("temperature a word", "POST", "/v1/chat/completions", _chat(temperature="hot"), 400),
    ("top_p zero", "POST", "/v1/chat/completions", _chat(top_p=0), 400),
    ("top_p above one", "POST", "/v1/chat/completions", _chat(top_p=1.5), 400),
    ("top_k negative", "POST", "/v1/chat/completions", _chat(top_k=-1), 400),
    ("max_tokens zero", "POST", "/v1/chat/completions", _chat(max_tokens=0), 400),
    ("max_tokens over context", "POST", "/v1/chat/completions", _chat(max_tokens=5000), 400),
    ("max_completion_tokens over context", "POST", "/v1/chat/completions", _chat(max_completion_tokens=5000), 400),
    ("n zero", "POST", "/v1/chat/completions", _chat(n=0), 400),
    ("n above slots", "POST", "/v1/chat/completions", _chat(n=9), 400),
    ("stream not a bool", "POST", "/v1/chat/completions", _chat(stream="yes"), 400),
    ("too many stops", "POST", "/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), 400),
    ("empty stop", "POST", "/v1/chat/completions", _chat(stop=[""]), 400),
    ("seed not an int", "POST", "/v1/chat/completions", _chat(seed="abc"), 400),
    ("seed beyond 64 bits", "POST", "/v1/chat/completions", _chat(seed=2**64), 400),
    ("max_tokens a bool", "POST", "/v1/chat/completions", _chat(max_tokens=True), 400),
    ("max_tokens a string", "POST", "/v1/chat/completions", _chat(max_tokens="5"), 400),
    ("unknown model", "POST", "/v1/chat/completions", _chat(model="gpt-9"), 404),
    ("unknown path", "GET", "/v1/nothing", None, 404),
    ("wrong method", "GET", "/v1/chat/completions", None, 405),
]


@pytest.mark.parametrize("name,method,path,body,status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_errors(server, name, method, path, body, status):
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    resp = httpx.request(method, server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_unknown_fields_are_ignored_and_server_stays_healthy(server, client):
    resp = httpx.post(server.url + "/v1/chat/completions", json=_chat(temperature=0, max_tokens=60, frobnicate=True, user="x"), timeout=30)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == SCRIPT_ANSWER
    assert httpx.get(server.url + "/health").status_code == 200


def test_eight_concurrent_streams_are_correct_and_isolated(client):
    prompts = [f"hello {i} world" for i in range(7)] + ["hi"]
    expected = [client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": p}], temperature=0, max_tokens=30).choices[0].message.content for p in prompts]
    results = [None] * len(prompts)

    def stream(i):
        chunks = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=30, stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected and results[-1] == SCRIPT_ANSWER


def test_api_key_required_when_configured(model_dir):
    srv = ServerProcess(model_dir, "--api-key", "s3cret", "--cors", "http://example.com")
    try:
        anonymous = httpx.post(srv.url + "/v1/chat/completions", json=_chat(max_tokens=5))
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/report/curves").status_code == 401  # the curves are behind the key too
        ok = OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0).chat.completions.create(model="nanochat", messages=HI, temperature=0, max_tokens=60)
        assert ok.choices[0].message.content == SCRIPT_ANSWER
        preflight = httpx.options(srv.url + "/v1/chat/completions", headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert preflight.headers.get("access-control-allow-origin") == "http://example.com"
    finally:
        banner = srv.close()
    assert "auth: bearer API key required" in banner


def test_open_server_says_so(model_dir):
    srv = ServerProcess(model_dir)
    assert httpx.get(srv.url + "/v1/models").status_code == 200
    banner = srv.close()
    assert "auth: none" in banner and "/v1" in banner


# ---------------------------------------------------------------- OpenAI features, through the real client


def test_logprobs_whole_and_streamed_agree_with_the_answer(client):
    asked = dict(model="nanochat", messages=HI, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**asked)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens == 8
    assert b"".join(bytes(e.bytes) for e in entries).decode() == whole.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy takes the likeliest
        assert e.logprob <= 0 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    streamed = [e for c in client.chat.completions.create(**asked, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    plain = client.chat.completions.create(model="nanochat", messages=HI, temperature=0, max_tokens=8)
    assert plain.choices[0].logprobs is None


def test_developer_role_is_the_system_role(client):
    def answer(role):
        messages = [{"role": role, "content": "be brief"}, *HI]
        return client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=20).choices[0].message.content

    assert answer("developer") == answer("system")


def test_features_this_model_lacks_are_refused_not_ignored(client):
    import openai

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra in ({"response_format": {"type": "json_object"}}, {"tools": [tool]}, {"tool_choice": "required"}):
        with pytest.raises(openai.BadRequestError, match="not supported by this model"):
            client.chat.completions.create(model="nanochat", messages=HI, max_tokens=5, **extra)
    text = client.chat.completions.create(model="nanochat", messages=HI, max_tokens=5, response_format={"type": "text"})
    assert text.choices[0].message.content


def test_a_max_tokens_past_the_context_is_refused_saying_how_many_fit(client):
    import openai

    context = client.models.list().data[0].model_extra["context_length"]
    prompt = client.chat.completions.create(model="nanochat", messages=HI, max_tokens=1).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match=f"at most {context - prompt} can follow") as refused:
        client.chat.completions.create(model="nanochat", messages=HI, max_tokens=context)
    assert refused.value.code == "context_length_exceeded"
    fits = client.chat.completions.create(model="nanochat", messages=HI, max_tokens=context - prompt, temperature=0)
    assert fits.choices[0].message.content == SCRIPT_ANSWER  # the largest value it names is taken


def test_without_max_tokens_the_answer_runs_to_its_end_and_usage_streams(client):
    whole = client.chat.completions.create(model="nanochat", messages=HI, temperature=0)
    assert whole.choices[0].message.content == SCRIPT_ANSWER and whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="nanochat", messages=HI, temperature=0, max_completion_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_head_health_and_trailing_slashes(server):
    assert httpx.head(server.url + "/health").status_code == 200
    resp = httpx.post(server.url + "/v1/chat/completions/", json=_chat(temperature=0, max_tokens=60))
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == SCRIPT_ANSWER
    assert OpenAI(base_url=server.url + "/v1/", api_key="unused").models.list().data[0].id == "nanochat"


def test_text_completions_for_plain_prompts(client):
    whole = client.completions.create(model="nanochat", prompt="hello world", max_tokens=6, temperature=0, logprobs=2)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.finish_reason in ("length", "stop") and whole.usage.completion_tokens >= 1
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.token_logprobs) == whole.usage.completion_tokens
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="nanochat", prompt="hello world", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == choice.text


def test_prometheus_metrics(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="nanochat", messages=HI, temperature=0, max_tokens=5)
    httpx.post(server.url + "/v1/chat/completions", content=b"{")
    text = httpx.get(server.url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("nanochat_http_responses_total", (("route", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert samples[("nanochat_http_responses_total", (("route", "/v1/chat/completions"), ("status", "400")))] >= 1
    assert samples[("nanochat_generated_tokens_total", ())] >= 5
    assert samples[("nanochat_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("nanochat_time_per_output_token_seconds_count", ())] >= 4
    assert samples[("nanochat_slots", ())] == 8 and samples[("nanochat_slots_in_use", ())] == 0
    assert samples[("nanochat_queue_depth", ())] == 0


# ---------------------------------------------------------------- the report's training curves


def test_training_curves_are_listed_and_served_and_nothing_else_is(server, model_dir, tmp_path):
    from nanochat.curves import MetricsLog, draw

    log = MetricsLog(tmp_path / "metrics.jsonl", keep_through=0)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 3.0 / step, "lrm": 1.0})
    report = model_dir / "report"
    png = draw(log.path, "base d2", report / "curves-base.png").read_bytes()
    (report / "report.md").write_text("# the card")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    (report / "curves-evil.png").symlink_to(tmp_path / "secret.png")  # a link out of the folder is not served
    try:
        assert httpx.get(server.url + "/report/curves").json() == {"curves": ["curves-base.png"]}
        got = httpx.get(server.url + "/report/curves/curves-base.png")
        assert got.status_code == 200 and got.headers["content-type"] == "image/png" and got.content == png
        for name in ("curves-evil.png", "report.md", "..%2Freport%2Freport.md", "..%2F..%2Fsecret.png", "%2e%2e",
                     "curves-base.png%00.md", "%2Fetc%2Fpasswd", "curves-..%2Fcurves-base.png"):
            refused = httpx.get(f"{server.url}/report/curves/{name}")
            assert refused.status_code == 404 and "secret" not in refused.text and "error" in refused.json(), name
    finally:
        (report / "curves-evil.png").unlink()


# ---------------------------------------------------------------- the whole legacy completions protocol


def _complete(server, **fields) -> dict:
    resp = httpx.post(server.url + "/v1/completions", json={"model": "nanochat", "temperature": 0, **fields}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_token_id_prompts_and_prompt_lists_make_one_choice_each_in_order(server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()["tokens"]
    alone = [_complete(server, prompt=p, max_tokens=5)["choices"][0]["text"] for p in ("hello world", "the answer")]
    assert _complete(server, prompt=ids, max_tokens=5)["choices"][0]["text"] == alone[0]  # text and its ids read alike
    both = _complete(server, prompt=["hello world", "the answer"], max_tokens=5, n=2)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in both["choices"]] == [alone[0], alone[0], alone[1], alone[1]]  # n x prompts, prompt by prompt
    as_ids = _complete(server, prompt=[ids, ids[:1]], max_tokens=5)
    assert as_ids["choices"][0]["text"] == alone[0] and as_ids["usage"]["prompt_tokens"] == 2 * 1 + len(ids) + 1  # each after a <|bos|>


def test_echo_scores_the_prompt_with_the_first_token_null_then_the_completion(server):
    scored = _complete(server, prompt="<|bos|>hello world", max_tokens=0, echo=True, logprobs=2)["choices"][0]
    assert scored["text"] == "<|bos|>hello world" and scored["finish_reason"] == "length"
    lp = scored["logprobs"]
    assert lp["tokens"] == ["<|bos|>", "hello", " world"] and lp["text_offset"] == [0, 7, 12]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes it
    assert all(v < 0 for v in lp["token_logprobs"][1:]) and all(len(top) == 2 for top in lp["top_logprobs"][1:])
    # without the <|bos|> the server reads the prompt after one of its own: the same scores, none echoed
    implied = _complete(server, prompt="hello world", max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]
    assert implied["tokens"] == ["hello", " world"] and implied["token_logprobs"] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    generated = _complete(server, prompt="hello world", max_tokens=3, logprobs=1)["choices"][0]
    echoed = _complete(server, prompt="hello world", max_tokens=3, logprobs=1, echo=True)["choices"][0]
    assert echoed["text"] == "hello world" + generated["text"]
    assert echoed["logprobs"]["tokens"] == ["hello", " world"] + generated["logprobs"]["tokens"]
    assert echoed["logprobs"]["token_logprobs"][2:] == pytest.approx(generated["logprobs"]["token_logprobs"], abs=1e-5)
    streamed = [json.loads(line[6:]) for line in httpx.post(server.url + "/v1/completions", json={
        "prompt": "hello world", "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1, "stream": True}).text.splitlines()
        if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in streamed) == echoed["text"]


def test_a_prompt_that_fills_the_context_can_be_scored_but_not_continued(server, client):
    context = client.models.list().data[0].model_extra["context_length"]
    bos = httpx.post(server.url + "/tokenize", json={"prompt": "<|bos|>", "add_special_tokens": False}).json()["tokens"]
    full = bos + [5] * (context - 1)  # starting with <|bos|>, so the server adds none
    assert len(_complete(server, prompt=full, max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]["tokens"]) == context
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": [bos + [5], full], "max_tokens": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt[1]"
    assert refused.json()["error"]["code"] == "context_length_exceeded"


def test_tokenizer_endpoints_in_vllms_shapes(server):
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"]) == ("<|bos|>", "<|assistant_end|>") and "<|user_start|>" in info["chat_template"]
    plain = httpx.post(server.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    with_bos = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    bos = httpx.post(server.url + "/tokenize", json={"prompt": "<|bos|>", "add_special_tokens": False}).json()["tokens"]
    assert with_bos["tokens"] == bos + plain["tokens"] and with_bos["count"] == len(with_bos["tokens"]) and plain["max_model_len"] > 0
    assert httpx.post(server.url + "/detokenize", json={"tokens": with_bos["tokens"]}).json() == {"prompt": "<|bos|>hello world"}
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


def test_system_and_developer_messages_anywhere_join_in_order(client):
    def answer(messages):
        return client.chat.completions.create(model="nanochat", messages=messages, temperature=0, max_tokens=20).choices[0].message.content

    scattered = [{"role": "developer", "content": "be"}, HI[0], {"role": "assistant", "content": "ok"},
                 {"role": "system", "content": [{"type": "text", "text": "brief"}]}, HI[0]]
    joined = [{"role": "system", "content": "be\n\nbrief"}, HI[0], {"role": "assistant", "content": "ok"}, HI[0]]
    assert answer(scattered) == answer(joined)
