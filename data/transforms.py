"""Reference CPU transforms of the recipe (RECIPE.md section 4), with mmseg v0.11 / mmcv 1.2.7 / OpenCV semantics.

The train pipeline is factored as "draw parameters" + "apply parameters" so that the fast device-side path
(data/fast.py) can be checked against it: `draw_params(rng, h, w)` draws everything a sample needs (scale ratio,
the candidate crop offsets, flip, photometric coins and values) from a numpy Generator, and
`apply_params(image, label, params)` runs the pipeline exactly as mmseg does it: rescale the whole image
(bilinear) and label (nearest), crop (the first candidate accepted by cat_max_ratio), flip, photometric
distortion on uint8, normalize, pad.

OpenCV is not a dependency, so its kernels are re-implemented here, bit for bit where it matters:
- `cv2.resize(INTER_LINEAR)` on uint8 uses 11-bit fixed-point weights and (in its SIMD code, which x86-64 builds
  run) a vertical pass that rounds as `((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16) + 2 >> 2`.
  `linear_taps` + `resize_image` reproduce that exactly (checked equal to OpenCV 4.10 and 5.0 on random sizes;
  the test suite holds OpenCV outputs as literals). It is not F.interpolate: that one differs by 1 on ~13% of
  pixels. No antialiasing when downscaling, as in OpenCV.
- `cv2.resize(INTER_NEAREST)`: source index floor(dst * (1 / (dst_size / src_size))) in double precision.
- `cv2.cvtColor` RGB<->HSV on uint8 (hue in 0..180): the integer table-based forward conversion and the float32
  backward conversion of OpenCV's vector code (fused multiply-adds, truncation), equal on every input.
mmcv's `PhotoMetricDistortion.convert` computes in float32, clips to [0, 255] and truncates to uint8; values are
kept as float32 tensors holding integers here, which is exact.

Everything works on torch tensors of any device, so data/fast.py reuses the per-index and per-pixel kernels
(`linear_taps`, `nearest_index`, `rgb_to_hsv`, `hsv_to_rgb`, `convert`, `normalize`) on its own batched
composition (window sampling instead of a whole-image resize, masks instead of branches).
"""

from dataclasses import dataclass

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

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_HSV_SHIFT = 12
_HSCALE = np.float32(6.0) / np.float32(180.0)  # OpenCV: hscale = 6.f / hrange, in float32
_INV255 = np.float32(1.0) / np.float32(255.0)


# ---------------------------------------------------------------------------------------------------- normalize
def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small constant on `device` without a host sync (torch.tensor(..., device=cuda) waits for the GPU)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


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


def _inverse_scale(src_size: int, dst_size):
    """OpenCV's scale = 1. / (dst_size / src_size), in double; dst_size an int or a tensor (per sample)."""
    if isinstance(dst_size, torch.Tensor):
        return 1.0 / (dst_size.double() / src_size)
    return 1.0 / (dst_size / src_size)


def nearest_index(dst: torch.Tensor, src_size: int, dst_size) -> torch.Tensor:
    """cv2 INTER_NEAREST source index of destination index `dst` (int tensor; dst_size int or broadcastable)."""
    return torch.floor(dst.double() * _inverse_scale(src_size, dst_size)).long().clamp(max=src_size - 1)


def linear_taps(dst: torch.Tensor, src_size: int, dst_size, clamp_weight: bool):
    """cv2 INTER_LINEAR (uint8) taps of destination index `dst`: (src0, src1, weight0, weight1), weights int32 / 2048.

    OpenCV zeroes the fraction of out-of-range taps along x (clamp_weight=True) but only clamps the row indices
    along y (clamp_weight=False): with its rounding that is visible in the first and last rows when upscaling.
    """
    pos = ((dst.double() + 0.5) * _inverse_scale(src_size, dst_size) - 0.5).float()  # double, stored as float
    src0 = torch.floor(pos)
    frac = pos - src0
    src0 = src0.long()
    if clamp_weight:
        outside = (src0 < 0) | (src0 >= src_size - 1)
        frac = torch.where(outside, torch.zeros_like(frac), frac)
        src0 = torch.where(src0 < 0, torch.zeros_like(src0), src0)
    src1 = (src0 + 1).clamp(0, src_size - 1)
    src0 = src0.clamp(0, src_size - 1)
    one = float(1 << _COEF_BITS)
    weight0 = torch.round((1.0 - frac) * one).int()  # saturate_cast<short>: round half to even
    weight1 = torch.round(frac * one).int()
    return src0, src1, weight0, weight1


