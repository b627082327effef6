"""Label preparation: `<stem>_gtFine_labelTrainIds.png` for every annotation, and optionally the fast-path cache.

A labelTrainIds image is rendered from `<stem>_gtFine_polygons.json` with cityscapesscripts' createLabelImage
(the same code as its json2labelImg(..., "trainIds")), or, where there is no JSON, mapped from
`<stem>_gtFine_labelIds.png` with the id -> trainId table; both give the same image. Idempotent: an output whose
mtime is not older than its source is skipped. Atomic: written to a temporary file in the same folder, then
renamed over the target, so an interrupted run never leaves a half-written PNG.
"""

import multiprocessing
import os
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image
from tqdm import tqdm

from data.cityscapes import LABEL_SUFFIX, SPLITS, discover
from data.fast import CACHE_DIRNAME, ensure_cache
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
    return target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def train_id_image(source: Path) -> Image.Image:
    """The labelTrainIds image of one polygons JSON or labelIds PNG; errors name the file."""
    if source.name.endswith(JSON_SUFFIX):
        try:
            annotation = Annotation()
            annotation.fromJsonFile(str(source))
            image = createLabelImage(annotation, "trainIds")
        except (SystemExit, Exception) as error:  # cityscapesscripts calls sys.exit on an unknown label
            raise ValueError(f"{source}: cannot render polygons ({error!r}); expected a Cityscapes "
                             "gtFine_polygons.json") from error
        return image
    try:
        with Image.open(source) as image:
            image.load()
            if image.mode not in ("L", "P"):
                raise ValueError(f"mode {image.mode}")
            ids = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{source}: cannot read labelIds ({error}); expected an 8-bit single-channel PNG") from error
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
    write_atomic(train_id_image(source), target)


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
