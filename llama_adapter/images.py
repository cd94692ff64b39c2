"""Opening images that users upload: a clear error for a missing, corrupt, non-image or huge file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# The image encoder sees 224x224 anyway; bigger files only cost memory and time to decode.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 25 * 2**20


class ImageError(ValueError):
    """An image could not be used; the message says what to do instead."""


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Decode an image file to RGB (EXIF rotation applied), checking its size before decoding it."""
    path = Path(path)
    if not path.is_file():
        raise ImageError("no image was received: upload an image (PNG, JPEG, WebP, ...) and try again")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"the file is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit: upload a smaller image")
    unreadable = ImageError(
        f"{path.name} could not be read as an image (it is corrupt or not an image file): upload a PNG, JPEG or WebP image"
    )
    try:
        im = Image.open(path)  # reads the header only, so the pixel check below comes before decoding
    except Image.DecompressionBombError:
        raise ImageError("the image is far too large to decode: resize it and upload it again") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise unreadable from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                f"the image is {width}x{height} pixels, over the {max_pixels / 1e6:.0f} megapixel limit: "
                "resize it (e.g. to 1024 pixels on the long side) and upload it again"
            )
        try:
            return ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, SyntaxError, ValueError):  # e.g. a truncated file: its header was fine
            raise unreadable from None
