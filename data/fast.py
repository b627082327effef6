"""The fast path: a memory-mapped uint8 cache of decoded images/labels, and batched device-side augmentation.

Cache (one per split, in `cache_dir`, default `<root>/fastpath_cache`):
    <split>_images.u8   raw uint8 (N, H, W, 3) RGB, C order, no header (np.memmap)
    <split>_labels.u8   raw uint8 (N, H, W) trainIds, checked when the cache is built
    <split>_index.json  {"version", "split", "count", "height", "width", "sources"}; "sources" holds, per sample,
                        [image path, size, mtime_ns, label path, size, mtime_ns] (paths relative to cache_dir), or
                        {"fingerprint"} for a datasets.Dataset of in-memory images (plus "label_space" for labels
                        other than Cityscapes' trainIds). The cache is stale as soon as that changes.
All images of a split must have one size (true of Cityscapes): a different one is an error naming the file.
Building writes temporary files in cache_dir and renames them into place, the index last, under a file lock
(several ranks may ask at once). Reading a sample is two memmap slices (~0.6 ms at 1024x2048).

Device augmentation (`DeviceAugment`, the `on_device` of the fast pipeline) reproduces data/transforms.py's
reference pipeline on a whole batch: the same parameter distribution (`draw_batch_params`, from the torch
generator the training script owns) and, for the same parameters, the same output (`apply_batch_params`):
- scale + crop + flip are one sampling grid per sample: the crop window's pixels are computed directly from the
  source image with OpenCV's fixed-point bilinear taps (data/device_kernels.py: integer math, so bit-exact),
  labels by nearest index;
  the rescaled image is never materialised;
- cat_max_ratio: the class histograms of the 10 candidate windows of the nearest-resampled label are computed on
  the device (one histogram per candidate, no host sync) and the first accepted candidate is taken, else the 11th;
- photometric distortion with per-sample coins and values, in the reference order (masks on accelerators);
- normalization, and padding (image 0, label 255) where the rescaled image is smaller than the crop.
"""

import json
import logging
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm import tqdm

from data.cityscapes import describe, read_pair
from data.device_kernels import adjust_hue, adjust_saturation, blend_rows, convert, linear_taps, nearest_index
from data.labels import CITYSCAPES, IGNORE_INDEX, LabelSpace
from data.locking import flock_exclusive, unlock
from data.transforms import (
    BRIGHTNESS_DELTA,
    CAT_MAX_RATIO,
    CONTRAST_RANGE,
    CROP_SIZE,
    CROP_TRIES,
    FLIP_PROB,
    HUE_DELTA,
    IMG_SCALE,
    RATIO_RANGE,
    SATURATION_RANGE,
    normalize,
)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIRNAME = "fastpath_cache"


# ------------------------------------------------------------------------------------------------------- cache
def cache_paths(cache_dir, split: str) -> dict[str, Path]:
    cache_dir = Path(cache_dir)
    return {"images": cache_dir / f"{split}_images.u8", "labels": cache_dir / f"{split}_labels.u8",
            "index": cache_dir / f"{split}_index.json"}


def source_signature(source: datasets.Dataset, cache_dir, space: LabelSpace = CITYSCAPES) -> dict:
    """What the cache was built from: per-file sizes and mtimes, or the dataset fingerprint for in-memory data; and
    the label space, when it is not Cityscapes' (so that a Cityscapes cache built before it existed stays current)."""
    signature = _files_signature(source, cache_dir)
    if space != CITYSCAPES:
        signature["label_space"] = [space.num_labels, space.reduce_labels]
    return signature


