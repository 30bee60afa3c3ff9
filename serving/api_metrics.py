"""Prometheus metrics for the server (GET /metrics), each app with its own registry.

Counted: HTTP responses by route and status, generated tokens; histograms of
time to first token and time per output token; gauges of the queue depth and
the cache slots in use, read from the engine when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Routes are labelled by name; anything else is "other", so a scan of random paths cannot grow the label set.
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/config", "/stats", "/metrics", "/")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.responses = Counter("nanochat_http_responses", "HTTP responses sent, by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("nanochat_generated_tokens", "tokens generated for clients", registry=r)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("nanochat_time_per_output_token_seconds", "between consecutive tokens of one sample",
                                   buckets=TOKEN_BUCKETS, registry=r)
        Gauge("nanochat_queue_depth", "requests waiting for a slot", registry=r).set_function(engine.queue_depth)
        Gauge("nanochat_slots_in_use", "cache slots held by running samples", registry=r).set_function(engine.slots_in_use)
        Gauge("nanochat_slots", "cache slots (--max-batch)", registry=r).set(engine.cache.slots)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountResponses:
    """ASGI middleware counting every HTTP response by route and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = False

        async def send_counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.responses.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            # an unexpected error is answered (500) by Starlette's outermost middleware, outside this one
            if not started:
                self.metrics.responses.labels(route, "500").inc()
            raise


class TokenClock:
    """Times one request's tokens into the histograms: the first from arrival, each next from the one before (per sample)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics, self.started = metrics, time.monotonic()
        self.last: dict[int, float] = {}

    def tokens(self, index: int, count: int = 1) -> None:
        """`count` tokens of sample `index` arrived together (a stream holding them for its interval, or a
        consumer that fell behind): the gap since that sample's last arrival is spread over them, so the
        time-per-token histogram gets one entry for every token but each sample's first, and its mean and
        quantiles stay those of the time per token."""
        now = time.monotonic()
        self.metrics.tokens.inc(count)
        if index in self.last:
            gaps = [(now - self.last[index]) / count] * count
        else:  # the sample's first token starts its clock (the request's first also times TTFT); the rest came with it
            if not self.last:
                self.metrics.ttft.observe(now - self.started)
            gaps = [0.0] * (count - 1)
        for gap in gaps:
            self.metrics.per_token.observe(gap)
        self.last[index] = now
