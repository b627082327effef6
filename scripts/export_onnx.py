"""Export a trained model to ONNX and check it against PyTorch with onnxruntime.

    python scripts/export_onnx.py --checkpoint out/run/final --out fcn_hr18.onnx                   # 1x3x1024x2048
    python scripts/export_onnx.py --checkpoint out/run/final --out fcn_hr18.onnx --dynamic --upsample

Input `pixel_values`: float32 Bx3xHxW, normalized as in training (RGB, (x - mean) / std, data.transforms.normalize).
Output `logits`: float32 Bx19xceil(H/4)xceil(W/4), at 1/4 of the input size as the model returns them; upsample
them bilinearly (align_corners=False) to HxW and take the argmax over classes for trainIds. With --upsample the
graph does that too and has a second output `labels`: int64 BxHxW trainIds (0..18).
Static (default): batch and size fixed at --batch_size and --input_size (any H, W >= 32). --dynamic: batch, H
and W are free; H and W must then be multiples of 32 (the fuse layers' exact-size resize that other sizes need is
control flow, which tracing records for the traced size only). 1024x2048 and 512x1024 are.

The check runs both models on a seeded random normalized input (and, with --dynamic, on a second batch size and
image size) and writes the largest absolute logit difference and the share of pixels whose argmax agrees to
OUT.json (or --output_json). Above --atol + --rtol * (largest |logit|) it stops with an error (the JSON is written
first). Uses torch's TorchScript-based exporter (dynamo=False): the dynamo one needs the onnxscript package.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from torch import nn

from modeling import strict_json
from modeling.cli import HelpFormatter, finite_float, positive_int, seed_int
from modeling.errors import first_line
from modeling.hrnet_fcn import MIN_INPUT_SIZE
from modeling.inference import load_model

DYNAMIC_MULTIPLE = 32  # the stride of the coarsest branch


# ------------------------------------------------------------------------------------------------------ helpers
class ExportWrapper(nn.Module):
    """Plain tensors in and out (no ModelOutput): logits, and with upsample also the full-size argmax."""

    def __init__(self, model: nn.Module, upsample: bool):
        super().__init__()
        self.model, self.upsample = model, upsample

    def forward(self, pixel_values: torch.Tensor):
        logits = self.model(pixel_values, return_dict=False)[0]
        if not self.upsample:
            return logits
        full = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits, full.argmax(1)


def output_names(upsample: bool) -> list[str]:
    return ["logits", "labels"] if upsample else ["logits"]


def check_sizes(args) -> None:
    height, width = args.input_size
    if min(height, width) < MIN_INPUT_SIZE:
        raise SystemExit(f"error: --input_size {height} {width}: expected H and W >= {MIN_INPUT_SIZE}")
    if args.dynamic and (height % DYNAMIC_MULTIPLE or width % DYNAMIC_MULTIPLE):
        raise SystemExit(f"error: --input_size {height} {width}: with --dynamic, expected multiples of "
                         f"{DYNAMIC_MULTIPLE} (e.g. 1024 2048)")


def check_shapes(args) -> list[tuple[int, int, int, int]]:
    """The input shapes the check runs: the export's, and with --dynamic a second batch size and image size."""
    batch, (height, width) = args.batch_size, args.input_size
    shapes = [(batch, 3, height, width)]
    if args.dynamic:
        def other(side):  # about half the side, a multiple of 32, >= 32
            return max(DYNAMIC_MULTIPLE, side // 2 // DYNAMIC_MULTIPLE * DYNAMIC_MULTIPLE)

        shapes.append((batch + 1, 3, other(height), other(width)))
    return shapes


def export(wrapper: ExportWrapper, path: Path, shape, opset: int, dynamic: bool) -> None:
    names = output_names(wrapper.upsample)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"},
                        "logits": {0: "batch", 2: "height_4", 3: "width_4"}}
        if wrapper.upsample:
            dynamic_axes["labels"] = {0: "batch", 1: "height", 2: "width"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the tracer's notes on the model's shape checks (constants for the traced size, as intended) and the
        # legacy exporter's deprecation notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (torch.zeros(shape),), str(path), dynamo=False, opset_version=opset,
                          input_names=["pixel_values"], output_names=names, dynamic_axes=dynamic_axes)
    onnx.checker.check_model(str(path))


