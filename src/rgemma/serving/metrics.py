"""``GET /metrics``: the engine's and the server's numbers for Prometheus.

Each server has its own ``CollectorRegistry``, so several servers in one
process (tests, benchmarks) do not mix their numbers. The engine keeps its
own counters; :class:`EngineCollector` reads a snapshot of them at each
scrape. HTTP responses are counted by :class:`ResponseCounter`, an ASGI
middleware, and by the server's last-resort error handler (Starlette answers
unhandled exceptions outside the middleware stack).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "rgemma_"
# EngineStats attribute -> the help of its metric, PREFIX + the attribute; or (metric name
# without PREFIX, help) where the name differs. Counters get Prometheus' "_total" suffix.
ENGINE_COUNTERS = {
    "prompt_tokens": "Prompt tokens prefilled.",
    "prompt_tokens_cached": "Prompt tokens reused from the prefix cache.",
    "generated_tokens": ("generation_tokens", "Tokens generated."),
    "steps": ("engine_steps", "Scheduler iterations."),
    "prefix_cache_hits": "Prompts that reused a cached prefix.",
}
ENGINE_GAUGES = {
    "waiting": ("queue_depth", "Requests waiting for batch rows."),
    "prefilling": ("prefilling_requests", "Requests being prefilled."),
    "active_slots": "Batch rows decoding.",
    "reserved_slots": "Batch rows reserved by prefilling requests.",
    "max_slots": "Batch rows in all.",
    "tokens_per_second": (
        "generation_tokens_per_second",
        "Generated tokens per second (last 10 s).",
    ),
    "prefix_cache_entries": "Prefix states cached.",
    "prefix_cache_bytes": "Bytes of cached prefix states.",
}
REQUEST_OUTCOMES = ("submitted", "finished", "cancelled", "failed", "rejected")


class EngineCollector(Collector):
    """The engine's counters and gauges (``Engine.stats()``), read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        requests = CounterMetricFamily(
            PREFIX + "requests", "Engine requests by outcome.", labels=["outcome"]
        )
        for outcome in REQUEST_OUTCOMES:
            requests.add_metric([outcome], getattr(s, f"requests_{outcome}"))
        yield requests
        for family, table in (
            (CounterMetricFamily, ENGINE_COUNTERS),
            (GaugeMetricFamily, ENGINE_GAUGES),
        ):
            for attr, spec in table.items():
                name, help_ = spec if isinstance(spec, tuple) else (attr, spec)
                yield family(PREFIX + name, help_, value=getattr(s, attr))


class ServerMetrics:
    """The registry of one server: the engine's numbers and the HTTP responses."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.responses = Counter(
            PREFIX + "http_responses",
            "HTTP responses by status code.",
            ["code"],
            registry=self.registry,
        )

    def count_response(self, status: int) -> None:
        self.responses.labels(code=str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class ResponseCounter:
    """ASGI middleware: counts every HTTP response by status code."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_response(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
