"""python -m llama_adapter.eval instructions: AlpacaEval-format outputs from JSON or JSONL instruction lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import llama_adapter

from .eval_helpers import files, run_eval

pytestmark = pytest.mark.usefixtures("one_thread")

# AlpacaEval's alpaca_eval.json layout: the reference model's output and name come along and must be replaced.
ALPACA_EVAL = [
    {"dataset": "helpful_base", "instruction": "Name some famous actors.", "output": "ref", "generator": "text_davinci_003"},
    {"dataset": "koala", "instruction": "Tell me about alpacas.", "output": "ref", "generator": "text_davinci_003"},
    {"dataset": "oasst", "instruction": "Write a poem about the sun.", "output": "ref", "generator": "text_davinci_003"},
    {"dataset": "selfinstruct", "instruction": "List two colors.", "output": "ref", "generator": "text_davinci_003"},
    {"dataset": "vicuna", "instruction": "How do I make tea?", "output": "ref", "generator": "text_davinci_003"},
]


def test_alpaca_eval_outputs_end_to_end(hf_dir: Path, pipe, tmp_path: Path, capsys) -> None:
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps(ALPACA_EVAL))
    out = tmp_path / "out"
    rc, table, err = run_eval(capsys, "instructions", "--data", data, "--base", hf_dir, "--out", out, "--max-new-tokens", 7,
                              "--device", "cpu", "--batch-size", 4, "--generator", "tiny-adapter")  # fmt: skip
    assert rc == 0, err
    outputs = json.loads((out / "outputs.json").read_text())
    expected = ["".join(pipe.stream(llama_adapter.format_prompt(r["instruction"]), max_new_tokens=7, temperature=0)).strip()
                for r in ALPACA_EVAL]  # fmt: skip
    assert outputs == [r | {"output": e, "generator": "tiny-adapter"} for r, e in zip(ALPACA_EVAL, expected, strict=True)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == 5 and metrics["generator"] == "tiny-adapter"
    assert metrics["mean_words"] == pytest.approx(sum(len(e.split()) for e in expected) / 5)
    assert table.splitlines()[2].startswith("| tiny-adapter | 5 | ")


def test_jsonl_of_strings_and_inputs(hf_dir: Path, pipe, tmp_path: Path, capsys) -> None:
    data = tmp_path / "questions.jsonl"
    records = ['"Name a color."', '{"instruction": "Translate to French.", "input": "the water"}', "", '"Tell me a story."']
    data.write_text("\n".join(records) + "\n")
    rc, _, err = run_eval(capsys, "instructions", "--data", data, "--base", hf_dir, "--out", tmp_path / "o", "--max-new-tokens", 5,
                          "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    outputs = json.loads((tmp_path / "o" / "outputs.json").read_text())
    prompts = [llama_adapter.format_prompt("Name a color."), llama_adapter.format_prompt("Translate to French.", "the water"),
               llama_adapter.format_prompt("Tell me a story.")]  # fmt: skip
    assert [o["output"] for o in outputs] == ["".join(pipe.stream(p, max_new_tokens=5, temperature=0)).strip() for p in prompts]
    assert [o["instruction"] for o in outputs] == ["Name a color.", "Translate to French.", "Tell me a story."]
    assert outputs[1]["input"] == "the water" and all(o["generator"] == Path(hf_dir).name for o in outputs)


def test_resume_after_two_records(hf_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps(ALPACA_EVAL))
    args = ("instructions", "--data", data, "--base", hf_dir, "--max-new-tokens", 6, "--device", "cpu")
    names = ("predictions.jsonl", "outputs.json", "metrics.json", "run.json")
    assert run_eval(capsys, *args, "--out", tmp_path / "whole")[0] == 0
    assert run_eval(capsys, *args, "--out", tmp_path / "part", "--limit", 2, "--batch-size", 1)[0] == 0
    assert len(json.loads((tmp_path / "part" / "outputs.json").read_text())) == 2
    assert run_eval(capsys, *args, "--out", tmp_path / "part", "--batch-size", 3)[0] == 0
    assert files(tmp_path / "part", names) == files(tmp_path / "whole", names)
    data.write_text(json.dumps(ALPACA_EVAL[::-1]))  # another version of the file: its ids mean other instructions
    rc, _, err = run_eval(capsys, *args, "--out", tmp_path / "part")
    assert rc == 2 and "other settings (different data_sha256)" in err


def test_bad_records_are_listed(tmp_path: Path, hf_dir: Path, capsys) -> None:
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "ok"}, {"prompt": "x"}, 7, {"instruction": "y", "input": 3}]))
    rc, _, err = run_eval(capsys, "instructions", "--data", data, "--base", hf_dir, "--out", tmp_path / "o")
    assert rc == 2
    assert "3 bad record(s)" in err and "record 1: expected a non-empty string or an object" in err
    assert "record 2:" in err and "record 3: 'input' must be a string" in err


def test_python_dash_m_runs_the_task(hf_dir: Path, tmp_path: Path) -> None:
    """The documented command itself, in a fresh process."""
    data = tmp_path / "q.json"
    data.write_text(json.dumps(["Name a color."]))
    cmd = [sys.executable, "-m", "llama_adapter.eval", "instructions", "--data", str(data), "--base", str(hf_dir),
           "--out", str(tmp_path / "o"), "--max-new-tokens", "3", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (tmp_path / "o" / "table.md").read_text()
    assert len(json.loads((tmp_path / "o" / "outputs.json").read_text())) == 1
