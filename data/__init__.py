"""Cityscapes data: label table, synthetic generator, discovery, preparation, transforms, fast device-side path.

    dataset, on_device = get_train_data(root, pipeline="fast" | "reference", crop_size=(512, 1024), seed=0)
    pixel_values, labels = on_device(batch_to_device(batch, device), generator)  # float32 Bx3xhxw, int64 Bxhxw
    dataset, on_device = get_val_data(root, split="val")

`root` is a Cityscapes-layout folder (labelTrainIds prepared by scripts/prepare_cityscapes.py) or a
`datasets.Dataset` with image and label columns, whose values `label_space` (data.labels.LabelSpace: the class count,
reduce_labels; default Cityscapes' 19 trainIds) describes; data.hf_dataset loads any Hugging Face segmentation
dataset that way. The submodules load on first use, so that
`import data.labels` (or data.synthetic) stays light: no torch, no datasets.
"""

import importlib
from pathlib import Path

__all__ = ["get_train_data", "get_val_data", "discover", "from_hf_dataset", "prepare_cityscapes", "normalize",
           "batch_to_device", "reference_on_device", "val_on_device", "default_cache_dir"]

_LAZY = {"discover": "data.cityscapes", "from_hf_dataset": "data.cityscapes", "prepare_cityscapes": "data.prepare",
         "normalize": "data.transforms"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def default_cache_dir(root, cache_dir=None) -> Path:
    """cache_dir if given, else <root>/fastpath_cache for a folder root."""
    from data.fast import CACHE_DIRNAME

    if cache_dir is not None:
        return Path(cache_dir)
    if not isinstance(root, (str, Path)):
        raise ValueError("the fast path needs cache_dir=... for a datasets.Dataset source")
    return Path(root) / CACHE_DIRNAME


def batch_to_device(batch: dict, device) -> dict:
    """A loader batch with its tensors on `device` (asynchronous from pinned memory), other values as they are."""
    import torch

    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def reference_on_device(batch: dict, generator=None):
    """on_device of the reference pipeline: the dataset did everything; only dtypes are fixed here."""
    return batch["pixel_values"].float(), batch["labels"].long()


def val_on_device(batch: dict, generator=None):
    """on_device of validation: normalize the whole uint8 images on the device."""
    from data.transforms import normalize

    return normalize(batch["image"]), batch["label"].long()


def get_train_data(root, pipeline: str = "fast", crop_size=(512, 1024), seed: int = 0, *, img_scale=None,
                   ratio_range=None, cat_max_ratio=None, cache_dir=None, nproc: int = 1, label_space=None):
    """(dataset, on_device) of the training split.

    reference: PNGs decoded and fully transformed on the CPU, per-sample numpy RNG seeded by (seed, epoch, index).
    fast: samples are raw uint8 reads from the memory-mapped cache (built here, with a log line, if missing or
    stale; `scripts/prepare_cityscapes.py --cache` builds it ahead), on_device = DeviceAugment, whose random draws
    come from the torch generator passed to it (`seed` is not used).
    img_scale (the resize target, (long, short)), ratio_range and cat_max_ratio: None = the recipe's
    ((2048, 1024), (0.5, 2.0), 0.75). label_space None: Cityscapes' trainIds.
    """
    from data.cityscapes import ReferenceTrainDataset, as_source
    from data.fast import CacheDataset, DeviceAugment, ensure_cache
    from data.labels import CITYSCAPES
    from data.transforms import CAT_MAX_RATIO, IMG_SCALE, RATIO_RANGE, TrainTransform

    label_space = label_space or CITYSCAPES
    img_scale = IMG_SCALE if img_scale is None else img_scale
    ratio_range = RATIO_RANGE if ratio_range is None else ratio_range
    cat_max_ratio = CAT_MAX_RATIO if cat_max_ratio is None else cat_max_ratio

    if pipeline not in ("fast", "reference"):
        raise ValueError(f"pipeline must be 'fast' or 'reference', got {pipeline!r}")
    source = as_source(root, "train")
    if pipeline == "reference":
        transform = TrainTransform(crop_size, img_scale, ratio_range, cat_max_ratio)
        return ReferenceTrainDataset(source, transform, seed, label_space), reference_on_device
    cache_dir = default_cache_dir(root, cache_dir)
    ensure_cache(source, cache_dir, "train", nproc, space=label_space)
    return CacheDataset(cache_dir, "train"), DeviceAugment(crop_size, img_scale, ratio_range, cat_max_ratio)


def get_val_data(root, split: str = "val", *, cache_dir=None, instance_ids: bool = False, label_space=None):
    """(dataset, on_device) of a whole-image split: items {"image": uint8 3xHxW, "label": uint8 HxW, "index"}.

    Reads the fast-path cache when a current one exists (prepare_cityscapes.py --cache builds train and val),
    else decodes the PNGs. instance_ids=True: items also hold "instance_ids" (int32 HxW, from
    <stem>_gtFine_instanceIds.png, for the official iIoU) when every label of the split has that file beside it.
    label_space None: Cityscapes' trainIds.
    """
    from data.cityscapes import ImageDataset, WithInstanceIds, as_source, instance_ids_path
    from data.fast import CacheDataset, cache_is_current
    from data.labels import CITYSCAPES

    label_space = label_space or CITYSCAPES
    source = as_source(root, split)
    dataset = ImageDataset(source, label_space)
    if cache_dir is not None or isinstance(root, (str, Path)):
        cache_dir = default_cache_dir(root, cache_dir)
        if cache_is_current(cache_dir, split, source, label_space):
            dataset = CacheDataset(cache_dir, split, channels_first=True)
    paths = [instance_ids_path(label) for label in source["label"]] if instance_ids else [None]
    if all(path is not None for path in paths):
        dataset = WithInstanceIds(dataset, paths)
    return dataset, val_on_device
