"""Error pacing: a client's occasional mistake is answered at once, a loop of them is slowed to the budget."""

from __future__ import annotations

import time

import httpx
import pytest

from serving.error_pacing import BURST, MAX_WAIT, RATE, ErrorPacer
from served_model import ServerProcess, make_served_model


def test_the_budget_refills_at_its_rate_and_waits_are_capped(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    pacer = ErrorPacer(rate=10, burst=3)
    assert [pacer.charge("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.charge("a") == pytest.approx(0.1)  # one past the burst: one refill's time
    assert pacer.charge("b") == 0.0  # budgets are per client
    clock[0] += 1.0  # ten refills, capped at the burst
    assert [pacer.charge("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert max(pacer.charge("a") for _ in range(100)) == MAX_WAIT


def test_a_garbage_loop_is_slowed_and_a_good_request_is_not(tmp_path):
    make_served_model(tmp_path)
    srv = ServerProcess(tmp_path)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            count = BURST + 20
            started = time.monotonic()
            statuses = {http.post("/v1/chat/completions", content=b"{garbage").status_code for _ in range(count)}
            assert statuses == {400} and time.monotonic() - started >= (count - BURST) / RATE * 0.8
            started = time.monotonic()
            ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert ok.status_code == 200 and time.monotonic() - started < 1.0  # good answers are never held
    finally:
        srv.close()
