"""Reliability of long training runs: preemption, non-finite steps, data-loader failures, checks before heavy work.

    preemption = PreemptionFlag().install()          # SIGTERM / SIGUSR1 only set a flag
    guard = StepGuard(accelerator, model, optimizer, preemption, max_nonfinite_steps=20, check_interval=10)
    ...                                                # per iteration, per micro-batch:
    accelerator.backward(loss)
    guard.before_optimizer_step(iteration)            # marks a non-finite update so that it is not applied
    optimizer.step()
    ...                                                # per iteration:
    guard.after_iteration()
    signum = guard.check(iteration + 1)               # every check_interval iterations: one tiny all-reduce

Preemption. The handlers only record the signal (nothing else is safe inside a signal handler, and a rank must
not stop alone: the others would wait for it in the next collective). Every `check_interval` iterations all
processes all-reduce (max) one tiny tensor holding "a signal arrived here" and the non-finite streak: every rank
sees the same answer at the same iteration, finishes it, the training script saves a checkpoint and exits with
EXIT_PREEMPTED (75, sysexits' EX_TEMPFAIL: "try again"). The trade-off of `check_interval`: each check is a
collective plus a host sync (the CPU stops queueing work ahead of the GPU for that iteration, ~1 ms); checking
every iteration would pay it every step, checking every k iterations delays the stop by up to k - 1 iterations
(k = 10 at ~0.3 s per iteration: 3 s of a 90 s warning). Data-loader workers ignore both signals unless their
parent sends them (Slurm signals every process of a job step: a worker killed by it would kill the run before it
can save; see `shield_worker`).

Non-finite steps. The skip decision is taken on the device, from the gradients after DDP's all-reduce (identical on
every rank, so all ranks skip together with no extra collective): `torch._amp_foreach_non_finite_check_and_unscale_`
(the GradScaler's kernel, scale 1) sets a found-inf flag. Optimizers that take a found-inf tensor (the fused ones,
e.g. SGD(fused=True)) then skip the whole update on the device, momentum and weight decay included, as they do
for the GradScaler: no host sync. Other optimizers pay one sync and get their gradients set to None, which makes
`step()` touch nothing. fp16: the gradient scaler makes the same check on the same (scaled) gradients and skips
by itself; the guard only counts. It cannot ask Accelerate: `accelerator.optimizer_step_was_skipped` is always
False with a fused optimizer (Accelerate infers a skip from optimizer.step() not being called, and the GradScaler
calls a fused optimizer's step() every time, handing it found_inf).
The number of consecutive skipped steps is read at each check: after `max_nonfinite_steps` in a row, NonFiniteError
stops the run (no bad update was applied meanwhile, so the checkpoints hold the last good weights). A non-finite
forward pass also makes BatchNorm's running statistics non-finite (they are updated in the forward, not by the
optimizer): `check_finite_state` refuses to write such a state into a checkpoint.
Test hook: with HRNETFCN_INJECT_NAN_AT=k in the environment, the gradients of iteration k (1-based: the update
that would produce checkpoint iter_k) and of every later one are made NaN.

Data loading. `loader_kwargs` gives DataLoaders a timeout (workers > 0) and the signal-ignoring worker init;
`explain_loader_errors` turns the DataLoader's timeout / dead-worker RuntimeErrors into one clear message.

Checks before heavy work. `check_split_files` (every file of a split is a complete, non-empty PNG: signature and
IEND trailer, read in parallel; the first few pairs are decoded and their labels checked), `check_crop_fits`,
`check_pretrained_source` (unknown timm tag or missing file, without downloading anything),
`check_checkpoint_fits` (names and shapes from the safetensors header against the model: another number of
classes is named as such).
"""

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from modeling.utils import check_state_dict, first_line

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, relaunching the same command continues the run
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_MARKER = "preempted.json"  # written into OUTPUT_DIR on a preemption exit, removed by the next launch
INJECT_NAN_ENV = "HRNETFCN_INJECT_NAN_AT"
DEFAULT_LOADER_TIMEOUT = 300.0  # seconds a DataLoader may wait for one batch from its workers
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"IEND\xaeB`\x82"  # the IEND chunk type and CRC: the last 8 bytes of every complete PNG


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
    reports its own exit code 1 whatever its workers returned)."""
    path = Path(output_dir) / PREEMPTED_MARKER
    path.write_text(json.dumps({"iteration": iteration, "signal": signal_name(signum), "checkpoint": str(checkpoint),
                                "exit_code": EXIT_PREEMPTED}) + "\n")
    return path


def clear_preemption_marker(output_dir) -> None:
    (Path(output_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ non-finite steps
def _found_non_finite(tensors, found: torch.Tensor) -> None:
    """found (float32, 1 element) becomes 1 if any tensor holds a NaN/inf; one multi-tensor kernel per dtype."""
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
        self._inject_at = int(os.environ.get(INJECT_NAN_ENV, "0")) or None  # the test hook (module docstring)

    def before_optimizer_step(self, iteration: int) -> None:
        """Call between backward and optimizer.step() on every micro-batch (acts on the last one only)."""
        if not self.accelerator.sync_gradients:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if self._inject_at is not None and iteration + 1 >= self._inject_at and grads:
            grads[0][(0,) * grads[0].dim()] = float("nan")
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


def check_finite_state(model, iteration: int) -> None:
    """Raise NonFiniteError naming the tensors if any floating-point parameter or buffer is NaN/inf (one sync)."""
    named = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if bool(finite.all()):
        return
    bad = [n for (n, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
    raise NonFiniteError(f"iteration {iteration}: the model holds non-finite values ({len(bad)} tensors: "
                         f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); not writing a checkpoint. A "
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


# --------------------------------------------------------------------------------------- checks before heavy work
def _png_problem(path: str) -> str | None:
    """Why a file is not a complete PNG (None if it looks complete): reads 8 bytes at each end."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    if head != _PNG_SIGNATURE:
        return "not a PNG (bad signature)"
    if tail != _PNG_TRAILER:
        return f"truncated PNG (no IEND trailer; {size} bytes)"
    return None


