"""modeling/benchmarking.py's Clock (scripts/train.py's images/s) against a fake time source: the steady-state window
must subtract the pauses (evaluations, checkpoints) inside it and nothing else."""

import types

import pytest
import torch

from modeling import benchmarking

GLOBAL_BATCH = 4


@pytest.fixture
def fake_time(monkeypatch):
    """A clock that moves only when the test says: advance(seconds)."""
    now = [0.0]
    monkeypatch.setattr(benchmarking, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def new_state(wall_s=0.0, steady_images=0, steady_s=0.0):
    return types.SimpleNamespace(wall_s=wall_s, steady_images=steady_images, steady_s=steady_s)


def paused(clock, advance, seconds: float) -> None:
    at = clock.pause()
    advance(seconds)
    clock.resume(at)


def test_images_per_sec_subtracts_only_the_pauses_inside_the_steady_window(fake_time):
    state = new_state()
    clock = benchmarking.Clock(state, torch.device("cpu"), warmup_until=2)
    clock.before_iteration(0)
    fake_time(1.0)  # iteration 0 (warm-up)
    paused(clock, fake_time, 10.0)  # before the window: an evaluation at a resumed run's first checkpoint
    clock.before_iteration(1)
    fake_time(1.0)  # iteration 1 (warm-up)
    at = clock.pause()  # a pause straddling the window's start: 3 s before it, 4 s inside
    fake_time(3.0)
    clock.before_iteration(2)  # the window starts here (t = 15)
    fake_time(4.0)
    clock.resume(at)
    fake_time(1.0)  # iteration 2
    clock.before_iteration(3)
    fake_time(1.0)  # iteration 3
    paused(clock, fake_time, 6.0)  # inside the window: a checkpoint
    clock.before_iteration(4)
    fake_time(1.0)  # iteration 4 (t = 28)
    clock.update(state, 5, GLOBAL_BATCH)

    timed, pauses_inside = 28.0 - 15.0, 4.0 + 6.0
    assert state.steady_s == pytest.approx(timed - pauses_inside) == 3.0  # the three timed iterations
    assert state.steady_images == 3 * GLOBAL_BATCH
    assert state.steady_images / state.steady_s == pytest.approx(GLOBAL_BATCH / 1.0)  # results.json's images/s
    assert state.wall_s == 28.0 and clock.paused == 10.0 + 7.0 + 6.0  # wall time and the log's pauses: all of it


def test_a_resumed_launch_adds_its_window_to_the_earlier_ones(fake_time):
    state = new_state(wall_s=100.0, steady_images=40, steady_s=10.0)  # what earlier launches recorded
    clock = benchmarking.Clock(state, torch.device("cpu"), warmup_until=7)
    paused(clock, fake_time, 30.0)  # the resumed run evaluates before its first iteration: in the warm-up
    for iteration in range(5, 10):
        clock.before_iteration(iteration)
        fake_time(2.0)
    clock.update(state, 10, GLOBAL_BATCH)
    assert state.steady_images == 40 + 3 * GLOBAL_BATCH and state.steady_s == pytest.approx(10.0 + 3 * 2.0)
    assert state.wall_s == pytest.approx(100.0 + 30.0 + 5 * 2.0)
