"""GET /metrics in Prometheus' text format (prometheus_client): the engine's counters and gauges, read at
scrape time, plus HTTP request counts and latency histograms kept by the server.

Names (all prefixed lfm2vl_): requests_total, requests_finished_total{reason}, prompt_tokens_total,
prefilled_tokens_total, generation_tokens_total, vision_crops_total, queue_depth, active_requests,
batch_size (rows in the last decode step), decode_batch_size_mean, slots, image_cache_{hits,misses}_total,
prefix_cache_{hits,misses}_total, prefix_cache_tokens_reused_total, {image,prefix}_cache_bytes,
http_requests_total{path,status}, time_to_first_token_seconds, request_seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

_COUNTERS = {
    "requests": ("requests", "requests submitted to the engine"),
    "prompt_tokens": ("prompt_tokens", "prompt tokens of admitted requests (image tokens included)"),
    "prefilled_tokens": ("prefilled_tokens", "prompt tokens actually prefilled (the rest came from the prefix cache)"),
    "generated_tokens": ("generation_tokens", "tokens generated"),
    "vision_crops": ("vision_crops", "image crops run through the vision tower"),
    "image_cache_hits": ("image_cache_hits", "images whose features came from the image cache"),
    "image_cache_misses": ("image_cache_misses", "images encoded because the image cache lacked them"),
    "prefix_cache_hits": ("prefix_cache_hits", "requests that resumed from a stored prefix"),
    "prefix_cache_misses": ("prefix_cache_misses", "requests with no stored prefix"),
    "prefix_cache_tokens_reused": ("prefix_cache_tokens_reused", "prompt tokens restored from the prefix cache"),
}
_GAUGES = {
    "queued": ("queue_depth", "requests waiting for a slot"),
    "active": ("active_requests", "requests in a slot (prefilling or decoding)"),
    "decoding": ("batch_size", "requests decoding now (rows of the next decode step)"),
    "slots": ("slots", "cache slots (requests that can run at once)"),
    "image_cache_mb": ("image_cache_megabytes", "memory held by the image cache"),
    "prefix_cache_mb": ("prefix_cache_megabytes", "memory held by the prefix cache"),
}


class EngineCollector(Collector):
    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(f"lfm2vl_{name}", doc, value=s[key])
        for key, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(f"lfm2vl_{name}", doc, value=s[key])
        mean = s["decode_rows"] / s["decode_steps"] if s["decode_steps"] else 0.0
        yield GaugeMetricFamily("lfm2vl_decode_batch_size_mean", "mean rows per decode step since start", value=mean)
        done = CounterMetricFamily("lfm2vl_requests_finished", "requests ended, by reason", labels=["reason"])
        for reason in ("stop", "length", "cancelled", "error"):
            done.add_metric([reason], s[f"finished_{reason}"])
        yield done


class Metrics:
    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.http = Counter("lfm2vl_http_requests", "HTTP requests answered, by path and status",
                            ["path", "status"], registry=self.registry)
        self.ttft = Histogram("lfm2vl_time_to_first_token_seconds", "request received -> first token",
                              buckets=_BUCKETS, registry=self.registry)
        self.latency = Histogram("lfm2vl_request_seconds", "request received -> last token",
                                 buckets=_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
