"""The worker: claims jobs from the store and runs them on the engine (torch is imported lazily)."""

from kolors_api.worker.loop import JobAborted, Worker, WorkerConfig, WorkerState, load_engine

__all__ = ["JobAborted", "Worker", "WorkerConfig", "WorkerState", "load_engine"]
