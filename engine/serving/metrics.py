"""Prometheus metrics of one server: latencies, tokens, requests and the engine's gauges (no JAX).

/metrics answers without a key (Prometheus scrapers rarely carry one), so nothing here is
labelled by key: every series is by model, final status or HTTP code. A tenant's own figures
live behind GET /v1/usage, which needs its key (issue 11: a tenant never sees another's name or
usage). Each app owns its CollectorRegistry, so two apps in one process (tests) never share
counters. Engine gauges are read at scrape time from the engine thread's last published stats:
the HTTP thread that serves /metrics never touches the engine.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily

from engine.outputs import Usage

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    """The server's metrics; `stats` returns the engine's EngineStats or None while warming."""

    def __init__(self, model_name: str, stats: Callable[[], object | None],
                 ready: Callable[[], bool]):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels, registry = ["model"], self.registry

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.time_to_first_token = histogram(
            "ember_time_to_first_token_seconds", "Arrival to first generated token.",
            _LATENCY_BUCKETS).labels(model_name)
        self.inter_token_latency = histogram(
            "ember_inter_token_latency_seconds", "Time between a request's engine outputs.",
            _ITL_BUCKETS).labels(model_name)
        self.e2e_latency = histogram(
            "ember_e2e_request_latency_seconds", "Arrival to last token.",
            _LATENCY_BUCKETS).labels(model_name)
        self.queue_time = histogram(
            "ember_request_queue_time_seconds", "Arrival to first scheduled step.",
            _LATENCY_BUCKETS).labels(model_name)
        self._prompt_tokens = Counter("ember_prompt_tokens", "Prompt tokens billed.",
                                      labels, registry=registry).labels(model_name)
        self._cached_tokens = Counter("ember_cached_tokens", "Prompt tokens from the prefix cache.",
                                      labels, registry=registry).labels(model_name)
        self._generation_tokens = Counter("ember_generation_tokens", "Tokens generated.",
                                          labels, registry=registry).labels(model_name)
        self._requests = Counter("ember_requests", "Finished requests by ledger status.",
                                 ["model", "status"], registry=registry)
        self._http = Counter("ember_http_responses", "HTTP responses by status code.",
                             ["code"], registry=registry)
        registry.register(_EngineCollector(model_name, stats, ready))

    def count_request(self, key_name: str, status: str, usage: Usage) -> None:
        """Counts a finished request's tokens and final status.

        key_name is deliberately not recorded (see the module docstring); the argument stays
        so that callers need not know which figures are public.
        """
        del key_name
        self._prompt_tokens.inc(usage.prompt_tokens)
        self._cached_tokens.inc(usage.cached_tokens)
        self._generation_tokens.inc(usage.completion_tokens)
        self._requests.labels(self.model_name, status).inc()

    def count_response(self, status_code: int) -> None:
        self._http.labels(str(status_code)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges of the engine's state, read from its last published stats at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], object | None],
                 ready: Callable[[], bool]):
        self._model_name, self._stats, self._ready = model_name, stats, ready

    def collect(self):
        stats = self._stats()
        gauges = {
            "ember_engine_ready": ("1 once the engine has warmed up.", float(self._ready())),
        }
        if stats is not None:
            gauges.update({
                "ember_num_requests_running": ("Sequences running.", stats.num_running),
                "ember_num_requests_waiting": ("Sequences waiting.", stats.num_waiting),
                "ember_kv_page_usage_ratio": ("Fraction of KV pages held by requests.",
                                              stats.page_usage),
                "ember_kv_free_pages": ("KV pages free.", stats.num_free_pages),
                "ember_prefix_cache_hit_rate": ("Prompt tokens served from the prefix cache, "
                                                "over those queried.",
                                                stats.prefix_cache_hit_rate),
                "ember_num_preemptions": ("Preemptions since start.", stats.num_preemptions),
                "ember_compilations_after_warmup": ("XLA compilations after warm-up (0 is the "
                                                    "target).", stats.compilations_after_warmup),
            })
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([self._model_name], float(value))
            yield family
