"""Benchmarks: each mode measures one thing side by side in one run and prints/writes JSON.

    python scripts/benchmark.py data --out out/bench_data.json        # CPU cost per training sample
    python scripts/benchmark.py model --out out/bench_model.json      # our model vs the bare timm backbone
    python scripts/benchmark.py metric --out out/bench_metric.json    # streaming mIoU vs evaluate's way
    accelerate launch scripts/benchmark.py throughput ...             # the real training step, images/s
    python scripts/benchmark.py report RUN_DIR... --out_dir D         # the benchmark table and plots

Results go to BENCHMARKS.md with the command, the machine and the date.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ----------------------------------------------------------------------------------------------- data (issue 4)
def mmseg_style_sample(image_path: str, label_path: str, seed, crop_size=(512, 1024), img_scale=(2048, 1024),
                       ratio_range=(0.5, 2.0), cat_max_ratio=0.75):
    """One training sample the way mmseg v0.11 computes it: plain OpenCV/numpy calls, BGR, as mmcv 1.2.7 makes them.

    The speed baseline of the reference pipeline (data.get_train_data(..., "reference")). It draws from
    numpy's Generator seeded like the reference's sample (seed = (seed, epoch, index)) in the reference's order,
    so both compute the same sample (size, crop, flip, photometric steps): only the way differs. The crop test
    uses np.unique as mmseg's RandomCrop does; Pad is left out (a no-op at these sizes).
    Returns (float32 3xhxw normalized RGB, int64 hxw labels).
    """
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)  # LoadImageFromFile: BGR uint8
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]  # Resize(ratio_range) + imrescale
    target = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    height, width = label.shape
    factor = min(max(target) / max(height, width), min(target) / min(height, width))
    size = (int(width * factor + 0.5), int(height * factor + 0.5))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    margins = (max(label.shape[0] - crop_size[0], 0) + 1, max(label.shape[1] - crop_size[1], 0) + 1)
    offsets = np.stack([rng.integers(0, margins[0], 11), rng.integers(0, margins[1], 11)], 1)
    for y, x in offsets:  # RandomCrop(cat_max_ratio): 10 checked tries, then an 11th
        classes, counts = np.unique(label[y:y + crop_size[0], x:x + crop_size[1]], return_counts=True)
        counts = counts[classes != 255]
        if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
            break
    image, label = image[y:y + crop_size[0], x:x + crop_size[1]], label[y:y + crop_size[0], x:x + crop_size[1]]
    if rng.random() < 0.5:  # RandomFlip: mmcv.imflip
        image, label = np.flip(image, axis=1), np.flip(label, axis=1)

    def convert(values, alpha=1.0, beta=0.0):  # PhotoMetricDistortion.convert
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    brightness = rng.uniform(-32, 32) if rng.integers(2) else None
    mode = rng.integers(2)
    contrast = rng.uniform(0.5, 1.5) if rng.integers(2) else None
    if brightness is not None:
        image = convert(image, beta=brightness)
    if mode == 1 and contrast is not None:
        image = convert(image, alpha=contrast)
    if rng.integers(2):  # saturation: mmcv.bgr2hsv / hsv2bgr
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):  # hue
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-18, 18)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0 and contrast is not None:
        image = convert(image, alpha=contrast)
    image = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_BGR2RGB)  # Normalize: mmcv.imnormalize(to_rgb=True)
    mean, std = np.array([[123.675, 116.28, 103.53]]), np.array([[58.395, 57.12, 57.375]])
    cv2.subtract(image, mean, image)
    cv2.multiply(image, 1 / std, image)
    return np.ascontiguousarray(image.transpose(2, 0, 1)), label.astype(np.int64)  # DefaultFormatBundle


def bench_data(args) -> dict:
    """CPU cost per training sample: the reference pipeline from PNGs vs the fast path, on the same files.

    Measures, on --num_images synthetic (or --data_root) images: PNG decode alone; the reference pipeline
    (decode + resize + crop + flip + photometric + normalize, ms per sample); the fast path's loading (memmap
    read of image + label, page cache warm, ms per sample); the fast path's device-side augmentation run on the
    CPU (ms per batch of --batch_size); DataLoader images/s with each --workers count for both pipelines.
    Means over --repeats passes after one warm-up pass.
    """
    import os
    import platform
    import subprocess
    import tempfile
    import time

    import cv2
    import numpy as np
    import torch

    import data
    from data.cityscapes import discover, read_pair
    from data.synthetic import generate_cityscapes

    def per_item(dataset, repeats):  # ms per __getitem__, after one warm-up pass
        for i in range(len(dataset)):
            dataset[i]
        start = time.perf_counter()
        for _ in range(repeats):
            for i in range(len(dataset)):
                dataset[i]
        return 1000 * (time.perf_counter() - start) / (repeats * len(dataset))

    def loader_rate(dataset, workers):  # images/s through a DataLoader, after its first batch
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.loader_batch_size, num_workers=workers,
                                             persistent_workers=workers > 0)
        for _ in loader:
            pass
        start, count = time.perf_counter(), 0
        for _ in range(max(args.repeats, 1)):
            for batch in loader:
                count += len(batch["index"])
        return count / (time.perf_counter() - start)

    workdir = tempfile.TemporaryDirectory(prefix="bench_data_") if args.work_dir is None else None
    root = Path(args.data_root) if args.data_root else Path(args.work_dir or workdir.name) / "cs"
    try:
        start = time.perf_counter()
        if not args.data_root and not (root / "leftImg8bit").exists():
            generate_cityscapes(root, num_train=args.num_images, num_val=1, num_test=0, height=args.height,
                                width=args.width, seed=0)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        data.prepare_cityscapes(root, nproc=args.nproc, build_cache=True, cache_splits=("train",), progress=False)
        prepare_s = time.perf_counter() - start
        source = discover(root, "train").select(range(min(args.num_images, len(discover(root, "train")))))
        height, width = read_pair(source[0]["image"], source[0]["label"])[1].shape
        crop, scale = tuple(args.crop_size), tuple(args.img_scale)
        reference, _ = data.get_train_data(source, "reference", crop_size=crop, img_scale=scale)
        fast, augment = data.get_train_data(root, "fast", crop_size=crop, img_scale=scale)
        fast = torch.utils.data.Subset(fast, range(len(source)))

        class Decode(torch.utils.data.Dataset):  # PNG decode + label check only
            def __len__(self):
                return len(source)

            def __getitem__(self, i):
                return read_pair(source[i]["image"], source[i]["label"])

        class MmsegStyle(Decode):  # the same samples as plain OpenCV calls, mmseg's way
            def __getitem__(self, i):
                return mmseg_style_sample(source[i]["image"], source[i]["label"], (0, 0, i), crop, scale)

        cv2.setNumThreads(torch.get_num_threads())  # OpenCV's own thread pool ignores OMP_NUM_THREADS
        decode_ms = per_item(Decode(), args.repeats)
        reference_ms = per_item(reference, args.repeats)
        best_cpu = np.full((2, len(source)), np.inf)  # reference vs mmseg's way: CPU s, interleaved, best per sample
        for _ in range(args.repeats + 1):
            for i in range(len(source)):
                for k, dataset in enumerate((reference, MmsegStyle())):
                    start = time.process_time()
                    dataset[i]
                    best_cpu[k, i] = min(best_cpu[k, i], time.process_time() - start)
        reference_cpu_ms, mmseg_style_cpu_ms = 1000 * best_cpu.mean(1)
        fast_ms = per_item(fast, args.repeats)
        batch = torch.utils.data.default_collate([fast[i % len(fast)] for i in range(args.batch_size)])
        generator = torch.Generator().manual_seed(0)
        augment(batch, generator)  # warm-up
        times = []
        for _ in range(max(args.repeats, 1)):
            start = time.perf_counter()
            augment(batch, generator)
            times.append(time.perf_counter() - start)
        aug_ms = 1000 * float(np.mean(times))
        loader = {"reference": {}, "fast": {}}
        for workers in args.workers:
            loader["reference"][str(workers)] = round(loader_rate(reference, workers), 2)
            loader["fast"][str(workers)] = round(loader_rate(fast, workers), 2)
    finally:
        if workdir is not None:
            workdir.cleanup()
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    results = {
        "mode": "data", "height": int(height), "width": int(width), "num_images": len(source), "crop_size": crop,
        "img_scale": scale, "batch_size": args.batch_size, "repeats": args.repeats, "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "generate_s": round(generate_s, 2), "prepare_and_cache_s": round(prepare_s, 2),
        "decode_ms_per_sample": round(decode_ms, 3), "reference_ms_per_sample": round(reference_ms, 3),
        "fast_load_ms_per_sample": round(fast_ms, 3),
        "reference_vs_opencv_mmseg_way": {"reference_cpu_ms": round(reference_cpu_ms, 2),
                                          "opencv_cpu_ms": round(mmseg_style_cpu_ms, 2),
                                          "ratio": round(reference_cpu_ms / mmseg_style_cpu_ms, 2)},
        "reference_over_fast_load": round(reference_ms / fast_ms, 1),
        "decode_over_fast_load": round(decode_ms / fast_ms, 1),
        "device_aug_ms_per_batch": round(aug_ms, 1), "device_aug_ms_per_sample": round(aug_ms / args.batch_size, 2),
        "loader_batch_size": args.loader_batch_size, "loader": loader,
    }
    print(json.dumps(results, indent=2))
    return results


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_root", default=None, help="a prepared-or-not Cityscapes root (default: synthetic)")
    parser.add_argument("--work_dir", default=None, help="where to generate the synthetic data (default: a temp dir)")
    parser.add_argument("--height", type=int, default=1024, help="synthetic image height")
    parser.add_argument("--width", type=int, default=2048, help="synthetic image width")
    parser.add_argument("--num_images", type=int, default=8, help="training images to measure on")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch_size", type=int, default=16, help="batch of the device-side augmentation")
    parser.add_argument("--loader_batch_size", type=int, default=2, help="DataLoader batch size (recipe: 2/GPU)")
    parser.add_argument("--crop_size", type=int, nargs=2, default=[512, 1024], help="crop h w")
    parser.add_argument("--img_scale", type=int, nargs=2, default=[2048, 1024], help="resize target (long, short)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images")
    parser.add_argument("--nproc", type=int, default=2, help="processes for label preparation and caching")


# ---------------------------------------------------------------------------------------------- model (issue 3)
def bench_model(args) -> dict:
    """Forward+backward seconds per iteration of our model vs the bare timm backbone on the same CPU input.

    The three networks run in turn within each repetition, so load on the machine hits them alike: timm's
    hrnet_w18 features model (loss = sum of its outputs), our model with timm's nearest fusion, and our model as
    it trains (bilinear fusion, FCN head, upsampled cross-entropy). The ratios are the overheads of head+loss and of
    the reference's bilinear fusion: medians over --reps (after --warmup) of the ratio within each repetition, which
    cancels most of the drift of a shared machine's load; seconds are medians too. Wall time and this process's CPU
    time are both recorded: with --threads 1 on a busy machine the CPU time is the steadier measure of the work.
    """
    import time
    from statistics import median

    import timm
    import torch

    from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation

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
    print(json.dumps(results, indent=2))
    return results


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


# --------------------------------------------------------------------------------------------- metric (issue 6)
def bench_metric(args) -> dict:
    """CPU time per image of the streaming MeanIoU vs the way evaluate's mean_iou computes, same predictions.

    Inputs: --num_images random maps of --height x --width, labels uint8 (10% ignored) and predictions int64 (what
    argmax returns), made once. evaluate's script lives on the hub, so its recipe is reimplemented here:
    - "evaluate_histograms": keep a copy of every full-resolution map, then per image intersect_and_union's steps
      (np.array copies, the ignore mask, three np.histogram calls), summed in float64;
    - "evaluate_add_batch": the same plus what `add_batch` / `compute` do to the maps on their way through arrow:
      datasets.Image encoding (PNG) and decoding of both maps;
    - "streaming": MeanIoU.update per image on the CPU (one joint histogram) + compute.
    All give the same dict (checked). The methods alternate --repeats times after one warm-up pass; each figure is
    the median over the passes of process CPU time (all threads) and wall time per image. torch runs --threads
    threads (default 1, like numpy).
    """
    import platform
    import statistics
    import time
    import warnings

    import datasets
    import numpy as np
    import torch

    from modeling.metrics import MeanIoU, metrics_from_areas

    torch.set_num_threads(args.threads)  # numpy's side is single-threaded: compare like with like
    num_labels, ignore_index = args.num_labels, 255
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.height, args.width)
    labels = [torch.randint(0, num_labels, shape, generator=generator, dtype=torch.uint8)
              for _ in range(args.num_images)]
    for label in labels:
        label[torch.rand(shape, generator=generator) < 0.1] = ignore_index
    preds = [torch.randint(0, num_labels, shape, generator=generator) for _ in range(args.num_images)]
    features = datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()})

    def histograms(pairs) -> dict:
        totals = np.zeros((3, num_labels))  # intersect, union, label, float64 as evaluate sums them
        bins = dict(bins=num_labels, range=(0, num_labels - 1))
        for pred, label in pairs:  # intersect_and_union's steps, in its order (label_map, reduce_labels off)
            pred, label = np.array(pred), np.array(label)
            mask = label != ignore_index
            mask = np.not_equal(label, ignore_index)
            pred = pred[mask]
            label = np.array(label)[mask]
            intersect = pred[pred == label]
            area_intersect = np.histogram(intersect, **bins)[0]
            area_pred = np.histogram(pred, **bins)[0]
            area_label = np.histogram(label, **bins)[0]
            area_union = area_pred + area_label - area_intersect
            totals += (area_intersect, area_union, area_label)
        return metrics_from_areas(*totals)

    def evaluate_histograms():
        stored = [(pred.numpy().copy(), label.numpy().copy()) for pred, label in zip(preds, labels, strict=True)]
        return histograms(stored)

    def evaluate_add_batch():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # datasets: "Downcasting array dtype int64 to int32"
            stored = [features.encode_example({"predictions": pred.numpy(), "references": label.numpy()})
                      for pred, label in zip(preds, labels, strict=True)]
        decoded = (features.decode_example(example) for example in stored)
        return histograms((example["predictions"], example["references"]) for example in decoded)

    def streaming():
        metric = MeanIoU(num_labels, ignore_index)
        for pred, label in zip(preds, labels, strict=True):
            metric.update(pred, label)
        return metric.compute()

    methods = {"evaluate_add_batch": evaluate_add_batch, "evaluate_histograms": evaluate_histograms,
               "streaming": streaming}
    timings = {name: {"cpu": [], "wall": []} for name in methods}
    results = {}
    for _ in range(args.repeats + 1):  # the first pass warms up and is not counted
        for name, run in methods.items():
            cpu, wall = time.process_time(), time.perf_counter()
            results[name] = run()
            timings[name]["cpu"].append((time.process_time() - cpu) / args.num_images * 1000)
            timings[name]["wall"].append((time.perf_counter() - wall) / args.num_images * 1000)
    for name in ("evaluate_add_batch", "evaluate_histograms"):
        for key, value in results[name].items():
            np.testing.assert_array_equal(results["streaming"][key], value, err_msg=f"{name} {key}")

    report = {"images": args.num_images, "size": f"{args.height}x{args.width}", "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "identical_results": True}
    for name, times in timings.items():
        report[f"{name}_cpu_ms_per_image"] = round(statistics.median(times["cpu"][1:]), 2)
        report[f"{name}_wall_ms_per_image"] = round(statistics.median(times["wall"][1:]), 2)
    print("| method | CPU ms / image | wall ms / image | streaming is faster (CPU) |\n|---|---:|---:|---:|")
    for name in methods:
        cpu, wall = report[f"{name}_cpu_ms_per_image"], report[f"{name}_wall_ms_per_image"]
        speedup = "-"
        if name != "streaming":
            report[f"speedup_cpu_vs_{name}"] = round(cpu / report["streaming_cpu_ms_per_image"], 1)
            speedup = f"{report[f'speedup_cpu_vs_{name}']}x"
        print(f"| {name} | {cpu} | {wall} | {speedup} |")
    print(f"({args.num_images} images of {args.height}x{args.width}, median of {args.repeats} passes, "
          f"{torch.get_num_threads()} torch threads)")
    return report


def add_metric_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_images", type=int, default=10)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--num_labels", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the streaming metric")


# ------------------------------------------------------------------------------------- throughput, report (7)
# The reference's figures (RECIPE.md section 1): mmsegmentation 0.11 on V100-SXM2-32GB, batch 2 per GPU, 512x1024.
REFERENCE_RUNS = (
    {"gpu_count": 1, "precision": "fp32", "time_to_train_s": None, "images_per_sec": 7.00, "miou_pct": None},
    {"gpu_count": 8, "precision": "fp32", "time_to_train_s": 57574.09, "images_per_sec": 20.88, "miou_pct": 78.11},
    {"gpu_count": 1, "precision": "fp16", "time_to_train_s": None, "images_per_sec": 5.20, "miou_pct": None},
    {"gpu_count": 8, "precision": "fp16", "time_to_train_s": 70489.24, "images_per_sec": 17.82, "miou_pct": 78.46},
)
REFERENCE_SETTING = "batch 2/process, crop 512x1024"
REFERENCE_TARGET_MIOU = 0.7811  # Time2train's accuracy figure, as a fraction (train.py's --target_miou scale)
SEED_CONFIGS = ((1, "fp32"), (8, "fp32"), (1, "fp16"), (8, "fp16"))  # the seed table's rows, always shown
PRECISION_NAMES = {"no": "fp32"}  # Accelerate's mixed_precision value -> the table's name
# what `report` shows of a throughput JSON, beside the fields every run has
THROUGHPUT_FIELDS = ("batch_size", "channels_last", "compile", "input", "s_per_iter", "data_wait_pct",
                     "peak_memory_gib", "host_syncs_per_step", "collectives_per_step")
# torch.distributed functions that DDP (buffer broadcast), SyncBN and torch's Python comm hooks call through the
# module attribute: replacing the attribute sees every such call. Missing names (other torch versions) are skipped.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "_broadcast_coalesced", "reduce", "all_to_all", "barrier")


class CollectiveCounter:
    """While entered (and enabled), counts calls of the torch.distributed collectives in COLLECTIVES, per name.

    What it cannot see: DDP's built-in gradient all-reduce (C++; `count_gradient_buckets` reroutes it), and
    collectives inside torch.compile'd graphs (throughput does not count under --compile, where the wrappers
    would be traced into the graph).
    """

    def __init__(self, enabled: bool = True):
        import collections

        self.enabled, self.counts, self.originals = enabled, collections.Counter(), {}

    def __enter__(self):
        import torch.distributed as dist

        for name in COLLECTIVES if self.enabled else ():
            if hasattr(dist, name):
                self.originals[name] = getattr(dist, name)
                setattr(dist, name, self.counting(name, self.originals[name]))
        return self

    def counting(self, name: str, function):
        import functools

        @functools.wraps(function)
        def counted(*args, **kwargs):
            self.counts[name] += 1  # a Python int: counting adds no device work and no synchronisation
            return function(*args, **kwargs)

        return counted

    def __exit__(self, *exc_info):
        import torch.distributed as dist

        for name, function in self.originals.items():
            setattr(dist, name, function)


def count_gradient_buckets(model) -> None:
    """Route DDP's gradient all-reduce through torch's own Python `allreduce_hook`, one dist.all_reduce per bucket.

    The arithmetic is DDP's default (divide by the world size, all-reduce the bucket); the difference is a Python
    call per bucket (microseconds). Must run before the first forward. No-op without DDP (one process).
    """
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ddp = getattr(model, "_orig_mod", model)
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        ddp.register_comm_hook(state=None, hook=allreduce_hook)


def count_host_syncs(function) -> int:
    """Calls function() once with CUDA's sync debug mode on; returns the number of synchronizing CUDA calls.

    torch's own caveat: not every synchronizing operation is flagged (torch.distributed's are not).
    """
    import warnings

    import torch

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every occurrence, not once per source line
            function()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def batch_source(args, accelerator, train):
    """next_batch() -> (pixel_values, labels) on the device, as the training loop gets them.

    --synthetic_input: one random batch made on the device once and returned every time (no data cost at all).
    Otherwise train.py's own sampler and loader over data.get_train_data(pipeline=--pipeline), on_device
    augmentation with a per-iteration seeded device generator, channels_last input when asked.
    """
    import itertools

    import torch

    from data import get_train_data
    from data.labels import IGNORE_INDEX, NUM_CLASSES
    from modeling.utils import batch_to_device

    device, rank = accelerator.device, accelerator.process_index
    if args.synthetic_input:
        generator = torch.Generator(device=device).manual_seed(rank)
        height, width = args.crop_size
        pixel_values = torch.randn(args.batch_size, 3, height, width, generator=generator, device=device)
        labels = torch.randint(0, NUM_CLASSES, (args.batch_size, height, width), generator=generator, device=device)
        labels[:, :, : width // 8] = IGNORE_INDEX  # some ignored pixels, as in real labels
        if args.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return lambda: (pixel_values, labels)

    try:
        dataset, on_device = get_train_data(args.data_root, pipeline=args.pipeline, crop_size=tuple(args.crop_size))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: --data_root: {error}") from None
    sampler = train.ShardedEpochSampler(len(dataset), accelerator.num_processes, rank, seed=0)
    if sampler.per_replica < args.batch_size:
        raise SystemExit(f"error: --batch_size {args.batch_size} x {accelerator.num_processes} processes needs at "
                         f"least that many training images, {args.data_root} has {len(dataset)}")
    batches = train.train_batches(dataset, sampler, args.batch_size, args.num_workers, first_batch=0,
                                  pin_memory=device.type == "cuda")
    generator, iterations = torch.Generator(device=device), itertools.count()

    def next_batch():
        generator.manual_seed(train.augmentation_seed(0, rank, next(iterations)))
        pixel_values, labels = on_device(batch_to_device(next(batches), device), generator)
        if args.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return pixel_values, labels

    return next_batch


def bench_throughput(args) -> dict | None:
    """images/s of the real training step under `accelerate launch`; the JSON on the main process (else None).

    The model, optimizer and scheduler come from scripts/train.py, SyncBN/AMP/compile from Accelerate as in
    training. The clock starts after --warmup iterations (device synchronised, processes aligned by a barrier) and
    stops after --iters more (device synchronised): nothing in between waits for the device. Per process it
    measures the time, the host time spent getting each batch (data wait) and the peak memory; the slowest process
    gives the figures. Collectives are counted per step in the timed iterations (CollectiveCounter).
    """
    import time

    import torch
    import train  # scripts/train.py: this script's folder is on sys.path when run as a script
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("error: --iters and --batch_size must be >= 1 and --warmup >= 0")
    if not args.synthetic_input and not args.data_root:
        raise SystemExit("error: --data_root is required unless --synthetic_input is given")
    accelerator = Accelerator(step_scheduler_with_optimizer=False,  # train.py steps the scheduler per iteration
                              dynamo_backend="inductor" if args.compile else None)
    train.check_launch(accelerator)
    device, processes = accelerator.device, accelerator.num_processes
    set_seed(0)
    # as training builds it (the weights do not change the speed); --no_sync_batchnorm: the SyncBN cost is the
    # difference with the default run
    model = train.create_model("none", args.channels_last, accelerator, sync_batchnorm=not args.no_sync_batchnorm)
    optimizer, scheduler = train.create_optimizer_and_scheduler(model, lr=0.01, max_iters=80_000)
    sync_batchnorm = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    guard = train.StepGuard(accelerator, model, optimizer)  # training's non-finite check is part of the step
    count = args.count_collectives and not args.compile
    if count:
        count_gradient_buckets(model)
    next_batch = batch_source(args, accelerator, train)

    def synchronize() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step(pixel_values, labels) -> torch.Tensor:
        """One iteration as train.py's loop runs it (gradient_accumulation_steps 1)."""
        loss = train.training_step(model, optimizer, accelerator, guard, 0, pixel_values, labels)
        guard.after_iteration()
        scheduler.step()
        return loss

    model.train()
    loss_sum = torch.zeros((), device=device)
    with CollectiveCounter(enabled=count) as counter:
        for _ in range(args.warmup):  # allocator, cuDNN autotuning, torch.compile, DDP bucket rebuild
            loss_sum += step(*next_batch())
        accelerator.wait_for_everyone()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counts_before, data_wait, start = counter.counts.copy(), 0.0, synchronize()
        for _ in range(args.iters):
            t = time.perf_counter()
            batch = next_batch()
            data_wait += time.perf_counter() - t
            loss_sum += step(*batch)
        elapsed = synchronize() - start
        per_step = {name: n / args.iters for name, n in (counter.counts - counts_before).items()}
    host_syncs = None
    if device.type == "cuda":  # after the clock: sync debug mode slows what it watches
        data_syncs = count_host_syncs(next_batch)
        step_syncs = count_host_syncs(lambda: step(*batch))
        host_syncs = {"data": data_syncs, "step": step_syncs}

    # the slowest process sets the pace of a synchronous data-parallel step
    mine = torch.tensor([[elapsed, data_wait, train.peak_memory_gib(device), loss_sum.item()]], device=device,
                        dtype=torch.float64)
    gathered = accelerator.gather(mine)
    elapsed, data_wait, peak_memory, _ = gathered.max(dim=0).values.tolist()
    loss_mean = gathered[:, 3].mean().item() / (args.warmup + args.iters)  # a sanity figure: finite, about ln 19
    global_batch, environment = args.batch_size * processes, train.environment(accelerator)
    results = {
        "mode": "throughput",
        "num_processes": processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": environment["device"],
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
        "host_syncs_per_step": host_syncs,
        "loss_mean": loss_mean,
        "environment": environment,
    }
    accelerator.print(json.dumps(results, indent=2))
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else torchrun reports SIGABRT at exit
    return results if accelerator.is_main_process else None


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_root", default=None, help="prepared Cityscapes root (scripts/prepare_cityscapes.py)")
    parser.add_argument("--synthetic_input", action="store_true",
                        help="random tensors made once on the device instead of data: the model's speed alone")
    parser.add_argument("--pipeline", choices=("fast", "reference"), default="fast",
                        help="training data path of data.get_train_data (fast: batched augmentation on the device)")
    parser.add_argument("--num_workers", type=int, default=2, help="loader workers per process")
    parser.add_argument("--batch_size", type=int, default=2, help="images per process (the reference: 2)")
    parser.add_argument("--crop_size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) through Accelerate")
    parser.add_argument("--no_sync_batchnorm", action="store_true",
                        help="plain BN on each process even on several GPUs (measures what SyncBN costs)")
    parser.add_argument("--no_count_collectives", dest="count_collectives", action="store_false",
                        help="keep DDP's built-in C++ gradient all-reduce (collectives are then not reported)")


