"""Timing a run without slowing it: the steady-state clock, peak memory, the environment, the results dict.

Device work is asynchronous: the clock synchronizes only where a measurement ends (start of the steady state,
around evaluations and checkpoints; at log points the loss .item() does it), never per iteration.
"""

import os
import resource
import time

import torch

from modeling.checkpointing import versions

# images/s excludes the first iterations of each launch (allocator, cuDNN autotuning, torch.compile).
WARMUP_ITERS = 20


def synchronize(device: torch.device) -> float:
    """perf_counter() once the device has finished the work queued so far (reading the clock earlier times the
    launch of CUDA kernels, not their run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Clock:
    """Wall time and steady-state time of this launch, on top of what earlier launches recorded in `state`
    (a modeling.training.TrainState).

    The steady-state window starts at iteration `warmup_until`. Pauses (evaluations, checkpoints) are subtracted
    from it only for the part that lies inside it: a pause during the warm-up (a resumed run evaluating at its first
    iteration) must not shorten the window, or images/s comes out too high. `paused` counts every pause of the
    launch (train.py's per-log-interval times use its differences)."""

    def __init__(self, state, device: torch.device, warmup_until: int):
        self.device, self.warmup_until = device, warmup_until
        self.t0, self.wall0 = time.perf_counter(), state.wall_s
        self.steady_t0, self.steady_iter0 = None, None
        self.paused = 0.0  # every pause of this launch
        self.steady_paused = 0.0  # the parts of pauses after steady_t0
        self.steady_images0, self.steady_s0 = state.steady_images, state.steady_s

    def before_iteration(self, iteration: int) -> None:
        if iteration == self.warmup_until:
            self.steady_t0, self.steady_iter0 = synchronize(self.device), iteration

    def pause(self) -> float:
        """The time at which the device finished the iterations so far: pass it to resume() after the pause."""
        return synchronize(self.device)

    def resume(self, paused_at: float) -> None:
        now = time.perf_counter()
        self.paused += now - paused_at
        if self.steady_t0 is not None:  # only the part inside the window (a pause may straddle its start)
            self.steady_paused += max(0.0, now - max(paused_at, self.steady_t0))

    def wall_s(self) -> float:
        return self.wall0 + time.perf_counter() - self.t0

    def update(self, state, iteration: int, global_batch: int) -> None:
        """Write this launch's totals up to `iteration` (completed iterations) into `state`."""
        now = synchronize(self.device)
        state.wall_s = self.wall0 + now - self.t0
        if self.steady_t0 is not None:
            state.steady_images = self.steady_images0 + (iteration - self.steady_iter0) * global_batch
            state.steady_s = self.steady_s0 + now - self.steady_t0 - self.steady_paused


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def environment(accelerator) -> dict:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": name, "device_type": device.type, **versions()}


def build_results(state, target_miou: float, accelerator, global_batch: int) -> dict:
    """results.json of a training run (the benchmark's figures) from its TrainState."""
    return {
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "iterations": state.iteration,
        "global_batch": global_batch,
        "images_per_sec": state.steady_images / state.steady_s if state.steady_s > 0 else None,
        "target_miou": target_miou,
        "time_to_train_s": state.time_to_train_s,
        "total_wall_s": state.wall_s,
        "final_miou": state.final_metrics["mean_iou"] if state.final_metrics else None,
        "best_miou": state.best_miou if state.best_metrics else None,
        "best_iteration": state.best_iteration,
        "final_metrics": state.final_metrics,
        "best_metrics": state.best_metrics,
        "skipped_steps": state.skipped_steps,
        "eval_log": state.eval_log,
        "environment": environment(accelerator),
    }
