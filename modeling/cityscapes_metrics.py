"""The official Cityscapes pixel-level metrics, streamed: class and category IoU and iIoU as cityscapesscripts has them.

cityscapesscripts' `evalPixelLevelSemanticLabeling` builds a labelId confusion matrix and, per ground-truth instance
(`*_gtFine_instanceIds.png`: id > 1000 is an instance of label id // 1000), a true-positive and a false-negative pixel
count weighted by avgClassSize[class] / instance size. Then, for each of the 19 evaluated classes (and each of the 7
categories: flat, construction, object, nature, sky, human, vehicle):
- IoU  = TP / (TP + FP + FN): FN counts the class's pixels predicted as anything else (ignored ids included), FP the
  pixels of the other evaluated classes predicted as it (pixels whose ground truth is ignored count nowhere);
- iIoU = TP_w / (TP_w + FP + FN_w), with the weighted TP/FN of the instances and the unweighted FP, for the classes
  with instances (person, rider, car, truck, bus, train, motorcycle, bicycle) and the categories made only of such
  classes (human, vehicle);
- a score whose denominator is 0 is NaN, and each average is the mean of the non-NaN scores.

Here the same figures come from a 19x20 trainId histogram (column 19: predictions outside the 19 classes) and the
weighted sums per class, accumulated on the device without a host sync and summed over processes with one
all-reduce. Predictions are trainIds: labelIds outside the 19 classes (caravan, trailer, ...) are all "outside", so
the one difference from the official script is a labelIds prediction of caravan/trailer on a vehicle instance, which
the official category iIoU counts as a vehicle hit (a 19-class model never predicts those).

    metric = CityscapesMetrics()
    metric.update(preds, labels, instance_ids)   # BxHxW trainIds, trainIds (255 ignored), instanceIds (or None)
    results = metric.compute(accelerator)        # every process must call it
"""

import numpy as np
import torch
from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import args as _official_args
from cityscapesscripts.helpers.labels import category2labels
from cityscapesscripts.helpers.labels import labels as _cityscapes_labels

from data.labels import CLASS_NAMES, NUM_CLASSES
from modeling.metrics import metrics_from_areas

_EVALUATED = sorted((label for label in _cityscapes_labels if not label.ignoreInEval and 0 <= label.trainId < 255),
                    key=lambda label: label.trainId)
assert tuple(label.name for label in _EVALUATED) == CLASS_NAMES
OUTSIDE = NUM_CLASSES  # histogram column of predictions outside the 19 classes; row/slot of "no evaluated class"
CATEGORIES = tuple(category for category in category2labels if any(label.category == category for label in _EVALUATED))
CLASS_CATEGORY = np.array([CATEGORIES.index(label.category) for label in _EVALUATED])  # trainId -> category index
INSTANCE_CLASSES = tuple(label.trainId for label in _EVALUATED if label.hasInstances)
# The official rule: a category has an iIoU when every label of it (id >= 0) has instances.
INSTANCE_CATEGORIES = tuple(category for category in CATEGORIES
                            if all(label.hasInstances for label in category2labels[category] if label.id >= 0))
AVG_CLASS_SIZE = np.zeros(NUM_CLASSES + 1)  # per trainId, from cityscapesscripts (0: no instances)
for _train_id in INSTANCE_CLASSES:
    AVG_CLASS_SIZE[_train_id] = _official_args.avgClassSize[CLASS_NAMES[_train_id]]
MAX_LABEL_ID = max(label.id for label in _cityscapes_labels)
INSTANCE_SPAN = (MAX_LABEL_ID + 1) * 1000  # instance ids are labelId * 1000 + instance number
# labelId (and one past the last, for out-of-range ids) -> trainId of an evaluated class with instances, else OUTSIDE
_INSTANCE_CLASS = np.full(MAX_LABEL_ID + 2, OUTSIDE)
for _label in _EVALUATED:
    if _label.hasInstances:
        _INSTANCE_CLASS[_label.id] = _label.trainId
_STATE_SIZE = (NUM_CLASSES + 1) ** 2 + 4 * (NUM_CLASSES + 1) + 2


def _nan_divide(numerator, denominator) -> np.ndarray:
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator == 0, np.nan, numerator / np.where(denominator == 0, 1, denominator))


def _average(scores: dict) -> float:
    """cityscapesscripts' getScoreAverage: the mean of the non-NaN scores, NaN if there is none."""
    valid = [value for value in scores.values() if not np.isnan(value)]
    return float(np.mean(valid)) if valid else float("nan")


