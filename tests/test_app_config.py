"""app.py's configuration: flags, environment variables, and the offline start with nothing cached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import app
from llama_adapter.tiny import TINY_ARGS, load_tiny

from .conftest import ROOT


def test_defaults_are_the_public_weights() -> None:
    s = app.parse_settings([], env={})
    assert (s.base, s.adapter, s.caption_adapter, s.tiny) == (app.DEFAULT_BASE, app.DEFAULT_ADAPTER, app.DEFAULT_CAPTION_ADAPTER, False)
    assert (s.quantize, s.compile) == (None, False)
    assert (s.host, s.port, s.share) == (None, None, None)  # left to Gradio (and so to Spaces)


def test_environment_variables_set_what_flags_do_not() -> None:
    env = {
        "LLAMA_ADAPTER_BASE": "/models/llama",
        "LLAMA_ADAPTER_ADAPTER": "none",
        "LLAMA_ADAPTER_CAPTION_ADAPTER": "/models/mm.pth",
        "LLAMA_ADAPTER_DEVICE": "cuda",
        "LLAMA_ADAPTER_DTYPE": "bf16",
        "LLAMA_ADAPTER_QUANTIZE": "int8",
        "LLAMA_ADAPTER_COMPILE": "1",
        "LLAMA_ADAPTER_TINY": "1",
    }
    s = app.parse_settings([], env=env)
    got = (s.base, s.adapter, s.caption_adapter, s.device, s.dtype, s.quantize, s.compile, s.tiny)
    assert got == ("/models/llama", None, "/models/mm.pth", "cuda", "bf16", "int8", True, True)
    assert app.parse_settings(["--caption-adapter", "none"], env={}).caption_adapter is None
    s = app.parse_settings(["--base", "b", "--adapter", "a.safetensors", "--dtype", "fp16", "--port", "8000", "--share"], env=env)
    assert (s.base, s.adapter, s.dtype, s.port, s.share) == ("b", "a.safetensors", "fp16", 8000, True)


def test_a_bad_dtype_in_the_environment_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        app.parse_settings([], env={"LLAMA_ADAPTER_DTYPE": "int4"})
    assert e.value.code == 2 and "use fp32, bf16 or fp16" in capsys.readouterr().err


def test_chat_turns_pair_gradio_messages() -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Stopped before any reply"},
        {"role": "user", "content": "Again"},
    ]
    assert app.chat_turns(history) == [("Hi", "Hello!"), ("Stopped before any reply", ""), ("Again", "")]


def test_model_panel_names_the_model() -> None:
    pipe = load_tiny("cpu")
    panel = app.model_panel(app.Models(pipe, None, tiny=True))
    for text in ("tiny random LLaMA", "tiny random adapter", "no image model", "cpu", "float32", f"{TINY_ARGS.max_seq_len} tokens"):
        assert text in panel
    assert f"{pipe.adapter_parameter_count():,}" in panel
    limits = pipe.scheduler.limits
    assert f"0 of {limits.max_rows} rows" in panel and f"0 waiting (at most {limits.max_queue})" in panel


def test_offline_with_nothing_cached_exits_with_one_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_ADAPTER_", "HF_", "GRADIO_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert app.DEFAULT_BASE in done.stderr and "not in the local cache" in done.stderr
    assert "python app.py --tiny" in done.stderr and "--base /path/to/" in done.stderr


def test_the_v1_adapter_shape_comes_from_a_flag_or_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert app.parse_settings(["--adapter-shape", "10x30"], env={}).adapter_shape == (10, 30)
    assert app.parse_settings([], env={"LLAMA_ADAPTER_ADAPTER_SHAPE": "5x3"}).adapter_shape == (5, 3)
    assert app.parse_settings([], env={}).adapter_shape is None
    with pytest.raises(SystemExit) as e:
        app.parse_settings([], env={"LLAMA_ADAPTER_ADAPTER_SHAPE": "ten by thirty"})
    assert e.value.code == 2 and "is not LENxLAYERS" in capsys.readouterr().err


def test_batch_and_queue_limits_come_from_a_flag_or_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    s = app.parse_settings(["--max-batch", "4"], env={"LLAMA_ADAPTER_MAX_QUEUE": "0"})
    assert (s.max_batch, s.max_queue) == (4, 0)
    assert (app.parse_settings([], env={}).max_batch, app.parse_settings([], env={}).max_queue) == (None, None)
    for argv in (["--max-batch", "0"], ["--max-queue", "-1"], ["--max-batch", "many"]):
        with pytest.raises(SystemExit) as e:
            app.parse_settings(argv, env={})
        assert e.value.code == 2 and "give a whole number from" in capsys.readouterr().err
