"""Label preparation: `<stem>_gtFine_labelTrainIds.png` for every annotation, and optionally the fast-path cache.

A labelTrainIds image is rendered from `<stem>_gtFine_polygons.json` with cityscapesscripts' createLabelImage
(the same code as its json2labelImg(..., "trainIds")), or, where there is no JSON, mapped from
`<stem>_gtFine_labelIds.png` with the id -> trainId table; both give the same image. Idempotent: an output whose
mtime is not older than its source is skipped. Atomic: written to a temporary file in the same folder, then
renamed over the target, so an interrupted run never leaves a half-written PNG.

Checked before rendering (a one-line ValueError naming the file): a JSON must be UTF-8 JSON whose
imgWidth/imgHeight equal its leftImg8bit image's size (read from the PNG header; without an image, at most
data.image_checks.MAX_PIXELS), with known labels and finite polygon points within 10x the image size; a labelIds
PNG's declared size must match its image too (no decompression bomb is decoded); a directory where a
labelTrainIds PNG goes is an error. Every written label is checked to hold trainIds only.
"""

import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image
from tqdm import tqdm

from data.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX, SPLITS, check_label, discover
from data.fast import CACHE_DIRNAME, ensure_cache
from data.image_checks import MAX_PIXELS, open_image, png_size
from data.labels import ID_TO_TRAIN_ID

JSON_SUFFIX = "_gtFine_polygons.json"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"


def find_annotations(root) -> list[tuple[Path, Path]]:
    """(source, target) for every annotation under root/gtFine/<split>/<city>/: the JSON, else the labelIds."""
    root = Path(root)
    if not (root / "gtFine").is_dir():
        raise FileNotFoundError(f"{root / 'gtFine'}: folder not found; expected the Cityscapes layout "
                                "gtFine/<split>/<city>/*_gtFine_polygons.json")
    jobs = {}
    for split in SPLITS:
        for suffix in (LABEL_IDS_SUFFIX, JSON_SUFFIX):  # the JSON wins when both exist
            for source in sorted((root / "gtFine" / split).glob(f"*/*{suffix}")):
                target = source.with_name(source.name[:-len(suffix)] + LABEL_SUFFIX)
                jobs[target] = source
    if not jobs:
        raise ValueError(f"{root / 'gtFine'}: no *{JSON_SUFFIX} or *{LABEL_IDS_SUFFIX} files found")
    return [(source, target) for target, source in jobs.items()]


def is_up_to_date(source: Path, target: Path) -> bool:
    for path, what in ((source, "annotation"), (target, "labelTrainIds PNG")):
        if path.exists() and not path.is_file():
            raise ValueError(f"{path}: a directory (or other non-file) where the {what} file should be; remove or "
                             "rename it, then rerun prepare")
    return target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def image_size_of(source: Path, suffix: str) -> tuple[int, int] | None:
    """(width, height) of the leftImg8bit PNG of an annotation (from its header), None if there is no image."""
    split_dir = source.parent.parent  # root/gtFine/<split>/<city>/<name>
    image = split_dir.parents[1] / "leftImg8bit" / split_dir.name / source.parent.name / \
        (source.name[:-len(suffix)] + IMAGE_SUFFIX)
    return png_size(image) if image.is_file() else None


def _polygons_problem(annotation: dict, width: int, height: int) -> str | None:
    """Why a parsed polygons JSON cannot be rendered correctly (None if it can)."""
    objects = annotation.get("objects")
    if not isinstance(objects, list):
        return "no 'objects' list"
    for i, obj in enumerate(objects):
        if isinstance(obj, dict) and obj.get("deleted"):  # not drawn (createLabelImage skips it too)
            continue
        label = obj.get("label") if isinstance(obj, dict) else None
        if not isinstance(label, str) or (label not in name2label and label.removesuffix("group") not in name2label):
            return f"object {i}: unknown label {str(label)[:40]!r}"
        points = obj.get("polygon")
        if not isinstance(points, list):
            return f"object {i} ({label}): no 'polygon' list"
        for point in points:
            ok = isinstance(point, list) and len(point) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in point)
            if not ok or abs(point[0]) > 10 * width or abs(point[1]) > 10 * height:
                return (f"object {i} ({label}): point {str(point)[:60]} is not a finite [x, y] within 10x the "
                        f"{width}x{height} image")
    return None