class CityscapesMetrics:
    """Streaming official Cityscapes metrics (see the module docstring); state: one float64 vector to all-reduce."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        self._hist = self._weighted = self._images = None

    def _allocate(self, device) -> None:
        n = NUM_CLASSES + 1
        self._hist = torch.zeros(n * n, dtype=torch.int64, device=device)  # label row x prediction column
        self._weighted = torch.zeros(4, n, dtype=torch.float64, device=device)  # tp_w, fn_w, category tp_w, fn_w
        self._images = torch.zeros(2, dtype=torch.int64, device=device)  # images, images with instance ids
        tables = {"instance_class": _INSTANCE_CLASS, "avg_size": AVG_CLASS_SIZE,
                  "category": np.append(CLASS_CATEGORY, -1)}
        self._tables = {key: torch.as_tensor(value, device=device) for key, value in tables.items()}

    def update(self, preds: torch.Tensor, labels: torch.Tensor, instance_ids: torch.Tensor | None = None) -> None:
        """Adds a batch (BxHxW or HxW, any device): trainId predictions, trainId labels (values outside 0..18 are
        ignored) and optionally the ground-truth instanceIds (without them the iIoU figures are NaN)."""
        if preds.shape != labels.shape or (instance_ids is not None and instance_ids.shape != labels.shape):
            shapes = [tuple(t.shape) for t in (preds, labels, instance_ids) if t is not None]
            raise ValueError(f"preds, labels, instance_ids: expected the same shape, got {shapes}")
        if self._hist is None:
            self._allocate(self.device or preds.device)
        device, n = self._hist.device, NUM_CLASSES
        batch = preds.shape[0] if preds.ndim > 2 else 1
        preds = preds.to(device, non_blocking=True).reshape(batch, -1).long()
        labels = labels.to(device, non_blocking=True).reshape(batch, -1).long()
        column = torch.where((preds >= 0) & (preds < n), preds, OUTSIDE)
        row = torch.where((labels >= 0) & (labels < n), labels, OUTSIDE)
        # index_add_ (not bincount, which reads its input's max back to the host on CUDA): no sync
        index = (row * (n + 1) + column).reshape(-1)
        self._hist.index_add_(0, index, torch.ones((), dtype=torch.int64, device=device).expand(index.numel()))
        self._images[0] += preds.shape[0]
        if instance_ids is None:
            return
        self._images[1] += preds.shape[0]
        self._add_instances(column, instance_ids.to(device, non_blocking=True).reshape(preds.shape).long())

    def _add_instances(self, column: torch.Tensor, ids: torch.Tensor) -> None:
        """Per image and instance id: size, pixels predicted as its class, pixels predicted in its category; then
        the weighted sums per class. Pixels that are no instance go to id 0, which belongs to no class."""
        batch, device, tables = ids.shape[0], ids.device, self._tables
        ids = torch.where((ids > 1000) & (ids < INSTANCE_SPAN), ids, 0)  # the official test is id > 1000
        pixel_class = tables["instance_class"][ids // 1000]
        hit = (column == pixel_class) & (pixel_class < NUM_CLASSES)
        category_hit = tables["category"][column] == tables["category"][pixel_class]
        slots = (ids + torch.arange(batch, device=device)[:, None] * INSTANCE_SPAN).reshape(-1)
        counts = torch.zeros(3, batch * INSTANCE_SPAN, dtype=torch.int64, device=device)
        values = torch.stack([torch.ones_like(hit), hit, category_hit]).reshape(3, -1).long()
        counts.index_add_(1, slots, values)
        size, tp, category_tp = counts.double()
        instance_class = tables["instance_class"][torch.arange(INSTANCE_SPAN, device=device) // 1000].repeat(batch)
        weight = tables["avg_size"][instance_class] / size.clamp(min=1)  # 0 for slots of no class
        weighted = torch.stack([tp, size - tp, category_tp, size - category_tp]) * weight
        self._weighted.index_add_(1, instance_class, weighted)

    # ------------------------------------------------------------------------------------------------ state
    def state(self) -> torch.Tensor:
        """The whole state as one float64 vector (counts exact below 2**53): sum it over processes to merge."""
        if self._hist is None:
            self._allocate(self.device or "cpu")
        return torch.cat([self._hist.double(), self._weighted.reshape(-1), self._images.double()])

    def load_state(self, state: torch.Tensor) -> "CityscapesMetrics":
        """Replaces the state with a (summed) vector from `state`; returns self."""
        if state.shape != (_STATE_SIZE,):
            raise ValueError(f"state: expected a vector of {_STATE_SIZE} values, got shape {tuple(state.shape)}")
        self._allocate(state.device)
        n = (NUM_CLASSES + 1) ** 2
        self._hist.copy_(state[:n].round().long())
        self._weighted.copy_(state[n:-2].reshape(4, -1))
        self._images.copy_(state[-2:].round().long())
        return self

    def confusion_matrix(self) -> np.ndarray:
        """19 x 20 int64 counts: label trainId rows, prediction trainId columns, last column predictions outside."""
        return self.state()[:(NUM_CLASSES + 1) ** 2].cpu().numpy().astype(np.int64).reshape(
            NUM_CLASSES + 1, NUM_CLASSES + 1)[:NUM_CLASSES]

    def mean_iou(self, nan_to_num: float | None = None) -> dict:
        """evaluate's `mean_iou` dict from the same histogram (labels being trainIds 0..18 and 255)."""
        hist = self.confusion_matrix().astype(np.float64)
        intersect, pred, label = np.diag(hist), hist[:, :NUM_CLASSES].sum(0), hist.sum(1)
        return metrics_from_areas(intersect, pred + label - intersect, label, nan_to_num)

    # ---------------------------------------------------------------------------------------------- compute
    def compute(self, accelerator=None) -> dict:
        """The official figures (dicts by class / category name), precision, recall and the 19x19 counts. With an
        accelerator every process must call it (one all-reduce) and gets the same dict."""
        if accelerator is not None and accelerator.num_processes > 1:
            if self._hist is None:
                self._allocate(accelerator.device)
            self.load_state(accelerator.reduce(self.state().to(accelerator.device), reduction="sum"))
        hist = self.confusion_matrix()
        weighted = self._weighted.cpu().numpy()
        images, with_instances = self._images.tolist()
        conf = hist[:, :NUM_CLASSES]
        tp, label_total, pred_total = np.diag(conf), hist.sum(1), conf.sum(0)
        fp = pred_total - tp
        iou = _nan_divide(tp, label_total + fp)
        has_instances = images > 0 and with_instances == images
        results = {
            "class_iou": dict(zip(CLASS_NAMES, iou.tolist(), strict=True)),
            "class_iiou": {CLASS_NAMES[c]: float(_nan_divide(weighted[0, c], weighted[:2, c].sum() + fp[c]))
                           if has_instances else float("nan") for c in INSTANCE_CLASSES},
            "category_iou": {}, "category_iiou": {},
        }
        for index, category in enumerate(CATEGORIES):
            members = CLASS_CATEGORY == index
            category_tp = conf[np.ix_(members, members)].sum()
            category_fp = conf[np.ix_(~members, members)].sum()
            results["category_iou"][category] = float(_nan_divide(category_tp, hist[members].sum() + category_fp))
            if category in INSTANCE_CATEGORIES:
                tp_w, fn_w = weighted[2, :NUM_CLASSES][members].sum(), weighted[3, :NUM_CLASSES][members].sum()
                results["category_iiou"][category] = float(_nan_divide(tp_w, tp_w + fn_w + category_fp)) \
                    if has_instances else float("nan")
        for key in ("class_iou", "class_iiou", "category_iou", "category_iiou"):
            results[f"mean_{key}"] = _average(results[key])
        results["precision"] = dict(zip(CLASS_NAMES, _nan_divide(tp, pred_total).tolist(), strict=True))
        results["recall"] = dict(zip(CLASS_NAMES, _nan_divide(tp, label_total).tolist(), strict=True))
        results["confusion_matrix"] = conf.tolist()
        results["predicted_outside_classes"] = hist[:, NUM_CLASSES].tolist()
        results["num_images"], results["num_images_with_instances"] = images, with_instances
        return results


def markdown_table(results: dict) -> str:
    """The official table: per class IoU / iIoU / precision / recall, then per category IoU / iIoU (in %)."""
    def pct(value) -> str:
        return "-" if value is None else "nan" if np.isnan(value) else f"{value * 100:.2f}"

    rows = ["| class | IoU (%) | iIoU (%) | precision (%) | recall (%) |", "|---|---:|---:|---:|---:|"]
    for name, iou in results["class_iou"].items():
        rows.append(f"| {name} | {pct(iou)} | {pct(results['class_iiou'].get(name))} | "
                    f"{pct(results['precision'][name])} | {pct(results['recall'][name])} |")
    rows.append(f"| **average** | **{pct(results['mean_class_iou'])}** | **{pct(results['mean_class_iiou'])}** | "
                "| |")
    rows += ["", "| category | IoU (%) | iIoU (%) |", "|---|---:|---:|"]
    for name, iou in results["category_iou"].items():
        rows.append(f"| {name} | {pct(iou)} | {pct(results['category_iiou'].get(name))} |")
    rows.append(f"| **average** | **{pct(results['mean_category_iou'])}** | "
                f"**{pct(results['mean_category_iiou'])}** |")
    return "\n".join(rows)

