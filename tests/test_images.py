"""Opening uploaded images: every bad file gets a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from llama_adapter.images import ImageError, open_image


def jpeg_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "noise.jpg"
    Image.effect_noise((256, 256), 60).convert("RGB").save(path, quality=90)
    return path.read_bytes()


def test_an_image_opens_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 20), (10, 20, 30, 128)).save(path)
    im = open_image(path)
    assert im.mode == "RGB" and im.size == (30, 20)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 10)).save(path, exif=exif)
    assert open_image(path).size == (10, 40)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("missing", "no image was received"),
        ("text", "could not be read as an image"),
        ("truncated", "could not be read as an image"),  # the header is fine, the pixels are cut off
    ],
)
def test_bad_files_get_a_message(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "upload.jpg"
    if content == "text":
        path.write_text("plain text, not an image")
    elif content == "truncated":
        path.write_bytes(jpeg_bytes(tmp_path)[:3000])
    with pytest.raises(ImageError, match=expected):
        open_image(path)


def test_huge_images_are_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    with pytest.raises(ImageError, match=r"400x300 pixels, over the 0 megapixel limit"):
        open_image(path, max_pixels=100_000)
    with pytest.raises(ImageError, match="MB limit"):
        open_image(path, max_bytes=100)