def check_split_files(source, decode: int = 2, threads: int = 16) -> None:
    """Every image and label of a split (a source from data.cityscapes.discover) is a complete PNG; the first
    `decode` pairs decode and hold trainIds. Raises ValueError naming the first bad file. Cheap: two 8-byte reads
    per file (threads hide network-filesystem latency); the full decode of every file happens when it is read."""
    from data.cityscapes import read_pair

    paths = [p for column in ("image", "label") for p in source[column] if isinstance(p, str | Path)]
    with ThreadPoolExecutor(threads) as pool:
        for path, problem in zip(paths, pool.map(_png_problem, paths), strict=True):
            if problem is not None:
                raise ValueError(f"{path}: {problem}; expected a complete PNG (re-extract or re-download it)")
    for i in range(min(decode, len(source))):
        read_pair(source[i]["image"], source[i]["label"], f"row {i}")


def check_crop_fits(image_size: tuple[int, int], crop_size, img_scale) -> None:
    """The training crop must fit the image rescaled to the nominal scale (ratio 1), else most crops are padding.

    image_size and crop_size are (h, w); img_scale is the recipe's (long, short) resize target."""
    from data.transforms import rescale_size

    height, width = rescale_size(*image_size, 1.0, img_scale)
    if crop_size[0] > height or crop_size[1] > width:
        raise ValueError(f"--crop_size {crop_size[0]} {crop_size[1]} is larger than the training images rescaled to "
                         f"the nominal scale ({height}x{width} from {image_size[0]}x{image_size[1]}): most crops "
                         f"would be padding; expected a crop of at most {height} {width}")


def check_pretrained_source(source: str) -> None:
    """'none', an existing local weights file, or a known timm pretrained tag; nothing is downloaded."""
    from modeling.hrnet_fcn import _WEIGHT_FILE_SUFFIXES, BACKBONE

    if source == "none":
        return
    path = Path(source)
    if path.suffix in _WEIGHT_FILE_SUFFIXES or path.exists():  # the same rule as load_pretrained_backbone
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained_backbone {source}: no such weights file")
        return
    import timm

    if source not in timm.list_pretrained():
        suffixes, tags = ", ".join(_WEIGHT_FILE_SUFFIXES), ", ".join(timm.list_pretrained(BACKBONE + ".*"))
        raise ValueError(f"--pretrained_backbone {source!r}: neither a weights file ({suffixes}), nor a timm "
                         f"pretrained tag such as {tags}, nor 'none'")


def check_checkpoint_fits(model, weights_file) -> None:
    """The tensors of a safetensors file (read from its header only) must match `model`'s names and shapes."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        shapes = {key: SimpleNamespace(shape=tuple(f.get_slice(key).get_shape())) for key in f.keys()}
    expected = model.state_dict()
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    head = shapes.get("decode_head.conv_seg.weight")
    if classes is not None and head is not None and head.shape[0] != classes:
        raise ValueError(f"{weights_file}: a model with {head.shape[0]} classes, this run's model has {classes}")
    check_state_dict(shapes, expected, str(weights_file))
