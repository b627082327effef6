"""Segmentation inference (whole image, sliding window, multi-scale + flip) and the shared evaluation loop.

`predict` reproduces mmsegmentation's test modes (docs/recipe.md sections 4 and 6):
- "whole": one forward pass, logits (1/4 resolution) upsampled bilinearly (align_corners=False) to the output size;
- "slide": crops of `crop_size` every `stride` pixels (the last crop of a row/column is shifted back inside the
  image; an image smaller than a crop is one smaller crop), each crop's logits upsampled to the crop, summed
  into the full canvas and divided by how many crops covered each pixel;
- "aug": for every ratio, the image rescaled with the reference rule relative to `base_size` (keep the aspect
  ratio, fit inside (base * ratio)), plus its horizontal flip; softmax probabilities at the output size averaged.
  The reference rescales the uint8 image before normalizing; rescaling the normalized tensor is the same linear
  map, up to the reference's rounding to uint8.

`evaluate_segmentation` is the one evaluation loop (scripts/train.py and scripts/eval.py): rank r of W takes the
dataset indices r, r + W, ... (no padding, so no sample is counted twice), runs the unwrapped model under the
accelerator's autocast, accumulates the mIoU histograms on its device and sums them with a single all-reduce.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from data import batch_to_device
from data.transforms import rescale_size
from modeling.cli import positive_float, positive_int
from modeling.convert import convert_mmseg_state_dict
from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
from modeling.metrics import MeanIoU
from modeling.reliability import loader_kwargs
from modeling.weights import read_weights_file

MODES = ("whole", "slide", "aug")
AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the reference's multi-scale test
CROP_SIZE = (512, 1024)  # (h, w), the training crop
STRIDE = (341, 682)  # (h, w), two thirds of the crop
BASE_SIZE = (1024, 2048)  # (h, w) that the aug ratios multiply: the Cityscapes image size


def load_model(checkpoint) -> HRNetFCNForSemanticSegmentation:
    """Our save_pretrained folder, or a reference (mmseg) .pth/.pt checkpoint converted on the fly (19 classes).

    Raises FileNotFoundError / ValueError naming the path (unreadable, unsafe or non-matching weights)."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; expected a folder written by save_pretrained "
                                    "(e.g. the training run's final model) or a reference .pth file")
        return HRNetFCNForSemanticSegmentation.from_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (expected a save_pretrained folder or a .pth file)")
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(f"{path}: expected a save_pretrained folder or a reference .pth/.pt checkpoint")
    config = HRNetFCNConfig()
    model = HRNetFCNForSemanticSegmentation(config)
    # read_weights_file: torch.load(weights_only=True), mmcv's {"state_dict": ...} unwrapped, errors name the file
    model.load_state_dict(convert_mmseg_state_dict(read_weights_file(path), config, source=str(path)))
    return model


def _resize(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)


