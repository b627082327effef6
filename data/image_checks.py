"""Image checks made before decoding: the size a PNG declares in its IHDR header, decompression bombs, and photos
of any common mode read as 8-bit RGB.

    png_size(path) -> (width, height) from the 33 header bytes, None for a file that is not a PNG
    open_image(path, what) -> a PIL image, opened (header only) and refused beyond MAX_PIXELS
    read_photo(path) -> HxWx3 uint8 RGB of a PNG/JPEG of any common mode (16-bit grayscale scaled, not clipped)

Errors are one-line ValueErrors naming the file, its declared size and what was expected.
"""

import struct
from pathlib import Path

import numpy as np
from PIL import Image

# PIL's own decompression-bomb threshold (it warns above it and refuses above twice it): 89.5 M pixels, 43x a
# Cityscapes image. Read once, never changed.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Modes that PIL converts to RGB without losing meaning (8 bits per channel, palette, alpha dropped, 1-bit, CMYK).
_RGB_CONVERTIBLE = ("1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def ihdr_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first 24 bytes of a PNG (signature, then the IHDR chunk), None when there is no
    complete IHDR chunk there."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def png_size(path) -> tuple[int, int] | None:
    """(width, height) that a PNG declares in its IHDR chunk (no decoding), None when the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if not head.startswith(PNG_SIGNATURE):
        return None
    size = ihdr_size(head)
    if size is None:
        raise ValueError(f"{path}: PNG without an IHDR header; expected a complete PNG")
    return size


def _too_large(path, width: int, height: int, what: str) -> ValueError:
    return ValueError(f"{path}: the {what} declares {width}x{height} pixels ({width * height / 1e6:.0f} M), beyond "
                      f"the {MAX_PIXELS / 1e6:.0f} M-pixel limit (a decompression bomb?); refusing to decode it")


def check_declared_size(path, what: str = "image") -> tuple[int, int] | None:
    """The declared (width, height) of a PNG, refused when it is 0 or beyond MAX_PIXELS; None when not a PNG."""
    size = png_size(path)
    if size is not None:
        width, height = size
        if width == 0 or height == 0:
            raise ValueError(f"{path}: the {what} declares {width}x{height} pixels; expected a non-empty PNG")
        if width * height > MAX_PIXELS:
            raise _too_large(path, width, height, what)
    return size


def open_image(path, what: str = "image") -> Image.Image:
    """Opens an image (header only: decoding happens at load()), refusing decompression bombs before decoding."""
    check_declared_size(path, what)  # PNGs: the size from the header, with the size in the message
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:  # other formats: PIL's own guard (twice MAX_PIXELS)
        raise ValueError(f"{path}: {error}; refusing to decode it") from error
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise _too_large(path, image.width, image.height, what)
    return image


def to_rgb8(image: Image.Image, name) -> np.ndarray:
    """HxWx3 uint8 RGB from a PIL image of any mode that has one meaning as a photo.

    16-bit grayscale (PIL modes I;16*, and I for a PNG, which only holds 16-bit there) is scaled to 8 bits
    (round(v / 257): 257 * v8 -> v8 exactly) instead of being clipped at 255 as PIL's convert("RGB") does."""
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
        gray = np.asarray(image).astype(np.float32)
        return np.repeat(np.round(gray / 257).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if mode not in _RGB_CONVERTIBLE:
        raise ValueError(f"{name}: image mode {mode} (e.g. 32-bit integer or float pixels) has no single 8-bit RGB "
                         "meaning; expected an 8/16-bit grayscale, palette, RGB or RGBA image")
    return np.array(image.convert("RGB"))


def read_photo(path) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file of any common mode; errors (bomb, truncated, unknown mode) name the file."""
    path = Path(path)
    try:
        with open_image(path, "image") as image:
            image.load()
            return to_rgb8(image, path)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: unreadable image ({error})") from error