def _files_signature(source: datasets.Dataset, cache_dir) -> dict:
    # string columns hold paths; image columns (bytes) are never read here: a hub dataset's would all be loaded
    path_type = datasets.Value("string")
    if source.features["image"] != path_type or source.features["label"] != path_type:
        return {"fingerprint": source._fingerprint}
    images, labels = list(source["image"]), list(source["label"])
    rows = []
    for image, label in zip(images, labels, strict=True):
        row = []
        for path in (image, label):
            try:
                stat = os.stat(path)
            except OSError as error:
                raise FileNotFoundError(f"{path}: cannot stat source file ({error.strerror})") from error
            row += [os.path.relpath(path, cache_dir), stat.st_size, stat.st_mtime_ns]
        rows.append(row)
    return {"files": rows}


def read_cache_index(cache_dir, split: str) -> dict | None:
    """The validated index of a split's cache, or None if there is none; ValueError if it is unreadable."""
    paths = cache_paths(cache_dir, split)
    if not paths["index"].exists():
        return None
    hint = "delete it or rerun `python scripts/prepare_cityscapes.py --data_root ROOT --cache`"
    try:
        index = json.loads(paths["index"].read_text())
        shape = (int(index["count"]), int(index["height"]), int(index["width"]))
        if index["version"] != CACHE_VERSION or index["split"] != split or "sources" not in index:
            raise ValueError(f"version {index['version']}, split {index['split']}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{paths['index']}: unreadable fast-path cache index ({error}); {hint}") from error
    for key, channels in (("images", 3), ("labels", 1)):
        expected = shape[0] * shape[1] * shape[2] * channels
        size = paths[key].stat().st_size if paths[key].exists() else None
        if size != expected:
            raise ValueError(f"{paths[key]}: fast-path cache file has {size} bytes, expected {expected} "
                             f"({shape[0]} x {shape[1]} x {shape[2]} x {channels} uint8); {hint}")
    return index


def cache_is_current(cache_dir, split: str, source: datasets.Dataset, space: LabelSpace = CITYSCAPES) -> bool:
    """True if a valid cache of exactly these sources exists; ValueError if one exists but is unreadable."""
    index = read_cache_index(cache_dir, split)
    return index is not None and index["count"] == len(source) and (
        index["sources"] == source_signature(source, cache_dir, space))


def _fill(job) -> None:
    """Worker: decode and check samples [start, stop) and write them into the (temporary) memmaps."""
    rows, paths, shape, start, stop, space = job
    images = np.memmap(paths["images"], np.uint8, "r+", shape=(*shape, 3))
    labels = np.memmap(paths["labels"], np.uint8, "r+", shape=shape)
    for i, image_value, label_value in zip(range(start, stop), rows["image"], rows["label"], strict=True):
        image, label = read_pair(image_value, label_value, f"row {i}", space)
        if label.shape != shape[1:]:
            name = describe(image_value, f"row {i} image")
            raise ValueError(f"{name}: size {label.shape[1]}x{label.shape[0]}, expected {shape[2]}x{shape[1]} like "
                             "the split's first image (the cache needs one size per split)")
        images[i], labels[i] = image, label
    images.flush()
    labels.flush()


@contextmanager
def _lock(cache_dir: Path, split: str):
    """One rank builds the cache while the others wait. Where the filesystem cannot lock, ranks may build it at
    once: wasteful but safe, since each writes its own temporary files and renames them into place."""
    path = cache_dir / f".{split}.lock"
    with open(path, "w") as handle:
        warning = flock_exclusive(handle.fileno(), path, wait=True,
                                  unprotected="several processes may build this cache at once (safe, but slower)")
        if warning:
            logger.warning(warning)
            yield
            return
        try:
            yield
        finally:
            unlock(handle.fileno())


