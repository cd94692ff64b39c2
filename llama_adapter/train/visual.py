"""The multimodal side of training: starting from a trained adapter, and images in.

The two phases (their rules are in ``roles``) follow the official LLaMA-Adapter V2 code (``get_trainable_params``):

- ``pretrain`` trains the visual adapter (``clip_proj``, ``clip_proj_norm``, ``visual_query``,
  ``visual_blocks``, ``visual_proj``, ``visual_proj_norm``), the adaption prompts and the gates;
  the model has no biases, as the official pretrain model has none.
- ``finetune`` adds zero-initialised biases and trains LLaMA's biases and RMSNorm weights only;
  prompts, gates and the visual adapter keep the values they start with (``--init-adapter``).
  With ``--lora-rank`` it also trains the LoRA projections: the official training script builds
  no LoRA (``w_lora`` is off), so LoRA training is our extension, named by its ``lora_*`` keys;
  ``new_gate`` stays frozen at its value, as the official finetune rule would leave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ImageError
from ..inputs.images import load_image
from ..model.visual import ImageTransform, VisualEncoder
from ..roles import Role, role_of, trains_in_phase
from ..serve.adapters import read_adapter_source
from ..serve.pipeline import Pipeline
from ..weights.adapter import AdapterFile, fit_adapter
from ..weights.state import shapes
from .data import Example


def read_init_adapter(source: str) -> tuple[Path, AdapterFile]:
    """The adapter a run starts from (a pretrain-phase output, or an official V2 file or name); it must be multimodal."""
    adapter = read_adapter_source(source)
    path = adapter.path
    if adapter.config.visual is None:
        raise ValueError(f"--init-adapter {path} has no visual part: start image-text training from a multimodal adapter")
    if adapter.config.gate_activation != "tanh":
        raise ValueError(f"--init-adapter {path} uses raw gates; image-text training uses tanh gates (official V2)")
    return path, adapter


def copy_init_adapter(pipe: Pipeline, adapter: AdapterFile, source: str) -> None:
    """Overwrite ``pipe``'s fresh adapter with ``adapter``'s tensors (and CLIP's, when the file carries a copy).

    What the pretrain phase trains must be in the file; biases, norms and LoRA missing from it
    keep their fresh values (zero, the base's, zero up-projections) so that fine-tuning starts
    from exactly the pretrained model.
    """
    assert pipe.visual is not None
    targets = pipe.adapter_tensors() | pipe.visual.clip_state()
    # new_gate comes with LoRA, which a pretrain model lacks: it then keeps its fresh 1.
    required = {n for n in pipe.adapter_tensors() if trains_in_phase(n, "pretrain") and role_of(n) is not Role.NEW_GATE}
    tensors = fit_adapter(adapter, pipe.model.args, shapes(targets.items()), required, source)
    with torch.no_grad():
        for name, t in tensors.items():
            targets[name].copy_(t)


class ImageFeeder:
    """Visual prompts for batches: images read, transformed, through frozen CLIP (no_grad), then the visual adapter.

    Training images get the official augmentation, a random resized crop whose randomness is
    seeded by (seed, epoch, example), so a resumed or multi-process run crops exactly as an
    uninterrupted single-process one.  Evaluation uses CLIP's plain inference transform.
    Examples without an image get a zero visual prompt, as at inference without an image.
    """

    def __init__(self, visual: VisualEncoder, seed: int) -> None:
        self.visual, self.seed = visual, seed
        self.augment = ImageTransform(visual.transform.cfg, train=True, channel_order=visual.cfg.channel_order)

    def train_prompts(self, examples: Sequence[Example], indices: Sequence[int], epoch: int) -> Tensor | None:
        pixels = []
        for example, index in zip(examples, indices, strict=True):
            if example.image is None:
                pixels.append(None)
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)
                pixels.append(self.augment.pixels_of(_read(example.image)))
        return self._prompts(pixels)

    def eval_prompts(self, examples: Sequence[Example]) -> Tensor | None:
        return self._prompts([None if e.image is None else self.visual.transform.pixels_of(_read(e.image)) for e in examples])

    def _prompts(self, pixels: list[Tensor | None]) -> Tensor | None:
        rows = [i for i, p in enumerate(pixels) if p is not None]
        if not rows:
            return None
        clip = self.visual.clip.conv1.weight
        batch = torch.stack([pixels[i] for i in rows]).to(device=clip.device, dtype=clip.dtype)
        with torch.no_grad():
            tokens = self.visual.clip_tokens(batch)
        prompts = self.visual.adapt(tokens)
        if len(rows) == len(pixels):
            return prompts
        index = torch.tensor(rows, device=prompts.device)
        return prompts.new_zeros(len(pixels), *prompts.shape[1:]).index_copy(0, index, prompts)


def _read(path: Path):
    try:
        return load_image(path)
    except ImageError as e:  # only the header was checked before training; name the file in full
        raise ImageError(f"{path}: {e}") from None
