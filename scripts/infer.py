"""Segment images with a trained model: colorized masks (Cityscapes palette), overlays and raw trainId maps.

    python scripts/infer.py --checkpoint out/run/final photos/ street.jpg --out_dir out/pictures
    python scripts/infer.py --checkpoint fcn_hr18.pth photos/ --out_dir out/pictures --mode slide --cpu

For each input image NAME.png/.jpg, writes NAME_pred.png (colorized), NAME_overlay.png (blended on the photo) and
NAME_trainIds.png (class ids: 0..18 for Cityscapes, 0..N-1 for a model of N classes) to --out_dir; images found in a
folder (searched recursively) keep their path below that folder (photos/a/x.jpg -> OUT_DIR/a/x_*.png), so equal
names in different subfolders do not overwrite each other; two inputs that would still write the same files are an
error. Runs on the GPU when there is one (else CPU), one image at a time, at the image's own size. Any common image
mode is read as 8-bit RGB (16-bit grayscale scaled to 8 bits, palette/gray/RGBA converted); an image declaring more
than 89 M pixels is refused before decoding (a decompression bomb), as is --mixed_precision fp16 without a GPU.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from data.image_checks import check_declared_size, read_photo
from data.transforms import normalize
from modeling.cli import HelpFormatter, refuse_fp16_on_cpu
from modeling.inference import add_inference_args, load_model, predict, predict_options
from modeling.visualize import save_prediction_pictures

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(image path, output name without suffix, relative to --out_dir) for every image of the inputs."""
    images = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            images += [(p, p.relative_to(path).with_suffix("")) for p in sorted(path.rglob("*"))
                       if p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            images.append((path, Path(path.stem)))
        else:
            raise SystemExit(f"error: {path}: no such image or folder")
    if not images:
        raise SystemExit(f"error: no {'/'.join(IMAGE_SUFFIXES)} images in {' '.join(inputs)}")
    first_with = {}
    for path, output in images:
        other = first_with.setdefault(output, path)
        if other != path:
            raise SystemExit(f"error: {other} and {path} would both be written as {output}_*.png in --out_dir; "
                             "expected inputs with distinct names (run them separately or rename one)")
    return images


def read_rgb(path: Path) -> np.ndarray:
    """8-bit RGB of any common mode (16-bit grayscale scaled, not clipped); a decompression bomb is refused."""
    try:
        return read_photo(path)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def main(args) -> dict:
    images = list_images(args.inputs)
    try:
        options = predict_options(args)
        for path, _ in images:  # every PNG's header before any work: a bomb among many stops nothing half-done
            check_declared_size(path)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    refuse_fp16_on_cpu(accelerator)
    try:
        model = load_model(args.checkpoint).to(accelerator.device).eval()
    except (FileNotFoundError, ValueError, OSError) as error:
        raise SystemExit(f"error: --checkpoint: {error}") from error
    out_dir = Path(args.out_dir)
    written = []
    for path, output in tqdm(images, desc="infer"):
        image = read_rgb(path)
        pixel_values = normalize(torch.from_numpy(image).permute(2, 0, 1)[None].to(accelerator.device))
        with accelerator.autocast():
            scores = predict(model, pixel_values, args.mode, **options)
        train_ids = scores.argmax(1)[0].to("cpu", torch.uint8).numpy()
        written += save_prediction_pictures(out_dir / output.parent, output.name, image, train_ids)
        written.append(out_dir / f"{output}_trainIds.png")
        Image.fromarray(train_ids).save(written[-1])
    print(f"{len(images)} images -> {out_dir}")
    return {"num_images": len(images), "out_dir": str(out_dir), "files": [str(p) for p in written]}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--checkpoint", required=True, help="save_pretrained folder or a reference mmseg .pth")
    parser.add_argument("--out_dir", required=True)
    add_inference_args(parser)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
