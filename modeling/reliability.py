"""Reliability of long training runs: preemption, non-finite steps, data-loader failures (docs/reliability.md).

Why it is built this way: a signal handler may only set a flag, and no rank may stop alone (the others would wait
for it in the next collective), so every `check_interval` iterations all ranks all-reduce one tiny tensor holding
"a signal arrived" and the non-finite streak, and all stop at the same iteration. A non-finite update is detected
and skipped on the device from the all-reduced gradients (identical on every rank: no extra collective, no host
sync with a fused optimizer), as the fp16 GradScaler does. A DataLoader worker that hangs or dies, or that a job
scheduler signals along with the training process, must not hang or kill the run: `loader_kwargs` and
`explain_loader_errors`.
"""

import os
import signal
import threading
from pathlib import Path

import torch

from modeling import strict_json
from modeling.errors import first_line

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, relaunching the same command continues the run
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_MARKER = "preempted.json"  # written into OUTPUT_DIR on a preemption exit, removed by the next launch
DEFAULT_LOADER_TIMEOUT = 300.0  # seconds a DataLoader may wait for one batch from its workers


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive non-finite steps, or a non-finite model state."""


# ----------------------------------------------------------------------------------------------------- preemption
class PreemptionFlag:
    """SIGTERM / SIGUSR1 handlers that only record the signal; `restore()` puts the previous handlers back.

    Installed from the main thread only (Python's rule); elsewhere (e.g. a notebook's worker thread) it does nothing
    and the signals keep their default action.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            # scripts/train.py blocks these signals while it imports: one that arrived meanwhile is delivered now
            signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def write_preemption_marker(output_dir, iteration: int, signum: int, checkpoint) -> Path:
    """OUTPUT_DIR/preempted.json: lets a job script tell a preemption exit from a failure behind a launcher (which
    reports its own exit code (1, or 128 + the signal) whatever its workers returned)."""
    path = Path(output_dir) / PREEMPTED_MARKER
    path.write_text(strict_json.dumps({"iteration": iteration, "signal": signal_name(signum),
                                       "checkpoint": str(checkpoint), "exit_code": EXIT_PREEMPTED}) + "\n")
    return path


