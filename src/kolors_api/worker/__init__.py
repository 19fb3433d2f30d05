"""The worker: claims jobs from the store and runs them on the engine (torch is imported lazily).

`make_worker(settings, store)` builds one; `kolors_api.worker.engines` holds the engine factory
contract (`--engine package.module:factory`); `kolors_api.worker.safety` screens prompts and images.
"""

from kolors_api.worker.engines import EngineFactoryError, EngineLike, load_factory
from kolors_api.worker.loop import TRANSITIONS, Worker, WorkerConfig, WorkerState
from kolors_api.worker.make import make_worker
from kolors_api.worker.model_check import ModelNotFound, check_model
from kolors_api.worker.progress import JobAborted

__all__ = [
    "TRANSITIONS",
    "EngineFactoryError",
    "EngineLike",
    "JobAborted",
    "ModelNotFound",
    "Worker",
    "WorkerConfig",
    "WorkerState",
    "check_model",
    "load_factory",
    "make_worker",
]
