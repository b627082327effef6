"""Cityscapes discovery, validation and safe image/label reading, and the PNG-reading torch datasets.

    discover(root, split) -> datasets.Dataset with columns image, label (paths), city, stem
    from_hf_dataset(ds, image_column="image", label_column="label") -> the same columns from a user's dataset

A "source" is such a `datasets.Dataset`: image/label values are paths (str), PIL images, or the
{"path", "bytes"} dicts of an undecoded `datasets.Image` column. Labels must be trainIds (0..18, 255 = ignore);
`scripts/prepare_cityscapes.py` writes them for the Cityscapes layout. Other datasets pass their
`data.labels.LabelSpace` (their class count, reduce_labels) to the readers and datasets. Every read is checked: a
corrupt or truncated file, a label value outside {0..18, 255}, or an image/label size mismatch raises a one-line
ValueError naming the file and what was expected. Truncated PNGs are never loaded as whole: PIL's
ImageFile.LOAD_TRUNCATED_IMAGES is left False and decoding errors are re-raised with the path.
"""

import io
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from data.labels import CITYSCAPES, IGNORE_INDEX, LabelSpace
from data.transforms import TrainTransform, val_transform

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------- discovery
def discover(root, split: str) -> datasets.Dataset:
    """The (image, label) pairs of one split of a Cityscapes-layout root, sorted by path.

    Raises FileNotFoundError for a missing folder or label (telling to run scripts/prepare_cityscapes.py when
    only the labelTrainIds are missing) and ValueError for an empty split.
    """
    root = Path(root)
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (root, image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: folder not found; expected the Cityscapes layout leftImg8bit/{split}/"
                                    f"<city>/*{IMAGE_SUFFIX} and gtFine/{split}/<city>/ under {root}")
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise ValueError(f"{image_dir}: empty split, expected <city>/*{IMAGE_SUFFIX} files")
    rows = {"image": [], "label": [], "city": [], "stem": []}
    for image in images:
        city, stem = image.parent.name, image.name[:-len(IMAGE_SUFFIX)]
        label = label_dir / city / f"{stem}{LABEL_SUFFIX}"
        if not label.is_file():
            sources = [label_dir / city / f"{stem}_gtFine_{kind}" for kind in ("polygons.json", "labelIds.png")]
            if any(source.is_file() for source in sources):
                raise FileNotFoundError(f"{label}: missing; run `python scripts/prepare_cityscapes.py --data_root "
                                        f"{root}` to write the labelTrainIds")
            raise FileNotFoundError(f"{label}: missing label for image {image}")
        for key, value in zip(rows, (str(image), str(label), city, stem), strict=True):
            rows[key].append(value)
    return datasets.Dataset.from_dict(rows)


def from_hf_dataset(ds: datasets.Dataset, image_column: str = "image", label_column: str = "label") -> datasets.Dataset:
    """A user's `datasets.Dataset` (e.g. loaded from the hub) as a source: columns image, label, city, stem.

    Image/label values may be paths, PIL images or `datasets.Image` features (cast to decode=False here so that
    decoding errors name the file). Labels must already be trainIds (map labelIds with data.labels.ID_TO_TRAIN_ID).
    """
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"expected a datasets.Dataset, got {type(ds).__name__}")
    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise ValueError(f"dataset has no column {column!r} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise ValueError("empty dataset: expected at least one (image, label) row")
    for column in (image_column, label_column):
        if isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    keep = {image_column: "image", label_column: "label"}
    ds = ds.select_columns([c for c in (image_column, label_column, "city", "stem") if c in ds.column_names])
    ds = ds.rename_columns({old: new for old, new in keep.items() if old != new})
    if "city" not in ds.column_names:
        ds = ds.add_column("city", [""] * len(ds))
    if "stem" not in ds.column_names:
        ds = ds.add_column("stem", [f"{i:06d}" for i in range(len(ds))])
    return ds


def as_source(root, split: str) -> datasets.Dataset:
    """A path (Cityscapes layout) or a datasets.Dataset (split ignored) -> a source dataset."""
    if isinstance(root, datasets.Dataset):
        return from_hf_dataset(root)
    return discover(root, split)


def describe(value, name: str | None = None) -> str:
    """A name for a source value in error messages: its path, else `name` (e.g. "row 3"), else its type."""
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return name or f"<in-memory {type(value).__name__}>"


# ----------------------------------------------------------------------------------------------------- reading
def _decode(value, what: str, name: str) -> Image.Image:
    """Opens and fully decodes a path / PIL image / {"path", "bytes"} dict; errors name the file."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict):
            image = Image.open(value["path"])
        else:
            image = Image.open(value)
        image.load()  # decodes now: a truncated file raises here (LOAD_TRUNCATED_IMAGES stays False)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{name}: {what} file not found") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: cannot decode {what} ({error}); expected a complete PNG") from error
    return image


def read_image(value, name: str | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB. `name` names in-memory values in errors."""
    name = describe(value, name)
    image = _decode(value, "image", name)
    if image.mode != "RGB":
        if image.mode not in ("L", "P", "RGBA", "LA"):
            raise ValueError(f"{name}: image mode {image.mode}, expected an 8-bit RGB image")
        image = image.convert("RGB")
    return np.array(image)  # writable (np.asarray of a PIL image is read-only), for torch.from_numpy


def check_label(label: np.ndarray, name: str, space: LabelSpace = CITYSCAPES) -> np.ndarray:
    """Raises unless every value of a uint8 label is a class of `space` (0..18) or 255 (~0.5 ms at 1024x2048)."""
    n = space.num_labels
    # uint8 wrap-around: values n..254 map to 0..254-n, 255 to 255-n and 0..n-1 to 256-n..255
    if np.any((label - np.uint8(n)) < np.uint8(IGNORE_INDEX - n)):
        counts = np.bincount(label.reshape(-1), minlength=256)
        bad = np.flatnonzero(counts * ~space.valid())
        hint = " (labelIds instead of labelTrainIds?)" if space == CITYSCAPES and bad.max() <= 33 else ""
        raise ValueError(f"{name}: label values {bad[:8].tolist()} outside {{0..{n - 1}, {IGNORE_INDEX}}}{hint}")
    return label


def read_label(value, name: str | None = None, space: LabelSpace = CITYSCAPES) -> np.ndarray:
    """HxW uint8 training ids (after `space`'s reduce_labels), checked."""
    name = describe(value, name)
    image = _decode(value, "label", name)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"{name}: label mode {image.mode}, expected a single-channel 8-bit trainId PNG")
    label = np.array(image)
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"{name}: label values beyond 0..255, expected trainIds 0..18 and 255")
        label = label.astype(np.uint8)
    if space.reduce_labels:
        label = space.lookup()[label]
    return check_label(label, name, space)


