"""OpenCV's uint8 kernels that mmseg calls, written in torch for the device-side path (data/fast.py).

The reference pipeline (data/transforms.py) calls OpenCV itself; the fast path cannot (its batches live on the
accelerator and it never materialises the rescaled image), so it computes the same integers:
- `cv2.resize(INTER_LINEAR)` on uint8: 11-bit fixed-point taps (`linear_taps`) and, in the SIMD code x86-64
  builds run, a vertical pass that rounds as `((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16) + 2 >> 2`
  (`blend_rows`). Not F.interpolate: that one differs by 1 on ~13% of pixels.
- `cv2.resize(INTER_NEAREST)`: source index floor(dst * (1 / (dst_size / src_size))) in double (`nearest_index`).
- `cv2.cvtColor` RGB<->HSV on uint8 (hue 0..179): the integer table-based forward conversion and the float32
  backward conversion of OpenCV's AVX2 code (fused multiply-adds; truncation in the vector loop, rounding in the
  scalar tail of each row).
tests/test_transforms.py checks each against OpenCV, and the fast path against the reference, with tolerance 0.
Everything works on tensors of any device; values are float32 or int32 tensors holding uint8 integers.
"""

import numpy as np
import torch

from data.transforms import to_device

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_HSV_SHIFT = 12
_HSCALE = np.float32(6.0) / np.float32(180.0)  # OpenCV: hscale = 6.f / hrange, in float32
_INV255 = np.float32(1.0) / np.float32(255.0)
_HSV_VECTOR_PIXELS = 32  # pixels per iteration of OpenCV's HSV2RGB vector loop; the rest of a row is scalar code


# ------------------------------------------------------------------------------------------------------- resize
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


def blend_rows(h0: torch.Tensor, h1: torch.Tensor, weight0: torch.Tensor, weight1: torch.Tensor) -> torch.Tensor:
    """OpenCV's vertical pass (SIMD rounding) on horizontally interpolated rows (int32, x2048) -> 0..255 int32."""
    value = (((h0 >> 4) * weight0) >> 16) + (((h1 >> 4) * weight1) >> 16)
    return ((value + 2) >> 2).clamp_(0, 255)


# ------------------------------------------------------------------------------------------------- photometric
def convert(x: torch.Tensor, alpha=1.0, beta=0.0) -> torch.Tensor:
    """mmseg PhotoMetricDistortion.convert: float32 x * alpha + beta, clip to [0, 255], truncate to uint8."""
    return (x * alpha + beta).clamp(0, 255).floor()


def _hsv_tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's sdiv_table / hdiv_table180: round((255 << 12) / i), round((180 << 12) / (6 i)), entry 0 = 0."""
    i = torch.arange(256, dtype=torch.float64, device=device)
    # entry 0 by torch.where, not item assignment (a scalar written into a device tensor may wait for the GPU)
    sdiv = torch.where(i == 0, 0.0, torch.round((255 << _HSV_SHIFT) / i))
    hdiv = torch.where(i == 0, 0.0, torch.round((180 << _HSV_SHIFT) / (6 * i)))
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


def hsv_to_rgb(hsv: torch.Tensor, dim: int = -3, row_width=None) -> torch.Tensor:
    """cv2.cvtColor(HSV2RGB) on uint8 HSV (H in 0..179), as OpenCV's x86-64 AVX2 code computes it; float32 0..255.

    float32 with fused multiply-adds; x * 255 is truncated in the vector loop (32 pixels at a time) and rounded
    in the scalar code that finishes each row (its last width % 32 pixels). Columns are the last dimension of
    the channel planes (dim -3: ...x3xHxW, dim -1: HxWx3); row_width (int, or a tensor broadcastable to the
    planes' leading dimensions, e.g. (B, 1, 1)) is the width OpenCV was given, default the whole last dimension
    (smaller where a padded crop holds a narrower image).
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
    scaled = torch.stack(channels, dim) * 255
    width = h.shape[-1] if row_width is None else row_width
    column = torch.arange(h.shape[-1], device=hsv.device)
    tail = (column >= width - width % _HSV_VECTOR_PIXELS).expand(h.shape).unsqueeze(dim)  # as stack(..., dim)
    return torch.where(tail, torch.round(scaled), torch.trunc(scaled)).clamp_(0, 255)


def adjust_saturation(x: torch.Tensor, alpha, dim: int = -3, row_width=None) -> torch.Tensor:
    hsv = rgb_to_hsv(x, dim)
    h, s, v = hsv.unbind(dim)
    return hsv_to_rgb(torch.stack([h.float(), convert(s.float(), alpha), v.float()], dim), dim, row_width)


def adjust_hue(x: torch.Tensor, delta, dim: int = -3, row_width=None) -> torch.Tensor:
    hsv = rgb_to_hsv(x, dim)
    h, s, v = hsv.unbind(dim)
    return hsv_to_rgb(torch.stack([torch.remainder(h + delta, 180), s, v], dim), dim, row_width)
