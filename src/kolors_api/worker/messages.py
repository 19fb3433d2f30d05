"""The messages between a supervisor (`serve`, `kolors-api worker`) and its engine processes.

One JSON object per line over a Unix socket pair; each kind is a plain dataclass (cog's
`eventtypes.py`). The engine process sends `Hello` once its store is open, `Ready` once its engine
has loaded, `Changed` for every job it changed (and the API wakes that job's waiters), `JobDone`
after every job it stored, and `Fatal` just before it exits on an error. The supervisor sends
`Changed` when a job was queued (`job_id` None) or a job changed on its side (a cancel).
Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Hello:
    worker_id: str
    pid: int
    device: str


@dataclass
class Ready:
    pass


@dataclass
class Changed:
    #: The job that changed, or None: "a job was queued".
    job_id: str | None = None
    #: Only its progress changed (it runs on): what waits for its end sleeps on.
    progress: bool = False


@dataclass
class JobDone:
    seconds: float
    outcome: str
    stages: dict[str, float]
    #: The engine process's counters after the job (`kolors_api.worker.metrics.engine_report`).
    report: dict[str, float] = field(default_factory=dict)


@dataclass
class Fatal:
    cause: str


Message = Hello | Ready | Changed | JobDone | Fatal
KINDS: dict[str, type[Any]] = {cls.__name__: cls for cls in (Hello, Ready, Changed, JobDone, Fatal)}


def encode(message: Message) -> bytes:
    """One line: `{"kind": ..., **fields}`."""
    return json.dumps({"kind": type(message).__name__, **asdict(message)}, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """The message of one line; ValueError when it is none."""
    data = json.loads(line)
    cls = KINDS.get(data.pop("kind", None)) if isinstance(data, dict) else None
    if cls is None:
        raise ValueError(f"not a message: {line[:80]!r}")
    message: Message = cls(**data)
    return message