def _logits(model, pixel_values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Model logits upsampled to `size` (the model's input size: the reference resizes to the input first, then
    to the original image size) in float32, as argmax of low-precision logits would break more ties."""
    return _resize(model(pixel_values).logits.float(), size)


def slide_windows(height: int, width: int, crop_size=CROP_SIZE, stride=STRIDE) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every crop, in mmseg's order and placement."""
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def slide_logits(model, pixel_values: torch.Tensor, crop_size=CROP_SIZE, stride=STRIDE) -> torch.Tensor:
    """Crop logits averaged over the overlaps, at the input size."""
    batch, _, height, width = pixel_values.shape
    total, count = None, pixel_values.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(height, width, crop_size, stride):
        logits = _logits(model, pixel_values[:, :, y1:y2, x1:x2], (y2 - y1, x2 - x1))
        if total is None:
            total = logits.new_zeros((batch, logits.shape[1], height, width))
        total[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


def aug_probabilities(model, pixel_values: torch.Tensor, size: Sequence[int], ratios=AUG_RATIOS, flip=True,
                      base_size=BASE_SIZE) -> torch.Tensor:
    """Softmax probabilities at `size`, averaged over the rescaled images and their horizontal flips."""
    height, width = pixel_values.shape[-2:]
    total, passes = None, 0
    for ratio in ratios:
        scaled_size = rescale_size(height, width, ratio, base_size)  # the same rule as the training resize
        scaled = pixel_values
        if scaled_size != (height, width):
            scaled = F.interpolate(pixel_values, size=scaled_size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            inputs = scaled.flip(-1) if flipped else scaled
            probs = _resize(_logits(model, inputs, scaled_size), size).softmax(1)
            probs = probs.flip(-1) if flipped else probs
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


@torch.no_grad()
def predict(model, pixel_values: torch.Tensor, mode: str = "whole", output_size: Sequence[int] | None = None,
            crop_size=CROP_SIZE, stride=STRIDE, ratios=AUG_RATIOS, flip: bool = True,
            base_size=BASE_SIZE) -> torch.Tensor:
    """float32 class scores Bx(num_labels)xHxW at `output_size` (default: the input's): argmax is the prediction.

    Scores are logits for "whole" and "slide", averaged softmax probabilities for "aug". Call it in eval mode,
    under `accelerator.autocast()` for mixed precision.
    """
    size = tuple(output_size) if output_size is not None else tuple(pixel_values.shape[-2:])
    if mode == "whole":
        return _resize(_logits(model, pixel_values, pixel_values.shape[-2:]), size)
    if mode == "slide":
        return _resize(slide_logits(model, pixel_values, crop_size, stride), size)
    if mode == "aug":
        return aug_probabilities(model, pixel_values, size, ratios, flip, base_size)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def add_inference_args(parser) -> None:
    """The prediction options that scripts/eval.py and scripts/infer.py share (a parser or an argument group)."""
    parser.add_argument("--mode", choices=MODES, default="whole")
    add_predict_args(parser)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: the accelerate launch config")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")


def add_predict_args(parser) -> None:
    """The options of the slide and aug modes, read by predict_options."""
    parser.add_argument("--crop_size", type=positive_int, nargs=2, default=CROP_SIZE, metavar=("H", "W"),
                        help="slide")
    parser.add_argument("--stride", type=positive_int, nargs=2, default=STRIDE, metavar=("H", "W"),
                        help="slide: at most the crop size")
    parser.add_argument("--ratios", type=positive_float, nargs="+", default=AUG_RATIOS, help="aug")
    parser.add_argument("--base_size", type=positive_int, nargs=2, default=BASE_SIZE, metavar=("H", "W"),
                        help="aug: the size the ratios multiply (the reference: 1024 2048)")
    parser.add_argument("--no_flip", action="store_true", help="aug without the flipped passes")


def predict_options(args) -> dict:
    """`predict`'s keyword arguments from the options of add_inference_args (ValueError: a stride beyond the crop)."""
    if any(s > c for s, c in zip(args.stride, args.crop_size, strict=True)):  # pixels between crops: no prediction
        raise ValueError(f"--stride {args.stride[0]} {args.stride[1]} is larger than --crop_size {args.crop_size[0]} "
                         f"{args.crop_size[1]}: pixels between the crops would get no prediction; expected a stride "
                         "of at most the crop size")
    return dict(crop_size=args.crop_size, stride=args.stride, ratios=args.ratios, flip=not args.no_flip,
                base_size=args.base_size)


def evaluate_segmentation(model, dataset, on_device: Callable, accelerator, batch_size: int = 1,
                          num_workers: int = 2, mode: str = "whole", predict_kwargs: dict | None = None,
                          on_predictions: Callable | None = None, num_labels: int | None = None,
                          ignore_index: int | None = None) -> dict:
    """evaluate's `mean_iou` dict over `dataset`, computed across all processes (each must call this).

    dataset items: {"image": uint8 3xHxW, "label": uint8 HxW trainIds, "index": int}; `on_device(batch)` turns a
    batch already on the device into (pixel_values, labels). `on_predictions(preds, labels, batch)` (optional) sees
    every batch's int64 predictions at label size, e.g. to write pictures or submission files. num_labels and
    ignore_index default to the model config's. The model's train/eval mode is restored on return.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    # No DDP hooks (ranks run different numbers of batches); eager, as eval shapes differ from the training crops.
    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    config = getattr(model, "config", None)
    num_labels = num_labels if num_labels is not None else getattr(config, "num_labels", 19)
    ignore_index = ignore_index if ignore_index is not None else getattr(config, "ignore_index", 255)
    metric = MeanIoU(num_labels=num_labels, ignore_index=ignore_index, device=accelerator.device)

    shard = Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))
    # loader_kwargs: a timeout instead of a silent hang, and workers that survive a job-wide preemption signal
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=False,
                        **loader_kwargs(num_workers))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=f"eval ({mode})", disable=not accelerator.is_main_process):
            batch = batch_to_device(batch, accelerator.device)
            pixel_values, labels = on_device(batch)
            with accelerator.autocast():
                scores = predict(model, pixel_values, mode, output_size=labels.shape[-2:], **(predict_kwargs or {}))
            preds = scores.argmax(1)
            metric.update(preds, labels)
            if on_predictions is not None:
                on_predictions(preds, labels, batch)
    finally:
        model.train(was_training)
    return metric.compute(accelerator)
