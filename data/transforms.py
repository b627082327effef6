"""Reference CPU transforms of the recipe (docs/recipe.md section 4): mmseg v0.11's train pipeline on OpenCV.

The train pipeline is factored as "draw parameters" + "apply parameters" so that the fast device-side path
(data/fast.py) can be checked against it: `draw_params(rng, h, w)` draws everything a sample needs (scale ratio,
the candidate crop offsets, flip, photometric coins and values) from a numpy Generator, and
`apply_params(image, label, params)` runs the pipeline with the calls mmseg makes through mmcv 1.2.7: rescale
the whole image (cv2.resize INTER_LINEAR) and label (INTER_NEAREST), crop (the first candidate accepted by
cat_max_ratio), flip, photometric distortion on uint8 (float32 arithmetic truncated to uint8, cv2.cvtColor to and
from HSV), normalize, pad. The images are RGB here (mmseg's are BGR): RGB2HSV on RGB is BGR2HSV on BGR.
"""

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from data.labels import IGNORE_INDEX

MEAN = (123.675, 116.28, 103.53)  # RGB
STD = (58.395, 57.12, 57.375)
IMG_SCALE = (2048, 1024)  # (long, short) target of the ratio-range resize
RATIO_RANGE = (0.5, 2.0)
CROP_SIZE = (512, 1024)  # (h, w)
CAT_MAX_RATIO = 0.75
CROP_TRIES = 10  # mmseg checks 10 crops; after 10 failures it uses an 11th, unchecked one
FLIP_PROB = 0.5
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # shift drawn from randint(-18, 18), i.e. [-18, 17]


# ---------------------------------------------------------------------------------------------------- normalize
def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small constant made on `device` by fill kernels, without a host sync: a copy from pageable host memory
    (torch.tensor(..., device=cuda), even .to(non_blocking=True)) waits for the GPU to drain its queue."""
    return torch.stack([torch.full((), value, dtype=dtype, device=device) for value in values])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or integral float) ...x3xHxW RGB -> float32 (x - mean) / std, on the input's device."""
    mean = to_device(MEAN, torch.float32, images.device).view(3, 1, 1)
    inv_std = to_device([1.0 / s for s in STD], torch.float32, images.device).view(3, 1, 1)  # mmcv: x * (1 / std)
    return (images.float() - mean) * inv_std