def compare(wrapper: ExportWrapper, session: onnxruntime.InferenceSession, shape, seed: int) -> dict:
    """PyTorch vs onnxruntime on one seeded N(0, 1) input (what normalized photos look like)."""
    pixel_values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = wrapper(pixel_values)
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    got = session.run(output_names(wrapper.upsample), {"pixel_values": pixel_values.numpy()})
    if got[0].shape != expected[0].shape:
        raise SystemExit(f"error: onnxruntime logits {got[0].shape} for input {tuple(shape)}, PyTorch "
                         f"{expected[0].shape}")
    labels = (got[1], expected[1]) if wrapper.upsample else (got[0].argmax(1), expected[0].argmax(1))
    return {"input_shape": list(shape), "output_shapes": {name: list(t.shape) for name, t in
                                                          zip(output_names(wrapper.upsample), got, strict=True)},
            "max_abs_diff": float(np.abs(got[0] - expected[0]).max()),
            "max_abs_logit": float(np.abs(expected[0]).max()),
            "argmax_agreement": float((labels[0] == labels[1]).mean())}


def output_json_path(args) -> Path:
    return Path(args.output_json) if args.output_json else Path(f"{args.out}.json")


# --------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    check_sizes(args)
    try:
        model = load_model(args.checkpoint).eval()
    except (FileNotFoundError, ValueError, OSError) as error:
        raise SystemExit(f"error: --checkpoint: {first_line(error)}") from None  # the error names the path
    wrapper = ExportWrapper(model, args.upsample).eval()
    out, shapes = Path(args.out), check_shapes(args)
    try:
        export(wrapper, out, shapes[0], args.opset, args.dynamic)
    except Exception as error:  # exporter and checker errors come in many types; say which step failed
        raise SystemExit(f"error: exporting {args.checkpoint} to {out} (opset {args.opset}) failed: "
                         f"{type(error).__name__}: {first_line(error)}") from error
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    checks = [compare(wrapper, session, shape, args.seed + i) for i, shape in enumerate(shapes)]
    max_diff = max(c["max_abs_diff"] for c in checks)
    limit = args.atol + args.rtol * max(c["max_abs_logit"] for c in checks)
    results = {"onnx": str(out), "onnx_bytes": out.stat().st_size, "checkpoint": str(args.checkpoint),
               "opset": args.opset, "dynamic": args.dynamic, "upsample": args.upsample,
               "inputs": {"pixel_values": ["batch", 3, "height", "width"] if args.dynamic else list(shapes[0])},
               "outputs": output_names(args.upsample), "checks": checks, "max_abs_diff": max_diff,
               "argmax_agreement": min(c["argmax_agreement"] for c in checks), "atol": args.atol, "rtol": args.rtol,
               "tolerance": limit, "passed": max_diff <= limit, "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__, "seed": args.seed}
    json_path = output_json_path(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(strict_json.dumps(results, indent=2))
    print(f"{out}: max |logit difference| {max_diff:.3g} (tolerance {limit:.3g}), argmax agreement "
          f"{results['argmax_agreement']:.4%} over {len(checks)} check(s) -> {json_path}")
    if not results["passed"]:
        raise SystemExit(f"error: {out}: onnxruntime logits differ from PyTorch by {max_diff:.3g} > tolerance "
                         f"{limit:.3g} (--atol {args.atol} + --rtol {args.rtol} * max |logit|); see {json_path}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="save_pretrained folder (a training run's final/) or a reference mmseg .pth")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--output_json", help="the check's results (default: OUT.json)")
    parser.add_argument("--input_size", type=positive_int, nargs=2, default=(1024, 2048), metavar=("H", "W"),
                        help="the exported size (static) or the traced and first checked size (--dynamic)")
    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--dynamic", action="store_true", help="free batch, H and W (multiples of 32)")
    parser.add_argument("--upsample", action="store_true",
                        help="also output `labels`: logits upsampled to the input size, argmax over classes")
    parser.add_argument("--opset", type=positive_int, default=17, help="ONNX opset version")
    parser.add_argument("--atol", type=finite_float, default=1e-3, help="absolute part of the logit tolerance")
    parser.add_argument("--rtol", type=finite_float, default=1e-4, help="part of the largest |logit| added to it")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the random check inputs")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
