"""Adapter files (official V1 and ours) and every loading error a user can meet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama_adapter
from llama_adapter import AdapterConfig, CheckpointError, read_adapter, save_adapter

from .test_model import SAMPLE, adapted_copy, reference_forward, tokens_for


def v1_state(pipe, length: int, layers: int, scalar_gate: bool, gates_on_all_layers: bool = False, seed: int = 3) -> dict:
    """An official-V1-layout file: adapter_query rows for the top layers, raw gates."""
    torch.manual_seed(seed)
    args = pipe.model.args
    state = {"adapter_query.weight": torch.randn(layers * length, args.dim)}
    gated = range(args.n_layers) if gates_on_all_layers else range(args.n_layers - layers, args.n_layers)
    for i in gated:
        state[f"layers.{i}.attention.gate"] = torch.randn(1) if scalar_gate else torch.randn(1, args.n_heads, 1, 1)
    return state


@pytest.mark.parametrize("scalar_gate", [False, True], ids=["per-head-gate", "scalar-gate"])
def test_official_v1_file_loads_with_raw_gate(tmp_path: Path, hf_dir: Path, pipe, scalar_gate: bool) -> None:
    state = v1_state(pipe, length=3, layers=2, scalar_gate=scalar_gate)
    path = tmp_path / "adapter_v1.pth"
    torch.save(state, path)
    loaded = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32")
    model = loaded.model
    assert model.adapter_config == AdapterConfig(adapter_len=3, adapter_layer=2, gate_activation="identity")
    for i in (2, 3):
        gate = model.state_dict()[f"layers.{i}.attention.gate"]
        assert gate.shape == (1, 4, 1, 1)
        assert torch.equal(gate, state[f"layers.{i}.attention.gate"].expand(1, 4, 1, 1))
    tokens = tokens_for(pipe, SAMPLE[:1])
    with torch.no_grad():
        assert (model(tokens) - reference_forward(model, tokens)).abs().max().item() <= 1e-4


def test_official_v1_file_with_gates_in_every_layer(tmp_path: Path, hf_dir: Path, pipe) -> None:
    """The V1 training model has a gate in each layer; only the top ones are used."""
    state = v1_state(pipe, length=3, layers=2, scalar_gate=False, gates_on_all_layers=True)
    path = tmp_path / "llama_adapter_len3_layer2_release.pth"
    torch.save(state, path)
    model = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32").model
    assert model.adapter_config.adapter_layer == 2 and model.first_adapted_layer == 2
    assert torch.equal(model.state_dict()["layers.3.attention.gate"], state["layers.3.attention.gate"])


def test_own_format_round_trip(tmp_path: Path, hf_dir: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.5)
    path = save_adapter(
        tmp_path / "out" / "adapter.safetensors", model.adapter_parameters(), model.adapter_config, model.args, {"lr": 0.001}
    )
    read = read_adapter(path)
    assert read.config == model.adapter_config
    assert read.metadata["format_version"] == "1"
    assert read.base_dims == model.args.summary()
    assert json.loads(read.metadata["training_args"]) == {"lr": 0.001}
    for name, p in model.adapter_parameters().items():
        assert torch.equal(read.tensors[name], p.detach())
    loaded = llama_adapter.load(hf_dir, tmp_path / "out", device="cpu", dtype="fp32")  # a directory works too
    tokens = tokens_for(pipe, SAMPLE)
    # Equal tensors, but safetensors buffers are only 8-byte aligned and oneDNN rounds differently for them.
    with torch.no_grad():
        assert torch.allclose(loaded.model(tokens), model(tokens), atol=1e-5, rtol=0)


def test_adapter_loads_in_bf16(tmp_path: Path, hf_dir: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.5)
    path = save_adapter(tmp_path / "a.safetensors", model.adapter_parameters(), model.adapter_config, model.args)
    loaded = llama_adapter.load(hf_dir, path, device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    tokens = tokens_for(pipe, SAMPLE[:1])
    with torch.no_grad():
        ref = model(tokens).softmax(-1)
        got = loaded.model(tokens).softmax(-1)
    assert (got - ref).abs().max().item() < 0.05


# ---------------------------------------------------------------- errors that name what is wrong


def test_missing_adapter_file_names_the_path(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(llama_adapter.ResolveError, match="nope.safetensors"):
        llama_adapter.load(hf_dir, str(tmp_path / "nope.safetensors"), device="cpu")


def test_missing_base_dir_names_it(tmp_path: Path) -> None:
    with pytest.raises(llama_adapter.ResolveError, match="missing_model"):
        llama_adapter.load(tmp_path / "missing_model" / "x" / "y", device="cpu")


def test_wrong_shape_adapter_names_keys_and_shapes(tmp_path: Path, hf_dir: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.5)
    tensors = {k: v.detach().clone() for k, v in model.adapter_parameters().items()}
    tensors["adapter_query.weight"] = torch.zeros(6, 32)
    path = save_adapter(tmp_path / "bad.safetensors", tensors, model.adapter_config, model.args)
    with pytest.raises(CheckpointError, match=r"adapter_query.weight: checkpoint has shape \[6, 32\], model expects \[6, 64\]"):
        llama_adapter.load(hf_dir, path, device="cpu")


def test_unexpected_and_missing_adapter_keys_are_named(tmp_path: Path, hf_dir: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.5)
    tensors = {k: v.detach().clone() for k, v in model.adapter_parameters().items()}
    del tensors["layers.3.attention.gate"]
    tensors["layers.3.attention.extra"] = torch.zeros(1)
    path = save_adapter(tmp_path / "bad.safetensors", tensors, model.adapter_config, model.args)
    with pytest.raises(CheckpointError) as err:
        llama_adapter.load(hf_dir, path, device="cpu")
    assert "missing keys: layers.3.attention.gate" in str(err.value)
    assert "unexpected keys: layers.3.attention.extra" in str(err.value)


def test_adapter_for_another_base_is_refused(tmp_path: Path, hf_dir: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.5)
    other = llama_adapter.ModelArgs(dim=64, n_layers=8, n_heads=4, vocab_size=384)
    path = save_adapter(tmp_path / "a.safetensors", model.adapter_parameters(), model.adapter_config, other)
    with pytest.raises(CheckpointError, match="trained for a base model with .*'n_layers': 8"):
        llama_adapter.load(hf_dir, path, device="cpu")


def test_v1_file_with_foreign_keys_is_refused(tmp_path: Path, hf_dir: Path, pipe) -> None:
    state = v1_state(pipe, length=3, layers=2, scalar_gate=True) | {"visual_proj.weight": torch.zeros(2, 2)}
    torch.save(state, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="unexpected keys .*visual_proj.weight"):
        llama_adapter.load(hf_dir, tmp_path / "a.pth", device="cpu")


def test_pth_with_code_is_not_executed(tmp_path: Path, hf_dir: Path) -> None:
    """weights_only loading refuses pickled objects instead of running them."""
    torch.save({"adapter_query.weight": torch.zeros(1), "obj": Path("x")}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth holds Python objects other than tensors") as err:
        llama_adapter.load(hf_dir, tmp_path / "evil.pth", device="cpu")
    assert "weights_only" not in str(err.value)  # torch's advice to load it unsafely is not passed on


def test_not_our_safetensors_is_refused(tmp_path: Path, hf_dir: Path) -> None:
    save_file({"adapter_query.weight": torch.zeros(6, 64)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a llama-adapter adapter file"):
        llama_adapter.load(hf_dir, tmp_path / "x.safetensors", device="cpu")


def test_base_with_wrong_shapes_names_keys(tmp_path: Path, hf_dir: Path) -> None:
    bad = tmp_path / "bad_base"
    shutil.copytree(hf_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(10)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        llama_adapter.load(bad, device="cpu")
    assert "missing keys: layers.1.feed_forward.w3.weight" in str(err.value)
    assert "norm.weight: checkpoint has shape [10], model expects [64]" in str(err.value)


def test_base_without_tokenizer_says_so(tmp_path: Path, hf_dir: Path) -> None:
    bad = tmp_path / "no_tok"
    shutil.copytree(hf_dir, bad)
    (bad / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in"):
        llama_adapter.load(bad, device="cpu")


def test_base_without_config_says_which_files(tmp_path: Path, tokenizer_path: Path) -> None:
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="neither params.json .* nor config.json"):
        llama_adapter.load(tmp_path, device="cpu")


def test_unknown_dtype_is_refused(hf_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        llama_adapter.load(hf_dir, device="cpu", dtype="int4")


def test_second_pipeline_shares_the_loaded_base(tmp_path: Path, hf_dir: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.5)
    path = save_adapter(tmp_path / "a.safetensors", model.adapter_parameters(), model.adapter_config, model.args)
    shared = pipe.with_adapter(path)
    assert shared.model.layers[1].feed_forward.w1.weight.data_ptr() == pipe.model.layers[1].feed_forward.w1.weight.data_ptr()
    assert shared.scheduler is pipe.scheduler  # one decode loop for both: their requests batch together
    assert shared.adapter_name == str(path)
    fresh = llama_adapter.load(hf_dir, path, device="cpu", dtype="fp32")
    tokens = tokens_for(pipe, SAMPLE)
    with torch.no_grad():
        assert torch.allclose(shared.model(tokens), fresh.model(tokens), atol=1e-5, rtol=0)


def test_load_on_a_pipeline_is_a_deprecated_alias_of_with_adapter(tmp_path: Path, pipe) -> None:
    model = adapted_copy(pipe, "tanh", gate_scale=0.5)
    path = save_adapter(tmp_path / "a.safetensors", model.adapter_parameters(), model.adapter_config, model.args)
    with pytest.warns(DeprecationWarning, match="with_adapter"):
        shared = llama_adapter.load(pipe, path)
    assert shared.model.output.weight.data_ptr() == pipe.model.output.weight.data_ptr()
    with pytest.raises(ValueError, match="cannot be converted to bf16"), pytest.warns(DeprecationWarning):
        llama_adapter.load(pipe, path, dtype="bf16")


def test_a_tokenizer_that_is_not_sentencepiece_is_named(tmp_path: Path, hf_dir: Path) -> None:
    bad = tmp_path / "bad_tok"
    shutil.copytree(hf_dir, bad)
    (bad / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model is not a sentencepiece model"):
        llama_adapter.load(bad, device="cpu")
