"""The auto rule for waiting for company (`kolors_api.jobs.batching`): its decisions on given
arrival histories, and the step clock it reads."""

from __future__ import annotations

import pytest

from kolors_api.jobs.batching import StepClock, WaitRule

RULE = WaitRule()  # probe 0.25, most 2, busy_after 1 step
STEP = 0.040  # seconds


def deadline(*, head_age: float = 0.0, seen: tuple[float, ...] = (), arrivals: tuple[float, ...] = (100.0,),
             full: bool = False, step: float | None = STEP) -> float:
    """The rule's answer, as seconds after the claim (claimed at t=10 on the worker's clock)."""
    return RULE.deadline(claimed_at=10.0, head_age=head_age, step=step, seen=seen, arrivals=arrivals,
                         full=full) - 10.0


def test_a_lone_job_on_an_idle_worker_waits_a_quarter_of_a_step() -> None:
    assert deadline() == pytest.approx(0.25 * STEP)


def test_a_job_that_found_the_worker_busy_does_not_wait() -> None:
    assert deadline(head_age=1.5 * STEP) == 0.0
    # ... even with company arriving: the backlog makes the batch
    assert deadline(head_age=1.5 * STEP, seen=(10.001,), arrivals=(100.0, 100.002)) == 0.0


def test_a_full_batch_does_not_wait() -> None:
    assert deadline(full=True) == 0.0


def test_each_arrival_moves_the_deadline_by_twice_the_batchs_gaps() -> None:
    # A burst 6 ms apart: every sighting buys twice the widest recent gap (12 ms) from that sighting.
    arrivals = (100.0, 100.006, 100.012)
    assert deadline(seen=(10.006, 10.012), arrivals=arrivals) == pytest.approx(0.012 + 0.012)
    # The gap never buys less than the probe ...
    assert deadline(seen=(10.001,), arrivals=(100.0, 100.001)) == pytest.approx(0.001 + 0.25 * STEP)
    # ... nor more than the most a call may wait,
    assert deadline(seen=(10.001,), arrivals=(100.0, 100.5)) == pytest.approx(2 * STEP)


def test_no_burst_holds_a_call_back_longer_than_two_steps() -> None:
    arrivals = tuple(100.0 + 0.01 * n for n in range(12))
    seen = tuple(10.0 + 0.01 * n for n in range(1, 12))
    assert deadline(seen=seen, arrivals=arrivals) == pytest.approx(2 * STEP)


def test_only_the_last_three_gaps_count() -> None:
    # An old wide gap (a straggler before the burst) no longer stretches the wait.
    arrivals = (100.0, 100.030, 100.032, 100.034, 100.036)
    seen = (10.001, 10.002, 10.003, 10.004)
    assert deadline(seen=seen, arrivals=arrivals) == pytest.approx(0.004 + max(0.004, 0.25 * STEP))


def test_before_any_call_was_measured_a_step_is_the_default() -> None:
    assert deadline(step=None) == pytest.approx(0.25 * RULE.default_step)
    assert deadline(step=None, head_age=2 * RULE.default_step) == 0.0


def test_the_step_clock_measures_per_size_and_scales_to_unmeasured_sizes() -> None:
    clock = StepClock()
    assert clock.step(512, 512) is None
    clock.observe(512, 512, steps=20, images=1, seconds=0.4)
    assert clock.step(512, 512) == pytest.approx(0.02)
    # a batch of 4 in 0.4 s: one image's step is taken as 0.4 / 20 / sqrt(4); the latest counts half
    clock.observe(512, 512, steps=20, images=4, seconds=0.4)
    assert clock.step(512, 512) == pytest.approx((0.02 + 0.01) / 2)
    # 1024² was never run: four times the pixels of the nearest size measured
    assert clock.step(1024, 1024) == pytest.approx(4 * 0.015)
    clock.observe(512, 512, steps=0, images=1, seconds=1.0)  # nothing to learn from
    assert clock.step(512, 512) == pytest.approx(0.015)
