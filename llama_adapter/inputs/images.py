"""Reading images: paths, PIL images or numpy arrays to upright RGB, with a clear error for anything unusable.

Size limits are checked before decoding, so a huge upload costs neither memory nor time.  The aspect
ratio is bounded too: CLIP's resize scales the short side to 224, so a 1 x 60000 image would become
224 x 13.4M pixels; with the ratio at most ``MAX_ASPECT_RATIO`` no accepted image resizes to more than
224 x 224 x ``MAX_ASPECT_RATIO`` pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError

ImageInput = str | os.PathLike | Image.Image | np.ndarray

# The encoder sees 224 x 224 anyway; larger inputs only cost memory and decoding time.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 25 * 2**20
# Wide panoramas pass; strips and lines (whose resize to 224 on the short side explodes) do not.
MAX_ASPECT_RATIO = 20
_SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied, any mode (L, P, RGBA, CMYK, 16-bit...) converted to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT:
        # convert("RGB") would clip 16-bit grey values at 255 (a white image); scale them to 8 bits first.
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def load_image(
    image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES, name: str | None = None
) -> Image.Image:
    """An RGB PIL image from a file path, a PIL image or a numpy array (uint8, RGB order, H x W [x 3|4]).

    ``name``: what error messages call a file (e.g. an upload's original name instead of a server path).
    """
    if isinstance(image, np.ndarray):
        img = _from_array(image)
        _check_pixels(img, max_pixels)
        return _upright(img, "the image array")
    if isinstance(image, Image.Image):
        _check_pixels(image, max_pixels)
        return _decode(image, "the image")
    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image), max_pixels, max_bytes, name)
    raise ImageError(f"unsupported image type {type(image).__name__}; pass a file path, a PIL image or a numpy RGB array")


def check_image_file(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> None:
    """Raise ImageError unless ``path`` is an image file within the limits, reading only its header.

    For checking a whole dataset quickly: pixel data that is corrupt past the header only fails when decoded.
    """
    with _open_file(Path(path), max_pixels, max_bytes) as opened:
        # The ratio of the long to the short side is the same whichever way EXIF turns the image.
        _check_aspect(opened.size, Path(path).name)


def _read_file(path: Path, max_pixels: int, max_bytes: int, name: str | None) -> Image.Image:
    with _open_file(path, max_pixels, max_bytes, name) as opened:
        return _decode(opened, name or path.name)


def _open_file(path: Path, max_pixels: int, max_bytes: int, name: str | None = None) -> Image.Image:
    """The file opened lazily (header read, pixels not decoded), size limits checked."""
    if not path.is_file():
        raise ImageError(f"image file not found: {name or path}")
    name = name or path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"{name} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit: use a smaller image")
    try:
        opened = Image.open(path)  # reads the header only: the pixel check comes before decoding
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is far too large to decode: resize it and try again") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...) for files it cannot parse
        raise ImageError(
            f"{name} is not an image PIL can read ({str(e).replace(str(path), name)}); use a JPEG, PNG, WebP, GIF or BMP file"
        ) from None
    try:
        _check_pixels(opened, max_pixels)
    except ImageError:
        opened.close()
        raise
    return opened


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} pixels, over the {max_pixels / 1e6:.0f} megapixel limit: "
            "resize it (e.g. to 1024 pixels on the long side) and try again"
        )


def _check_aspect(size: tuple[int, int], what: str) -> None:
    width, height = size
    if min(width, height) > 0 and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{what} is {width}x{height} pixels, more than {MAX_ASPECT_RATIO} times as long as it is wide, "
            "and the model sees a square: crop it to the part that matters and try again"
        )


def _decode(img: Image.Image, what: str) -> Image.Image:
    try:
        img.load()  # PIL opens lazily: truncated or corrupt pixel data only fails here
    except Exception as e:  # decoders raise OSError, ValueError, struct.error, DecompressionBombError...
        raise ImageError(f"{what} is corrupt or unsupported ({type(e).__name__}: {e}); re-save it as JPEG or PNG") from None
    return _upright(img, what)


def _upright(img: Image.Image, what: str) -> Image.Image:
    """Upright RGB, its shape checked: the bound on what preprocessing allocates is on the pixels the model gets."""
    try:
        rgb = to_rgb(img)
    except Exception as e:
        raise ImageError(f"{what} is corrupt or unsupported ({type(e).__name__}: {e}); re-save it as JPEG or PNG") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError(f"{what} is empty ({rgb.width}x{rgb.height} pixels)")
    _check_aspect(rgb.size, what)
    return rgb


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"image array has dtype {array.dtype}; pass uint8 values 0-255 (convert with .astype(np.uint8))")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(f"image array has shape {array.shape}; expected (H, W), (H, W, 3) RGB or (H, W, 4) RGBA")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image array is empty: shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))