def resize_image(image: np.ndarray, size: tuple[int, int], rows_per_chunk: int = 32) -> np.ndarray:
    """HxWx3 uint8 -> size=(h, w) uint8, bit-exact cv2.resize(INTER_LINEAR) on uint8 (numpy, int32)."""
    height, width = image.shape[:2]
    if (height, width) == tuple(size):
        return image.copy()
    y0, y1, wy0, wy1 = (t.numpy() for t in linear_taps(torch.arange(size[0]), height, size[0], clamp_weight=False))
    x0, x1, wx0, wx1 = (t.numpy() for t in linear_taps(torch.arange(size[1]), width, size[1], clamp_weight=True))
    # horizontal pass over every source row, pre-shifted by 4 as OpenCV packs it to int16
    rows = image[:, x0].astype(np.int32)
    rows *= wx0[:, None]
    right = image[:, x1].astype(np.int32)
    right *= wx1[:, None]
    rows += right
    rows >>= 4
    out = np.empty((*size, 3), np.uint8)
    for start in range(0, size[0], rows_per_chunk):  # vertical pass in cache-sized chunks of output rows
        span = slice(start, start + rows_per_chunk)
        top, bottom = rows[y0[span]], rows[y1[span]]
        top *= wy0[span, None, None]
        top >>= 16
        bottom *= wy1[span, None, None]
        bottom >>= 16
        top += bottom
        top += 2
        top >>= 2
        out[span] = np.clip(top, 0, 255)
    return out


def blend_rows(h0: torch.Tensor, h1: torch.Tensor, weight0: torch.Tensor, weight1: torch.Tensor) -> torch.Tensor:
    """OpenCV's vertical pass (SIMD rounding) on horizontally interpolated rows (int32, x2048) -> 0..255 int32."""
    value = (((h0 >> 4) * weight0) >> 16) + (((h1 >> 4) * weight1) >> 16)
    return ((value + 2) >> 2).clamp_(0, 255)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW uint8 -> size=(h, w), cv2.resize(INTER_NEAREST) semantics."""
    height, width = label.shape
    ys = nearest_index(torch.arange(size[0]), height, size[0]).numpy()
    xs = nearest_index(torch.arange(size[1]), width, size[1]).numpy()
    return np.take(label[ys], xs, axis=1)


# ------------------------------------------------------------------------------------------------- photometric
def convert(x: torch.Tensor, alpha=1.0, beta=0.0) -> torch.Tensor:
    """mmseg PhotoMetricDistortion.convert: float32 x * alpha + beta, clip to [0, 255], truncate to uint8."""
    return (x * alpha + beta).clamp(0, 255).floor()


def _hsv_tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's sdiv_table / hdiv_table180: round((255 << 12) / i), round((180 << 12) / (6 i)), entry 0 = 0."""
    i = torch.arange(256, dtype=torch.float64, device=device)
    sdiv = torch.round((255 << _HSV_SHIFT) / i)
    hdiv = torch.round((180 << _HSV_SHIFT) / (6 * i))
    sdiv[0] = hdiv[0] = 0
    return sdiv.int(), hdiv.int()


def rgb_to_hsv(rgb: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """cv2.cvtColor(RGB2HSV) on uint8 values (any int/float dtype holding 0..255): int32, H in 0..179."""
    r, g, b = rgb.int().unbind(dim)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    sdiv, hdiv = _hsv_tables(rgb.device)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * sdiv[v.long()] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff.long()] + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v], dim)


# which of OpenCV's tab[0..3] = (v, v(1-s), v(1-s f), v(1-s(1-f))) each of r, g, b takes in each hue sector
_SECTOR_RGB = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def _one_minus_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 1 - a * b with a single rounding, as the fused multiply-add of OpenCV's AVX2 build computes it."""
    return (1.0 - a.double() * b.double()).float()  # the float32 product is exact in double


