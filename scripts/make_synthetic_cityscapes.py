"""Write a synthetic dataset in the exact Cityscapes layout (see data/synthetic.py):

    python scripts/make_synthetic_cityscapes.py --out out/cs --num_train 8 --num_val 4
    python scripts/make_synthetic_cityscapes.py --out out/cs_full --height 1024 --width 2048 --num_train 4 --num_val 2

Then make the training labels with scripts/prepare_cityscapes.py --data_root out/cs.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import SPLITS, generate_cityscapes
from modeling.cli import HelpFormatter


def main(args) -> dict:
    start = time.perf_counter()
    try:
        root = generate_cityscapes(args.out, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
                                   height=args.height, width=args.width, seed=args.seed)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"error: {error}") from None
    images = {split: len(list((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))) for split in SPLITS}
    results = {"root": str(root.resolve()), "images": images, "height": args.height, "width": args.width,
               "seed": args.seed, "seconds": round(time.perf_counter() - start, 2)}
    print(f"wrote {sum(images.values())} images {images} of {args.height}x{args.width} to {root} "
          f"in {results['seconds']} s")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic Cityscapes-format dataset.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to create (must not hold a dataset yet)")
    parser.add_argument("--num_train", type=int, default=8, help="images in train (>= 1)")
    parser.add_argument("--num_val", type=int, default=4, help="images in val (>= 1)")
    parser.add_argument("--num_test", type=int, default=2, help="images in test (>= 0)")
    parser.add_argument("--height", type=int, default=256, help="image height (real Cityscapes: 1024)")
    parser.add_argument("--width", type=int, default=512, help="image width (real Cityscapes: 2048)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
