"""Convert a reference (mmsegmentation fcn_hr18) checkpoint into a model `from_pretrained` loads.

    python scripts/convert_mmseg_checkpoint.py fcn_hr18_512x1024_80k_cityscapes.pth out/fcn_hr18_cityscapes
    # then: HRNetFCNForSemanticSegmentation.from_pretrained("out/fcn_hr18_cityscapes")

SRC is read with torch.load(weights_only=True): an mmcv checkpoint ({"meta", "state_dict", "optimizer"}: only
"state_dict" is used) or a bare state dict with keys backbone.* / decode_head.*. Every key must map and every
shape must fit (docs/recipe.md section 2), otherwise the script stops and lists the offending keys. DST_DIR receives
config.json and model.safetensors.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation, convert_mmseg_state_dict
from modeling.cli import HelpFormatter
from modeling.weights import read_weights_file


def main(args) -> dict:
    try:
        reference = read_weights_file(args.src)
        config = HRNetFCNConfig(num_labels=args.num_labels, fuse_upsample=args.fuse_upsample)
        state_dict = convert_mmseg_state_dict(reference, config, source=str(args.src))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    model = HRNetFCNForSemanticSegmentation(config)
    model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(args.dst)
    results = {"src": str(args.src), "dst": str(args.dst), "tensors": len(state_dict),
               "parameters": sum(p.numel() for p in model.parameters()), "fuse_upsample": args.fuse_upsample}
    print(results)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("src", type=Path, help="reference checkpoint (.pth) or a state dict (.pth/.safetensors)")
    parser.add_argument("dst", type=Path, help="output directory for save_pretrained")
    parser.add_argument("--fuse_upsample", choices=("bilinear", "nearest"), default="bilinear",
                        help="fusion upsampling of the converted model: the reference's bilinear (default) or timm's")
    parser.add_argument("--num_labels", type=int, default=19, help="classes of the checkpoint's head (19)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
