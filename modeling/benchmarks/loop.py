"""benchmark.py loop: our training iteration (what train.py runs: Accelerate's prepared model and optimizer,
autocast, the non-finite guard, the scheduler) against a plain PyTorch loop of the same model (torch.autocast,
backward, the same fused SGD step; torch's GradScaler for fp16), one process, on one batch made on the device.

The two run in alternating blocks of --iters iterations, --reps times, so that clock boosts and other load hit both
alike; each block is ended by a device sync before the clock is read. The figure is the ratio of images/s, ours over
plain (median over the repetitions): the price of the suite's loop, target >= 0.9.
"""

import argparse
from statistics import median

import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile

from modeling import strict_json, training
from modeling.benchmarking import environment, synchronize
from modeling.benchmarks.throughput import iteration_step, synthetic_batch
from modeling.cli import non_negative_int, positive_int, refuse_fp16_on_cpu
from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
from modeling.reliability import StepGuard

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def plain_loop_step(channels_last: bool, mixed_precision: str, device: torch.device, compile_model: bool):
    """step(pixel_values, labels) -> loss of a hand-written loop: the same model, optimizer and schedule, no
    Accelerate, no guard."""
    model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig()).to(device)
    model = training.to_channels_last(model) if channels_last else model
    # built after the move: the optimizer's zero momentum buffers are made beside the parameters, on the device
    optimizer, scheduler = training.create_optimizer_and_scheduler(model, lr=0.01, max_iters=80_000)
    network = torch.compile(model) if compile_model else model
    dtype = AUTOCAST_DTYPES[mixed_precision]
    scaler = torch.amp.GradScaler(device.type, init_scale=training.FP16_INIT_SCALE, enabled=dtype == torch.float16)
    network.train()

    def step(pixel_values, labels) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = network(pixel_values=pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # fused SGD takes the scaler's found_inf: no host sync
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss.detach()

    return step


def our_step(accelerator, channels_last: bool):
    """step(pixel_values, labels) -> loss exactly as the throughput benchmark and train.py run it."""
    model = training.create_model("none", channels_last, accelerator, sync_batchnorm="off")
    optimizer, scheduler = training.create_optimizer_and_scheduler(model, lr=0.01, max_iters=80_000)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    return iteration_step(accelerator, model, optimizer, scheduler, StepGuard(accelerator, model, optimizer))


def time_block(step, batch, iters: int, device: torch.device) -> float:
    start = synchronize(device)
    for _ in range(iters):
        step(*batch)
    return synchronize(device) - start


def profile_steps(step, batch, device: torch.device, steps: int = 2, top: int = 15) -> dict:
    """torch.profiler over `steps` iterations: is the step bound by the host (launching kernels) or the device?

    Per step: wall time, device busy time (sum of kernel times; kernels overlap little in one stream), host time
    spent in ops, number of kernels, and the ops with the most device and host time. Host-bound: wall ~ host time
    and device busy << wall (then CUDA graphs / torch.compile pay); device-bound: busy ~ wall.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(*batch)
        wall = synchronize(device) - start
    events = prof.key_averages()

    def per_step_ms(us: float) -> float:
        return round(us / steps / 1e3, 3)

    def ranked(key):
        return [[e.key, per_step_ms(key(e)), e.count // steps] for e in sorted(events, key=key, reverse=True)[:top]]

    device_time = [e for e in events if e.self_device_time_total > 0]
    return {"wall_ms": per_step_ms(wall * 1e6),
            "device_busy_ms": per_step_ms(sum(e.self_device_time_total for e in device_time)),
            "host_op_ms": per_step_ms(sum(e.self_cpu_time_total for e in events)),
            "kernels": sum(e.count for e in device_time) // steps,
            "top_device": ranked(lambda e: e.self_device_time_total),
            "top_host": ranked(lambda e: e.self_cpu_time_total)}


def run(args) -> dict:
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                              dynamo_backend="inductor" if args.compile else None,
                              kwargs_handlers=training.accelerator_kwargs("off"))
    refuse_fp16_on_cpu(accelerator)
    if accelerator.num_processes != 1:
        raise SystemExit("error: benchmark.py loop runs one process (python scripts/benchmark.py loop ...)")
    device = accelerator.device
    torch.manual_seed(0)
    steps = {"plain": plain_loop_step(args.channels_last, accelerator.mixed_precision, device, args.compile),
             "ours": our_step(accelerator, args.channels_last)}
    batch = synthetic_batch(args.batch_size, args.crop_size, args.channels_last, device)
    for step in steps.values():
        time_block(step, batch, args.warmup, device)  # allocator, cuDNN autotuning, compilation
    seconds = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            seconds[name].append(time_block(step, batch, args.iters, device))
    images = args.batch_size * args.iters
    profiles = {name: profile_steps(step, batch, device) for name, step in steps.items()} if args.profile else None
    env = environment(accelerator)
    results = {
        "mode": "loop", "device": env["device"], "mixed_precision": accelerator.mixed_precision,
        "batch_size": args.batch_size, "crop_size": list(args.crop_size), "channels_last": args.channels_last,
        "compile": args.compile, "warmup": args.warmup, "iters": args.iters, "reps": args.reps,
        "threads": torch.get_num_threads(),
        "images_per_sec": {name: images * len(s) / sum(s) for name, s in seconds.items()},
        "ratio_ours_to_plain": median(p / o for p, o in zip(seconds["plain"], seconds["ours"], strict=True)),
        "block_seconds": seconds,
        "profile_per_step": profiles,
        "environment": env,
    }
    accelerator.print(strict_json.dumps(results, indent=2))
    return results


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--crop_size", type=positive_int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed iterations of each loop first")
    parser.add_argument("--iters", type=positive_int, default=10, help="iterations per timed block")
    parser.add_argument("--reps", type=positive_int, default=5, help="timed blocks of each loop, alternating")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) both loops")
    parser.add_argument("--profile", action="store_true",
                        help="also a torch.profiler summary of 2 steps of each loop (host- or device-bound?)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: the accelerate launch config (fp16: GPU only)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