def render_polygons(source: Path) -> Image.Image:
    """The labelTrainIds image of a polygons JSON, checked first (see the module docstring)."""
    def bad(why):
        return ValueError(f"{source}: cannot render polygons ({why}); expected a Cityscapes gtFine_polygons.json")

    try:
        text = source.read_bytes().decode("utf-8")
        annotation = json.loads(text)
    except UnicodeDecodeError as error:
        raise bad(f"not UTF-8 text: byte 0x{error.object[error.start]:02x} at offset {error.start}") from None
    except json.JSONDecodeError as error:
        raise bad(f"invalid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(annotation, dict):
        raise bad("not a JSON object")
    width, height = annotation.get("imgWidth"), annotation.get("imgHeight")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise bad(f"imgWidth/imgHeight {str(width)[:20]}/{str(height)[:20]}: expected positive integers")
    image_size = image_size_of(source, JSON_SUFFIX)
    if image_size is not None and (width, height) != image_size:
        raise bad(f"it declares imgWidth x imgHeight {width}x{height}, its leftImg8bit image is "
                  f"{image_size[0]}x{image_size[1]}")
    if image_size is None and width * height > MAX_PIXELS:
        raise bad(f"it declares imgWidth x imgHeight {width}x{height}, beyond {MAX_PIXELS / 1e6:.0f} M pixels")
    problem = _polygons_problem(annotation, width, height)
    if problem is not None:
        raise bad(problem)
    try:
        parsed = Annotation()
        parsed.fromJsonText(text)
        return createLabelImage(parsed, "trainIds")
    except (SystemExit, Exception) as error:  # cityscapesscripts calls sys.exit on what it cannot handle
        lines = str(error).strip().splitlines()
        raise bad(f"{type(error).__name__}: {lines[0][:200] if lines else ''}") from None


def train_id_image(source: Path) -> Image.Image:
    """The labelTrainIds image of one polygons JSON or labelIds PNG; errors name the file."""
    if source.name.endswith(JSON_SUFFIX):
        return render_polygons(source)
    try:
        image_size = image_size_of(source, LABEL_IDS_SUFFIX)
        with open_image(source, "labelIds PNG") as image:  # header only: decompression bombs are refused here
            if image_size is not None and image.size != image_size:
                raise ValueError(f"size {image.width}x{image.height}, its leftImg8bit image is "
                                 f"{image_size[0]}x{image_size[1]}")
            image.load()
            if image.mode not in ("L", "P"):
                raise ValueError(f"mode {image.mode}")
            ids = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        message = str(error).removeprefix(f"{source}: ")
        raise ValueError(f"{source}: cannot read labelIds ({message}); expected an 8-bit single-channel PNG of its "
                         "image's size") from error
    return Image.fromarray(ID_TO_TRAIN_ID[ids])


def write_atomic(image: Image.Image, target: Path) -> None:
    """Saves a PNG to a temporary file beside target, then renames it over target."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _convert(job: tuple[Path, Path]) -> None:
    source, target = job
    image = train_id_image(source)
    check_label(np.asarray(image), f"{target} (from {source})")  # trainIds only, whatever the source held
    write_atomic(image, target)


def prepare_cityscapes(root, nproc: int = 1, build_cache: bool = False, cache_dir=None,
                       cache_splits=("train", "val"), progress: bool = True) -> dict:
    """Writes missing or outdated labelTrainIds under root (and the fast-path caches of cache_splits).

    Returns {"written": n, "skipped": n, "cache": {split: {"images", "labels", "index", "built"}}}.
    """
    root = Path(root)
    todo, skipped = [], 0
    for source, target in find_annotations(root):
        if is_up_to_date(source, target):
            skipped += 1
        else:
            todo.append((source, target))
    bar = tqdm(total=len(todo), desc="labelTrainIds", unit="img", disable=not progress or not todo)
    if nproc > 1 and len(todo) > 1:
        with multiprocessing.get_context().Pool(nproc) as pool:
            for _ in pool.imap_unordered(_convert, todo, chunksize=4):
                bar.update()
    else:
        for job in todo:
            _convert(job)
            bar.update()
    bar.close()
    stats = {"written": len(todo), "skipped": skipped, "cache": {}}
    if build_cache:
        cache_dir = Path(cache_dir) if cache_dir is not None else root / CACHE_DIRNAME
        for split in cache_splits:
            if not (root / "leftImg8bit" / split).is_dir():
                continue
            paths, built = ensure_cache(discover(root, split), cache_dir, split, nproc, rebuild_unreadable=True,
                                        progress=progress)
            stats["cache"][split] = {**{key: str(path) for key, path in paths.items()}, "built": built}
    return stats
