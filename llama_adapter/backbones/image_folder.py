"""Labelled images for classification: an image folder (``SPLIT/<class>/*.jpg``) or a CSV of ``path,label``.

Everything is checked before any model is loaded, and all problems are reported at once, each naming its
folder, file or CSV line: a missing split, an empty class folder, a label the training split lacks, an
image file that is missing or whose header cannot be read.  Pixel data that is corrupt past a valid header
only shows when decoded; that error names the file too.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # far beyond any classifier's input; a bigger file is an error, not a decompression bomb


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    where: str  # how to name it in an error: "train/cat/1.jpg" or "train.csv line 4"


def read_split_dir(root: Path) -> tuple[list[LabelledImage], list[str]]:
    """``root/<class>/<image>`` entries, and problems (an empty class folder, no class folders)."""
    problems: list[str] = []
    if not root.is_dir():
        return [], [f"{root}: folder not found (expected one sub-folder of images per class)"]
    items: list[LabelledImage] = []
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        problems.append(f"{root}: no class folders (expected {root.name}/<class>/<image files>)")
    for d in classes:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        if not files:
            problems.append(f"{d}: empty class folder (no {'/'.join(sorted(IMAGE_SUFFIXES))} files); add images or remove it")
        items += [LabelledImage(f, d.name, f"{root.name}/{d.name}/{f.name}") for f in files]
    return items, problems


def read_csv(path: Path) -> tuple[list[LabelledImage], list[str]]:
    """``path,label`` rows (an optional header row ``path,label``); paths relative to the CSV's folder."""
    if not path.is_file():
        return [], [f"{path}: file not found"]
    items: list[LabelledImage] = []
    problems: list[str] = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or (n == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                problems.append(f"{path.name} line {n}: expected two columns path,label, got {row!r}")
                continue
            items.append(LabelledImage(path.parent / row[0].strip(), row[1].strip(), f"{path.name} line {n}"))
    if not items and not problems:
        problems.append(f"{path}: no rows")
    return items, problems


def check_image(item: LabelledImage) -> str | None:
    """A problem with the file's header (missing, not an image, too large), or None; does not decode pixels."""
    try:
        with Image.open(item.path) as img:
            w, h = img.size
    except FileNotFoundError:
        return f"{item.where}: image file not found: {item.path}"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"{item.where}: unreadable image {item.path} ({type(e).__name__}: {e})"
    if w * h > MAX_PIXELS:
        return f"{item.where}: image {item.path} is {w}x{h} pixels, over the limit of {MAX_PIXELS:,}"
    return None


def class_order(labels: set[str]) -> list[str]:
    """Sorted class names; numerically when every label is an integer (so '10' comes after '9')."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def read_labelled_images(train_source: Path, val_source: Path) -> tuple[list[LabelledImage], list[LabelledImage], list[str]]:
    """Checked training and validation images and the class names (from the training split)."""
    read = read_csv if train_source.suffix.lower() == ".csv" else read_split_dir
    train, problems = read(train_source)
    read = read_csv if val_source.suffix.lower() == ".csv" else read_split_dir
    val, val_problems = read(val_source)
    problems += val_problems
    classes = class_order({i.label for i in train})
    known = set(classes)
    problems += [f"{i.where}: label {i.label!r} has no training images (training classes: {', '.join(classes)})"
                 for i in val if i.label not in known]  # fmt: skip
    problems += [p for p in map(check_image, train + val) if p]
    if problems:
        raise DataError(problems)
    return train, val, classes


def decode(item: LabelledImage) -> Image.Image:
    """The image as upright RGB; a clear error naming the file if its pixel data is corrupt."""
    try:
        with Image.open(item.path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{item.where}: cannot decode image {item.path} ({e}); fix or remove it, then --resume") from e


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images, their class indices, and a problem ("" if none) for each.

    A file that cannot be decoded comes back as a blank image with its problem, instead of an exception, so that a
    loader worker hands the message to the training process without a traceback around it (see ``checked``).
    """

    def __init__(self, items: list[LabelledImage], classes: list[str], transform: Callable[[Image.Image], Tensor]) -> None:
        self.items, self.transform = items, transform
        self.index = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        item = self.items[i]
        try:
            return self.transform(decode(item)), self.index[item.label], ""
        except DataError as e:
            return self.transform(Image.new("RGB", (8, 8))), self.index[item.label], str(e)


def checked(batch: tuple[Tensor, Tensor, list[str]]) -> tuple[Tensor, Tensor]:
    """Images and labels of a loaded batch; a DataError naming the files if any could not be decoded."""
    images, labels, problems = batch
    bad = [p for p in problems if p]
    if bad:
        raise DataError(bad)
    return images, labels