def load_run(path) -> dict:
    """{"name", "path", "data"} of RUN_DIR/results.json, a results.json, or a throughput JSON."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"error: {path}: expected a run directory holding results.json, or a results.json or "
                         "throughput JSON file")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {file}: not readable as JSON ({error})") from None
    if not isinstance(data, dict) or not {"num_processes", "images_per_sec", "eval_log"} & data.keys():
        raise SystemExit(f"error: {file}: neither scripts/train.py's results.json nor a throughput JSON "
                         "(none of num_processes, images_per_sec, eval_log)")
    name = file.parent.name if file.name == "results.json" else file.stem
    return {"name": name, "path": str(file), "data": data}


def time_to_train(eval_log, target: float) -> tuple:
    """(wall_s, mean_iou) of the first evaluation in the log with mean_iou >= target (fractions), else (None, None)."""
    for entry in eval_log or []:
        miou = entry.get("mean_iou")
        if miou is not None and miou >= target:  # NaN never passes
            return entry.get("wall_s"), miou
    return None, None


def percent(value):
    return None if value is None else 100.0 * value


def none_for_nan(values):
    # NaN (a class absent from the split) is not JSON: report.json holds null there
    return None if values is None else [None if v is None or v != v else v for v in values]


def run_row(run: dict, target_miou) -> dict:
    """One table row from a run's JSON; anything missing is None ('-' in the table)."""
    data = run["data"]
    processes, global_batch = data.get("num_processes"), data.get("global_batch")
    per_process = global_batch // processes if global_batch and processes else None
    row = {"run": run["name"], "path": run["path"], "gpu_count": processes,
           "precision": PRECISION_NAMES.get(data.get("mixed_precision"), data.get("mixed_precision")),
           "global_batch": global_batch, "images_per_sec": data.get("images_per_sec"),
           "device": (data.get("environment") or {}).get("device", data.get("device"))}
    if data.get("mode") == "throughput":
        crop = data.get("crop_size") or ["?", "?"]
        extras = [flag for flag in ("channels_last", "compile") if data.get(flag)]
        setting = f"batch {data.get('batch_size')}/process, crop {crop[0]}x{crop[1]}, {data.get('input')} input"
        return {**row, "source": "throughput", "setting": ", ".join([setting, *extras]),
                "batchnorm": "SyncBN" if data.get("sync_batchnorm") else "BN", "target_miou_pct": None,
                "time_to_train_s": None, "miou_pct": None, "best_miou_pct": None, "final_miou_pct": None,
                "per_class_iou": None, "throughput": {key: data.get(key) for key in THROUGHPUT_FIELDS}}
    target = target_miou if target_miou is not None else data.get("target_miou") or REFERENCE_TARGET_MIOU
    wall_s, miou = time_to_train(data.get("eval_log"), target)
    if "eval_log" not in data and target == data.get("target_miou"):  # no log: trust the run's own figure
        wall_s = data.get("time_to_train_s")
    metrics = data.get("best_metrics") or data.get("final_metrics") or {}
    device_type = (data.get("environment") or {}).get("device_type")  # train.py: SyncBN iff CUDA and > 1 process
    batchnorm = None if device_type is None or processes is None else (
        "SyncBN" if device_type == "cuda" and processes > 1 else "BN")
    return {**row, "source": "train", "setting": f"batch {per_process}/process" if per_process else None,
            "throughput": None,
            "batchnorm": batchnorm,
            "target_miou_pct": percent(target), "time_to_train_s": wall_s, "miou_pct": percent(miou),
            "best_miou_pct": percent(data.get("best_miou")), "final_miou_pct": percent(data.get("final_miou")),
            "per_class_iou": none_for_nan(metrics.get("per_category_iou"))}