def read_pair(image_value, label_value, name: str | None = None,
              space: LabelSpace = CITYSCAPES) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 RGB, HxW uint8 trainIds) of one sample, sizes checked. `name` (e.g. "row 3") names in-memory
    values in errors."""
    image_name = describe(image_value, name and f"{name} image")
    label_name = describe(label_value, name and f"{name} label")
    image, label = read_image(image_value, image_name), read_label(label_value, label_name, space)
    if image.shape[:2] != label.shape:
        raise ValueError(f"{label_name}: label size {label.shape[1]}x{label.shape[0]} differs from its image "
                         f"{image_name} ({image.shape[1]}x{image.shape[0]}); expected the same size")
    return image, label


# ---------------------------------------------------------------------------------------------------- datasets
class ReferenceTrainDataset(torch.utils.data.Dataset):
    """The reference CPU pipeline: decode the PNGs, then the whole recipe transform on the CPU.

    Sample i of epoch e draws from numpy's Generator seeded by (seed, e, i): the result does not depend on
    workers, batch composition or resuming. The epoch lives in shared memory, so `set_epoch` reaches
    DataLoader workers, persistent ones included (call it before iterating the epoch).
    Items: {"pixel_values": float32 3 x crop_h x crop_w normalized, "labels": int64 crop_h x crop_w, "index"}.
    """

    def __init__(self, source: datasets.Dataset, transform: TrainTransform, seed: int = 0,
                 space: LabelSpace = CITYSCAPES):
        self.source, self.transform, self.seed, self.space = source, transform, seed, space
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        row = self.source[int(index)]
        image, label = read_pair(row["image"], row["label"], f"row {index} ({row['stem']})", self.space)
        rng = np.random.default_rng([self.seed, int(self._epoch[0]), int(index)])
        pixel_values, labels = self.transform(image, label, rng)
        return {"pixel_values": pixel_values, "labels": labels, "index": int(index)}


class ImageDataset(torch.utils.data.Dataset):
    """Whole images decoded from PNG, for validation: {"image": uint8 3xHxW, "label": uint8 HxW, "index"}."""

    def __init__(self, source: datasets.Dataset, space: LabelSpace = CITYSCAPES):
        self.source, self.space = source, space

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        row = self.source[int(index)]
        return {**val_transform(*read_pair(row["image"], row["label"], f"row {index} ({row['stem']})", self.space)),
                "index": int(index)}


# ------------------------------------------------------------------------------------------------- instance ids
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def instance_ids_path(label_value) -> Path | None:
    """The `<stem>_gtFine_instanceIds.png` beside a labelTrainIds path, if that file exists (else None)."""
    if not isinstance(label_value, (str, Path)) or not str(label_value).endswith(LABEL_SUFFIX):
        return None
    path = Path(str(label_value)[:-len(LABEL_SUFFIX)] + INSTANCE_SUFFIX)
    return path if path.is_file() else None


def read_instance_ids(path) -> np.ndarray:
    """HxW int32 Cityscapes instanceIds (a 16-bit PNG: labelId * 1000 + instance for instances, else the labelId)."""
    image = _decode(str(path), "instanceIds", str(path))
    if image.mode not in ("I", "I;16", "I;16B", "L"):
        raise ValueError(f"{path}: instanceIds mode {image.mode}, expected a single-channel 16-bit PNG")
    return np.array(image).astype(np.int32)


class WithInstanceIds(torch.utils.data.Dataset):
    """A validation dataset whose items also hold "instance_ids" (int32 HxW, read from `paths`, checked in size)."""

    def __init__(self, dataset, paths: list):
        self.dataset, self.paths = dataset, paths

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        instance_ids = read_instance_ids(self.paths[int(index)])
        if instance_ids.shape != tuple(item["label"].shape):
            raise ValueError(f"{self.paths[int(index)]}: size {instance_ids.shape[1]}x{instance_ids.shape[0]}, "
                             f"expected its label's {item['label'].shape[1]}x{item['label'].shape[0]}")
        return {**item, "instance_ids": torch.from_numpy(instance_ids)}
