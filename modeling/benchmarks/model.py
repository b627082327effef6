"""benchmark.py model: forward+backward time of our model vs the bare timm backbone, on the same CPU input."""

import argparse
import time
from statistics import median

import timm
import torch

from modeling import strict_json
from modeling.cli import non_negative_int, positive_int
from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation


def run(args) -> dict:
    """Forward+backward seconds per iteration of our model vs the bare timm backbone on the same CPU input.

    The three networks run in turn within each repetition, so load on the machine hits them alike: timm's
    hrnet_w18 features model (loss = sum of its outputs), our model with timm's nearest fusion, and our model as
    it trains (bilinear fusion, FCN head, upsampled cross-entropy). The ratios are the overheads of head+loss and of
    the reference's bilinear fusion: medians over --reps (after --warmup) of the ratio within each repetition, which
    cancels most of the drift of a shared machine's load; seconds are medians too. Wall time and this process's CPU
    time are both recorded: with --threads 1 on a busy machine the CPU time is the steadier measure of the work.
    """
    if args.height % 32 or args.width % 32:
        raise SystemExit("error: --height and --width must be multiples of 32 (timm's own fusion needs it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, args.height, args.width)
    labels = torch.randint(0, 19, (args.batch_size, args.height, args.width))
    labels[:, :, : args.width // 8] = 255  # some ignored pixels, as in real labels
    backbone = timm.create_model("hrnet_w18", pretrained=False, features_only=True, feature_location="",
                                 out_indices=(1, 2, 3, 4))
    nearest = HRNetFCNForSemanticSegmentation(HRNetFCNConfig(fuse_upsample="nearest"))
    ours = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
    steps = {
        "timm_backbone": (backbone, lambda: sum(f.sum() for f in backbone(pixel_values))),
        "ours_nearest_fuse": (nearest, lambda: nearest(pixel_values, labels=labels).loss),
        "ours": (ours, lambda: ours(pixel_values, labels=labels).loss),
    }
    seconds = {name: [] for name in steps}
    cpu_seconds = {name: [] for name in steps}
    for rep in range(args.warmup + args.reps):
        for name, (model, loss_fn) in steps.items():
            model.train()
            model.zero_grad(set_to_none=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss_fn().backward()
            if rep >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - cpu_start)

    def ratios(times: dict) -> dict:
        return {name: median([a / b for a, b in zip(t, times["timm_backbone"], strict=True)])
                for name, t in times.items()}

    results = {
        "mode": "model", "input": [args.batch_size, 3, args.height, args.width], "threads": torch.get_num_threads(),
        "warmup": args.warmup, "reps": args.reps, "torch": torch.__version__, "timm": timm.__version__,
        "seconds_per_iter": {name: median(s) for name, s in seconds.items()},
        "ratio_to_timm_backbone": ratios(seconds),
        "cpu_seconds_per_iter": {name: median(s) for name, s in cpu_seconds.items()},
        "cpu_ratio_to_timm_backbone": ratios(cpu_seconds),
        "all_seconds": seconds,
        "all_cpu_seconds": cpu_seconds,
    }
    print(strict_json.dumps(results, indent=2))
    return results


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=positive_int, default=2)
    parser.add_argument("--height", type=positive_int, default=256)
    parser.add_argument("--width", type=positive_int, default=512)
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed repetitions first")
    parser.add_argument("--reps", type=positive_int, default=5, help="timed repetitions (the median is reported)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
