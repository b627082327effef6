"""The reference pipeline (data/transforms.py, on OpenCV) against mmseg, the device-side kernels
(data/device_kernels.py) against OpenCV, and the fast path (data/fast.py) against the reference: tolerance 0.

MMSEG_OUTPUTS were produced with opencv-python-headless 4.10.0.84 (OpenCV 5.0.0 gives the same) by a literal
transcription of mmseg v0.11's train pipeline (Resize ratio_range, RandomCrop with cat_max_ratio, RandomFlip,
PhotoMetricDistortion, Normalize, Pad) fed the parameters in MMSEG_CASES: they pin the pipeline's semantics
independently of how data/transforms.py is written.
"""

import base64
import zlib

import cv2
import numpy as np
import pytest
import torch

from data.device_kernels import blend_rows, convert, hsv_to_rgb, linear_taps, nearest_index, rgb_to_hsv
from data.fast import BatchParams, apply_batch_params, draw_batch_params, photometric_batch, select_crops
from data.labels import IGNORE_INDEX
from data.transforms import (
    CROP_TRIES,
    MEAN,
    STD,
    TrainParams,
    apply_params,
    crop_accepted,
    draw_params,
    normalize,
    photometric,
    rescale_size,
    select_crop,
)
from data.transforms import convert as reference_convert


def stack_params(params: list[TrainParams], device="cpu") -> BatchParams:
    """The reference's per-sample parameters as a batch, to run the fast path on the same draws."""
    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    def step(name, dtype, default):
        values = [getattr(p, name) for p in params]
        return (tensor([v is not None for v in values], torch.bool),
                tensor([default if v is None else v for v in values], dtype))

    return BatchParams(tensor([p.ratio for p in params], torch.float64), tensor([p.size for p in params], torch.int64),
                       tensor(np.stack([p.crop_offsets for p in params]), torch.int64),
                       tensor([p.flip for p in params], torch.bool), *step("brightness", torch.float32, 0.0),
                       tensor([p.contrast_first for p in params], torch.bool), *step("contrast", torch.float32, 1.0),
                       *step("saturation", torch.float32, 1.0), *step("hue", torch.int64, 0))


def pattern(height, width, channels=3):
    """A deterministic uint8 test image (no RNG, so the literals never depend on a numpy version)."""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels), indexing="ij")
    return ((y * 37 + x * 11 + c * 71 + (x * y) % 13) % 256).astype(np.uint8)


# -------------------------------------------------------------------------------- device kernels vs OpenCV
def taps_resize(image, size):
    """HxWx3 uint8 -> size (h, w) with the fast path's integer kernels, on the whole image."""
    (height, width), rows, cols = image.shape[:2], torch.arange(size[0]), torch.arange(size[1])
    y0, y1, wy0, wy1 = linear_taps(rows, height, size[0], clamp_weight=False)
    x0, x1, wx0, wx1 = linear_taps(cols, width, size[1], clamp_weight=True)
    source = torch.from_numpy(image).int()
    horizontal = source[:, x0] * wx0[:, None] + source[:, x1] * wx1[:, None]
    return blend_rows(horizontal[y0], horizontal[y1], wy0[:, None, None], wy1[:, None, None]).numpy()


SIZES = [(5, 7), (9, 13), (3, 4), (4, 11), (37, 61), (64, 128), (17, 250)]


@pytest.mark.parametrize("source", [(5, 7), (40, 80), (61, 97)])
def test_resize_kernels_equal_opencv(source):
    image = np.random.default_rng(0).integers(0, 256, (*source, 3)).astype(np.uint8)
    label = image[..., 0].copy()
    for size in SIZES:
        expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(taps_resize(image, size), expected, err_msg=f"{source} -> {size}")
        ys = nearest_index(torch.arange(size[0]), source[0], size[0]).numpy()
        xs = nearest_index(torch.arange(size[1]), source[1], size[1]).numpy()
        np.testing.assert_array_equal(label[ys][:, xs], cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST))


