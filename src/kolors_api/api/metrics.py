"""Prometheus metrics of one API process (its own registry, so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kolors_api.worker.metrics import STAGE_BUCKETS, JobMetrics


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kolors_http_requests_total", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.queue_depth = Gauge("kolors_queue_depth", "Jobs waiting in the queue", registry=self.registry)
        self.processing = Gauge("kolors_jobs_processing", "Jobs claimed by a worker (their leases)",
                                registry=self.registry)
        self.workers = Gauge("kolors_workers_alive", "Workers with a fresh heartbeat", registry=self.registry)
        self.reclaims = Gauge("kolors_reclaims_total", "Jobs handed to another worker after a lost lease",
                              registry=self.registry)
        self.dead_letters = Gauge("kolors_dead_letters_total", "Jobs failed after too many deliveries",
                                  registry=self.registry)
        self.embedded_worker = Gauge("kolors_embedded_worker_up",
                                     "serve's engine processes that are ready (0 while they load or restart, "
                                     "or with --no-worker)", registry=self.registry)
        self.event_streams = Gauge("kolors_event_streams", "Open server-sent event streams (watchers of jobs)",
                                   registry=self.registry)
        self.webhook_deliveries = Counter("kolors_webhook_deliveries_total",
                                          "Webhook delivery tries by outcome: delivered (2xx), retry (to be tried "
                                          "again), failed (out of tries, or refused), stopped (the receiver said 410)",
                                          ["outcome"], registry=self.registry)
        #: A sync request's own stages in this process: `accept` (validate, admit, store the job), `wake`
        #: (from the engine's write of the outcome to this process's waiter waking up), `read` (its images).
        self.request_stage = Histogram("kolors_request_stage_seconds", "Where a sync request's time went in the "
                                       "API process, by stage: accept, wake, read", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        #: The engine processes' job durations and stages (`kolors_job_duration_seconds`, `_stage_seconds`).
        self.jobs = JobMetrics(self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
