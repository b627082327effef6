"""benchmark.py metric: CPU time per image of the streaming MeanIoU vs evaluate's mean_iou, same predictions."""

import argparse
import platform
import statistics
import time
import warnings

import datasets
import numpy as np
import torch

from modeling.cli import positive_int, seed_int
from modeling.metrics import MeanIoU, metrics_from_areas


def run(args) -> dict:
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


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_images", type=positive_int, default=10)
    parser.add_argument("--height", type=positive_int, default=1024)
    parser.add_argument("--width", type=positive_int, default=2048)
    parser.add_argument("--num_labels", type=positive_int, default=19)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads for the streaming metric")
