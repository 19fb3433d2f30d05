"""Job-duration metrics of a worker: in the API's `/metrics` (embedded) or served for Prometheus by a
standalone one (`kolors-api worker --metrics-port`).

prometheus_client comes with the `worker` and `server` extras; it is imported only when metrics are
asked for, and its absence (a hand-made install) is then a start-up error that says so.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

#: The histogram `kolors_job_duration_seconds` is labelled by outcome and uses these buckets (seconds).
JOB_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
#: `kolors_job_stage_seconds`: its stages and buckets (waits of milliseconds matter as much as calls).
STAGES = ("queue_time", "batch_wait", "call_time", "finish_time", "total_time")
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


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
        self.peak_memory = prometheus_client.Gauge(
            "kolors_engine_peak_memory_bytes", "Peak CUDA memory allocated during the current or last job "
            "(0 without CUDA)", registry=self.registry)
        self.job_stage = prometheus_client.Histogram(
            "kolors_job_stage_seconds", "Where a job's time went, by stage (`kolors_api.worker.loop.timeline`): "
            "queue_time, batch_wait, call_time, finish_time, total_time", ["stage"],
            buckets=STAGE_BUCKETS, registry=self.registry)
        #: The counters of engines in other processes, by process (their last report; see `engine_report`).
        self.remote: dict[int, dict[str, float]] = {}
        self.peak_memory.set_function(lambda: max([_cuda_peak_memory(), *(r.get("peak_memory", 0.0)
                                                                           for r in self.remote.values())]))
        self.registry.register(_PromptCacheCollector(prometheus_client.metrics_core, self.remote))
        #: The engine processes shown (`watch`): a `kolors_api.worker.supervisor.Supervisor`, or None.
        self.engines: Any = None
        self.registry.register(_EnginesCollector(prometheus_client.metrics_core, self))

    def observe(self, seconds: float, outcome: str, stages: Mapping[str, float] | None = None) -> None:
        """A job stored by a worker: its engine seconds, its outcome and its stages (`loop.timeline`)."""
        self.job_duration.labels(outcome).observe(seconds)
        for stage, value in (stages or {}).items():
            if stage in STAGES:
                self.job_stage.labels(stage).observe(value)

    def watch(self, engines: Any) -> None:
        """Show the engine processes of `engines` (a `kolors_api.worker.supervisor.Supervisor`, or None:
        the metrics are there, with no engine):
        `kolors_engine_up{engine,device}` (1 ready, 0 loading or restarting) and
        `kolors_engine_restarts{engine,device}`."""
        self.engines = engines

    def report(self, pid: int, counters: Mapping[str, float]) -> None:
        """The latest counters of the engine in process `pid` (`engine_report` there): they add to this
        registry's, and stay counted after that process ends, so the totals never go down."""
        self.remote[pid] = dict(counters)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside the pod
        """Serve `/metrics` on `host:port` from a daemon thread."""
        self._prometheus.start_http_server(port, addr=host, registry=self.registry)


def engine_report() -> dict[str, float]:
    """This process's engine counters (calls, jobs and images of engine calls, prompt-cache hits and
    misses, peak CUDA memory): what an engine process sends to `serve` or `worker` (`JobMetrics.report`)."""
    cache = sys.modules.get("kolors_api.engine.prompt_cache")
    batch = sys.modules.get("kolors_api.worker.progress")
    report: dict[str, float] = {"peak_memory": _cuda_peak_memory()}
    report.update(cache.STATS if cache is not None else {})
    report.update(batch.CALLS if batch is not None else {})
    return report


def _cuda_peak_memory() -> float:
    """torch's peak CUDA allocation (the engine resets it per job); 0 where torch or CUDA is not in use.
    Never imports torch: the API process of a fleet has none."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0.0
    return float(torch.cuda.max_memory_allocated())


class _EnginesCollector:
    def __init__(self, metrics_core: Any, jobs: JobMetrics) -> None:
        self._core = metrics_core
        self._jobs = jobs

    def collect(self) -> Any:
        up = self._core.GaugeMetricFamily("kolors_engine_up", "1 while the engine process is ready, 0 while it "
                                          "loads or restarts", labels=["engine", "device"])
        restarts = self._core.GaugeMetricFamily("kolors_engine_restarts", "How often the engine process was "
                                                "started again after it died, since this process started",
                                                labels=["engine", "device"])
        engines = self._jobs.engines
        for engine in engines.engines if engines is not None else []:
            labels = [str(engine.index), engine.device or "auto"]
            up.add_metric(labels, 1.0 if engine.state == "ready" else 0.0)
            restarts.add_metric(labels, engine.restarts)
        yield up
        yield restarts


class _PromptCacheCollector:
    """`kolors_prompt_cache_hits_total` / `_misses_total`: the engine's prompt-embedding cache
    (`kolors_api.engine.prompt_cache.STATS`), 0 until an engine runs in this process; and the engine
    calls of the workers with the jobs and images they ran (`kolors_api.worker.progress.CALLS`)."""

    def __init__(self, metrics_core: Any, remote: dict[int, dict[str, float]]) -> None:
        self._core = metrics_core
        self._remote = remote

    def collect(self) -> Any:
        reports = [engine_report(), *self._remote.values()]

        def total(name: str) -> float:
            return sum(report.get(name, 0) for report in reports)
        for name in ("hits", "misses"):
            family = self._core.CounterMetricFamily(
                f"kolors_prompt_cache_{name}", f"Prompt-embedding cache {name} of the engine")
            family.add_metric([], total(name))
            yield family
        for name, metric, text in (("calls", "kolors_engine_calls", "Engine calls (one batch each)"),
                                   ("jobs", "kolors_engine_call_jobs", "Jobs run by engine calls"),
                                   ("images", "kolors_engine_call_images", "Images made by engine calls")):
            family = self._core.CounterMetricFamily(metric, text)
            family.add_metric([], total(name))
            yield family
