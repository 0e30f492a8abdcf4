"""Prometheus metrics, named after Triton's conventions (request success/failure, queue, compute)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_success = Counter("distill_request_success", "Successful requests", ["endpoint"], registry=r)
        self.request_failure = Counter("distill_request_failure", "Failed requests", ["endpoint", "code"], registry=r)
        self.request_duration = Histogram("distill_request_duration_seconds", "Request latency", ["endpoint"],
                                          buckets=_LATENCY, registry=r)
        self.queue_duration = Histogram("distill_queue_duration_seconds", "Time items wait for a batch",
                                        buckets=_LATENCY, registry=r)
        self.compute_infer_duration = Histogram("distill_compute_infer_duration_seconds", "Teacher forward per batch",
                                                buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("distill_batch_size", "Items per teacher batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.queue_size = Gauge("distill_queue_size", "Items waiting for the teacher", registry=r)
        self.queue_rejected = Counter("distill_queue_rejected", "Items rejected with 503 (queue full)", registry=r)
        self.cache_hits = Counter("distill_cache_hits", "Labels served from the store", registry=r)
        self.cache_misses = Counter("distill_cache_misses", "Labels computed by the teacher", registry=r)
        self.inference_count = Counter("distill_inference_count", "Items run through the teacher", registry=r)