def add_speedups(rows: list) -> None:
    """speedup = images/s over that of the first 1-GPU row of the same source, precision and setting.

    A 1-GPU row is its own baseline (1.00), also when the same configuration was measured twice.
    """
    for row in rows:
        base = row if row["gpu_count"] == 1 else next(
            (r for r in rows if r["gpu_count"] == 1 and r["source"] == row["source"]
             and r["precision"] == row["precision"] and r["setting"] == row["setting"]), None)
        measured = base is not None and row["images_per_sec"] and base["images_per_sec"]
        row["speedup"] = row["images_per_sec"] / base["images_per_sec"] if measured else None
        row["scaling_pct"] = 100.0 * row["speedup"] / row["gpu_count"] if row["speedup"] else None


def reference_rows() -> list:
    rows = [{"run": "reference", "source": "reference", "setting": REFERENCE_SETTING, "device": "V100-SXM2-32GB",
             **ref} for ref in REFERENCE_RUNS]
    add_speedups(rows)
    return rows


def seed_table(rows: list, reference: list) -> list:
    """The seed's rows (1/8 GPU x fp32/fp16, then any other configuration measured), ours beside the reference.

    Ours is the first train.py run of that configuration, else the first throughput JSON; None when not measured.
    """
    others = {(r["gpu_count"], r["precision"]) for r in rows} - set(SEED_CONFIGS)
    table = []
    for gpus, precision in [*SEED_CONFIGS, *sorted(others, key=lambda c: (c[0] or 0, str(c[1])))]:
        candidates = [r for r in rows if (r["gpu_count"], r["precision"]) == (gpus, precision)]
        ours = next((r for r in candidates if r["source"] == "train"), candidates[0] if candidates else None)
        ref = next((r for r in reference if (r["gpu_count"], r["precision"]) == (gpus, precision)), None)
        fields = ("time_to_train_s", "images_per_sec", "miou_pct", "speedup")
        table.append({"gpu_count": gpus, "precision": precision, "run": ours and ours["run"],
                      **{k: ours and ours[k] for k in fields}, "reference": ref and {k: ref[k] for k in fields}})
    return table


