"""Prometheus metrics, one registry per app (so tests and several apps in a process never collide).

Names: prefix `genrec_`, base units (seconds), counters end in `_total`; labels only from small fixed
sets (endpoint = route template, status code, stage, reason, operation, model name/version).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Around a 50 ms budget: fine steps below it, coarse ones to 1 s.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("history", "queue", "engine", "response")
REJECTION_REASONS = ("queue_full", "over_budget", "deadline", "draining", "not_ready", "body_too_large",
                     "read_timeout", "client_rate", "unauthorized", "forbidden", "spool_full")
EVENT_OUTCOMES = ("stored", "spooled", "duplicate")
STRATEGIES = ("generative", "popular")


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "genrec_requests_total", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "genrec_request_duration_seconds", "HTTP request duration", ["endpoint"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.in_flight = Gauge("genrec_requests_in_flight", "HTTP requests being served", registry=r)
        self.stage_duration = Histogram(
            "genrec_stage_duration_seconds", "Time a /recommend request spends per stage", ["stage"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.queue_wait = Histogram(
            "genrec_queue_wait_seconds", "Time from enqueue to the start of the request's engine batch",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.batch_size = Histogram(
            "genrec_batch_size", "Requests per engine call", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        # Against the "engine" stage (dispatch to result seen by the event loop), the difference is
        # thread hand-off and how long a busy event loop took to notice the finished batch.
        self.engine_compute = Histogram(
            "genrec_engine_compute_seconds", "Time an engine call takes inside its worker thread",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.queue_size = Gauge("genrec_queue_size", "Requests waiting for the engine", registry=r)
        self.loop_lag = Histogram("genrec_event_loop_lag_seconds", "How late the event loop runs a 10 ms timer",
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.admission_threshold = Gauge("genrec_admission_threshold_seconds",
                                         "Admission admits while the expected latency is within this", registry=r)
        self.batch_cap = Gauge("genrec_batch_cap", "Requests a micro-batch closes at now (fitted to the latency budget)",
                               registry=r)
        self.rejections = Counter(
            "genrec_rejections_total", "Requests refused before the engine answered", ["reason"], registry=r
        )
        self.history_hits = Counter("genrec_history_store_hits_total", "History reads that found a history", registry=r)
        self.history_misses = Counter("genrec_history_store_misses_total", "History reads with no stored history", registry=r)
        self.history_errors = Counter(
            "genrec_history_store_errors_total", "History store failures", ["operation"], registry=r
        )
        self.degraded = Counter(
            "genrec_degraded_responses_total", "Responses served without the user's stored history", registry=r
        )
        self.recommendations = Counter(
            "genrec_recommendations_total", "Recommendation responses by strategy", ["strategy"], registry=r
        )
        self.events = Counter(
            "genrec_events_total", "Event writes acknowledged: stored in Redis, spooled, or duplicates of an earlier "
            "event_id", ["outcome"], registry=r,
        )
        self.spool_pending = Gauge("genrec_event_spool_pending", "Events in the spool not yet written to Redis", registry=r)
        self.spool_bytes = Gauge("genrec_event_spool_bytes", "Size of the event spool file", registry=r)
        self.spool_replayed = Counter(
            "genrec_event_spool_replayed_total", "Spooled events written to Redis (duplicates included)", registry=r
        )
        self.model_info = Gauge("genrec_model_info", "The bundle being served (value 1)", ["name", "version"], registry=r)
        # Series bound once: labels() validates and locks on every call, a cost paid per request.
        # Binding every stage here also exports them from the start (dashboards see zeros, not gaps).
        self.stages = {stage: self.stage_duration.labels(stage=stage) for stage in STAGES}
        self.strategies = {strategy: self.recommendations.labels(strategy=strategy) for strategy in STRATEGIES}
        self._request_series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        self.event_outcomes = {outcome: self.events.labels(outcome=outcome) for outcome in EVENT_OUTCOMES}
        for operation in ("read", "write"):
            self.history_errors.labels(operation=operation)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its duration; endpoint is a route template (a small set)."""
        series = self._request_series.get((endpoint, status))
        if series is None:
            series = (self.requests.labels(endpoint=endpoint, status=str(status)),
                      self.request_duration.labels(endpoint=endpoint))
            self._request_series[(endpoint, status)] = series
        series[0].inc()
        series[1].observe(seconds)

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def render(self) -> tuple[bytes, str]:
        """(exposition body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
