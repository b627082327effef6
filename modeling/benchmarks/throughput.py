"""benchmark.py throughput: images/s of the real training step under `accelerate launch`, with its data wait,
peak memory, host syncs and (with --count_collectives) the collectives per step.
"""

import argparse
import collections
import functools
import itertools
import sys
import time
import warnings

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from data import get_train_data
from data.labels import IGNORE_INDEX, NUM_CLASSES
from modeling import strict_json, training
from modeling.benchmarking import environment, peak_memory_gib, synchronize
from modeling.cli import non_negative_int, positive_int
from modeling.reliability import StepGuard

# torch.distributed functions that DDP (buffer broadcast), SyncBN and torch's Python comm hooks call through the
# module attribute: replacing the attribute sees every such call. Missing names (other torch versions) are skipped.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "_broadcast_coalesced", "reduce", "all_to_all", "barrier")
# the argument holding what this rank sends (a tensor or a list of tensors), by collective; barrier sends nothing
PAYLOAD_ARGUMENT = {"all_reduce": 0, "broadcast": 0, "reduce": 0, "all_gather": 1, "all_gather_single": 1,
                    "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1, "_broadcast_coalesced": 1,
                    "all_to_all": 1}
# what a collective is for, from the file that calls it: SyncBN (ours, torch's), DDP's gradient buckets (through
# count_gradient_buckets' hook) and DDP's buffer broadcast; anything else (StepGuard's check, ...) is "other"
CALLERS = (("modeling/sync_batchnorm.py", "batchnorm"), ("torch/nn/modules/_functions.py", "batchnorm"),
           ("ddp_comm_hooks/default_hooks.py", "gradient_buckets"), ("torch/nn/parallel/distributed.py",
                                                                     "buffer_broadcast"))


