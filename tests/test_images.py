"""Image input: CLIP preprocessing parity with open_clip and the official clip package, odd modes, EXIF, bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from llama_adapter import ClipSpec, ImageError
from llama_adapter.inputs.images import load_image
from llama_adapter.model.visual import ImageTransform, build_clip

from .test_multimodal import picture, write_clip_dir

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The official clip package's transform (clip/clip.py `_transform(224)`), restated.
OFFICIAL_CLIP = T.Compose(
    [
        T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        lambda im: im.convert("RGB"),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ]
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP folder in open_clip's own format (no download)."""
    return write_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def transforms(clip_dir: Path) -> tuple[ImageTransform, T.Compose]:
    """Ours, built the way load() builds it, and open_clip's own inference transform for the same model."""
    spec = ClipSpec(f"local-dir:{clip_dir}", None)
    _, preprocess_cfg = build_clip(spec)
    _, _, theirs = open_clip.create_model_and_transforms(spec.model)
    return ImageTransform(preprocess_cfg), theirs


def odd_images() -> dict[str, Image.Image]:
    base = picture(11, (257, 190))
    rgba = base.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, base.width, dtype=np.uint8), (base.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "P": base.quantize(64),
        "RGBA": rgba,
        "CMYK": base.convert("CMYK"),
        "LA": base.convert("LA"),
        "1": base.convert("1"),
    }


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_rgb_and_grey_equal_open_clip_and_official_clip(transforms, mode: str) -> None:
    ours, theirs = transforms
    for size in [(300, 240), (240, 300), (224, 224), (100, 60)]:  # wider, taller, exact, upscaled
        img = picture(10, size).convert(mode)
        got = ours(img)
        assert got.shape == (3, 224, 224)
        assert torch.equal(got, theirs(img))
        assert torch.equal(got, OFFICIAL_CLIP(img))


@pytest.mark.parametrize("mode", list(odd_images()))
def test_odd_modes_are_converted_to_rgb_then_preprocessed_as_clip_does(transforms, mode: str) -> None:
    """P, RGBA, CMYK, LA and 1 become the RGB they show first; then open_clip's transform applies unchanged.

    (open_clip alone resizes first, in the raw mode: a palette image is then resized with nearest
    neighbour, CMYK and alpha are resampled before conversion.)"""
    ours, theirs = transforms
    img = odd_images()[mode]
    assert img.mode == mode
    assert torch.equal(ours(img), theirs(img.convert("RGB")))


def test_sixteen_bit_grey_is_scaled_not_clipped(transforms) -> None:
    ours, _ = transforms
    grey8 = np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint16)
    img16 = Image.fromarray((grey8 * 257).astype(np.uint16))  # the same picture at 16 bits
    assert img16.mode.startswith("I")
    assert torch.equal(ours(img16), ours(Image.fromarray(grey8.astype(np.uint8))))


def test_exif_orientation_is_applied(transforms, tmp_path: Path) -> None:
    ours, theirs = transforms
    stored = picture(12, (320, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer must rotate the stored pixels 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    assert load_image(path).size == (200, 320)  # shown upright: portrait
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)
        assert torch.equal(ours(path), theirs(upright))
        assert not torch.equal(ours(path), theirs(raw))


def test_numpy_is_rgb_never_bgr(transforms) -> None:
    ours, _ = transforms
    red = np.zeros((50, 70, 3), dtype=np.uint8)
    red[..., 0] = 255
    pixels = ours(red)
    assert pixels[0].mean() > 1 and pixels[2].mean() < -1  # channel 0 is red
    img = picture(13)
    assert torch.equal(ours(np.asarray(img)), ours(img))
    assert torch.equal(ours(np.asarray(img.convert("L"))), ours(img.convert("L")))
    assert torch.equal(ours(np.asarray(img.convert("RGBA"))), ours(img.convert("RGBA")))


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    picture(14).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "image file not found: .*missing.png"),
        (lambda d: (d / "notes.jpg").write_text("not a picture") and d / "notes.jpg", "notes.jpg is not an image PIL can read"),
        (lambda d: (d / "empty.png").write_bytes(b"") == 0 and d / "empty.png", "empty.png is not an image PIL can read"),
        (lambda d: _truncated_jpeg(d / "cut.jpg"), "cut.jpg is corrupt or unsupported"),
    ],
    ids=["missing", "text-file", "empty-file", "truncated-jpeg"],
)
def test_bad_image_files_give_a_clear_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(make(tmp_path))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "dtype float32; pass uint8"),
        (np.zeros((8, 8, 2), dtype=np.uint8), r"shape \(8, 8, 2\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "empty"),
    ],
)
def test_bad_arrays_give_a_clear_error(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_other_types_are_refused() -> None:
    with pytest.raises(ImageError, match="unsupported image type Tensor"):
        load_image(torch.zeros(3, 8, 8))  # type: ignore[arg-type]


def test_huge_images_are_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    with pytest.raises(ImageError, match=r"400x300 pixels, over the 0 megapixel limit"):
        load_image(path, max_pixels=100_000)
    with pytest.raises(ImageError, match="MB limit"):
        load_image(path, max_bytes=100)
    with pytest.raises(ImageError, match="megapixel limit"):
        load_image(np.zeros((300, 400, 3), dtype=np.uint8), max_pixels=100_000)