def build_cache(source: datasets.Dataset, cache_dir, split: str, nproc: int = 1, progress: bool = True,
                space: LabelSpace = CITYSCAPES) -> dict:
    """(Re)writes the cache of one split atomically; returns its paths. Checks every image and label; labels are
    stored as training ids (after `space`'s reduce_labels)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = cache_paths(cache_dir, split)
    first = source[0]
    height, width = read_pair(first["image"], first["label"], "row 0", space)[1].shape
    shape = (len(source), height, width)
    needed, free = shape[0] * height * width * 4, shutil.disk_usage(cache_dir).free
    if needed > free:
        raise OSError(f"{cache_dir}: the {split} cache needs {needed / 2**30:.1f} GiB, only {free / 2**30:.1f} free")
    tmp = {key: path.with_name(f".{path.name}.{os.getpid()}.tmp") for key, path in paths.items()}
    try:
        np.memmap(tmp["images"], np.uint8, "w+", shape=(*shape, 3)).flush()
        np.memmap(tmp["labels"], np.uint8, "w+", shape=shape).flush()
        step = max(1, min(16, shape[0] // max(nproc, 1) // 4 or 1))
        # each job carries only its own rows (a pickled in-memory dataset would be copied whole)
        jobs = [(source[start:start + step], tmp, shape, start, min(start + step, shape[0]), space)
                for start in range(0, shape[0], step)]
        bar = tqdm(total=shape[0], desc=f"cache {split}", unit="img", disable=not progress)
        if nproc > 1:
            with multiprocessing.get_context().Pool(nproc) as pool:
                for job, _ in zip(jobs, pool.imap(_fill, jobs), strict=True):
                    bar.update(job[4] - job[3])
        else:
            for job in jobs:
                _fill(job)
                bar.update(job[4] - job[3])
        bar.close()
        index = {"version": CACHE_VERSION, "split": split, "count": shape[0], "height": height, "width": width,
                 "sources": source_signature(source, cache_dir, space)}
        tmp["index"].write_text(json.dumps(index))
        os.replace(tmp["images"], paths["images"])
        os.replace(tmp["labels"], paths["labels"])
        os.replace(tmp["index"], paths["index"])  # last: the index commits the cache
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return paths


def ensure_cache(source: datasets.Dataset, cache_dir, split: str, nproc: int = 1, rebuild_unreadable: bool = False,
                 progress: bool = True, space: LabelSpace = CITYSCAPES) -> tuple[dict, bool]:
    """(paths, built): builds the cache if it is missing or stale (sources changed), with a log line.

    An unreadable cache raises ValueError unless rebuild_unreadable (what the prepare script does).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _lock(cache_dir, split):  # another rank may be building it: wait, then find it current
        try:
            if cache_is_current(cache_dir, split, source, space):
                return cache_paths(cache_dir, split), False
        except ValueError:
            if not rebuild_unreadable:
                raise
        logger.warning("building the fast-path cache of %s (%d images) in %s", split, len(source), cache_dir)
        return build_cache(source, cache_dir, split, nproc, progress, space), True


class CacheDataset(torch.utils.data.Dataset):
    """Samples read from the memory-mapped cache: {"image": uint8, "label": uint8 HxW, "index": int}.

    image is HxWx3 (train, for DeviceAugment) or 3xHxW (channels_first=True, validation). The memmaps are opened
    lazily in each DataLoader worker (a pickled np.memmap would be a full copy).
    """

    def __init__(self, cache_dir, split: str, channels_first: bool = False):
        index = read_cache_index(cache_dir, split)
        if index is None:
            raise FileNotFoundError(f"{cache_paths(cache_dir, split)['index']}: no fast-path cache; run "
                                    "`python scripts/prepare_cityscapes.py --data_root ROOT --cache`")
        self.paths, self.channels_first = cache_paths(cache_dir, split), channels_first
        self.shape = (index["count"], index["height"], index["width"])
        self._images = self._labels = None

    def __getstate__(self):
        return {**self.__dict__, "_images": None, "_labels": None}

    def set_epoch(self, epoch: int) -> None:
        pass  # the fast path's random draws come from the generator passed to on_device

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> dict:
        if self._images is None:
            self._images = np.memmap(self.paths["images"], np.uint8, "r", shape=(*self.shape, 3))
            self._labels = np.memmap(self.paths["labels"], np.uint8, "r", shape=self.shape)
        image = torch.from_numpy(np.array(self._images[index]))
        if self.channels_first:
            image = image.permute(2, 0, 1)
        return {"image": image, "label": torch.from_numpy(np.array(self._labels[index])), "index": int(index)}