@pytest.mark.parametrize("width", [64, 40, 16, 100, 1024])
def test_hsv_kernels_equal_opencv(width):
    """2**17 random colours each way; widths that are not a multiple of 32 end in OpenCV's scalar code."""
    rng = np.random.default_rng(width)
    rgb = rng.integers(0, 256, ((1 << 17) // width, width, 3)).astype(np.uint8)
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    np.testing.assert_array_equal(rgb_to_hsv(torch.from_numpy(rgb), dim=-1).numpy(), expected)
    hsv = rgb.copy()
    hsv[..., 0] %= 180
    rgb = hsv_to_rgb(torch.from_numpy(hsv), dim=-1).numpy()
    np.testing.assert_array_equal(rgb, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


def test_rescale_size_rule():
    assert rescale_size(1024, 2048, 1.0) == (1024, 2048)
    assert rescale_size(1024, 2048, 0.5) == (512, 1024)
    assert rescale_size(1024, 2048, 0.75) == (768, 1536)
    # target (int(2048 * 1.999), int(1024 * 1.999)) = (4093, 2046): the short side binds, sf = 2046 / 1024
    assert rescale_size(1024, 2048, 1.999) == (2046, 4092)
    # aspect kept for another shape: sf = min(2048 / 1000, 1024 / 500) = 2.048
    assert rescale_size(500, 1000, 1.0) == (1024, 2048)


def test_convert_truncates_like_mmcv():
    x = np.array([0, 10, 100, 200, 255], np.uint8)
    expected = np.clip(x.astype(np.float32) * np.float32(1.37) + np.float32(-3.3), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(reference_convert(x, alpha=1.37, beta=-3.3), expected)
    assert reference_convert(x, beta=-3.3).tolist() == [0, 6, 96, 196, 251]
    device = convert(torch.from_numpy(x).float(), alpha=float(np.float32(1.37)), beta=float(np.float32(-3.3)))
    np.testing.assert_array_equal(device.numpy(), expected)


def test_normalize():
    images = torch.from_numpy(pattern(4, 6)).permute(2, 0, 1)[None]
    expected = (images.double() - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_crop_acceptance_rule():
    def crop(counts):  # a flat "crop" holding these class counts
        return np.concatenate([np.full(n, c, np.uint8) for c, n in counts.items()])

    assert not crop_accepted(crop({3: 100}))  # one class
    assert not crop_accepted(crop({3: 75, 4: 25}))  # largest must be < 75%
    assert crop_accepted(crop({3: 74, 4: 26}))
    assert crop_accepted(crop({3: 74, 4: 26, IGNORE_INDEX: 1000}))  # 255 is not counted
    assert not crop_accepted(crop({3: 10, IGNORE_INDEX: 1000}))
    label = np.zeros((8, 8), np.uint8)
    label[:, 6:] = 1
    offsets = np.zeros((CROP_TRIES + 1, 2), np.int64)
    offsets[:, 1] = [0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1]
    assert select_crop(label, offsets, (4, 4)) == 2  # (0, 4) holds 50% / 50%
    offsets[2] = 0
    assert select_crop(label, offsets, (4, 4)) == CROP_TRIES  # 10 rejections: the 11th, unchecked
    assert select_crop(label, offsets, (4, 4), cat_max_ratio=1.0) == 0


# ------------------------------------------------------------------------------------ mmseg end-to-end literals
MMSEG_CROP, MMSEG_SCALE = (16, 32), (40, 24)  # crop (h, w), img_scale (long, short)
MMSEG_CASES = [  # flip + all photometric steps (contrast first) + the cat_max_ratio retry; padding; 11th crop
    TrainParams(1.3, (31, 52), np.array([[0, 0], [15, 20], [3, 7]] + [[1, 1]] * 8), True, 10.7, True, 1.3, 0.7, 5),
    TrainParams(0.6, (14, 23), np.array([[0, 0]] * 11), False, None, False, 0.8, None, None),
    TrainParams(1.9, (45, 75), np.array([[20, 40]] * 10 + [[5, 3]]), False, -20.2, False, 1.45, 1.4, -18),
]
MMSEG_OUTPUTS = [  # zlib + base64 of (uint8 image before Normalize, padded, HxWx3) ++ (label HxW)
    (
        "eNrlVO1P2mcU3b4u2Z+2pEmTJWvTdW1XbTWtbwwUpSIKxf54q/6wvIlRpOqYBUWtYC2liIItSqtoLbRadc7O9yFGjPTsPvyYXbKP+7Jk"
        "T863JzfnnnPPvZA25pqVx8v6FWhWwAl4C1UCildojIGLgZ8EH4J+HJwfqiEoBlHvgrQ3Vz1yHBnexMA6+lfQtwTnPDrnYI2hbQotQejG"
        "wPmAIj3KNAjYAcsOTIRdmHfA/wrDak6TOrqb2JfPo34GtRGIg6h4hts+lAziugdXRuEIYS94iLEDPN7CwMaJ60OmL5npeQPHPGwxmCKA"
        "yA6xFS0WBPow3VPAlAMTNjw1nfr5jFe391YlKJqFbAY1UxAFUe5HaRBcGP0hjI/D58OwFwOeT/0Dx8Oeg20S5XoHIoLcDVkvJN2oakeF"
        "rYBbPG4YcE2Ly0pcaIC77Y+sYR3aZTS/hZLkzKIuAgkpIpzRjaLYg6uPUB7C7PghfLsg96bl3pk6z4nSy4jqf2YgupqHTFe5FaWtKDZA"
        "Y8CsHRkLDttOd/mjLe3+avPHpJysI1Fn7j1HFREFIHmOvhhWp5AO4UCuiOtU0ahiFNr8PASoBqHwoO4vXTIbuAcwGmHiGXgD9BzuqbJL"
        "JEqXzwOJkud1yeKMTjsNaxj2AMxXNGsl6tRIayJnecHmQXgQYeMnuuZRNA6Qoqy0Oy2ypwXrSJTg3lUN/J2AdQdtH9EixI8MTEKdQOOZ"
        "KFHHkdiyZ7RsBuwrMVtq2paKWpKh1sSYJjbUNNkvCzgljzurvO1l7u5S10JV92dRxEKpmHIh2YOFTsStmDXlXvLZiCET1qUD3PZiUyLb"
        "0MQaxB3HidSerrHtS6x7YvNOmX7jBrf8Q+Pid7L4+crIuarwNxUTlyqCIzVjUOdF0YyqnahzoL6TQWqGyIhyLUrUKG5AkRzX6/GQz2YM"
        "94PQ+At+C7Ml/NR5XGbZv9n68Zpu/ZJ6+aIy+W3D4veyORv3MtzkX7nrSzYMLcjcn6gsbyATRXRMlJlZR5H4UQelDi/s9hmYo+CfF9aN"
        "QK4LoqTO0xpHVtSRYVz8VpFhXcKlOHXCpI3zzS/1qmiIUiGUUY3Q4lnUb1sgNeK+WVhtWjdrrDBb2m4SJYSIoBxkya3ryRFRadvOdcPG"
        "ZW6VRF1QptzGhax1mtUYJ1mLhmesjApYcw8ZkbjDf/JqMP267/12X4qtm3ORnRFabSqiCsrR3w2k7kgURaLcekBcLabfJrrWkrb3C6al"
        "eOvcC93MZHM0qJjw1T7xVHl/KXO7bj0agrQfTWO5RTogwrESVpuI6FiRe8IZEQIrOFFo0Hna4Myqu464jrTiwVatYU2iWRbfS1Wqlm7K"
        "4lfFkYvloQu3g7TXPojGMRBGhi5V4BBP05+Gfz92bxy4Pmz3vNvserPmXMwKh5EmJdxGthxD+DzevHuCKEoFGUiROF+/cK72dRTVYUjD"
        "rMgVxHAAXuLywT0C1yB6ek86HIfWR/uvzo4wTYpEkeumvIH6J0yUeohFgsZ0pzdH2atsT98y7RXd3ySir/7n78t/vP/6/xeF93X+/dv/"
        "PwH12Huv"
    ),
    (
        "eNrdlP1PWlcYx93SzKYTu7W+sIqKVhCrIHaoiKBXC0jV6q2iSEWR+QYU7VWovSjOq4UCwgQVFSxSQIqo1KKyRQlmrmmX/VfdWdclW7Ld"
        "NGmWLPvm/PYknzzneT7npLAnUiE0vQnLarfkdjso/Rv0kWessTD34QHf8H2r8azT/rrXhQ16U9Xblyf3s/VHefMJquUnulNT6b7A9afx"
        "d662pvxzsmFLnsRZPOAuV/qrkUg9eijCTmHLWY+TM+BhKgM1yG4DeliDnVIA0/qKsdxQ5amoC9YI9+jtR3mSBFX+ijGKw2eqguyJvYbp"
        "4+bHyU77ksx1e2irQxOWIhESepiLJShWjLEiqn4KQ9s9InD2C+E4uQehKRor1C0crfiWQdZixOEDbIdtQuYaHfYh4zvw1MscQ5xsSt5Y"
        "VJavDrM9mjo/JNjLagfMJG0AnPEKtbJWV8k3ZNx5QupaKux1lQ55cfiDXrvmeSnAYssUC0p3fMtyGdlbtsZQ/u2Da50m0CqlH6WPLLAR"
        "O6S3N0xTW4wAS5W7y0f9YE0cbfSWIY7DN1gLnqyWOrcqN+F6f5ogfKUlRuo6KepboyncTBWPo70I6QlCDKyJLF0B3ZYN+8CaIP2RcC7U"
        "alrpdnj7N0I4/PVPOcCBQDYcJHVFrsvijNEkG0lytGTB7BeieeLdxesy141BL9h+zeQ+VxcVzkXvLsa7Had96yplgDCxk6XzEXH4L3PE"
        "wAHBTXU6G8moR/NEWGGrid7jLHrX6s37ITCBxpl4E3bSYXst/u5nIJUmlD+xR9EfURcSxeanZctpVTh8GmvsawglvfMfiAr8B62Cwdaj"
        "Mf7sD23mH7uWpmRr9GFf1f0Qd3ynfvqYAly1DjGWS6rcTF6AKQxfbcHhZ7aZC+6tAv+BqGACdY9iYLCwhSdx8gc8bUp/91i4+uHBNeyk"
        "yJikWc7LXH1sT3tdiCGKEuHD3O5nRX11dDz/Qbe1uijwXzSf6LB5pCtDcvc9pT8N2c2cPs4HWLO9zPkNy63meh80+LWCg5LOOFkKRF1n"
        "qobZiIQ3RRDO4fBFGCJempW5jIpNqyrYq40SZyJkDCmyzTCXsUq3hReEm/az4RhJHCVLtVT5HEtjqtXZIFQiwr7qsAGpwEhx+IrNzx5E"
        "Mh7FcgxbBQuO4sWN8rVFjjcV2r4s2s284yb3OGmKdcaol6Vx1kxeglAwz9+fFQ1sWhXk6l4AV3H44BMwn5c5fmGtyTnei1AgXRjJaAUv"
        "66xk8E2FurkaucCb+pxv+LL5MRG2AgHoIz6w/fcjxU7bzOdi+5uU/28u/X3e/pH/Tv2TP+eD6+CKBALht5v+a/X3+dD627/kY+sfm18B"
        "7EhStA=="
    ),
    (
        "eNrtk3FIG1ccx7+RQEZER6RBsGhRlBaVDqHSsRZKx0RLZdKSQUQpVGqYVJSNrUz6V1s2GEjGOiwbDpUVB9JiIWUSmeKoKBUdSqRigsGg"
        "JORCQkKOJNxx4bu7F8OKY6P/DPbHHl8e797d+9z3fd/vIeZDcgdyALkg8odgFIyBSVAGc6AGUpeZLCVt5AmykjxJ1pMN5FnSKblnE73p"
        "EHIr0NbADXAL3AZ3wD1A2S9i42AKzAhsXmeWkG9RqeTeafVFa3TyYnjsfWm8LTFxJf34Wm7Goc066enTZtzKx1GthUFws4gNwHg8ACMo"
        "YrOgUsDqVi3CbQVZTZ7PzXUEhof3O0cPrz+UnI8SvePyzamca1obnOGwl58l2M5cCUOg3zBsDMJ/+j2GLRPYQgKnyBbSEXa7Y92hZKUc"
        "g5JCXt+fqu/MSpaLtE5QFbTQkWEj3YRIV1g2G0y1gnk7WUPWkqfJJkFuJTuY7s/0+5ULxsZf3/6+oBXOKihm/ELBon/pyH89V8/Fptp2"
        "7nYERj4MjTjCD7pjX/Ym3f2ZbwbUsUHeWeOnpN1YtVdM9fXj0g0vIfsd/P3wdWK3HXtdOLiKSCekj0wJh6UtMnZ9v3M67PBIDm+yeyHT"
        "+5vS95IDGxza4icR9pGNRhEVIpUEPyHGGRGtPv4Be5cRguUQ5yTT+YTlA9l6OVveqdjaNftVp+RaTHTJB8U6korpFWpT79MiybSYlAW2"
        "UAsUkpEaRtxcmrI8yGBZxUtindgkfMS2rvGcS9PK+TvoO6pYvhIFvALOCz0H58BlMbMArop+HcaSl8YHmQtliu2GoKks/rYg3UiEV4zL"
        "5C9mGxVn9xThEWy1YacR/iYEmxBqxmEzIs2IvmOKtZhTrZbse1b1ko2XqnjyGqtniOgx+DbiU1gzqjJTPPFCMlFkvkZAZ6I+jJ4IeiTT"
        "jbj5ZtJyS7a6smUDqm2IVZ+z5i4b7vHMKGvnieAxuK4JbF4sGTMMJ0S8eqWpgp9CpA+S6VQSEzJ8GWxn8SqHoIpdwYkREdGniMxfsQXp"
        "ll3m57Z3H8vfQhkDvwd/BCfBn8BHSNdac+W3NWwROUIRwap/hyooaeSqHCJfKPwpU6Cx+mnFfY/fgn0LwhbESs2pty1Ze5lmt7PKResz"
        "Iv7PzIJU4wZEvihZ7Cr/2Wl74rTP9lR5Wuo8Df1ePFmK4n7Cck+2fqXYRml/yJop1k6zZIU4eBM4jbubH6xYqG56Vjfgqbv9S8OQ98yd"
        "X2vcS5hZwdp6FmHNCFMPIf+GwGPylsbPNs6bJ5ewPIeVOax6DW0swreM3RfW/9u/1UxG+6+//wNAxaR8"
    ),
]


def mmseg_inputs():
    label = np.zeros((12, 20), np.uint8)
    label[:6] = 10
    label[4:, 8:] = 1
    label[9:, 15:] = IGNORE_INDEX
    label[6:8, 2:5] = 13
    return pattern(12, 20), label


@pytest.mark.parametrize("case", range(len(MMSEG_CASES)))
def test_reference_pipeline_matches_mmseg_on_opencv(case):
    image, label = mmseg_inputs()
    params = MMSEG_CASES[case]
    assert rescale_size(*label.shape, params.ratio, MMSEG_SCALE) == params.size
    raw = np.frombuffer(zlib.decompress(base64.b64decode("".join(MMSEG_OUTPUTS[case]))), np.uint8).copy()
    size = MMSEG_CROP[0] * MMSEG_CROP[1]
    expected_image, expected_label = raw[:3 * size].reshape(*MMSEG_CROP, 3), raw[3 * size:].reshape(MMSEG_CROP)
    pixels, labels = apply_params(image, label, params, MMSEG_CROP)
    np.testing.assert_array_equal(labels.numpy(), expected_label)
    valid = torch.from_numpy(expected_label != IGNORE_INDEX) | (pixels != 0).any(0)  # padded pixels are 0
    denormalized = pixels * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    expected = torch.from_numpy(expected_image).permute(2, 0, 1).float()
    # mmcv normalizes with cv2.subtract/multiply in float32: equal up to float rounding (< 1e-3 of a level)
    torch.testing.assert_close(denormalized * valid, expected * valid, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------ fast path vs reference
def random_case(rng, height=40, width=80, crop=(32, 64), scale=(80, 40), classes=4):
    """A random image, a blocky random label (so cat_max_ratio accepts and rejects) and drawn params."""
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    blocks = rng.integers(0, classes, (height // 8 + 1, width // 8 + 1)).astype(np.uint8)
    label = np.kron(blocks, np.ones((8, 8), np.uint8))[:height, :width].copy()
    label[rng.random((height, width)) < 0.05] = IGNORE_INDEX
    return image, label, draw_params(rng, height, width, crop, scale)


def test_fast_path_equals_reference_for_same_params():
    """Same drawn parameters -> identical outputs: the fast path computes the crop window with the same integer
    OpenCV taps and the same per-pixel kernels, so on CPU the tolerance is 0 (labels and pixel_values exact)."""
    rng = np.random.default_rng(1)
    crop, scale = (32, 64), (80, 40)
    for _ in range(6):
        cases = [random_case(rng, crop=crop, scale=scale) for _ in range(4)]
        images = torch.from_numpy(np.stack([c[0] for c in cases]))
        labels = torch.from_numpy(np.stack([c[1] for c in cases]))
        params = stack_params([c[2] for c in cases])
        pixels, out_labels = apply_batch_params(images, labels, params, crop)
        for k, (image, label, p) in enumerate(cases):
            ref_pixels, ref_labels = apply_params(image, label, p, crop)
            assert torch.equal(out_labels[k], ref_labels)
            assert torch.equal(pixels[k], ref_pixels)


def test_fast_path_covers_every_branch():
    """The draws above hit padding, flips, both contrast orders, every photometric step and crop retries."""
    rng = np.random.default_rng(1)
    params = [random_case(rng)[2] for _ in range(24)]
    assert any(p.size[0] < 32 for p in params) and any(p.size[0] > 40 for p in params)
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert {getattr(p, name) is None for p in params} == {True, False}
    assert {p.flip for p in params} == {True, False} and {p.contrast_first for p in params} == {True, False}


def test_crop_selection_matches_reference_and_rates_agree():
    """Same params: same chosen candidate. Independent draws: same acceptance statistics."""
    rng = np.random.default_rng(2)
    image = np.zeros((40, 80, 3), np.uint8)
    label = np.zeros((40, 80), np.uint8)
    label[:, 50:] = 1  # crops left of x~50 hold one class: about half the first candidates are rejected
    crop, scale, n = (32, 48), (80, 40), 400
    params = [draw_params(rng, 40, 80, crop, scale) for _ in range(n)]
    ref = np.array([select_crop(cv2.resize(label, p.size[::-1], interpolation=cv2.INTER_NEAREST), p.crop_offsets,
                                crop) for p in params])
    fast = select_crops(torch.from_numpy(np.broadcast_to(label, (n, 40, 80)).copy()), stack_params(params),
                        crop).numpy()
    np.testing.assert_array_equal(fast, ref)
    generator = torch.Generator().manual_seed(0)
    drawn = draw_batch_params(n, 40, 80, generator, crop, scale)
    fast_drawn = select_crops(torch.from_numpy(np.broadcast_to(label, (n, 40, 80)).copy()), drawn, crop).numpy()
    for stat in (lambda c: c == 0, lambda c: c == CROP_TRIES):  # first accepted; all 10 rejected
        p_ref, p_fast = stat(ref).mean(), stat(fast_drawn).mean()
        assert abs(p_ref - p_fast) < 4 * np.sqrt(0.25 / n) * np.sqrt(2), (p_ref, p_fast)
    assert 0.2 < (ref == 0).mean() < 0.9 and (ref > 0).any()
    del image


def ks_statistic(a, b):
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                  - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()


def test_drawn_parameter_distributions_agree():
    """numpy reference draws vs torch device draws, 1024x2048 images, 4000 samples each."""
    n, rng = 4000, np.random.default_rng(3)
    ref = [draw_params(rng, 1024, 2048) for _ in range(n)]
    fast = draw_batch_params(n, 1024, 2048, torch.Generator().manual_seed(3))
    ref_ratio = np.array([p.ratio for p in ref])
    assert ks_statistic(ref_ratio, fast.ratio.numpy()) < 0.04
    assert 0.5 <= fast.ratio.min() and fast.ratio.max() < 2.0
    ref_size = np.array([p.size for p in ref])
    np.testing.assert_array_equal(fast.size.numpy(), [rescale_size(1024, 2048, r) for r in fast.ratio.tolist()])
    assert ks_statistic(ref_size[:, 1], fast.size[:, 1].numpy()) < 0.04
    # crop offsets: uniform over [0, margin]
    margins = (fast.size - torch.tensor([512, 1024])).clamp(min=0)[:, None]
    assert ((fast.crop_offsets >= 0) & (fast.crop_offsets <= margins)).all()
    rel_fast = (fast.crop_offsets / margins.clamp(min=1))[margins.expand_as(fast.crop_offsets) > 0].numpy()
    ref_margins = np.maximum(ref_size - [512, 1024], 0)[:, None]
    ref_offsets = np.stack([p.crop_offsets for p in ref])
    rel_ref = (ref_offsets / np.maximum(ref_margins, 1))[np.broadcast_to(ref_margins > 0, ref_offsets.shape)]
    assert ks_statistic(rel_ref, rel_fast) < 0.03
    tol = 4 * np.sqrt(0.25 / n)  # 4 sigma of a rate of 0.5
    for name in ("flip", "contrast_first"):
        assert abs(np.mean([getattr(p, name) for p in ref]) - 0.5) < tol
        assert abs(getattr(fast, name).float().mean().item() - 0.5) < tol
    for name, low, high in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5),
                            ("hue", -18, 17)):
        ref_values = np.array([getattr(p, name) for p in ref if getattr(p, name) is not None], dtype=float)
        on = getattr(fast, f"{name}_on")
        fast_values = getattr(fast, name)[on].double().numpy()
        assert abs(len(ref_values) / n - 0.5) < tol and abs(on.float().mean().item() - 0.5) < tol
        for values in (ref_values, fast_values):
            assert low <= values.min() and values.max() <= high
        assert ks_statistic(ref_values, fast_values) < 0.06
    ref_hue = {p.hue for p in ref if p.hue is not None}
    assert ref_hue == set(fast.hue[fast.hue_on].tolist()) == set(range(-18, 18))


def test_photometric_order_matters_and_is_followed():
    """Contrast before vs after saturation differs; the batched version follows each sample's own mode."""
    image = pattern(8, 32)
    base = dict(ratio=1.0, size=(8, 32), crop_offsets=np.zeros((11, 2), np.int64), flip=False, brightness=None,
                contrast=1.4, saturation=0.6, hue=3)
    first, last = TrainParams(contrast_first=True, **base), TrainParams(contrast_first=False, **base)
    out_first, out_last = photometric(image, first), photometric(image, last)
    assert not np.array_equal(out_first, out_last)
    batch = torch.from_numpy(np.stack([image, image])).permute(0, 3, 1, 2).float()
    for masked in (False, True):  # the CPU's per-subset way and the accelerators' masked way
        out = photometric_batch(batch, stack_params([first, last]), masked=masked).permute(0, 2, 3, 1)
        assert np.array_equal(out[0].numpy(), out_first) and np.array_equal(out[1].numpy(), out_last)


def test_masked_photometric_equals_per_subset():
    rng = np.random.default_rng(4)
    params = stack_params([draw_params(rng, 8, 32, (8, 32), (32, 8)) for _ in range(12)])
    images = torch.from_numpy(rng.integers(0, 256, (12, 3, 8, 32))).float()
    assert torch.equal(photometric_batch(images, params, masked=True), photometric_batch(images, params, masked=False))