# ------------------------------------------------------------------------------------------------------- resize
def rescale_size(height: int, width: int, ratio: float, img_scale=IMG_SCALE) -> tuple[int, int]:
    """mmseg Resize + mmcv.imrescale: the (h, w) an image is rescaled to for a ratio (drawn in training, one of
    the test ratios in aug inference). The order of img_scale's two sides does not matter: the largest size
    fitting both (long, short) edges is taken."""
    target = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))  # mmseg truncates the scaled target
    factor = min(max(target) / max(height, width), min(target) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


# ------------------------------------------------------------------------------------------------- photometric
def convert(image: np.ndarray, alpha=1.0, beta=0.0) -> np.ndarray:
    """mmseg PhotoMetricDistortion.convert: float32 x * alpha + beta, clipped to [0, 255], truncated to uint8."""
    return np.clip(image.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- train pipeline
@dataclass
class TrainParams:
    """Everything random about one training sample. None = that photometric step is skipped."""

    ratio: float
    size: tuple[int, int]  # the rescaled (h, w)
    crop_offsets: np.ndarray  # (CROP_TRIES + 1, 2) candidate (y, x) offsets in draw order
    flip: bool
    brightness: float | None
    contrast_first: bool  # mmseg's `mode == 1`: contrast before saturation/hue, else after
    contrast: float | None
    saturation: float | None
    hue: int | None


def draw_params(rng: np.random.Generator, height: int, width: int, crop_size=CROP_SIZE, img_scale=IMG_SCALE,
                ratio_range=RATIO_RANGE) -> TrainParams:
    """Draws the parameters of one sample of an image of the given size.

    All candidate crops are drawn up front; mmseg draws them lazily, which has the same distribution since they
    are independent of each other.
    """
    ratio = float(rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0])
    size = rescale_size(height, width, ratio, img_scale)
    margin_h, margin_w = max(size[0] - crop_size[0], 0), max(size[1] - crop_size[1], 0)
    tries = CROP_TRIES + 1
    offsets = np.stack([rng.integers(0, margin_h + 1, tries), rng.integers(0, margin_w + 1, tries)], 1)
    flip = bool(rng.random() < FLIP_PROB)
    brightness = float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = float(rng.uniform(*CONTRAST_RANGE)) if rng.integers(2) else None
    saturation = float(rng.uniform(*SATURATION_RANGE)) if rng.integers(2) else None
    hue = int(rng.integers(-HUE_DELTA, HUE_DELTA)) if rng.integers(2) else None
    return TrainParams(ratio, size, offsets, flip, brightness, contrast_first, contrast, saturation, hue)


def crop_accepted(label_crop: np.ndarray, cat_max_ratio: float = CAT_MAX_RATIO) -> bool:
    """mmseg RandomCrop's test: more than one class (255 excluded) and the largest < cat_max_ratio of them."""
    counts = np.bincount(label_crop.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def select_crop(label: np.ndarray, offsets: np.ndarray, crop_size=CROP_SIZE, cat_max_ratio=CAT_MAX_RATIO) -> int:
    """Index of the candidate crop mmseg uses on this (rescaled) label: the first of 10 accepted, else the 11th."""
    if cat_max_ratio >= 1:
        return 0
    for k in range(CROP_TRIES):
        y, x = offsets[k]
        if crop_accepted(label[y:y + crop_size[0], x:x + crop_size[1]], cat_max_ratio):
            return k
    return CROP_TRIES


def _hsv_step(image: np.ndarray, channel: int, change) -> np.ndarray:
    """mmcv: bgr2hsv, change one channel of the uint8 HSV image, hsv2bgr."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., channel] = change(hsv[..., channel])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def photometric(image: np.ndarray, params: TrainParams) -> np.ndarray:
    """mmseg PhotoMetricDistortion on an HxWx3 uint8 image, in mmseg's order."""
    if params.brightness is not None:
        image = convert(image, beta=params.brightness)
    if params.contrast_first and params.contrast is not None:
        image = convert(image, alpha=params.contrast)
    if params.saturation is not None:
        image = _hsv_step(image, 1, lambda s: convert(s, alpha=params.saturation))
    if params.hue is not None:
        image = _hsv_step(image, 0, lambda h: (h.astype(np.int16) + params.hue) % 180)
    if not params.contrast_first and params.contrast is not None:
        image = convert(image, alpha=params.contrast)
    return image


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW uint8 -> size=(h, w), nearest neighbour as mmcv resizes labels."""
    return cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)


def apply_params(image: np.ndarray, label: np.ndarray, params: TrainParams, crop_size=CROP_SIZE,
                 cat_max_ratio=CAT_MAX_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference train pipeline on HxWx3 uint8 RGB + HxW uint8 trainIds.

    Returns (float32 3 x crop_h x crop_w normalized, int64 crop_h x crop_w with 255 = ignore).
    """
    size = params.size[::-1]  # OpenCV takes (w, h)
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = resize_label(label, params.size)
    y, x = params.crop_offsets[select_crop(label, params.crop_offsets, crop_size, cat_max_ratio)]
    image = image[y:y + crop_size[0], x:x + crop_size[1]]
    label = label[y:y + crop_size[0], x:x + crop_size[1]]
    if params.flip:
        image, label = cv2.flip(image, 1), cv2.flip(label, 1)
    pixels = normalize(torch.from_numpy(photometric(image, params)).permute(2, 0, 1)).contiguous()
    labels = torch.from_numpy(np.ascontiguousarray(label)).long()
    if labels.shape == tuple(crop_size):
        return pixels, labels
    # Pad (bottom/right) after Normalize, as in the recipe: image 0, label 255
    out_image = torch.zeros(3, *crop_size, dtype=torch.float32)
    out_label = torch.full(tuple(crop_size), IGNORE_INDEX, dtype=torch.int64)
    out_image[:, :labels.shape[0], :labels.shape[1]] = pixels
    out_label[:labels.shape[0], :labels.shape[1]] = labels
    return out_image, out_label


class TrainTransform:
    """The reference train pipeline: `transform(image, label, rng)` = apply_params(draw_params(rng, ...))."""

    def __init__(self, crop_size=CROP_SIZE, img_scale=IMG_SCALE, ratio_range=RATIO_RANGE, cat_max_ratio=CAT_MAX_RATIO):
        self.crop_size, self.img_scale = tuple(crop_size), tuple(img_scale)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio

    def draw(self, rng: np.random.Generator, height: int, width: int) -> TrainParams:
        return draw_params(rng, height, width, self.crop_size, self.img_scale, self.ratio_range)

    def apply(self, image: np.ndarray, label: np.ndarray, params: TrainParams):
        return apply_params(image, label, params, self.crop_size, self.cat_max_ratio)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        return self.apply(image, label, self.draw(rng, *label.shape))


def val_transform(image: np.ndarray, label: np.ndarray) -> dict:
    """Validation: the whole image, no augmentation; normalization happens on the device (data.val_on_device)."""
    return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "label": torch.from_numpy(np.ascontiguousarray(label))}
