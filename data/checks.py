"""Cheap checks of a dataset before any heavy work (cache, model, launch), each failing with one clear line.

A truncated PNG would otherwise surface hours into a run, inside a loader worker.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data.cityscapes import read_pair
from data.image_checks import MAX_PIXELS, PNG_SIGNATURE, ihdr_size
from data.labels import CITYSCAPES, LabelSpace
from data.transforms import rescale_size

_PNG_TRAILER = b"IEND\xaeB`\x82"  # the IEND chunk type and CRC: the last 8 bytes of every complete PNG


def png_header(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """(why the file is not a complete PNG or None, the (width, height) its IHDR declares): 24 bytes at the start,
    8 at the end. A size of 0 or beyond MAX_PIXELS (a decompression bomb) is a problem too."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
    except OSError as err:
        return f"unreadable ({err.strerror})", None
    if size == 0:
        return "empty file (0 bytes)", None
    if head[:8] != PNG_SIGNATURE:
        return "not a PNG (bad signature)", None
    if tail != _PNG_TRAILER:
        return f"truncated PNG (no IEND trailer; {size} bytes)", None
    if (declared := ihdr_size(head)) is None:
        return "PNG without an IHDR header", None
    width, height = declared
    if width == 0 or height == 0 or width * height > MAX_PIXELS:
        return (f"the PNG declares {width}x{height} pixels (0, or beyond the {MAX_PIXELS / 1e6:.0f} M-pixel limit: "
                "a decompression bomb?)"), None
    return None, (width, height)


def check_split_files(source, decode: int = 2, threads: int = 16, space: LabelSpace = CITYSCAPES) -> None:
    """Every image and label of a split (a source from data.cityscapes.discover) is a complete PNG of a sane size,
    each label the size of its image; the first `decode` pairs decode and hold trainIds (classes of `space`). Raises
    ValueError naming the first bad file. Cheap: a 24-byte and an 8-byte read per file (threads hide network-filesystem
    latency); the full decode of every file happens when it is read."""
    pairs = [(image, label) for image, label in zip(source["image"], source["label"], strict=True)
             if isinstance(image, str | Path) and isinstance(label, str | Path)]
    paths = [path for pair in pairs for path in pair]
    with ThreadPoolExecutor(threads) as pool:
        headers = dict(zip(paths, pool.map(png_header, paths), strict=True))
    for path in paths:
        if (problem := headers[path][0]) is not None:
            raise ValueError(f"{path}: {problem}; expected a complete PNG (re-extract or re-download it)")
    for image, label in pairs:
        if headers[image][1] != headers[label][1]:
            (iw, ih), (lw, lh) = headers[image][1], headers[label][1]
            raise ValueError(f"{label}: a {lw}x{lh} label for the {iw}x{ih} image {image}; expected a label of its "
                             "image's size")
    for i in range(min(decode, len(source))):
        read_pair(source[i]["image"], source[i]["label"], f"row {i}", space)


def check_crop_fits(image_size: tuple[int, int], crop_size, img_scale) -> None:
    """The training crop must fit the image rescaled to the nominal scale (ratio 1), else most crops are padding.

    image_size and crop_size are (h, w); img_scale is the recipe's (long, short) resize target."""
    height, width = rescale_size(*image_size, 1.0, img_scale)
    if crop_size[0] > height or crop_size[1] > width:
        raise ValueError(f"--crop_size {crop_size[0]} {crop_size[1]} is larger than the training images rescaled to "
                         f"the nominal scale ({height}x{width} from {image_size[0]}x{image_size[1]}): most crops "
                         f"would be padding; expected a crop of at most {height} {width}")
