"""Prometheus metrics of `cg4ctr serve`: the runtime's observer, and the HTTP layer's request counts.

The runtime knows nothing of Prometheus; it calls a `RuntimeObserver`. `PrometheusObserver` is that observer,
holding its own `CollectorRegistry` (not prometheus-client's global one, so two servers or tests in one process
never share counts). Exposed at GET /metrics in the text exposition format. Names (all prefixed `cg4ctr_`):

    queue_depth                 gauge      requests waiting in the runtime's bounded queue
    queue_depth_max             gauge      the largest queue depth seen since start (never above --max-queue)
    batch_creatives             histogram  creatives per denoising batch
    batch_requests              histogram  requests per denoising batch
    stage_seconds{stage}        histogram  queue, prepare, denoise, decode, reward, store, select; seconds
    generate_seconds{status}    histogram  a generate request's time from submit to answer, by outcome; seconds
    rejections_total{reason}    counter    queue_full, deadline, bad_input, closed, cancelled (runtime);
                                           body_too_large, body_timeout, unauthorized (HTTP layer)
    http_requests_total{route,status}   counter   every answered HTTP request; route is the path template;
                                                  status 499: the client left before its answer (while it
                                                  waited, or while sending its body), nothing sent
    http_request_seconds{route}         histogram time to answer, seconds
"""
from __future__ import annotations

import threading
from typing import Optional

from cg4ctr_fast.serving.runtime import RuntimeObserver

__all__ = ["PrometheusObserver"]

# Seconds: a select answers in ~0.1 ms, a tiny-preset creative in ~10–100 ms on a CPU core, an SD1.5 batch of
# 32 in tens of seconds; 0.1 ms .. 120 s spans both ends.
_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 120.0)
# Creatives per batch: powers of two up to twice the 64-creative cap of one request.
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class PrometheusObserver(RuntimeObserver):
    """A `RuntimeObserver` that records into its own Prometheus registry (`self.registry`).

    Thread-safe (the runtime calls it from its worker thread, the HTTP layer from the event loop):
    prometheus-client's metrics lock themselves, and the running maximum of the queue depth has its own lock.
    """

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._queue_depth = Gauge("cg4ctr_queue_depth", "Requests waiting in the runtime's queue", registry=r)
        self._queue_depth_max = Gauge("cg4ctr_queue_depth_max", "Largest queue depth seen since start", registry=r)
        self._batch_creatives = Histogram("cg4ctr_batch_creatives", "Creatives per denoising batch",
                                          buckets=_BATCH, registry=r)
        self._batch_requests = Histogram("cg4ctr_batch_requests", "Requests per denoising batch",
                                         buckets=_BATCH, registry=r)
        self._stage = Histogram("cg4ctr_stage_seconds", "Time per runtime stage, seconds", ["stage"],
                                buckets=_SECONDS, registry=r)
        self._generate = Histogram("cg4ctr_generate_seconds", "Generate request time from submit to answer, "
                                   "seconds, by outcome", ["status"], buckets=_SECONDS, registry=r)
        self._rejections = Counter("cg4ctr_rejections", "Requests refused or dropped, by reason", ["reason"],
                                   registry=r)
        self._http = Counter("cg4ctr_http_requests", "HTTP requests answered, by route template and status",
                             ["route", "status"], registry=r)
        self._http_seconds = Histogram("cg4ctr_http_request_seconds", "HTTP time to answer, seconds", ["route"],
                                       buckets=_SECONDS, registry=r)
        self._max_depth = 0
        self._lock = threading.Lock()

    # RuntimeObserver
    def queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)
        with self._lock:
            if depth > self._max_depth:
                self._max_depth = depth
                self._queue_depth_max.set(depth)

    def batch(self, creatives: int, requests: int) -> None:
        self._batch_creatives.observe(creatives)
        self._batch_requests.observe(requests)

    def stage(self, name: str, seconds: float) -> None:
        self._stage.labels(stage=name).observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejections.labels(reason=reason).inc()

    def completed(self, status: str, seconds: float) -> None:
        self._generate.labels(status=status).observe(seconds)

    # HTTP layer
    def http_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request; `route` is the path template (bounded label values)."""
        self._http.labels(route=route, status=str(status)).inc()
        self._http_seconds.labels(route=route).observe(seconds)

    def exposition(self, queue_depth: Optional[int] = None) -> tuple[bytes, str]:
        """(the registry in the text exposition format, its content type); `queue_depth` refreshes the gauge."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if queue_depth is not None:
            self.queue_depth(queue_depth)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
