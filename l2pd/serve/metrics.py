"""Prometheus metrics of the engines behind one server (``GET /metrics``): read from the engines' counters at
scrape time, plus the server's own (rejections) and a histogram of iteration times."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class EngineCollector:
    def __init__(self, engines: list[Any]) -> None:
        self.engines = engines

    def collect(self):
        es = self.engines
        yield _gauge("l2pd_queue_depth", "requests waiting for a row", sum(len(e.waiting) for e in es))
        yield _gauge("l2pd_active_rows", "requests decoding now", sum(len(e.rows) for e in es))
        yield _gauge("l2pd_tokens_per_second", "answer tokens per second over the last 10 s",
                     sum(e.tokens_per_second() for e in es))
        for name, key, doc in (("l2pd_generated_tokens", "tokens_out", "answer tokens sent"),
                               ("l2pd_forwards", "forwards", "row forwards (one per request per iteration)"),
                               ("l2pd_iterations", "iterations", "engine iterations (packed forwards)"),
                               ("l2pd_fed_tokens", "fed_tokens", "tokens fed to the model"),
                               ("l2pd_logit_rows", "logit_rows", "positions the LM head ran over"),
                               ("l2pd_deferred_refreshes", "deferred_refreshes",
                                "block refreshes put off by the per-iteration token budget"),
                               ("l2pd_ahead_forwards", "ahead", "row forwards launched before the last iteration "
                                "was read back (run-ahead)"),
                               ("l2pd_ahead_wasted_forwards", "ahead_wasted",
                                "row forwards launched ahead for rows found elsewhere (they did not count)")):
            yield _counter(name, doc, sum(e.counters[key] for e in es))
        c = CounterMetricFamily("l2pd_requests", "requests the engines ended, by outcome", labels=["outcome"])
        for outcome in ("finished", "cancelled", "timed_out", "failed"):
            c.add_metric([outcome], sum(e.counters[outcome] for e in es))
        yield c


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Metrics:
    """One registry per server: the engine collector, rejected requests, iteration times."""

    def __init__(self, engines: list[Any]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engines))
        self.rejected = Counter("l2pd_rejected_requests", "requests answered with an error before decoding",
                                ["reason"], registry=self.registry)
        self.step_seconds = Histogram("l2pd_step_seconds", "seconds per engine iteration", buckets=STEP_BUCKETS,
                                      registry=self.registry)
        for e in engines:
            e.observers.append(self.step_seconds.observe)
