"""A training run's data, as scripts/train.py loads it: a Cityscapes-layout root (the real dataset or the synthetic
demo set) or any Hugging Face segmentation dataset (data/hf_dataset.py). Both end as a TrainingData; bad input stops
with a one-line `error:` naming the argument, before the cache, the model or any download.
"""

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from data import get_train_data, get_val_data
from data.checks import check_crop_fits, check_split_files
from data.cityscapes import discover
from data.fast import CACHE_DIRNAME
from data.hf_dataset import VALIDATION, hf_dataset_spec, image_size, label_space, load_splits, read_id2label
from data.prepare import prepare_cityscapes
from data.synthetic import generate_cityscapes_atomically
from data.transforms import IMG_SCALE

# The synthetic demo set: generated in seconds, trained on at 64x128 crops (as big as the images: crops see the
# whole scene at the recipe's 0.5-2x scales, so their BN statistics match whole-image evaluation), every class in val.
SYNTHETIC = {"num_train": 32, "num_val": 8, "num_test": 0, "height": 64, "width": 128, "seed": 0}
RECIPE_CROP = (512, 1024)


class TrainingData(NamedTuple):
    train_set: object  # a torch Dataset (data.get_train_data)
    on_device: Callable  # the training pipeline's device step
    val_data: tuple  # (dataset, on_device) of the validation split (data.get_val_data)
    crop_size: list[int]  # --crop_size, or the default that fits the images
    name: str  # the data root or the dataset, for messages
    record: dict  # saved as the model's config.training_data: what scripts/eval.py reads back
    id2label: dict | None = None  # the classes; None: Cityscapes' 19


def default_crop(height: int, width: int) -> list[int]:
    """The recipe's 512x1024 crop, capped at the images' size."""
    return [min(height, RECIPE_CROP[0]), min(width, RECIPE_CROP[1])]


# --------------------------------------------------------------------------------------------------- cityscapes
def train_img_scale(args, data_root: Path) -> tuple[int, int]:
    # The recipe rescales to (2048, 1024) x U[0.5, 2): the Cityscapes size. Synthetic images are smaller, so their
    # scale is taken relative to their own size, which keeps the recipe's range relative to the native image.
    if args.dataset != "synthetic":
        return IMG_SCALE
    with Image.open(next((data_root / "leftImg8bit" / "train").glob("*/*.png"))) as image:
        return image.size  # (w, h)


def default_crop_size(args, data_root: Path) -> list[int]:
    """--crop_size when not given: the recipe's 512x1024, capped at a synthetic set's (smaller) image size."""
    if args.dataset != "synthetic":
        return list(RECIPE_CROP)
    width, height = train_img_scale(args, data_root)
    return default_crop(height, width)


def check_data(data_root: Path, crop_size, img_scale) -> None:
    """Cheap checks before anything heavy (cache, model): layout, complete PNGs, trainIds, a crop that fits."""
    try:
        sources = {split: discover(data_root, split) for split in ("train", "val")}
        for source in sources.values():
            check_split_files(source)
        with Image.open(sources["train"][0]["image"]) as image:
            check_crop_fits(image.size[::-1], crop_size, img_scale)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --data_root: {err}") from None


def prepare_data_root(args, accelerator) -> Path:
    """The dataset root; for --dataset synthetic, generate it first (main process; the others wait)."""
    if args.dataset == "cityscapes":
        return Path(args.data_root)
    root = Path(args.data_root) if args.data_root else Path(args.output_dir) / "synthetic_cityscapes"
    if accelerator.is_main_process:
        if not root.exists():
            generate_cityscapes_atomically(root, **SYNTHETIC)
        prepare_cityscapes(root, build_cache=True)  # idempotent: labelTrainIds + the fast path's cache
    accelerator.wait_for_everyone()
    return root


def cityscapes_training_data(args, accelerator, pipeline: str) -> TrainingData:
    """--data_root (or --dataset synthetic): train and val of a Cityscapes-layout root, 19 classes."""
    data_root = prepare_data_root(args, accelerator)
    crop_size = args.crop_size or default_crop_size(args, data_root)
    img_scale = train_img_scale(args, data_root)
    check_data(data_root, crop_size, img_scale)
    train_set, on_device = get_train_data(data_root, pipeline=pipeline, crop_size=tuple(crop_size), seed=args.seed,
                                          img_scale=img_scale)
    # saved in config.json beside the weights: scripts/eval.py --checkpoint OUTPUT_DIR/final finds the data itself
    record = {"dataset": args.dataset, "data_root": str(data_root.resolve())}
    return TrainingData(train_set, on_device, get_val_data(data_root, split="val"), crop_size, str(data_root), record)


# ------------------------------------------------------------------------------------------------ hugging face
def hf_training_data(args, accelerator, pipeline: str) -> TrainingData:
    """--dataset_name: its train and validation splits, the classes from its id2label. Images are rescaled relative
    to the first training image's size (as for the synthetic set: the recipe's 0.5-2x range around the native
    size); the fast path's cache goes to OUTPUT_DIR/fastpath_cache, keyed by the dataset's fingerprint."""
    spec = hf_dataset_spec(args)
    try:
        with accelerator.main_process_first():  # one download into the shared cache, then everyone reads it
            splits = load_splits(spec)
        id2label = read_id2label(spec)
        space = label_space(spec, len(id2label))
        for split in ("train", VALIDATION):
            check_split_files(splits[split], space=space)
        height, width = image_size(splits["train"], space)
        crop_size = args.crop_size or default_crop(height, width)
        check_crop_fits((height, width), crop_size, (width, height))
        train_set, on_device = get_train_data(splits["train"], pipeline, tuple(crop_size), args.seed,
                                              img_scale=(width, height), label_space=space,
                                              cache_dir=Path(args.output_dir) / CACHE_DIRNAME)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --dataset_name: {err}") from None
    val_data = get_val_data(splits[VALIDATION], label_space=space)
    return TrainingData(train_set, on_device, val_data, crop_size, spec.dataset_name, spec.record(), id2label)