def hsv_to_rgb(hsv: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """cv2.cvtColor(HSV2RGB) on uint8 HSV (H in 0..179), as OpenCV's vector loop computes it; float32 0..255.

    OpenCV (>= 4.1.1, wide intrinsics, x86-64 AVX2 dispatch) computes in float32 with fused multiply-adds and
    truncates x * 255; only the scalar tail of a row (width % 32 pixels) rounds instead, which the recipe's
    1024-wide crops never reach. Equal to OpenCV 4.10 and 5.0 on all 180 x 256 x 256 inputs.
    """
    h, s, v = hsv.float().unbind(dim)
    h = h * float(_HSCALE)
    s = s * float(_INV255)
    v = v * float(_INV255)
    sector = torch.trunc(h)
    frac = h - sector
    tab = torch.stack([v, v * (1 - s), v * _one_minus_product(s, frac), v * _one_minus_product(s, 1 - frac)], -1)
    sector = sector.long().clamp_(0, 5)
    channels = []
    for table in _SECTOR_RGB:
        index = to_device(table, torch.int64, hsv.device)[sector]
        channels.append(torch.gather(tab, -1, index.unsqueeze(-1)).squeeze(-1))
    return torch.trunc(torch.stack(channels, dim) * 255).clamp_(0, 255)


def adjust_saturation(x: torch.Tensor, alpha, dim: int = -3) -> torch.Tensor:
    hsv = rgb_to_hsv(x, dim)
    h, s, v = hsv.unbind(dim)
    return hsv_to_rgb(torch.stack([h.float(), convert(s.float(), alpha), v.float()], dim), dim)


def adjust_hue(x: torch.Tensor, delta, dim: int = -3) -> torch.Tensor:
    hsv = rgb_to_hsv(x, dim)
    h, s, v = hsv.unbind(dim)
    return hsv_to_rgb(torch.stack([torch.remainder(h + delta, 180), s, v], dim), dim)


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


def photometric(image: torch.Tensor, params: TrainParams) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on a 3xHxW float32 tensor of uint8 values, in mmseg's order."""
    f32 = np.float32  # mmcv multiplies float32 pixels by the drawn value as float32
    if params.brightness is not None:
        image = convert(image, beta=float(f32(params.brightness)))
    if params.contrast_first and params.contrast is not None:
        image = convert(image, alpha=float(f32(params.contrast)))
    if params.saturation is not None:
        image = adjust_saturation(image, float(f32(params.saturation)))
    if params.hue is not None:
        image = adjust_hue(image, params.hue)
    if not params.contrast_first and params.contrast is not None:
        image = convert(image, alpha=float(f32(params.contrast)))
    return image


def apply_params(image: np.ndarray, label: np.ndarray, params: TrainParams, crop_size=CROP_SIZE,
                 cat_max_ratio=CAT_MAX_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference train pipeline on HxWx3 uint8 RGB + HxW uint8 trainIds.

    Returns (float32 3 x crop_h x crop_w normalized, int64 crop_h x crop_w with 255 = ignore).
    """
    image = resize_image(image, params.size)
    label = resize_label(label, params.size)
    y, x = params.crop_offsets[select_crop(label, params.crop_offsets, crop_size, cat_max_ratio)]
    image = image[y:y + crop_size[0], x:x + crop_size[1]]
    label = label[y:y + crop_size[0], x:x + crop_size[1]]
    if params.flip:
        image, label = image[:, ::-1], label[:, ::-1]
    pixels = photometric(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(), params)
    pixels = normalize(pixels)
    # Pad (bottom/right) after Normalize, as in the recipe: image 0, label 255
    out_image = torch.zeros(3, *crop_size, dtype=torch.float32)
    out_label = torch.full(tuple(crop_size), IGNORE_INDEX, dtype=torch.int64)
    out_image[:, :label.shape[0], :label.shape[1]] = pixels
    out_label[:label.shape[0], :label.shape[1]] = torch.from_numpy(np.ascontiguousarray(label)).long()
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
