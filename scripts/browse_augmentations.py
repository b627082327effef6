"""Look at training samples as the model sees them: a grid PNG of augmented crops with their labels overlaid.

    python scripts/browse_augmentations.py --data_root data/cityscapes --num_samples 6 --out augmentations.png
    python scripts/browse_augmentations.py --dataset synthetic --num_samples 4 --crop_size 64 128 --out aug.png

One row per sampled training image, one column per pipeline (--pipeline reference fast, the default, or either
alone): the augmented crop (rescaled, cropped, flipped, photometric distortion; denormalized back to RGB) with its
label blended in the Cityscapes palette (ignored and padded pixels show the photo). Each tile's caption gives the
image, the drawn scale ratio and rescaled size, the crop offset (y, x) in the rescaled image with the chosen
candidate (cat_max_ratio takes the first of 10 accepted), the flip, and the photometric steps drawn (b: brightness
shift, c: contrast factor, before or after s: saturation factor and h: hue shift). The same parameters go to
OUT.json with the PNG's path.

reference: the CPU pipeline's sample of epoch 0 (its draws are seeded by (--seed, epoch, index), as in training).
fast: DeviceAugment (the fast path's on_device) on the chosen images as one batch, on the CPU, drawn from a torch
generator seeded with --seed (training reseeds it every iteration); the images are decoded from their PNGs, which
is what the fast path's cache holds, so no cache is built.
--dataset synthetic generates a small Cityscapes-format set under --data_root (default: OUT's
folder/synthetic_cityscapes) if missing, and rescales relative to its own image size as scripts/train.py does;
real Cityscapes uses the recipe's (2048, 1024) x [0.5, 2).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from data import get_train_data
from data.cityscapes import discover, read_pair
from data.fast import DeviceAugment, draw_batch_params, select_crops
from data.prepare import prepare_cityscapes
from data.synthetic import generate_cityscapes_atomically
from data.transforms import IMG_SCALE, MEAN, STD, resize_label, select_crop
from modeling import strict_json
from modeling.cli import HelpFormatter, positive_int, seed_int
from modeling.errors import first_line
from modeling.visualize import overlay

PIPELINES = ("reference", "fast")
# Grid geometry in inches: tile width (its height follows the crop's aspect), caption under each tile, title row,
# margin around; at DPI pixels per inch.
TILE_INCHES, CAPTION_INCHES, TITLE_INCHES, MARGIN_INCHES, DPI = 5.0, 0.45, 0.35, 0.1, 100
LABEL_ALPHA = 0.4  # the label's share of the blend: the photometric distortion stays visible


# ------------------------------------------------------------------------------------------------------ helpers
def synthetic_root(args) -> Path:
    """The synthetic set's folder, generated and prepared (labelTrainIds) if missing."""
    root = Path(args.data_root) if args.data_root else Path(args.out).resolve().parent / "synthetic_cityscapes"
    if not (root / "leftImg8bit").exists():
        # a fixed set (seed 0; --seed picks images and draws from it)
        generate_cityscapes_atomically(root, num_train=max(args.num_samples, 8), num_val=1, num_test=0,
                                       height=args.synthetic_size[0], width=args.synthetic_size[1], seed=0)
    prepare_cityscapes(root, progress=False)
    return root


def image_scale(args, root: Path) -> tuple[int, int]:
    """The resize target (long, short): the recipe's, or for the synthetic set its own image size (as in training)."""
    if args.dataset != "synthetic":
        return IMG_SCALE
    with Image.open(next((root / "leftImg8bit" / "train").glob("*/*.png"))) as image:
        return image.size


