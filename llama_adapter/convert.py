"""Command line: convert an adapter between this package's format and peft's AdaptionPrompt.

python -m llama_adapter.convert ADAPTER --to peft OUT_DIR [--base BASE]
python -m llama_adapter.convert PEFT_DIR --to ours OUT.safetensors --base BASE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ModelConfig
from .errors import USER_ERRORS, CheckpointError, user_message
from .serve.adapters import read_adapter_source
from .weights import hub
from .weights.adapter import AdapterFile, save_adapter
from .weights.base import open_tokenizer, read_model_config
from .weights.peft import save_peft_adapter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_adapter.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="adapter: our .safetensors (or its directory), an official name or file, or a peft directory")
    p.add_argument("--to", required=True, choices=("peft", "ours"), help="peft: adapter_config.json + adapter_model.safetensors")
    p.add_argument("out", help="output: a directory for peft, a .safetensors file (or a directory for adapter.safetensors) for ours")
    p.add_argument("--base", help="the base model (directory or Hub repo id): its config is read for the layer count and dims")
    return p.parse_args(argv)


def base_config(base: str) -> ModelConfig:
    base_dir = hub.resolve_base(base)
    return read_model_config(base_dir, open_tokenizer(base_dir).n_words, None)


def config_for(file: AdapterFile, base: str | None) -> ModelConfig:
    """The base's config (from --base), or the dims our format records; checked against the adapter."""
    if base is not None:
        args = base_config(base)
    elif file.base_dims is not None:
        dims = file.base_dims
        args = ModelConfig(dim=dims["dim"], n_layers=dims["n_layers"], n_heads=dims["n_heads"], n_kv_heads=dims["n_kv_heads"])
    else:
        raise CheckpointError(f"{file.path} does not record its base model: pass --base with the base it was trained on")
    dim = file.tensors["adapter_query.weight"].shape[-1]
    first = args.n_layers - file.config.adapter_layer
    if dim != args.dim or first < 0 or file.first_layer not in (None, first):
        raise CheckpointError(
            f"{file.path} (prompts of width {dim}, {file.config.adapter_layer} layers from layer {file.first_layer}) "
            f"does not fit a base of dim {args.dim} with {args.n_layers} layers"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        file = read_adapter_source(a.adapter)
        if a.to == "ours" and a.base is None:
            raise CheckpointError("--to ours records the base's dims in the file: pass --base")
        args = config_for(file, a.base)
        if a.to == "peft":
            out = save_peft_adapter(a.out, file.tensors, file.config, args, base_name=a.base or "", source=str(a.adapter))
        else:
            out = Path(a.out)
            if out.is_dir() or not out.suffix:
                out = out / hub.ADAPTER_FILENAME
            save_adapter(out, file.tensors, file.config, args, {"converted_from": str(a.adapter)})
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
