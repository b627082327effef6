"""Cheap checks of a dataset before any heavy work (cache, model, launch), each failing with one clear line.

A truncated PNG would otherwise surface hours into a run, inside a loader worker.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data.cityscapes import read_pair
from data.transforms import rescale_size

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"IEND\xaeB`\x82"  # the IEND chunk type and CRC: the last 8 bytes of every complete PNG


def png_problem(path: str) -> str | None:
    """Why a file is not a complete PNG (None if it looks complete): reads 8 bytes at each end."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    if head != _PNG_SIGNATURE:
        return "not a PNG (bad signature)"
    if tail != _PNG_TRAILER:
        return f"truncated PNG (no IEND trailer; {size} bytes)"
    return None


def check_split_files(source, decode: int = 2, threads: int = 16) -> None:
    """Every image and label of a split (a source from data.cityscapes.discover) is a complete PNG; the first
    `decode` pairs decode and hold trainIds. Raises ValueError naming the first bad file. Cheap: two 8-byte reads
    per file (threads hide network-filesystem latency); the full decode of every file happens when it is read."""
    paths = [p for column in ("image", "label") for p in source[column] if isinstance(p, str | Path)]
    with ThreadPoolExecutor(threads) as pool:
        for path, problem in zip(paths, pool.map(png_problem, paths), strict=True):
            if problem is not None:
                raise ValueError(f"{path}: {problem}; expected a complete PNG (re-extract or re-download it)")
    for i in range(min(decode, len(source))):
        read_pair(source[i]["image"], source[i]["label"], f"row {i}")


def check_crop_fits(image_size: tuple[int, int], crop_size, img_scale) -> None:
    """The training crop must fit the image rescaled to the nominal scale (ratio 1), else most crops are padding.

    image_size and crop_size are (h, w); img_scale is the recipe's (long, short) resize target."""
    height, width = rescale_size(*image_size, 1.0, img_scale)
    if crop_size[0] > height or crop_size[1] > width:
        raise ValueError(f"--crop_size {crop_size[0]} {crop_size[1]} is larger than the training images rescaled to "
                         f"the nominal scale ({height}x{width} from {image_size[0]}x{image_size[1]}): most crops "
                         f"would be padding; expected a crop of at most {height} {width}")
