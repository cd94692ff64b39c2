"""Opening weight files with clear errors, and writing them so that a crash cannot leave a broken one.

Every failure to read a file (truncated, empty, header only, not this format, or a pickle that
``weights_only`` refuses) is a ``CheckpointError`` that names the file and says what to do.  Torch's
own message for a refused pickle advises ``weights_only=False``, which would run the file's code:
it is never passed on.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

_REFUSED_PICKLE = (
    "holds Python objects other than tensors and plain containers, which are not loaded because unpickling "
    "them could run code; ask its author for a safetensors file or a plain state dict of tensors"
)


def _reason(err: BaseException) -> str:
    """A short, safe description of a reader's error: its first sentence, never torch's unsafe advice."""
    text = str(err).split("\n")[0].split(". ")[0].strip()
    if not text or "weights_only" in text:
        return type(err).__name__
    return text


def torch_load(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; any failure is a CheckpointError about ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} {_REFUSED_PICKLE}") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or empty zip, not a torch file, ...
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(f"{path} ({size:,} bytes) is truncated or corrupt ({_reason(e)}): download or copy it again") from None


@contextmanager
def open_safetensors(path: Path, device: str = "cpu") -> Iterator[Any]:
    """``safe_open`` whose header and tensor reads raise a CheckpointError naming ``path``."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            yield f  # reads in the caller's block fail here too
    except SafetensorError as e:
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(
            f"{path} ({size:,} bytes) is truncated or not a safetensors file ({_reason(e)}): download or copy it again"
        ) from None


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``, its data on disk first: a power loss then leaves the
    old file or the new one, never a renamed but empty one."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some systems cannot open a directory; the rename itself is still atomic
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
