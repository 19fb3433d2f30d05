"""Job-duration metrics of a worker: in the API's `/metrics` (embedded) or served for Prometheus by a
standalone one (`kolors-api worker --metrics-port`).

prometheus_client comes with the `worker` and `server` extras; it is imported only when metrics are
asked for, and its absence (a hand-made install) is then a start-up error that says so.
"""

from __future__ import annotations

from typing import Any

#: The histogram `kolors_job_duration_seconds` is labelled by outcome and uses these buckets (seconds).
JOB_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class JobMetrics:
    """`kolors_job_duration_seconds`, in `registry` (the API's, for the embedded worker) or in one of
    its own; `observe` is a `Worker` `on_job_done`."""

    def __init__(self, registry: Any = None) -> None:
        try:
            import prometheus_client
        except ImportError:
            raise RuntimeError("--metrics-port needs prometheus-client (pip install 'kolors-api[worker]' "
                               "or prometheus-client)") from None
        self._prometheus: Any = prometheus_client
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.job_duration = prometheus_client.Histogram(
            "kolors_job_duration_seconds", "Engine time per job", ["outcome"],
            buckets=JOB_DURATION_BUCKETS, registry=self.registry)

    def observe(self, seconds: float, outcome: str) -> None:
        self.job_duration.labels(outcome).observe(seconds)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside the pod
        """Serve `/metrics` on `host:port` from a daemon thread."""
        self._prometheus.start_http_server(port, addr=host, registry=self.registry)
