"""Prepare a Cityscapes root for training: labelTrainIds PNGs, and optionally the fast-path cache.

    python scripts/prepare_cityscapes.py --data_root data/cityscapes --nproc 8
    python scripts/prepare_cityscapes.py --data_root data/cityscapes --nproc 8 --cache   # + train/val uint8 cache

Writes `<stem>_gtFine_labelTrainIds.png` beside every `<stem>_gtFine_polygons.json` (or labelIds PNG) of every
split, skipping up-to-date files; --cache also writes the memory-mapped uint8 arrays the fast pipeline reads
(~6 MB + 2 MB per 1024x2048 image: ~24 GB for train + val) into --cache_dir (default DATA_ROOT/fastpath_cache).
Safe to interrupt and rerun: every file is written to a temporary name and renamed into place.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.prepare import prepare_cityscapes
from modeling import strict_json
from modeling.cli import HelpFormatter


def main(args) -> dict:
    if args.nproc < 1:
        raise SystemExit(f"error: --nproc must be >= 1, got {args.nproc}")
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"error: --data_root {args.data_root}: not a directory (expected a Cityscapes root holding "
                         "leftImg8bit/ and gtFine/)")
    start = time.perf_counter()
    try:
        stats = prepare_cityscapes(args.data_root, nproc=args.nproc, build_cache=args.cache, cache_dir=args.cache_dir,
                                   cache_splits=tuple(args.cache_splits))
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    stats["seconds"] = round(time.perf_counter() - start, 2)
    print(strict_json.dumps(stats, indent=2))
    return stats


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", required=True, help="Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--nproc", type=int, default=1, help="worker processes")
    parser.add_argument("--cache", action="store_true", help="also build the fast-path uint8 cache")
    parser.add_argument("--cache_dir", default=None, help="where the cache goes (default DATA_ROOT/fastpath_cache)")
    parser.add_argument("--cache_splits", nargs="+", default=["train", "val"], help="splits to cache")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