def payload_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes this rank puts into one collective call: numel x element size, host metadata (no device read)."""
    index = PAYLOAD_ARGUMENT.get(name)
    value = args[index] if index is not None and len(args) > index else kwargs.get("tensor", kwargs.get("input"))
    tensors = value if isinstance(value, list | tuple) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def collective_kind(name: str, caller: str) -> str:
    """batchnorm_forward / batchnorm_backward / gradient_buckets / buffer_broadcast / other."""
    kind = next((k for suffix, k in CALLERS if caller.replace("\\", "/").endswith(suffix)), "other")
    if kind == "batchnorm":  # both SyncBNs gather statistics in forward and all-reduce gradient sums in backward
        return "batchnorm_backward" if name == "all_reduce" else "batchnorm_forward"
    return kind


class CollectiveCounter:
    """While entered (and enabled), counts calls of the torch.distributed collectives in COLLECTIVES: per name
    (`counts`), and calls and bytes sent per kind (`calls`, `bytes`; see collective_kind).

    What it cannot see: DDP's built-in gradient all-reduce (C++; `count_gradient_buckets` reroutes it), and
    collectives inside torch.compile'd graphs (throughput does not count under --compile, where the wrappers
    would be traced into the graph).
    """

    def __init__(self, enabled: bool = True):
        self.enabled, self.originals = enabled, {}
        self.reset()

    def reset(self) -> None:
        self.counts, self.calls, self.bytes = collections.Counter(), collections.Counter(), collections.Counter()

    def __enter__(self):
        for name in COLLECTIVES if self.enabled else ():
            if hasattr(dist, name):
                self.originals[name] = getattr(dist, name)
                setattr(dist, name, self.counting(name, self.originals[name]))
        return self

    def counting(self, name: str, function):
        @functools.wraps(function)
        def counted(*args, **kwargs):
            # Python ints from host metadata and the caller's file name: no device work, no synchronisation
            kind = collective_kind(name, sys._getframe(1).f_code.co_filename)
            self.counts[name] += 1
            self.calls[kind] += 1
            self.bytes[kind] += payload_bytes(name, args, kwargs)
            return function(*args, **kwargs)

        return counted

    def __exit__(self, *exc_info):
        for name, function in self.originals.items():
            setattr(dist, name, function)


def count_gradient_buckets(model) -> None:
    """Route DDP's gradient all-reduce through torch's own Python `allreduce_hook`, one dist.all_reduce per bucket.

    The arithmetic is DDP's default (divide by the world size, all-reduce the bucket); the difference is a Python
    call per bucket (microseconds). Must run before the first forward. No-op without DDP (one process).
    """
    ddp = getattr(model, "_orig_mod", model)
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        ddp.register_comm_hook(state=None, hook=allreduce_hook)


def host_sync_sites(function) -> dict[str, int]:
    """Calls function() once with CUDA's sync debug mode on; returns {"file:line": count} of its synchronizing
    CUDA calls. torch attributes each warning to the Python line that made the call, so the keys say where to look.

    torch's own caveat: not every synchronizing operation is flagged (torch.distributed's are not).
    """
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every occurrence, not once per source line
            function()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return dict(collections.Counter(f"{w.filename}:{w.lineno}" for w in caught
                                    if "synchronizing CUDA operation" in str(w.message)))


def compile_figures() -> dict:
    """What TorchDynamo compiled in this process so far: graphs, graph breaks, and each break's reason (first line).

    Read from torch's compile counters after the run (no cost during it). Under `accelerate launch` with several
    processes the DDP-wrapped model is compiled: DDP's own forward adds its graph breaks (3 in torch 2.14, by
    design: DDP's wrapper runs eagerly around the compiled model; BENCHMARKS.md, "torch.compile on the CPU").
    """
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": sorted({reason.splitlines()[0] for reason in breaks})}


def synthetic_batch(batch_size: int, crop_size, channels_last: bool, device: torch.device, seed: int = 0):
    """A random (pixel_values, labels) batch made on the device: the model's speed without any data cost."""
    generator = torch.Generator(device=device).manual_seed(seed)
    height, width = crop_size
    pixel_values = torch.randn(batch_size, 3, height, width, generator=generator, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size, height, width), generator=generator, device=device)
    labels[:, :, : width // 8] = IGNORE_INDEX  # some ignored pixels, as in real labels
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    return pixel_values, labels


def iteration_step(accelerator, model, optimizer, scheduler, guard):
    """step(pixel_values, labels) -> loss: one iteration as train.py's loop runs it (gradient_accumulation_steps 1)."""
    def step(pixel_values, labels) -> torch.Tensor:
        loss = training.training_step(model, optimizer, accelerator, guard, 0, pixel_values, labels)
        guard.after_iteration()
        scheduler.step()
        return loss

    return step


def batch_source(args, accelerator):
    """get_batch() -> (pixel_values, labels) on the device, as the training loop gets them.

    --synthetic_input: one random batch made on the device once and returned every time (no data cost at all).
    Otherwise training's own sampler and loader over data.get_train_data(pipeline=--pipeline), on_device
    augmentation with a per-iteration seeded device generator, channels_last input when asked.
    """
    device, rank = accelerator.device, accelerator.process_index
    if args.synthetic_input:
        batch = synthetic_batch(args.batch_size, args.crop_size, args.channels_last, device, seed=rank)
        return lambda: batch

    try:
        dataset, on_device = get_train_data(args.data_root, pipeline=args.pipeline, crop_size=tuple(args.crop_size))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: --data_root: {error}") from None
    sampler = training.create_sampler(dataset, accelerator, args.batch_size, seed=0, data_root=args.data_root)
    batches = training.train_batches(dataset, sampler, args.batch_size, args.num_workers, first_batch=0,
                            pin_memory=device.type == "cuda")
    generator, iterations = torch.Generator(device=device), itertools.count()

    def next_training_batch():
        generator.manual_seed(training.augmentation_seed(0, rank, next(iterations)))
        return training.next_batch(batches, on_device, device, generator, args.channels_last)

    return next_training_batch


def run(args) -> dict | None:
    """images/s of the real training step under `accelerate launch`; the JSON on the main process (else None).

    The model, optimizer, scheduler and step come from modeling/training.py, SyncBN/AMP/compile from Accelerate as in
    training. The clock starts after --warmup iterations (device synchronised, processes aligned by a barrier) and
    stops after --iters more (device synchronised): nothing in between waits for the device. Per process it
    measures the time, the host time spent getting each batch (data wait) and the peak memory; the slowest process
    gives the figures. With --count_collectives the collectives are counted per step in the timed iterations
    (CollectiveCounter); otherwise DDP runs untouched and they are null. The first warm-up iteration is timed on its
    own: under --compile it holds the compilation (`first_iteration_s`), and `compiled` gives dynamo's graphs and
    graph breaks.
    """
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("error: --iters and --batch_size must be >= 1 and --warmup >= 0")
    if not args.synthetic_input and not args.data_root:
        raise SystemExit("error: --data_root is required unless --synthetic_input is given")
    accelerator = Accelerator(step_scheduler_with_optimizer=False,  # train.py steps the scheduler per iteration
                              dynamo_backend="inductor" if args.compile else None,
                              kwargs_handlers=training.accelerator_kwargs(args.sync_batchnorm))
    training.check_launch(accelerator)
    device, processes = accelerator.device, accelerator.num_processes
    set_seed(0)
    # as training builds it (the weights do not change the speed); --sync_batchnorm off: the SyncBN cost is the
    # difference with the default run
    model = training.create_model("none", args.channels_last, accelerator, args.sync_batchnorm)
    optimizer, scheduler = training.create_optimizer_and_scheduler(model, lr=0.01, max_iters=80_000)
    sync_batchnorm = training.batchnorm_kind(model)  # what runs: one process is plain BN ("off") whatever the flag
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    guard = StepGuard(accelerator, model, optimizer)  # training's non-finite check is part of the step
    count = args.count_collectives and not args.compile
    if count:
        count_gradient_buckets(model)
    get_batch = batch_source(args, accelerator)

    step = iteration_step(accelerator, model, optimizer, scheduler, guard)
    model.train()
    loss_sum = torch.zeros((), device=device)
    with CollectiveCounter(enabled=count) as counter:
        first_iteration_s = None
        for i in range(args.warmup):  # allocator, cuDNN autotuning, torch.compile, DDP bucket rebuild
            start = time.perf_counter()
            loss_sum += step(*get_batch())
            if i == 0:  # under --compile: the forward's and the backward's compilation
                first_iteration_s = synchronize(device) - start
        accelerator.wait_for_everyone()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter.reset()
        data_wait, start = 0.0, synchronize(device)
        for _ in range(args.iters):
            t = time.perf_counter()
            batch = get_batch()
            data_wait += time.perf_counter() - t
            loss_sum += step(*batch)
        elapsed = synchronize(device) - start
        per_step = {name: n / args.iters for name, n in counter.counts.items()}
        by_kind = {kind: {"calls": n / args.iters, "bytes": counter.bytes[kind] / args.iters}
                   for kind, n in sorted(counter.calls.items())}
    host_syncs = sites = None
    if device.type == "cuda":  # after the clock: sync debug mode slows what it watches
        sites = {"data": host_sync_sites(get_batch), "step": host_sync_sites(lambda: step(*batch))}
        host_syncs = {part: sum(counts.values()) for part, counts in sites.items()}

    # the slowest process sets the pace of a synchronous data-parallel step
    mine = torch.tensor([[elapsed, data_wait, peak_memory_gib(device), loss_sum.item(),
                          first_iteration_s or 0.0]], device=device, dtype=torch.float64)
    gathered = accelerator.gather(mine)
    elapsed, data_wait, peak_memory, _, first_iteration = gathered.max(dim=0).values.tolist()
    loss_mean = gathered[:, 3].mean().item() / (args.warmup + args.iters)  # a sanity figure: finite, about ln 19
    global_batch, env = args.batch_size * processes, environment(accelerator)
    results = {
        "mode": "throughput",
        "num_processes": processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": env["device"],
        "input": "synthetic" if args.synthetic_input else args.pipeline,
        "data_root": None if args.synthetic_input else str(args.data_root),
        "batch_size": args.batch_size,
        "global_batch": global_batch,
        "crop_size": list(args.crop_size),
        "channels_last": args.channels_last,
        "compile": args.compile,
        "sync_batchnorm": sync_batchnorm,
        "warmup": args.warmup,
        "iters": args.iters,
        "images_per_sec": global_batch * args.iters / elapsed,
        "s_per_iter": elapsed / args.iters,
        "data_wait_s": data_wait / args.iters,
        "data_wait_pct": 100.0 * data_wait / elapsed,
        "peak_memory_gib": peak_memory,
        "peak_memory_kind": "cuda max allocated, timed iterations" if device.type == "cuda"
        else "process max resident set, whole run (CPU)",
        "collectives_per_step": sum(per_step.values()) if count else None,
        "collectives_by_name": per_step if count else None,
        "collectives_by_kind": by_kind if count else None,
        "collective_bytes_per_step": sum(k["bytes"] for k in by_kind.values()) if count else None,
        "host_syncs_per_step": host_syncs,
        "host_sync_sites": sites,
        "loss_mean": loss_mean,
        # the first warm-up iteration (None with --warmup 0), slowest process: with --compile, the compile time
        "first_iteration_s": first_iteration if args.warmup else None,
        "compiled": compile_figures() if args.compile else None,
        "environment": env,
    }
    accelerator.print(strict_json.dumps(results, indent=2))
    training.end_processes(accelerator)
    return results if accelerator.is_main_process else None


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_root", default=None, help="prepared Cityscapes root (scripts/prepare_cityscapes.py)")
    parser.add_argument("--synthetic_input", action="store_true",
                        help="random tensors made once on the device instead of data: the model's speed alone")
    parser.add_argument("--pipeline", choices=("fast", "reference"), default="fast",
                        help="training data path of data.get_train_data (fast: batched augmentation on the device)")
    parser.add_argument("--num_workers", type=non_negative_int, default=2, help="loader workers per process")
    parser.add_argument("--batch_size", type=positive_int, default=2, help="images per process (the reference: 2)")
    parser.add_argument("--crop_size", type=positive_int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed iterations first")
    parser.add_argument("--iters", type=positive_int, default=50, help="timed iterations")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) through Accelerate")
    parser.add_argument("--sync_batchnorm", choices=training.SYNC_BATCHNORM_CHOICES, default="ours",
                        help="as train.py's: ours, torch (nn.SyncBatchNorm, CUDA only) or off (per-process BN: "
                             "measures what SyncBN costs); one process runs plain BN whatever the choice")
    # opt-in: counting wraps torch.distributed and replaces DDP's C++ gradient all-reduce by a Python comm hook, so
    # the default run times the path training runs
    parser.add_argument("--count_collectives", action="store_true",
                        help="count torch.distributed calls and bytes per step (reroutes DDP's gradient all-reduce "
                             "through a Python hook; not under --compile); without it they are null")
