"""Streaming mean IoU that returns exactly what HF evaluate's `mean_iou` returns, without storing any map.

evaluate's `mean_iou` keeps every full-resolution prediction and label, then per image: applies `label_map`
(old -> new ids, all lookups on the original labels) and `reduce_labels` (0 -> 255, then -1, then 254 -> 255),
drops pixels whose label is `ignore_index`, and histograms over `num_labels` bins the intersection
(pred == label), the predictions and the labels; values outside [0, num_labels) fall out of the histograms but
a valid pixel with such a label still counts in the prediction histogram. The areas are summed over the split,
then IoU = I / (P + L - I), accuracy = I / L, overall accuracy = sum(I) / sum(L); the means are nan-means and
`nan_to_num` replaces NaN in every returned value.

Here each update adds one joint histogram (label value x prediction) computed on the device where the
predictions are. Every label value that any of those rules can tell apart (the classes, `ignore_index`, the
`label_map` ids, the `reduce_labels` ids, and their neighbours) has its own row; all values below/above those
share a sentinel row each, which the rules treat alike. `label_map` and `reduce_labels` are then applied to the
row values once, in `compute`, instead of to every pixel: same counts, a fraction of the work. Predictions get
one column per class plus one for "negative" and one for ">= num_labels" (both outside every histogram).
"""

import warnings

import numpy as np
import torch


def _transform_labels(values: np.ndarray, label_map: dict | None, reduce_labels: bool) -> np.ndarray:
    """evaluate's label rules, applied to an int64 array of label values (its order: label_map, then reduce)."""
    label = values.copy()
    if label_map is not None:
        for old_id, new_id in label_map.items():
            label[values == old_id] = new_id
    if reduce_labels:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


