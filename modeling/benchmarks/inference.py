"""benchmark.py inference: images/s and latency per image of modeling.inference.predict (whole, slide, aug) at
batch 1 and --batch_size, in one precision per run (Accelerate's autocast, as eval.py), contiguous and channels_last,
eager and torch.compile'd, on synthetic input.

Clock discipline as in `throughput`: --warmup untimed iterations per configuration (allocator, cuDNN autotuning,
compilation), then --iters timed ones, each ended by a device sync (a caller needs the prediction, so a batch is
done when its argmax is), the clock read only after the sync.
"""

import argparse

import numpy as np
import torch
from accelerate import Accelerator

from modeling import strict_json
from modeling.benchmarking import environment, peak_memory_gib, synchronize
from modeling.benchmarks.report import PRECISION_NAMES, inference_markdown
from modeling.cli import non_negative_int, positive_int, refuse_fp16_on_cpu
from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
from modeling.inference import MODES, add_predict_args, load_model, predict, predict_options


def time_predictions(accelerator, model, pixel_values: torch.Tensor, mode: str, options: dict, warmup: int,
                     iters: int) -> list[float]:
    """Seconds of each timed call of predict + argmax on `pixel_values`, after `warmup` untimed calls."""
    def once():
        with accelerator.autocast():
            return predict(model, pixel_values, mode, **options).argmax(1)

    for _ in range(warmup):
        once()
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, last = [], synchronize(device)
    for _ in range(iters):
        once()
        now = synchronize(device)
        times.append(now - last)
        last = now
    return times


def figures(times: list[float], batch_size: int) -> dict:
    """images/s over the timed calls, and the time per image (a call's time / the batch size) in ms."""
    per_image = 1000.0 * np.asarray(times) / batch_size
    p50, p90 = np.percentile(per_image, [50, 90]).tolist()
    return {"images_per_sec": batch_size * len(times) / sum(times), "ms_per_image_mean": float(per_image.mean()),
            "ms_per_image_p50": p50, "ms_per_image_p90": p90}


def run(args) -> dict:
    """One row per (compile, channels_last, mode, batch size); the JSON holds them with the run's environment."""
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    refuse_fp16_on_cpu(accelerator)
    try:
        options = predict_options(args)
        model = load_model(args.checkpoint) if args.checkpoint else None
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if model is None:
        torch.manual_seed(0)
        model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())  # random weights run as fast as trained ones
    device = accelerator.device
    model = model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    precision = PRECISION_NAMES.get(accelerator.mixed_precision, accelerator.mixed_precision)
    rows = []
    for channels_last in (False, True) if args.channels_last else (False,):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        # the same inductor compile as Accelerate's dynamo_backend, kept beside the eager model it wraps
        for compiled in (False, True) if args.compile else (False,):
            net = torch.compile(model) if compiled else model
            for mode in args.modes:
                for batch_size in sorted({1, args.batch_size}):
                    pixel_values = torch.randn(batch_size, 3, *args.input_size, generator=generator, device=device)
                    pixel_values = pixel_values.contiguous(memory_format=layout)
                    times = time_predictions(accelerator, net, pixel_values, mode, options, args.warmup, args.iters)
                    rows.append({"mode": mode, "batch_size": batch_size, "precision": precision,
                                 "channels_last": channels_last, "compile": compiled, **figures(times, batch_size),
                                 "peak_memory_gib": peak_memory_gib(device)})
                    accelerator.print(strict_json.dumps(rows[-1]))
    env = environment(accelerator)
    results = {"mode": "inference", "device": env["device"], "mixed_precision": accelerator.mixed_precision,
               "input_size": list(args.input_size), "checkpoint": args.checkpoint, "warmup": args.warmup,
               "iters": args.iters, "predict_options": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in options.items()},
               "threads": torch.get_num_threads(),
               "peak_memory_kind": "cuda max allocated, timed iterations" if device.type == "cuda"
               else "process max resident set, whole run (CPU)", "rows": rows, "environment": env}
    accelerator.print(inference_markdown([{"name": "this run", "data": results}]))
    return results


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument("--input_size", type=positive_int, nargs=2, default=(1024, 2048), metavar=("H", "W"),
                        help="synthetic input size (default: a Cityscapes image)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="the larger batch (batch 1 always runs)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls per configuration")
    parser.add_argument("--iters", type=positive_int, default=10, help="timed calls per configuration")
    parser.add_argument("--channels_last", action="store_true",
                        help="also measure with channels_last model and input (rows for both layouts)")
    parser.add_argument("--compile", action="store_true", help="also measure the torch.compile'd (inductor) model")
    parser.add_argument("--checkpoint", default=None,
                        help="a save_pretrained folder or reference .pth (default: random weights, as fast)")
    add_predict_args(parser)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="one precision per run (fp16: GPU only); default: the accelerate launch config")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
