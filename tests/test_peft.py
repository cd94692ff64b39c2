"""Adapters to and from peft's AdaptionPrompt, checked against peft itself on a tiny Llama-3-style base (GQA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llama_adapter
from llama_adapter import AdapterConfig
from llama_adapter.convert import main as convert
from llama_adapter.weights import hub

from .test_hub import hf_cache as offline_cache  # noqa: F401 (test_hub's fixture: an empty Hugging Face cache, offline)
from .test_hub import put_in_cache

TEXT = "the water is long and the people come to find oil, said she"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: fastest on one thread, and the cores are shared


def hf_base(llama3_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(llama3_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def peft_dir(llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained-looking in peft: random prompts, non-zero gates, saved by PeftModel.save_pretrained."""
    from peft import AdaptionPromptConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(hf_base(llama3_dir), AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(torch.randn(()).item())
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return out


def peft_logits(llama3_dir: Path, adapter_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_base(llama3_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_peft_adapter_loads_with_peft_logits(llama3_dir: Path, peft_dir: Path, llama3_pipe) -> None:
    pipe = llama3_pipe.with_adapter(peft_dir)
    cfg = pipe.model.adapter_config
    assert (cfg.adapter_len, cfg.adapter_layer, cfg.gate_activation) == (3, 2, "identity")
    tokens = torch.tensor([pipe.tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours, base = pipe.model(tokens), llama3_pipe.model(tokens)
    ref = peft_logits(llama3_dir, peft_dir, tokens)
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    assert (ours - ref).abs().max().item() <= 1e-4
    # load(base, dir) is the same thing in one call.
    loaded = llama_adapter.load(llama3_dir, peft_dir, device="cpu", dtype="fp32")
    assert torch.equal(loaded.model(tokens), ours)


def our_adapter(llama3_pipe, tmp_path: Path, per_head: bool, **extras: object) -> Path:
    cfg = AdapterConfig(adapter_len=4, adapter_layer=3, gate_activation="tanh", **extras)
    pipe = llama3_pipe.with_adapter(cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in pipe.model.adapter_parameters().items():
            if name.endswith(".gate"):
                p.copy_(torch.randn(p.shape) if per_head else torch.full(p.shape, torch.randn(()).item()))
    return llama_adapter.save_adapter(tmp_path / "ours.safetensors", pipe.adapter_tensors(), cfg, pipe.model.args)


def test_our_adapter_exports_to_peft_with_equal_logits(llama3_dir: Path, llama3_pipe, tmp_path: Path, capsys) -> None:
    ours_file = our_adapter(llama3_pipe, tmp_path, per_head=False)
    assert convert([str(ours_file), "--to", "peft", str(tmp_path / "peft")]) == 0
    pipe = llama3_pipe.with_adapter(ours_file)
    tokens = torch.tensor([pipe.tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours = pipe.model(tokens)
    ref = peft_logits(llama3_dir, tmp_path / "peft", tokens)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert "wrote" in capsys.readouterr().out


def test_conversions_round_trip_exactly(llama3_dir: Path, peft_dir: Path, tmp_path: Path) -> None:
    assert convert([str(peft_dir), "--to", "ours", str(tmp_path / "ours"), "--base", str(llama3_dir)]) == 0
    assert convert([str(tmp_path / "ours"), "--to", "peft", str(tmp_path / "back")]) == 0
    before = load_file(str(peft_dir / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_what_peft_cannot_hold_is_refused(llama3_pipe, tmp_path: Path, capsys) -> None:
    per_head = our_adapter(llama3_pipe, tmp_path / "a", per_head=True)
    assert convert([str(per_head), "--to", "peft", str(tmp_path / "out")]) == 2
    assert "a different gate for each head" in capsys.readouterr().err
    extras = our_adapter(llama3_pipe, tmp_path / "b", per_head=False, norm=True)
    assert convert([str(extras), "--to", "peft", str(tmp_path / "out")]) == 2
    assert "V2 extras" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_peft_lora_directory_is_refused_by_name(llama3_pipe, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(llama_adapter.CheckpointError, match="a peft LORA adapter; only ADAPTION_PROMPT adapters"):
        llama3_pipe.with_adapter(tmp_path)


@pytest.mark.usefixtures("offline_cache")
def test_a_peft_repo_on_the_hub_loads_from_the_cache(peft_dir: Path, llama3_pipe) -> None:
    files = {name: peft_dir / name for name in ("adapter_config.json", "adapter_model.safetensors")}
    put_in_cache(Path(hub.hf_constants.HF_HUB_CACHE), "me/peft-adapter", files)
    from_hub = llama3_pipe.with_adapter("me/peft-adapter")
    local = llama3_pipe.with_adapter(peft_dir)
    tokens = torch.tensor([llama3_pipe.tokenizer.encode(TEXT)])
    assert torch.equal(from_hub.model(tokens), local.model(tokens))
