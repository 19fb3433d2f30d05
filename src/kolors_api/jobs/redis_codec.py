"""Decoding what the Redis store's scripts and reads hand back into the store's types (`redis.py`)."""

from __future__ import annotations

import json
from typing import Any

from kolors_api.jobs import fair
from kolors_api.jobs.base import ApiKey, Job, JobState, Lease


def str_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def flat_hash(flat: list[Any]) -> dict[str, str]:
    """A flat [field, value, …] list (HGETALL inside a script) as a dict."""
    return {str_of(flat[i]): str_of(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def hash_of(raw: dict[Any, Any]) -> dict[str, str]:
    return {str_of(k): str_of(v) for k, v in raw.items()}


def encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


def opt_float(value: str | None) -> float | None:
    return float(value) if value else None


def job_of(h: dict[str, str]) -> Job:
    return Job(id=h["id"], model=h["model"], params=json.loads(h["params"]), state=JobState(h["state"]),
               created_at=float(h["created_at"]), key_id=h.get("key_id"), cost=float(h["cost"]),
               started_at=opt_float(h.get("started_at")), finished_at=opt_float(h.get("finished_at")),
               step=int(h["step"]), total_steps=int(h["total_steps"]), error=h.get("error"), outputs=int(h["outputs"]),
               ext=h["ext"], seeds=json.loads(h["seeds"]), metrics=json.loads(h["metrics"]),
               deliveries=int(h["deliveries"]), cancel_requested=h["cancel_requested"] == "1",
               version=int(h["version"]), expires_at=float(h.get("expires_at") or 0.0), phase=h.get("phase", ""))


def live(h: dict[str, str], now: float) -> Job | None:
    """The job of a hash, or None when there is none. Past retention (`expires_at`, on the server's
    clock, as `now`) there is none: the expiry sweep deletes the hash, readers do not wait for it."""
    if "id" not in h:
        return None
    expires = h.get("expires_at")
    return None if expires and float(expires) <= now else job_of(h)


def lease_of(flat: list[Any], token: str, worker_id: str) -> Lease:
    job = job_of(flat_hash(flat))
    return Lease(job=job, token=token, worker_id=worker_id, delivery=job.deliveries)


def key_of(h: dict[str, str]) -> ApiKey:
    return ApiKey(id=h["id"], name=h["name"], prefix=h["prefix"], key_hash=h["key_hash"],
                  admin=h.get("admin") == "1", enabled=h.get("enabled", "1") == "1",
                  credits=opt_float(h.get("credits")), rate_limit=h.get("rate_limit"),
                  max_concurrency=int(h["max_concurrency"]) if h.get("max_concurrency") else None,
                  weight=fair.weight_of(h.get("weight")),
                  created_at=float(h.get("created_at") or 0.0))
