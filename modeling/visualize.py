"""Pictures of predictions: Cityscapes-palette masks, overlays on the photo, a per-class IoU bar chart.

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


def plot_class_iou(per_category_iou, class_names, path, title: str = "per-class IoU") -> Path:
    """Horizontal bar chart of IoU (%) per class, bars in the class colours; NaN (class absent) drawn as 'n/a'."""
    iou = np.asarray(per_category_iou, dtype=np.float64) * 100
    names = list(class_names)
    colors = [tuple(c / 255 for c in PALETTE[i]) if i < len(PALETTE) else (0.5, 0.5, 0.5) for i in range(len(names))]
    fig = Figure(figsize=(7, 0.32 * len(names) + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.barh(positions, np.nan_to_num(iou), color=colors, edgecolor="black", linewidth=0.5)
    for y, value in zip(positions, iou, strict=True):
        ax.text(min(np.nan_to_num(value), 100) + 1, y, "n/a" if np.isnan(value) else f"{value:.1f}", va="center",
                fontsize=8)
    ax.set_yticks(positions, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"{title} (mean {np.nanmean(iou):.2f})" if not np.isnan(iou).all() else title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
