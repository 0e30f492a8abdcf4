"""Prometheus metrics, named after Triton's conventions (request success/failure, queue, compute).

The service is several processes (HTTP workers, one label engine per device), so it uses
prometheus_client's multiprocess mode: `enable_multiprocess(dir)` before the processes start,
each process writes its samples to files there, and `/metrics` renders them all
(`render`). Engine metrics carry a `device` label: queue depth, batch size and fill, queue,
augmentation and inference time per device.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        # HTTP side
        self.request_success = Counter("distill_request_success", "Successful requests", ["endpoint"], registry=r)
        self.request_failure = Counter("distill_request_failure", "Failed requests", ["endpoint", "code"], registry=r)
        self.request_duration = Histogram(
            "distill_request_duration_seconds", "Request latency", ["endpoint"], buckets=_LATENCY, registry=r
        )
        self.cache_hits = Counter("distill_cache_hits", "Labels served from the store", registry=r)
        self.cache_misses = Counter("distill_cache_misses", "Labels computed by the teacher", registry=r)
        self.labels_unstored = Counter(
            "distill_labels_unstored", "Labels computed by the teacher that the store refused to keep", registry=r
        )
        # label engine, per device
        dev = ["device"]
        self.queue_size = Gauge(
            "distill_queue_size",
            "Items accepted by the engine and not yet answered",
            dev,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_rejected = Counter("distill_queue_rejected", "Items rejected with 503 (queue full)", dev, registry=r)
        self.queue_duration = Histogram(
            "distill_queue_duration_seconds",
            "Time from a request's acceptance to its batch entering the teacher",
            dev,
            buckets=_LATENCY,
            registry=r,
        )
        self.augment_duration = Histogram(
            "distill_augment_duration_seconds",
            "Time from a batch's first slot to its last crop written",
            dev,
            buckets=_LATENCY,
            registry=r,
        )
        self.compute_infer_duration = Histogram(
            "distill_compute_infer_duration_seconds", "Teacher forward per batch", dev, buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram(
            "distill_batch_size",
            "Items per teacher batch",
            dev,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_fill = Histogram(
            "distill_batch_fill",
            "Batch size / max batch size",
            dev,
            buckets=(0.125, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.inference_count = Counter("distill_inference_count", "Items run through the teacher", dev, registry=r)

    def render(self) -> bytes:
        """Exposition text: every process's samples in multiprocess mode, else this registry's."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def enable_multiprocess(directory: str) -> None:
    """Switch this process, and the processes it starts, to file-backed metrics in `directory`.
    Call before creating Metrics; children inherit the environment variable."""
    from prometheus_client import values

    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.get_value_class()


def mark_process_dead(pid: int) -> None:
    """Drop a stopped process's live gauges (its counters and histograms stay counted)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