def to_rgb(pixel_values: torch.Tensor) -> np.ndarray:
    """Normalized float 3xHxW -> HxWx3 uint8 RGB (the inverse of data.transforms.normalize, rounded)."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (pixel_values.cpu() * std + mean).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def reference_samples(root, args, indices, img_scale) -> list[dict]:
    """Samples of the CPU pipeline (get_train_data's dataset, epoch 0); its draws are repeated here with the same
    seeding as ReferenceTrainDataset, to report them."""
    dataset, _ = get_train_data(root, "reference", tuple(args.crop_size), args.seed, img_scale=img_scale)
    dataset.set_epoch(0)
    transform, samples = dataset.transform, []
    for index in indices:
        item, row = dataset[index], dataset.source[index]
        label = read_pair(row["image"], row["label"], row["stem"])[1]
        params = transform.draw(np.random.default_rng([args.seed, 0, index]), *label.shape)
        choice = select_crop(resize_label(label, params.size), params.crop_offsets, transform.crop_size,
                             transform.cat_max_ratio)
        photometric = {"brightness": params.brightness, "contrast": params.contrast,
                       "contrast_first": params.contrast_first, "saturation": params.saturation, "hue": params.hue}
        samples.append({"pipeline": "reference", "index": index, "stem": row["stem"], "ratio": params.ratio,
                        "rescaled_size": list(params.size), "crop_candidate": choice,
                        "crop_offset": params.crop_offsets[choice].tolist(), "flip": params.flip,
                        "photometric": photometric, "image": to_rgb(item["pixel_values"]),
                        "label": item["labels"].numpy()})
    return samples


def fast_samples(root, args, indices, img_scale) -> list[dict]:
    """Samples of the device-side pipeline (DeviceAugment) on the chosen images as one batch, on the CPU.

    The images are decoded from their PNGs (the bytes the fast path's cache holds: no 18 GB cache is built to show
    a few). The draws are repeated from the generator's state to report them."""
    source = discover(root, "train").select(indices)
    pairs = [read_pair(row["image"], row["label"], row["stem"]) for row in source]
    batch = {"image": torch.from_numpy(np.stack([p[0] for p in pairs])),
             "label": torch.from_numpy(np.stack([p[1] for p in pairs]))}
    on_device = DeviceAugment(tuple(args.crop_size), img_scale)
    generator = torch.Generator().manual_seed(args.seed)
    state = generator.get_state()
    pixel_values, labels = on_device(batch, generator)
    generator.set_state(state)
    p = draw_batch_params(len(pairs), *batch["label"].shape[1:], generator, on_device.crop_size, on_device.img_scale,
                          on_device.ratio_range)
    choice = select_crops(batch["label"], p, on_device.crop_size, on_device.cat_max_ratio)
    samples = []
    for k, (index, stem) in enumerate(zip(indices, source["stem"], strict=True)):
        def drawn(on, value, k=k):
            return value[k].item() if on[k] else None

        photometric = {"brightness": drawn(p.brightness_on, p.brightness), "contrast": drawn(p.contrast_on, p.contrast),
                       "contrast_first": bool(p.contrast_first[k]), "saturation": drawn(p.saturation_on, p.saturation),
                       "hue": drawn(p.hue_on, p.hue)}
        samples.append({"pipeline": "fast", "index": index, "stem": stem, "ratio": p.ratio[k].item(),
                        "rescaled_size": p.size[k].tolist(), "crop_candidate": int(choice[k]),
                        "crop_offset": p.crop_offsets[k, choice[k]].tolist(), "flip": bool(p.flip[k]),
                        "photometric": photometric, "image": to_rgb(pixel_values[k]), "label": labels[k].numpy()})
    return samples


def caption(sample: dict) -> str:
    (h, w), (y, x), ph = sample["rescaled_size"], sample["crop_offset"], sample["photometric"]
    steps = [f"b{ph['brightness']:+.0f}" if ph["brightness"] is not None else None,
             f"c{ph['contrast']:.2f}" if ph["contrast"] is not None and ph["contrast_first"] else None,
             f"s{ph['saturation']:.2f}" if ph["saturation"] is not None else None,
             f"h{ph['hue']:+d}" if ph["hue"] is not None else None,
             f"c{ph['contrast']:.2f}" if ph["contrast"] is not None and not ph["contrast_first"] else None]
    steps = " ".join(s for s in steps if s) or "none"
    return (f"{sample['stem']}  ratio {sample['ratio']:.2f} -> {h}x{w}\n"
            f"crop y={y} x={x} (candidate {sample['crop_candidate']}){', flipped' if sample['flip'] else ''}; "
            f"photometric: {steps}")


def plot_grid(columns: dict[str, list[dict]], crop_size, path: Path) -> Path:
    """One row per image, one column per pipeline, tiles placed in inches (the PNG's size follows from the counts);
    written beside and renamed, so a viewer never reads half a PNG."""
    names, rows = list(columns), len(next(iter(columns.values())))
    tile_height = (TILE_INCHES - MARGIN_INCHES) * crop_size[0] / crop_size[1]  # the image's aspect
    width, height = TILE_INCHES * len(names) + MARGIN_INCHES, TITLE_INCHES + (tile_height + CAPTION_INCHES) * rows
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    for col, name in enumerate(names):
        fig.text((MARGIN_INCHES / 2 + TILE_INCHES * (col + 0.5)) / width, 1 - TITLE_INCHES / 2 / height,
                 f"--pipeline {name}", ha="center", va="center", fontsize=11)
        for row, sample in enumerate(columns[name]):
            top = TITLE_INCHES + (tile_height + CAPTION_INCHES) * row
            ax = fig.add_axes(((MARGIN_INCHES + TILE_INCHES * col) / width, 1 - (top + tile_height) / height,
                               (TILE_INCHES - MARGIN_INCHES) / width, tile_height / height))
            ax.imshow(overlay(sample["image"], sample["label"], LABEL_ALPHA), interpolation="nearest",
                      aspect="auto")
            ax.set_axis_off()
            ax.text(0.5, -0.03, caption(sample), transform=ax.transAxes, ha="center", va="top", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=DPI, format="png")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    if args.dataset == "cityscapes" and not args.data_root:
        raise SystemExit("error: --data_root is required with --dataset cityscapes (or use --dataset synthetic)")
    try:
        root = synthetic_root(args) if args.dataset == "synthetic" else Path(args.data_root)
        img_scale = image_scale(args, root)
        count = len(discover(root, "train"))
        rng = np.random.default_rng(args.seed)  # which images: a seeded draw, shown in index order
        indices = sorted(rng.choice(count, min(args.num_samples, count), replace=False).tolist())
        builders = {"reference": reference_samples, "fast": fast_samples}
        columns = {name: builders[name](root, args, indices, img_scale) for name in args.pipeline}
    except (FileNotFoundError, ValueError) as error:  # they name the file or folder
        raise SystemExit(f"error: --data_root: {first_line(error)}") from None
    path = plot_grid(columns, args.crop_size, Path(args.out))
    with Image.open(path) as image:
        size = list(image.size)
    samples = [{k: v for k, v in s.items() if k not in ("image", "label")} for c in columns.values() for s in c]
    results = {"png": str(path), "png_size": size, "data_root": str(root), "pipelines": list(args.pipeline),
               "crop_size": list(args.crop_size), "img_scale": list(img_scale), "seed": args.seed,
               "indices": indices, "samples": samples}
    json_path = Path(args.output_json) if args.output_json else path.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(strict_json.dumps(results, indent=1))
    print(f"{len(indices)} images x {len(columns)} pipeline(s) -> {path} ({size[0]}x{size[1]}), {json_path}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=("cityscapes", "synthetic"), default="cityscapes")
    parser.add_argument("--data_root", help="Cityscapes-layout folder (labelTrainIds prepared); for synthetic, "
                                            "where the set is (generated if missing)")
    parser.add_argument("--synthetic_size", type=positive_int, nargs=2, default=(64, 128), metavar=("H", "W"),
                        help="image size of a generated synthetic set (train.py's demo set is 64x128)")
    parser.add_argument("--pipeline", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    parser.add_argument("--num_samples", type=positive_int, default=6, help="training images shown (rows)")
    parser.add_argument("--crop_size", type=positive_int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--seed", type=seed_int, default=0, help="chooses the images and seeds the augmentation draws")
    parser.add_argument("--out", default="augmentations.png", help="the grid PNG")
    parser.add_argument("--output_json", help="the drawn parameters (default: OUT with .json)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