# ------------------------------------------------------------------------------------------ device augmentation
@dataclass
class BatchParams:
    """TrainParams of a batch as tensors on one device (leading dim B); *_on = the step is applied."""

    ratio: torch.Tensor  # float64 (B,)
    size: torch.Tensor  # int64 (B, 2) rescaled (h, w)
    crop_offsets: torch.Tensor  # int64 (B, CROP_TRIES + 1, 2)
    flip: torch.Tensor  # bool (B,)
    brightness_on: torch.Tensor
    brightness: torch.Tensor  # float32
    contrast_first: torch.Tensor
    contrast_on: torch.Tensor
    contrast: torch.Tensor  # float32
    saturation_on: torch.Tensor
    saturation: torch.Tensor  # float32
    hue_on: torch.Tensor
    hue: torch.Tensor  # int64



def draw_batch_params(batch_size: int, height: int, width: int, generator: torch.Generator, crop_size=CROP_SIZE,
                      img_scale=IMG_SCALE, ratio_range=RATIO_RANGE) -> BatchParams:
    """Draws a batch's parameters on the generator's device, with the reference's distribution (one rand call)."""
    device, tries = generator.device, CROP_TRIES + 1
    u = torch.rand(batch_size, 1 + 2 * tries + 10, generator=generator, device=device, dtype=torch.float64)
    ratio = ratio_range[0] + u[:, 0] * (ratio_range[1] - ratio_range[0])
    # data.transforms.rescale_size in float64, elementwise
    target_long, target_short = torch.floor(img_scale[0] * ratio), torch.floor(img_scale[1] * ratio)
    long_side, short_side = torch.maximum(target_long, target_short), torch.minimum(target_long, target_short)
    factor = torch.minimum(long_side / max(height, width), short_side / min(height, width))
    size = torch.stack([torch.floor(height * factor + 0.5), torch.floor(width * factor + 0.5)], 1).long()
    margin = torch.stack([size[:, 0] - crop_size[0], size[:, 1] - crop_size[1]], 1).clamp(min=0)  # (B, 2)
    offsets = torch.floor(u[:, 1:1 + 2 * tries].view(-1, tries, 2) * (margin[:, None] + 1)).long()
    offsets = torch.minimum(offsets, margin[:, None])
    c = u[:, 1 + 2 * tries:]

    def uniform(column, low, high):
        return (low + c[:, column] * (high - low)).float()

    hue = torch.floor(c[:, 9] * 2 * HUE_DELTA).long().clamp(max=2 * HUE_DELTA - 1) - HUE_DELTA
    return BatchParams(ratio, size, offsets, flip=c[:, 0] < FLIP_PROB,
                       brightness_on=c[:, 1] < 0.5, brightness=uniform(2, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA),
                       contrast_first=c[:, 3] < 0.5, contrast_on=c[:, 4] < 0.5, contrast=uniform(5, *CONTRAST_RANGE),
                       saturation_on=c[:, 6] < 0.5, saturation=uniform(7, *SATURATION_RANGE),
                       hue_on=c[:, 8] < 0.5, hue=hue)


def _window(size: torch.Tensor, offset: torch.Tensor, crop: int):
    """Positions (B, crop) in the rescaled image of a crop window, clamped; and which of them exist."""
    steps = torch.arange(crop, device=size.device)
    extent = size.clamp(max=crop)[:, None]  # the crop is smaller where the rescaled image is
    return offset[:, None] + torch.minimum(steps, extent - 1), steps < extent


