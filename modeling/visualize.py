"""Pictures: predictions (Cityscapes-palette masks, overlays), per-class IoU bars, confusion matrix, training curves,
benchmark plots.

Plots go through matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work headless.
"""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from data.labels import IGNORE_INDEX, PALETTE, colorize

OVERLAY_ALPHA = 0.5


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """HxWx3 uint8 RGB photo blended with the colorized HxW trainId map; ignored pixels keep the photo."""
    if image.shape[:2] != train_ids.shape:
        raise ValueError(f"image {image.shape[:2]} and train_ids {train_ids.shape}: expected the same height/width")
    colors = colorize(train_ids).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colors
    blended[train_ids == IGNORE_INDEX] = image[train_ids == IGNORE_INDEX]
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def save_prediction_pictures(out_dir, name: str, image: np.ndarray, train_ids: np.ndarray,
                             label: np.ndarray | None = None) -> list[Path]:
    """Writes <name>_pred.png (colorized), <name>_overlay.png and, given a label, <name>_gt.png; returns paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = {"pred": colorize(train_ids), "overlay": overlay(image, train_ids)}
    if label is not None:
        pictures["gt"] = colorize(label)
    paths = []
    for kind, picture in pictures.items():
        path = out_dir / f"{name}_{kind}.png"
        Image.fromarray(picture).save(path)
        paths.append(path)
    return paths


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_class_iou(runs: dict, class_names, path, title: str = "per-class IoU") -> Path:
    """Horizontal bars of IoU (%) per class; `runs` maps a name to its per-class IoUs (fractions).

    One run: bars in the class colours with their values, the mean in the title. Several: grouped bars, a legend.
    NaN (a class absent from the split) draws no bar ('n/a' for one run)."""
    names = list(class_names)
    fig = _new_figure(7, max(0.32 * len(names) * max(1, len(runs) / 2), 1) + 1.2)
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    height = 0.8 / len(runs)
    for i, (run, values) in enumerate(runs.items()):
        iou = np.asarray(values, dtype=np.float64) * 100
        if len(runs) == 1:
            colors = [tuple(c / 255 for c in PALETTE[k]) if k < len(PALETTE) else (0.5, 0.5, 0.5)
                      for k in range(len(names))]
            ax.barh(positions, np.nan_to_num(iou), color=colors, edgecolor="black", linewidth=0.5)
            for y, value in zip(positions, iou, strict=True):
                ax.text(min(np.nan_to_num(value), 100) + 1, y, "n/a" if np.isnan(value) else f"{value:.1f}",
                        va="center", fontsize=8)
            if not np.isnan(iou).all():
                title = f"{title} (mean {np.nanmean(iou):.2f})"
        else:
            ax.barh(positions + i * height, iou, height=height, label=run)
    ax.set_yticks(positions + (0.4 - height / 2 if len(runs) > 1 else 0), names)
    ax.invert_yaxis()
    ax.set(xlabel="IoU (%)", title=title, xlim=(0, 110 if len(runs) == 1 else 100))
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_miou_vs_time(curves: dict, targets_pct, path) -> Path:
    """val mIoU (%) against wall seconds, one line per run (`curves`: name -> (seconds, mIoU %)), a dashed line
    per Time2train target."""
    fig = _new_figure(7, 4.5)
    ax = fig.add_subplot()
    for name, (seconds, miou_pct) in curves.items():
        ax.plot(seconds, miou_pct, marker="o", markersize=3, label=name)
    for target in sorted(set(targets_pct)):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"target {target:.2f}%", (0, target), color="grey", fontsize=8, va="bottom")
    ax.set(xlabel="wall time (s)", ylabel="val mIoU (%)", title="mIoU vs wall time")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_images_per_sec(bars, path) -> Path:
    """One bar per configuration: `bars` holds (label, images/s, colour)."""
    fig = _new_figure(max(6, 1.1 * len(bars)), 4.5)
    ax = fig.add_subplot()
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    for x, (_, value, _) in enumerate(bars):
        ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=7)
    ax.set(ylabel="images/s (global)", title="Training throughput per configuration (grey: reference)")
    return _save(fig, path)


def training_curves(records) -> dict:
    """{"loss", "lr", "mean_iou"}: each a list of (iteration, value) in iteration order, from train_log.jsonl records.

    A resumed run appends the iterations after its checkpoint again: the last record of an iteration wins.
    """
    series = {"loss": {}, "lr": {}, "mean_iou": {}}
    for record in records:
        for key, points in series.items():
            if key in record and record[key] is not None:
                points[record["iteration"]] = record[key]
    return {key: sorted(points.items()) for key, points in series.items()}


def plot_training_curves(records, path) -> Path:
    """Training loss, learning rate and validation mIoU (%) against the iteration, side by side, as one PNG.

    Written beside and renamed, so that a viewer refreshing the file during training never reads half a PNG."""
    curves = training_curves(records)
    fig = _new_figure(13, 3.4)
    panels = (("loss", "training loss", 1, "tab:blue"), ("lr", "learning rate", 1, "tab:orange"),
              ("mean_iou", "val mIoU (%)", 100, "tab:green"))
    for ax, (key, label, scale, color) in zip(fig.subplots(1, 3), panels, strict=True):
        points = curves[key]
        ax.plot([i for i, _ in points], [v * scale for _, v in points], color=color,
                marker="o" if key == "mean_iou" else None, markersize=4)
        ax.set(xlabel="iteration", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)
    return path


def plot_confusion_matrix(counts, class_names, path, title: str = "confusion matrix") -> Path:
    """Row-normalized confusion matrix (ground truth rows, prediction columns, % of each row) as a labelled heatmap;
    rows without pixels stay blank. A 1000x900 PNG."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = counts / counts.sum(1, keepdims=True) * 100
    fig = Figure(figsize=(10, 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    for (row, col), value in np.ndenumerate(share):
        if value >= 0.5:  # label the cells that hold something, in a colour readable on the cell
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if value > 50 else "black")
    positions = np.arange(len(class_names))
    ax.set_xticks(positions, class_names, rotation=90)
    ax.set_yticks(positions, class_names)
    ax.set(xlabel="prediction", ylabel="ground truth", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the ground-truth class's pixels")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
