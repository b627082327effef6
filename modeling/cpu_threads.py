"""How many intra-op threads a CPU training process should use, from the cores that are actually free.

`accelerate launch` sets OMP_NUM_THREADS to the physical cores / processes on the CPU when the user did not set it
(`--num_cpu_threads_per_process`; an Accelerate config file cannot carry it). OpenMP threads spin-wait at every
parallel region: when other jobs (a browser, another training run) or our own loader workers hold some of those
cores, each operator waits for its slowest thread, and an iteration can take 10-50 times longer. So the training
process uses only the cores left by the other jobs' load and by the loader workers, and never more threads than
it was started with (an explicit OMP_NUM_THREADS=1 stays 1).

    threads, reason = choose_cpu_threads(loader_workers=2)
    torch.set_num_threads(threads)
"""

import math
import os

import torch


def choose_cpu_threads(loader_workers: int = 0, local_processes: int = 1) -> tuple[int, str]:
    """(threads per process, a short reason for the log): free cores / local processes - loader workers, >= 1.

    Free cores = the cores this process may run on (its affinity mask: containers, taskset) minus the 1-minute
    load average (the other jobs' runnable processes). Each loader worker is counted as one busy core: it runs the
    per-sample pipeline next to the training process. The result never exceeds torch's current thread count.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(cores - load, 1.0)
    threads = math.floor(free / max(local_processes, 1)) - loader_workers
    threads = max(1, min(threads, torch.get_num_threads()))
    reason = f"{cores} cores, load {load:.1f}, {loader_workers} loader workers"
    if local_processes > 1:
        reason += f", {local_processes} processes"
    return threads, reason