def gather_window(source: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """source[b, rows[b, i], cols[b, j]] for BxHxW(xC) source, Bxh rows, Bxw cols -> Bxhxw(xC).

    Whole rows first (one index_select), then columns with a broadcast (never materialised) index: much
    cheaper than 3-tensor advanced indexing, and batched (no per-sample loop).
    """
    batch, height = source.shape[:2]
    channels = source.shape[3:]
    offsets = torch.arange(batch, device=source.device)[:, None] * height
    picked = source.reshape(batch * height, *source.shape[2:]).index_select(0, (rows + offsets).reshape(-1))
    picked = picked.view(batch, rows.shape[1], *source.shape[2:])
    index = cols.view(batch, 1, cols.shape[1], *([1] * len(channels)))
    return torch.gather(picked, 2, index.expand(batch, rows.shape[1], cols.shape[1], *channels))


def select_crops(labels: torch.Tensor, params: BatchParams, crop_size=CROP_SIZE,
                 cat_max_ratio=CAT_MAX_RATIO) -> torch.Tensor:
    """(B,) index of the candidate crop the reference takes: the first of 10 accepted by cat_max_ratio, else the
    11th. The windows of the nearest-resampled label are gathered directly from the source label."""
    batch, height, width = labels.shape
    if cat_max_ratio >= 1:
        return torch.zeros(batch, dtype=torch.long, device=labels.device)
    bins = torch.arange(batch, device=labels.device)[:, None, None] * 256
    ones = torch.ones(1, dtype=torch.int64, device=labels.device).expand(batch * crop_size[0] * crop_size[1])
    accepted = []
    for k in range(CROP_TRIES):
        rows, row_ok = _window(params.size[:, 0], params.crop_offsets[:, k, 0], crop_size[0])
        cols, col_ok = _window(params.size[:, 1], params.crop_offsets[:, k, 1], crop_size[1])
        ys = nearest_index(rows, height, params.size[:, :1])
        xs = nearest_index(cols, width, params.size[:, 1:])
        window = gather_window(labels, ys, xs).long()
        window = torch.where(row_ok[:, :, None] & col_ok[:, None, :], window, IGNORE_INDEX)
        # class histogram per sample; index_add_ rather than bincount, which syncs with the host on CUDA
        counts = torch.zeros(batch * 256, dtype=torch.int64, device=labels.device)
        counts.index_add_(0, (window + bins).view(-1), ones)
        counts = counts.view(batch, 256)[:, :IGNORE_INDEX]  # 255 is not counted; other values are < 255
        largest, total = counts.max(1).values, counts.sum(1)
        accepted.append(((counts > 0).sum(1) > 1) & (largest.double() / total.clamp(min=1) < cat_max_ratio))
    accepted = torch.stack(accepted, 1)
    return torch.where(accepted.any(1), accepted.int().argmax(1), CROP_TRIES)


def _step(on: torch.Tensor, step, x: torch.Tensor, masked: bool) -> torch.Tensor:
    """x with step(x[index], index) applied to the samples where `on`: on the whole batch, kept by a mask (no host
    sync), or computed for the selected samples only."""
    if not masked:
        index = on.nonzero().squeeze(1)
        out = x.clone()
        if len(index):
            out[index] = step(x[index], index)
        return out
    return torch.where(on.view(-1, 1, 1, 1), step(x, slice(None)), x)


def photometric_batch(images: torch.Tensor, params: BatchParams, masked: bool | None = None,
                      widths: torch.Tensor | None = None) -> torch.Tensor:
    """PhotoMetricDistortion with per-sample parameters on Bx3xhxw float32 uint8 values, in the reference order.

    masked (default: on accelerators) computes every step for the whole batch and masks, with no host sync; on
    the CPU only the samples a step applies to are computed (a sync is free there and it halves the cost).
    widths (B,): the width of each sample's image inside a padded crop (default w), which OpenCV's HSV2RGB sees.
    """
    def per_sample(t, dims):
        return t.view(-1, *([1] * dims))

    def contrast(x, i):
        return convert(x, alpha=per_sample(p.contrast[i], 3))

    def saturation(x, i):
        return adjust_saturation(x, per_sample(p.saturation[i], 2), row_width=per_sample(widths[i], 2))

    def hue(x, i):
        return adjust_hue(x, per_sample(p.hue[i], 2), row_width=per_sample(widths[i], 2))

    p, masked = params, images.device.type != "cpu" if masked is None else masked
    if widths is None:
        widths = torch.full((len(images),), images.shape[-1], device=images.device)
    x = _step(p.brightness_on, lambda x, i: convert(x, beta=per_sample(p.brightness[i], 3)), images, masked)
    x = _step(p.contrast_on & p.contrast_first, contrast, x, masked)
    x = _step(p.saturation_on, saturation, x, masked)
    x = _step(p.hue_on, hue, x, masked)
    return _step(p.contrast_on & ~p.contrast_first, contrast, x, masked)


def apply_batch_params(images: torch.Tensor, labels: torch.Tensor, params: BatchParams, crop_size=CROP_SIZE,
                       cat_max_ratio=CAT_MAX_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference pipeline on a batch: BxHxWx3 uint8 + BxHxW uint8 -> (float32 Bx3xhxw, int64 Bxhxw)."""
    batch, height, width = labels.shape
    choice = select_crops(labels, params, crop_size, cat_max_ratio)
    offset = params.crop_offsets[torch.arange(batch, device=labels.device), choice]  # (B, 2)
    rows, row_ok = _window(params.size[:, 0], offset[:, 0], crop_size[0])
    cols, col_ok = _window(params.size[:, 1], offset[:, 1], crop_size[1])
    start, extent = offset[:, 1:], params.size[:, 1:].clamp(max=crop_size[1])
    cols = torch.where(params.flip[:, None], 2 * start + extent - 1 - cols, cols)  # flip within the crop
    valid = row_ok[:, :, None] & col_ok[:, None, :]

    ys, xs = nearest_index(rows, height, params.size[:, :1]), nearest_index(cols, width, params.size[:, 1:])
    out_labels = torch.where(valid, gather_window(labels, ys, xs).long(), IGNORE_INDEX)

    y0, y1, wy0, wy1 = linear_taps(rows, height, params.size[:, :1], clamp_weight=False)
    x0, x1, wx0, wx1 = linear_taps(cols, width, params.size[:, 1:], clamp_weight=True)
    wx0, wx1 = wx0[:, None, :, None], wx1[:, None, :, None]

    def horizontal(ys):  # OpenCV's horizontal pass on the needed rows: int32, x2048
        return gather_window(images, ys, x0).int() * wx0 + gather_window(images, ys, x1).int() * wx1

    pixels = blend_rows(horizontal(y0), horizontal(y1), wy0[:, :, None, None], wy1[:, :, None, None])
    pixels = photometric_batch(pixels.permute(0, 3, 1, 2).float().contiguous(), params, widths=extent[:, 0])
    return torch.where(valid[:, None], normalize(pixels), 0.0), out_labels


class DeviceAugment:
    """on_device of the fast pipeline: (batch of cache samples on the device, generator) -> (pixel_values, labels)."""

    def __init__(self, crop_size=CROP_SIZE, img_scale=IMG_SCALE, ratio_range=RATIO_RANGE, cat_max_ratio=CAT_MAX_RATIO):
        self.crop_size, self.img_scale = tuple(crop_size), tuple(img_scale)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio

    def __call__(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError("expected a BxHxWx3 uint8 image batch from the fast-path cache, got "
                             f"{tuple(images.shape)} {images.dtype}")
        if generator is None or generator.device.type != images.device.type:
            raise ValueError(f"expected a torch.Generator on the batch's device ({images.device}), got "
                             f"{None if generator is None else generator.device}")
        params = draw_batch_params(len(images), *labels.shape[1:], generator, self.crop_size, self.img_scale,
                                   self.ratio_range)
        return apply_batch_params(images, labels, params, self.crop_size, self.cat_max_ratio)