def _clamp_torch(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """clamp for any integer dtype: bounds outside the dtype's range clamp nothing (a -1 must not wrap to 255)."""
    info = torch.iinfo(values.dtype)
    low, high = (low if low > info.min else None), (high if high < info.max else None)
    return values if low is None and high is None else values.clamp(low, high)


def _clamp_numpy(values: np.ndarray, low: int, high: int, out: np.ndarray) -> None:
    """out[...] = clip(values, low, high), cast to out's (narrower) dtype in the same pass."""
    info = np.iinfo(values.dtype)
    np.clip(values, max(low, info.min), min(high, info.max), out=out, casting="unsafe")


def metrics_from_areas(area_intersect: np.ndarray, area_union: np.ndarray, area_label: np.ndarray,
                       nan_to_num: float | None = None) -> dict:
    """The evaluate `mean_iou` dict from summed float64 areas (keys, order, dtypes and NaN handling alike)."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN (e.g. nothing valid) is NaN, quietly
        iou = area_intersect / area_union
        acc = area_intersect / area_label
        metrics = {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": area_intersect.sum() / area_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": acc,
        }
    if nan_to_num is not None:
        metrics = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in metrics.items()}
    return metrics


class MeanIoU:
    """Accumulates on the device, sums across processes once, returns evaluate's `mean_iou` dict.

        metric = MeanIoU(num_labels=19, ignore_index=255)
        metric.update(logits.argmax(1), labels)        # any int dtypes, same shape, any device; no host sync
        results = metric.compute(accelerator)          # every process must call it (one all-reduce)
    """

    def __init__(self, num_labels: int = 19, ignore_index: int | None = 255, reduce_labels: bool = False,
                 label_map: dict | None = None, device: torch.device | str | None = None):
        if num_labels < 1:
            raise ValueError(f"num_labels: expected a positive int, got {num_labels}")
        self.num_labels = int(num_labels)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.reduce_labels = bool(reduce_labels)
        self.label_map = None if label_map is None else {int(k): int(v) for k, v in label_map.items()}
        self.device = None if device is None else torch.device(device)

        # Label values with a row of their own (see the module docstring); the others are clamped onto lo / hi.
        special = set(range(self.num_labels))
        if self.ignore_index is not None:
            special.add(self.ignore_index)
        if self.label_map is not None:
            special |= set(self.label_map) | set(self.label_map.values())
        if self.reduce_labels:
            special |= {0, 254, 255}
            special |= {value + 1 for value in special}  # v -> v - 1 lands on a special value
        self._lo, self._hi = min(special) - 1, max(special) + 1
        self._cols = self.num_labels + 2
        self._rows = self._hi - self._lo + 1
        self._size = self._rows * self._cols
        self._hist = None

    def reset(self) -> None:
        self._hist = None

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch: integer predictions and labels of the same shape (e.g. BxHxW), on the same device."""
        if preds.shape != labels.shape:
            raise ValueError(f"preds and labels: expected the same shape, got {tuple(preds.shape)} and "
                             f"{tuple(labels.shape)}")
        if preds.is_floating_point() or labels.is_floating_point() or torch.bool in (preds.dtype, labels.dtype):
            raise ValueError(f"preds and labels: expected integer tensors (class ids), got {preds.dtype} and "
                             f"{labels.dtype}")
        if self._hist is None:
            self._hist = torch.zeros(self._size, dtype=torch.int64, device=self.device or preds.device)
        labels = labels.to(self._hist.device, non_blocking=True)
        preds = preds.to(self._hist.device, non_blocking=True)

        # index = row * cols + column, row = clamp(label, lo, hi) - lo, column = clamp(pred, -1, num_labels) + 1.
        add = self._add_bincount if self._hist.device.type == "cpu" else self._add_index_add
        add(preds, labels)

    def _add_bincount(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        self._hist += torch.bincount(self._index_cpu(preds, labels).reshape(-1), minlength=self._size)

    def _add_index_add(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        # torch.bincount reads its input's max back to the host on CUDA; index_add_ keeps update sync-free.
        index = self._index_torch(preds, labels).reshape(-1)
        ones = torch.ones((), dtype=torch.int64, device=index.device).expand(index.numel())
        self._hist.index_add_(0, index, ones)

    def _index_torch(self, preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = torch.int32 if self._size <= torch.iinfo(torch.int32).max else torch.int64
        index = _clamp_torch(preds, -1, self.num_labels).to(dtype)
        index.add_(_clamp_torch(labels, self._lo, self._hi).to(dtype), alpha=self._cols)
        return index.add_(1 - self._lo * self._cols)

    def _index_cpu(self, preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same index on CPU, ~1.5x faster: numpy clamps and narrows in one pass (torch needs two, and int64
        passes are the slow ones), and int16 indices when the bins fit (they do for Cityscapes)."""
        dtype = np.int16 if self._size <= np.iinfo(np.int16).max else np.int32 if \
            self._size <= np.iinfo(np.int32).max else np.int64
        index = np.empty(preds.shape, dtype)
        _clamp_numpy(preds.numpy(), -1, self.num_labels, out=index)
        index = torch.from_numpy(index)
        if labels.dtype == torch.uint8 and self._lo < 0 and self._hi > 255:
            index.add_(labels, alpha=self._cols)  # every uint8 value has a row: nothing to clamp
        else:
            rows = np.empty(labels.shape, dtype)
            _clamp_numpy(labels.numpy(), self._lo, self._hi, out=rows)
            index.add_(torch.from_numpy(rows), alpha=self._cols)
        return index.add_(1 - self._lo * self._cols)

    def joint_histogram(self, accelerator=None) -> np.ndarray:
        """(label rows) x (prediction columns) int64 counts, summed over processes when given an accelerator."""
        hist = self._hist
        if hist is None:  # a process that got no sample still has to join the all-reduce
            device = accelerator.device if accelerator is not None else (self.device or "cpu")
            hist = torch.zeros(self._size, dtype=torch.int64, device=device)
        if accelerator is not None and accelerator.num_processes > 1:
            hist = accelerator.reduce(hist.clone(), reduction="sum")
        return hist.cpu().numpy().reshape(self._rows, self._cols)

    def areas(self, accelerator=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """float64 (intersect, union, pred_label, label) areas over `num_labels`, as evaluate sums them."""
        hist = self.joint_histogram(accelerator)
        values = _transform_labels(np.arange(self._lo, self._hi + 1, dtype=np.int64), self.label_map,
                                   self.reduce_labels)
        n = self.num_labels
        valid = values != self.ignore_index if self.ignore_index is not None else np.ones(len(values), bool)
        in_range = valid & (values >= 0) & (values < n)
        class_hist = hist[:, 1:n + 1]  # columns of predictions 0..n-1
        area_pred = class_hist[valid].sum(0)
        area_label = np.bincount(values[in_range], weights=hist[in_range].sum(1), minlength=n)
        area_intersect = np.bincount(values[in_range], weights=class_hist[in_range, values[in_range]], minlength=n)
        area_pred = area_pred.astype(np.float64)
        area_label = area_label.astype(np.float64)
        area_intersect = area_intersect.astype(np.float64)
        return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label

    def compute(self, accelerator=None, nan_to_num: float | None = None) -> dict:
        """evaluate's `mean_iou` dict; with an accelerator, every process must call it and gets the same dict."""
        area_intersect, area_union, _, area_label = self.areas(accelerator)
        return metrics_from_areas(area_intersect, area_union, area_label, nan_to_num)


def metrics_to_json(metrics: dict) -> dict:
    """The metric dict with numpy arrays and scalars as plain lists and floats (NaN kept: modeling.strict_json
    writes it as null)."""
    return {key: value.tolist() if isinstance(value, np.ndarray) else float(value) if isinstance(value, np.generic)
            else value for key, value in metrics.items()}