def clear_preemption_marker(output_dir) -> None:
    (Path(output_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ non-finite steps
def _found_non_finite(tensors, found: torch.Tensor) -> None:
    """found (float32, 1 element) becomes 1 if any tensor holds a NaN/inf, without a host sync.

    torch's private `_amp_foreach_non_finite_check_and_unscale_` (scale 1) is the GradScaler's own check: with fp16
    the guard counts the scaler's skips and must decide exactly as it does. The public
    `torch.nn.utils.get_total_norm` would also flag finite gradients whose norm overflows float32 (scaled fp16
    gradients can). tests/test_reliability.py pins the private function, so a torch upgrade that changes it fails.
    """
    one = torch.ones(1, device=found.device)
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)


class StepGuard:
    """Never apply a non-finite update; agree across processes on preemption signals and on when to give up.

    `skipped_steps`: skipped updates before this launch (from the resumed checkpoint). See the module docstring.
    """

    def __init__(self, accelerator, model, optimizer, preemption: PreemptionFlag | None = None, *,
                 max_nonfinite_steps: int = 20, check_interval: int = 10, skipped_steps: int = 0):
        if max_nonfinite_steps < 1 or check_interval < 1:
            raise ValueError("max_nonfinite_steps and check_interval must be >= 1")
        self.accelerator, self.optimizer, self.preemption = accelerator, optimizer, preemption
        self.max_nonfinite_steps, self.check_interval = max_nonfinite_steps, check_interval
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = accelerator.device
        self._found = torch.zeros(1, device=device)  # this iteration's update was (or would have been) non-finite
        self._streak = torch.zeros(1, device=device)  # consecutive non-finite iterations up to now
        self._skipped = torch.full((1,), float(skipped_steps), device=device)
        self._fp16 = getattr(accelerator, "scaler", None) is not None  # the GradScaler skips by itself (fp16)
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one
        self._inner = inner if getattr(inner, "_step_supports_amp_scaling", False) else None

    def before_optimizer_step(self, iteration: int) -> None:
        """Call between backward and optimizer.step() on every micro-batch (acts on the last one only)."""
        if not self.accelerator.sync_gradients:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        self._found.zero_()
        _found_non_finite(grads, self._found)
        if self._fp16:  # the GradScaler skips this update by itself
            return
        if self._inner is not None:
            self._inner.found_inf = self._found  # the fused kernel skips the whole update when it is 1
        elif self._found.item():  # one host sync per iteration for optimizers without found_inf support
            self.optimizer.zero_grad(set_to_none=True)  # step() leaves parameters without gradients untouched

    def after_iteration(self) -> None:
        """Call once per iteration, after the optimizer step: updates the counters on the device."""
        self._streak.mul_(self._found).add_(self._found)  # +1 on a skipped step, back to 0 on a good one
        self._skipped.add_(self._found)

    @property
    def skipped_steps(self) -> int:
        """Updates skipped so far in the run (a host sync: read it where the loop syncs anyway)."""
        return int(self._skipped.item())

    def check(self, done: int, force: bool = False) -> int | None:
        """Every check_interval iterations (or when forced; collective: every process, same iterations): the signal
        number if any process got a preemption signal, else None. Raises NonFiniteError after max_nonfinite_steps
        consecutive non-finite iterations. `done`: iterations completed."""
        if done % self.check_interval and not force:
            return None
        local = self.preemption.signum if self.preemption is not None and self.preemption.signum else 0
        packet = torch.cat([torch.tensor([float(local)]).to(self._streak.device), self._streak])
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(packet, op=torch.distributed.ReduceOp.MAX)
        signum, streak = (int(v) for v in packet.tolist())
        if streak >= self.max_nonfinite_steps:
            raise NonFiniteError(nonfinite_message(done, streak, self._fp16))
        return signum or None


def nonfinite_message(done: int, streak: int, fp16: bool) -> str:
    what = "the fp16 gradient scaler skipped" if fp16 else "non-finite (NaN/inf) loss or gradients in"
    return (f"{what} {streak} consecutive training steps (iterations {done - streak + 1}-{done}): no update was "
            f"applied after iteration {done - streak}, the checkpoints hold finite weights; stopping (the limit is "
            "--max_nonfinite_steps). Check the data and the learning rate, then resume from a checkpoint")


def check_finite_state(model, iteration: int, writing: str = "a checkpoint") -> None:
    """Raise NonFiniteError naming the tensors if any floating-point parameter or buffer is NaN/inf (one sync)."""
    named = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if bool(finite.all()):
        return
    bad = [n for (n, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
    raise NonFiniteError(f"iteration {iteration}: the model holds non-finite values ({len(bad)} tensors: "
                         f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); not writing {writing}. A "
                         "non-finite forward pass poisons BatchNorm statistics: resume from the last checkpoint")


# --------------------------------------------------------------------------------------------------- data loading
def _ignore_all_but_the_parent(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(set(PREEMPTION_SIGNALS))
        if info.si_pid == parent:  # the DataLoader (or multiprocessing at exit) ending a stuck worker: obey
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [info.si_signo])  # this thread receives it and dies of it
            os.kill(os.getpid(), info.si_signo)


def shield_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: survive SIGTERM / SIGUSR1 sent to every process of a job (Slurm does), so that the
    training process can finish its iteration and save; the worker still obeys its parent's SIGTERM (the DataLoader
    ends stuck workers with it, and multiprocessing waits for them at exit: ignoring it would hang the exit).

    The signals are blocked and a thread takes them with sigwaitinfo, which tells who sent them. Without
    sigwaitinfo (macOS), SIGUSR1 is ignored and SIGTERM keeps its default action."""
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        return
    for sig in PREEMPTION_SIGNALS:  # not the training process's flag-setting handlers (inherited through fork)
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)  # threads started later inherit the mask
    threading.Thread(target=_ignore_all_but_the_parent, args=(os.getppid(),), daemon=True).start()


def loader_kwargs(num_workers: int, timeout: float = DEFAULT_LOADER_TIMEOUT) -> dict:
    """DataLoader arguments for a run that must not hang on a stuck worker or die with a signalled one."""
    if num_workers == 0:  # no worker to wait for (and DataLoader refuses a timeout without workers)
        return {}
    return {"timeout": timeout, "worker_init_fn": shield_worker}


class LoaderError(RuntimeError):
    """A DataLoader worker died or delivered nothing within the timeout."""


def explain_loader_errors(loader, what: str, timeout: float):
    """Iterate `loader`, turning its dead-worker / timeout RuntimeErrors into a one-line LoaderError."""
    try:
        yield from loader
    except RuntimeError as err:
        text = first_line(err)
        if "timed out" in text:
            raise LoaderError(f"{what}: no batch from the DataLoader workers within {timeout:g} s (a worker hangs: "
                              "stuck storage or a deadlock in a transform); raise --loader_timeout if reading is "
                              "just slow, or run with --num_workers 0 to see where it stops") from err
        if "DataLoader worker" in text:
            raise LoaderError(f"{what}: a DataLoader worker died ({text}); out of memory (see dmesg) or a crash "
                              "in the decoding code; run with --num_workers 0 to see the error in the main process"
                              ) from err
        raise
