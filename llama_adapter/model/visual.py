"""Images -> visual prompt: CLIP (open_clip) tokens, then the official V2 visual adapter.

    CLIP ViT: all tokens after ln_post and proj           [B, 1+patches, clip_dim]
    clip_proj + clip_proj_norm                             [B, 1+patches, embed_dim]
    [visual_query ; tokens] -> visual_blocks (timm ViT)    [B, query_len+1+patches, embed_dim]
    first query_len tokens -> visual_proj + visual_proj_norm -> [B, query_len, D]

The result is added to the adaption prompt of every adapted layer (``Transformer.adapter_kv``).
Module and parameter names are the official ones, so V2 checkpoints load by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..cancel import CancelToken, check
from ..config import ChannelOrder, VisualConfig
from ..errors import ResolveError
from ..inputs.images import ImageInput, load_image
from ..roles import CLIP_PREFIX, Role, role_of

# open_clip and timm take seconds to import; they are imported where used, so text-only use never pays.
if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer


# The official V2 training augmentation: RandomResizedCrop over 90-100% of the area (bicubic, aspect 3/4-4/3).
TRAIN_CROP_SCALE = (0.9, 1.0)


class ImageTransform:
    """CLIP's preprocessing (open_clip's own transform) after :func:`load_image`.

    For the OpenAI models: resize the short side to 224 (bicubic), center crop 224, CLIP mean/std.
    With ``train`` it is open_clip's training transform instead, as the official V2 training
    uses it: a random resized crop of 90-100% of the image (bicubic) to 224, then CLIP mean/std.
    Converting to RGB comes first, so P, CMYK and RGBA images are resized as the colours they show.
    With ``channel_order="bgr"`` the channels are then reversed, as ``Image.fromarray(cv2.imread(path))``
    hands them to the official V2 models: this is the one place where an adapter's channel order applies.
    """

    def __init__(self, preprocess_cfg: Mapping[str, Any], train: bool = False, channel_order: ChannelOrder = "rgb") -> None:
        import open_clip

        cfg = dict(preprocess_cfg)
        self.cfg = cfg
        self.channel_order = channel_order
        self.transform = open_clip.image_transform(
            cfg["size"],
            is_train=train,
            aug_cfg={"scale": TRAIN_CROP_SCALE} if train else None,
            mean=cfg.get("mean"),
            std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"),
            interpolation=cfg.get("interpolation"),
            fill_color=cfg.get("fill_color", 0),
        )

    def __call__(self, image: ImageInput) -> Tensor:
        """Pixels [3, H, W] (float32, normalised)."""
        return self.pixels_of(load_image(image))

    def pixels_of(self, rgb: Image.Image) -> Tensor:
        """Pixels [3, H, W] of an upright RGB image, in the adapter's channel order."""
        if self.channel_order == "bgr":
            rgb = Image.merge("RGB", rgb.split()[::-1])
        return self.transform(rgb)


# ---------------------------------------------------------------- CLIP from open_clip


@dataclass(frozen=True)
class ClipSpec:
    """Where the CLIP vision tower comes from; every route goes through open_clip.

    - ``model`` + ``pretrained``: an open_clip model name and pretrained tag (default ``ViT-L-14`` /
      ``openai``, the CLIP of the official V2 models), downloaded once into the Hugging Face cache;
      ``pretrained`` may also be a local weights file. ``model`` may be ``hf-hub:org/repo`` or
      ``local-dir:/path`` (open_clip schemas; ``pretrained`` is then ignored).
    - ``config``: a whole open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, as in
      ``open_clip_config.json``'s ``model_cfg``), built with random weights: for tests and tiny demos
      that must not download. ``model`` then only names it in saved metadata.
    """

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    config: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, visual: VisualConfig) -> ClipSpec:
        return cls(visual.clip_model, visual.clip_pretrained)


_LOCAL_DIR, _HF_HUB = "local-dir:", "hf-hub:"
_OPEN_CLIP_CONFIG = "open_clip_config.json"


def clip_output_dim(spec: ClipSpec) -> int:
    """Width of CLIP's output tokens (after ``proj``), read from the model config without building the model."""
    import open_clip

    if spec.config is not None:
        cfg: Mapping[str, Any] | None = spec.config
    elif spec.model.startswith((_LOCAL_DIR, _HF_HUB)):
        cfg = json.loads(_config_file(spec.model).read_text())["model_cfg"]
    else:
        cfg = open_clip.get_model_config(spec.model)
    if cfg is None or "embed_dim" not in cfg:
        raise ResolveError(f"open_clip knows no model {spec.model!r}; see open_clip.list_models() or pass local-dir:/path")
    return int(cfg["embed_dim"])


def _config_file(model: str) -> Path:
    if model.startswith(_LOCAL_DIR):
        path = Path(model.removeprefix(_LOCAL_DIR)) / _OPEN_CLIP_CONFIG
        if not path.is_file():
            raise ResolveError(f"{path} not found: a local-dir: CLIP is a folder with {_OPEN_CLIP_CONFIG} and its weights")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model.removeprefix(_HF_HUB), _OPEN_CLIP_CONFIG))
    except Exception as e:  # network, missing repo or file: all mean the same to the user
        raise ResolveError(f"could not get {_OPEN_CLIP_CONFIG} of CLIP {model!r}: {e}") from None


