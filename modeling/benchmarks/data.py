"""benchmark.py data: CPU cost per training sample, the reference pipeline from PNGs vs the fast path."""

import argparse
from pathlib import Path

from modeling import strict_json
from modeling.cli import non_negative_int, positive_int


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


def run(args) -> dict:
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
    print(strict_json.dumps(results, indent=2))
    return results


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_root", default=None, help="a prepared-or-not Cityscapes root (default: synthetic)")
    parser.add_argument("--work_dir", default=None, help="where to generate the synthetic data (default: a temp dir)")
    parser.add_argument("--height", type=positive_int, default=1024, help="synthetic image height")
    parser.add_argument("--width", type=positive_int, default=2048, help="synthetic image width")
    parser.add_argument("--num_images", type=positive_int, default=8, help="training images to measure on")
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="batch of the device-side augmentation")
    parser.add_argument("--loader_batch_size", type=positive_int, default=2,
                        help="DataLoader batch size (recipe: 2/GPU)")
    parser.add_argument("--crop_size", type=positive_int, nargs=2, default=[512, 1024], help="crop h w")
    parser.add_argument("--img_scale", type=positive_int, nargs=2, default=[2048, 1024],
                        help="resize target (long, short)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed passes over the images")
    parser.add_argument("--nproc", type=positive_int, default=2, help="processes for label preparation and caching")