def fmt(value, digits: int = 2) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(header: list, lines: list) -> str:
    rows = [header, ["---"] * len(header), *[[fmt(v) for v in line] for line in lines]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def format_host_syncs(value) -> str | None:
    return None if not value else f"{value.get('data', '?')}, {value.get('step', '?')}"


def throughput_markdown(rows: list) -> str:
    """The throughput runs' figures, one line each: the columns of BENCHMARKS.md's GPU table."""
    measured = [r for r in rows if r["throughput"]]
    if not measured:
        return "No throughput JSON among the inputs."
    return markdown_table(
        ["run", "device", "GPU count", "precision", "batch/process", "channels_last", "compile", "input", "BN",
         "images/s", "s/iter", "data wait (%)", "peak memory (GiB)", "host syncs / step (data, step)",
         "collectives / step"],
        [[r["run"], r["device"], r["gpu_count"], r["precision"], t["batch_size"], t["channels_last"], t["compile"],
          t["input"], r["batchnorm"], r["images_per_sec"], t["s_per_iter"], t["data_wait_pct"],
          t["peak_memory_gib"], format_host_syncs(t["host_syncs_per_step"]), t["collectives_per_step"]]
         for r in measured for t in [r["throughput"]]])


def report_markdown(table: list, rows: list, plots: dict) -> str:
    fields = ("time_to_train_s", "images_per_sec", "miou_pct", "speedup")
    seed = markdown_table(
        ["GPU count", "precision", "run", "Time2train (s)", "images/s", "mIoU (%)", "speedup",
         "ref. Time2train (s)", "ref. images/s", "ref. mIoU (%)", "ref. speedup"],
        [[t["gpu_count"], t["precision"], t["run"], *(t[k] for k in fields),
          *((t["reference"] or {}).get(k) for k in fields)] for t in table])
    runs = markdown_table(
        ["run", "source", "GPU count", "precision", "setting", "BN", "global batch", "Time2train (s)", "images/s",
         "mIoU at Time2train (%)", "best mIoU (%)", "final mIoU (%)", "target (%)", "speedup", "scaling (%)",
         "device"],
        [[r["run"], r["source"], r["gpu_count"], r["precision"], r["setting"], r["batchnorm"], r["global_batch"],
          r["time_to_train_s"], r["images_per_sec"], r["miou_pct"], r["best_miou_pct"], r["final_miou_pct"],
          r["target_miou_pct"], r["speedup"], r["scaling_pct"], r["device"]] for r in rows])
    figures = "\n".join(f"![{name}]({Path(path).name})" for name, path in plots.items())
    return f"""# Benchmark report

## Seed table (ours beside the reference)

{seed}

Reference: mmsegmentation 0.11 on V100-SXM2-32GB, {REFERENCE_SETTING}, from RECIPE.md section 1. Time2train: wall
seconds until the first evaluation at or above the target mIoU (evaluations included). mIoU: that evaluation's.
Speedup: images/s over the 1-GPU run of the same precision, source and setting. '-': not measured or not reached.

## All runs

{runs}

## Throughput runs

{throughput_markdown(rows)}

s/iter and data wait: the slowest process's; data wait: host time spent getting the batches, as a share of the step
time; peak memory: CUDA max allocated on a GPU, the process's max resident set on the CPU; host syncs: counted once
after the clock with CUDA's sync debug mode (none on the CPU); collectives: torch.distributed calls per step.

## Plots

{figures}
"""


def plot_miou_vs_time(runs: list, rows: list, path: Path):
    import matplotlib.pyplot as plt

    logged = [(run, row) for run, row in zip(runs, rows, strict=True) if run["data"].get("eval_log")]
    if not logged:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, row in logged:
        log = run["data"]["eval_log"]
        ax.plot([e.get("wall_s") for e in log], [percent(e.get("mean_iou")) for e in log], marker="o", markersize=3,
                label=f"{row['run']} ({row['gpu_count']}x {row['precision']})")
    for target in sorted({row["target_miou_pct"] for _, row in logged}):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"target {target:.2f}%", (0, target), color="grey", fontsize=8, va="bottom")
    ax.set(xlabel="wall time (s)", ylabel="val mIoU (%)", title="mIoU vs wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_images_per_sec(rows: list, reference: list, path: Path):
    import matplotlib.pyplot as plt

    bars = [(f"{r['run']}\n{r['gpu_count']}x {r['precision']}", r["images_per_sec"], "tab:blue") for r in rows]
    bars += [(f"reference\n{r['gpu_count']}x {r['precision']}", r["images_per_sec"], "grey") for r in reference]
    bars = [bar for bar in bars if bar[1] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars)), 4.5))
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    for x, (_, value, _) in enumerate(bars):
        ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=7)
    ax.set(ylabel="images/s (global)", title="Training throughput per configuration (grey: reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_class_iou(rows: list, path: Path):
    import matplotlib.pyplot as plt
    import numpy as np

    from data.labels import CLASS_NAMES

    measured = [r for r in rows if r["per_class_iou"] is not None]
    if not measured:
        return None
    fig, ax = plt.subplots(figsize=(7, 7))
    height = 0.8 / len(measured)
    positions = np.arange(len(CLASS_NAMES))
    for i, row in enumerate(measured):  # NaN (class absent from the split) draws no bar
        ax.barh(positions + i * height, percent(np.asarray(row["per_class_iou"], dtype=float)), height=height,
                label=row["run"])
    ax.set_yticks(positions + 0.4 - height / 2, CLASS_NAMES)
    ax.invert_yaxis()
    ax.set(xlabel="IoU (%)", title="Per-class IoU (best evaluation, else final)", xlim=(0, 100))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bench_report(args) -> dict:
    """The seed table (Markdown + JSON) and plots from train.py results.json files and throughput JSONs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    if args.target_miou is not None and not 0.0 <= args.target_miou <= 1.0:
        raise SystemExit(f"error: --target_miou is a fraction in [0, 1] like train.py's (78.11% -> 0.7811), "
                         f"got {args.target_miou}")
    runs = [load_run(path) for path in args.runs]
    rows = [run_row(run, args.target_miou) for run in runs]
    add_speedups(rows)
    reference = reference_rows()
    table = seed_table(rows, reference)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {name: str(path) for name, path in (
        ("mIoU vs wall time", plot_miou_vs_time(runs, rows, out_dir / "miou_vs_time.png")),
        ("images/s per configuration", plot_images_per_sec(rows, reference, out_dir / "images_per_sec.png")),
        ("per-class IoU", plot_per_class_iou(rows, out_dir / "per_class_iou.png")),
    ) if path is not None}
    (out_dir / "report.md").write_text(report_markdown(table, rows, plots))
    results = {"mode": "report", "target_miou": args.target_miou, "seed_table": table, "runs": rows,
               "reference": reference, "markdown": str(out_dir / "report.md"), "plots": plots}
    (out_dir / "report.json").write_text(json.dumps(results, indent=2))
    print((out_dir / "report.md").read_text())
    return results


def add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="train.py output directories (holding results.json), or results/throughput JSON files")
    parser.add_argument("--out_dir", default="out/benchmark_report", help="report.md, report.json and the plots")
    parser.add_argument("--target_miou", type=float, default=None,
                        help="Time2train's mIoU as a fraction (default: each run's own --target_miou, else 0.7811)")


# --------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    results = args.run(args)
    if args.out and results is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, run, add_args in [
        ("data", bench_data, add_data_args),
        ("model", bench_model, add_model_args),
        ("metric", bench_metric, add_metric_args),
        ("throughput", bench_throughput, add_throughput_args),
        ("report", bench_report, add_report_args),
    ]:
        sub = modes.add_parser(name)
        sub.set_defaults(run=run)
        sub.add_argument("--out", default=None, help="write the results JSON here")
        add_args(sub)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