def build_clip(spec: ClipSpec) -> tuple[VisionTransformer, dict[str, Any]]:
    """The CLIP vision tower (fp32, CPU, eval) and its preprocessing config."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    if spec.config is not None:
        model = open_clip.CLIP(**spec.config)
        preprocess: dict[str, Any] = {"size": model.visual.image_size}  # open_clip's defaults: OpenAI mean/std, bicubic
    else:
        tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained) if spec.pretrained else {}
        try:
            # open_clip only warns when a QuickGELU checkpoint (the OpenAI ones) lands in a GELU model: force it.
            model = open_clip.create_model(spec.model, pretrained=spec.pretrained, force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
        except Exception as e:  # network, cache, unknown names: open_clip wraps them all in RuntimeError or OSError
            raise ResolveError(
                f"could not get CLIP {spec.model!r} (pretrained {spec.pretrained!r}) from open_clip: {e}. Its weights come "
                "from the Hugging Face Hub into the local cache: check the network (or HF_HUB_OFFLINE), or pass "
                "clip=ClipSpec(model, pretrained='/path/to/weights') with a local file."
            ) from None
        preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    tower = model.visual
    if not isinstance(tower, VisionTransformer) or tower.proj is None or tower.attn_pool is not None:
        raise ValueError(f"CLIP {spec.model!r}: only open_clip ViT towers with a final projection are supported")
    return tower.eval(), preprocess


# ---------------------------------------------------------------- the visual adapter


class VisualEncoder(nn.Module):
    """CLIP (frozen, ``clip.*``) plus the official V2 visual adapter (the other, trainable parameters)."""

    def __init__(self, clip: VisionTransformer, preprocess_cfg: Mapping[str, Any], cfg: VisualConfig, query_len: int, dim: int) -> None:
        from timm.models.vision_transformer import Block

        super().__init__()
        clip_dim = clip.proj.shape[1]
        if clip_dim != cfg.clip_dim:
            raise ValueError(f"the visual adapter expects CLIP tokens of width {cfg.clip_dim}, but this CLIP gives {clip_dim}")
        self.cfg, self.query_len = cfg, query_len
        self.transform = ImageTransform(preprocess_cfg, channel_order=cfg.channel_order)
        self.clip = clip
        self.clip_proj = nn.Linear(clip_dim, cfg.embed_dim)
        self.clip_proj_norm = nn.LayerNorm(cfg.embed_dim)
        self.visual_query = nn.Embedding(query_len, cfg.embed_dim)
        # nn.LayerNorm (eps 1e-5) as in the timm the official code was written for; timm 1.x defaults to eps 1e-6.
        self.visual_blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(cfg.depth)
        )
        self.visual_proj = nn.Linear(cfg.embed_dim, dim)
        self.visual_proj_norm = nn.LayerNorm(dim)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The visual adapter's parameters by name (everything but CLIP)."""
        return {n: p for n, p in self.named_parameters() if role_of(n) is Role.VISUAL}

    def clip_state(self) -> dict[str, Tensor]:
        """CLIP's tensors under the names an adapter file may carry them by (``clip.*``)."""
        return {CLIP_PREFIX + k: v for k, v in self.clip.state_dict().items()}

    def clip_tokens(self, pixels: Tensor) -> Tensor:
        """All CLIP tokens (class token first) after ``ln_post`` and ``proj``: [B, 1+patches, clip_dim]."""
        v = self.clip
        x = v.conv1(pixels).flatten(2).transpose(1, 2)  # [B, patches, width]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        return v.ln_post(v.transformer(x)) @ v.proj

    def forward(self, pixels: Tensor) -> Tensor:
        """Visual prompt [B, query_len, D] from normalised pixels [B, 3, H, W]."""
        return self.adapt(self.clip_tokens(pixels))

    def adapt(self, clip_tokens: Tensor) -> Tensor:
        """The visual adapter alone: visual prompt [B, query_len, D] from CLIP's tokens (training runs CLIP under no_grad)."""
        tokens = self.clip_proj_norm(self.clip_proj(clip_tokens))
        query = self.visual_query.weight.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = torch.cat([query, tokens], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.query_len]))

    def pixels(self, images: Sequence[ImageInput], cancel: CancelToken | None = None) -> Tensor:
        """Preprocessed images as one batch on this encoder's device and dtype (``cancel`` checked between images)."""
        weight = self.clip_proj.weight
        batch = []
        for image in images:
            check(cancel)
            batch.append(self.transform(image))
        check(cancel)
        return torch.stack(batch).to(device=weight.device, dtype=weight.dtype)

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageInput], cancel: CancelToken | None = None) -> Tensor:
        """Visual prompts [len(images), query_len, D]."""
        return self(self.pixels(images, cancel))


def build_visual(cfg: VisualConfig, query_len: int, dim: int, clip: ClipSpec | None, fresh: bool) -> VisualEncoder:
    """CLIP from open_clip plus the visual adapter; the adapter's parameters are on the meta device unless ``fresh``."""
    tower, preprocess = build_clip(clip or ClipSpec.of(cfg))
    if fresh:
        return VisualEncoder(tower, preprocess, cfg, query_len, dim)
    with torch.device("meta"):  # the adapter's weights come from the file; CLIP (built above) stays as it is
        return VisualEncoder(tower, preprocess, cfg, query_len, dim)
