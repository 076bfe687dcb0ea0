"""Prometheus metrics for ``GET /metrics``, through ``prometheus-client``.

The engine's own counters (tokens in and out, steps, batch, queue, resident adapters) are read
when Prometheus scrapes; what only the server sees (requests by endpoint and status, time to
first token) is counted as it happens. Each app has its own registry, so several servers in one
process (tests) never mix their numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class _EngineCollector:
    def __init__(self, engine: Any, served: Callable[[], list[str]]) -> None:
        self.engine, self.served = engine, served

    def collect(self) -> Iterator[Metric]:
        stats, load = self.engine.stats, self.engine.load()
        yield CounterMetricFamily(
            "softprompt_prompt_tokens",
            "Prompt tokens prefilled (virtual tokens excluded: their keys/values are cached).",
            value=stats.prompt_tokens,
        )
        yield CounterMetricFamily(
            "softprompt_generation_tokens", "Tokens generated.", value=stats.generated_tokens
        )
        yield CounterMetricFamily(
            "softprompt_engine_steps", "Engine steps (one decode step each).", value=stats.steps
        )
        yield CounterMetricFamily(
            "softprompt_prefill_seconds",
            "Seconds the engine spent prefilling joining requests.",
            value=stats.prefill_seconds,
        )
        yield CounterMetricFamily(
            "softprompt_decode_seconds",
            "Seconds the engine spent in decode steps.",
            value=stats.decode_seconds,
        )
        for name, text, histogram in (
            (
                "softprompt_engine_time_to_first_token_seconds",
                "Seconds from a request's arrival in the engine to its first new token.",
                stats.time_to_first_token,
            ),
            (
                "softprompt_longest_token_gap_seconds",
                "Per finished request with two new tokens or more: the longest wait between "
                "two of them (a stream stalled behind other work).",
                stats.longest_gap,
            ),
        ):
            buckets = [
                (f"{bound:g}", count)
                for bound, count in zip(histogram.bounds, histogram.counts, strict=True)
            ]
            buckets.append(("+Inf", histogram.count))
            yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=histogram.total)
        cache = getattr(self.engine, "prefix_cache", None)
        if cache is not None:
            yield CounterMetricFamily(
                "softprompt_prefix_cache_queried_tokens",
                "Prompt tokens looked up in the prefix cache.",
                value=cache.stats.queried_tokens,
            )
            yield CounterMetricFamily(
                "softprompt_prefix_cache_hit_tokens",
                "Prompt tokens whose keys/values were reused from the prefix cache.",
                value=cache.stats.hit_tokens,
            )
            yield GaugeMetricFamily(
                "softprompt_prefix_cache_hit_rate",
                "Share of the prompt tokens looked up that were reused, since start-up.",
                value=cache.stats.hit_rate,
            )
            yield GaugeMetricFamily(
                "softprompt_prefix_cache_bytes",
                f"Memory held by the prefix cache (at most {cache.max_bytes} bytes).",
                value=cache.nbytes,
            )
            yield CounterMetricFamily(
                "softprompt_prefix_cache_evicted_blocks",
                "Blocks dropped from the prefix cache to stay within its memory.",
                value=cache.stats.evicted_blocks,
            )
        yield GaugeMetricFamily(
            "softprompt_batch_size", "Requests in the running batch now.", value=load["running"]
        )
        yield GaugeMetricFamily(
            "softprompt_queue_length",
            "Requests waiting for a place in the batch.",
            value=load["waiting"],
        )
        yield GaugeMetricFamily(
            "softprompt_adapters_resident",
            "Adapters whose prefix is in memory now.",
            value=len(self.engine.registry.resident()),
        )
        report = getattr(self.engine, "health", None)  # serve --upstream: its vLLM servers
        if report is not None:
            upstreams = report()
            healthy = GaugeMetricFamily(
                "softprompt_upstream_healthy", "1 while the upstream answers.", labels=["upstream"]
            )
            flying = GaugeMetricFamily(
                "softprompt_upstream_in_flight",
                "Requests at the upstream now.",
                labels=["upstream"],
            )
            failures = CounterMetricFamily(
                "softprompt_upstream_failures",
                "Requests the upstream failed (refused, reset, 5xx, silent).",
                labels=["upstream"],
            )
            for u in upstreams:
                healthy.add_metric([u["url"]], int(u["healthy"]))
                flying.add_metric([u["url"]], u["in_flight"])
                failures.add_metric([u["url"]], u["failures"])
            yield from (healthy, flying, failures)
        yield GaugeMetricFamily(
            "softprompt_adapters_served",
            "Adapters served from the folder.",
            value=len(self.served()),
        )


LAG_INTERVAL = 0.05
"""Seconds between two readings of the event loop's lag."""


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text and its content type."""

    def __init__(self, engine: Any, served: Callable[[], list[str]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, served))  # type: ignore[arg-type]
        self.requests = Counter(
            "softprompt_requests",
            "Generation requests answered, by endpoint and HTTP status (499: client left).",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "softprompt_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

        self.loop_lag = Histogram(
            "softprompt_event_loop_lag_seconds",
            f"How late the server's event loop woke from a {LAG_INTERVAL * 1000:g} ms sleep, "
            "read continuously: work done on the loop delays every client by this much.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self._watched: asyncio.AbstractEventLoop | None = None
        self._lag_task: asyncio.Task[None] | None = None

    def watch_loop(self) -> None:
        """Read the running event loop's lag from now on (once per loop; called per request)."""
        loop = asyncio.get_running_loop()
        if self._watched is loop:
            return
        self._watched = loop
        self._lag_task = loop.create_task(self._read_lag())

    async def _read_lag(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(LAG_INTERVAL)
            self.loop_lag.observe(max(0.0, time.perf_counter() - start - LAG_INTERVAL))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
