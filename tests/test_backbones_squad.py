"""The SQuAD command end to end on a tiny random RoBERTa: learning (v1.1 and v2.0), frozen backbone, adapter files,
exact resume with dropout on, windows over long contexts, and bad data reported before compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from llama_adapter.backbones import adapter_parameters, read_backbone_adapter
from llama_adapter.backbones.squad import load_question_answerer, main, parse_args, train
from llama_adapter.backbones.squad_data import Question, best_answer, read_squad, tokenize
from llama_adapter.backbones.squad_metric import squad_scores
from llama_adapter.backbones.tiny import keyword_squad, save_tiny_roberta, squad_texts

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def roberta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_roberta(tmp_path_factory.mktemp("roberta") / "tiny-roberta", squad_texts())


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def squad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("squad")
    return {
        "train": write(d / "train.json", keyword_squad(64, 0)),
        "val": write(d / "val.json", keyword_squad(24, 1)),
        "train2": write(d / "train-v2.json", keyword_squad(64, 0, version_2=True)),
        "val2": write(d / "val-v2.json", keyword_squad(24, 1, version_2=True)),
    }


def cli(model: Path, train_file: Path, val_file: Path, out: Path, *extra: object) -> list[str]:
    args = ("--model", model, "--train", train_file, "--val", val_file, "--out", out, "--max-seq-len", 64, "--doc-stride", 16,
            "--adapter-len", 10, "--device", "cpu", *extra)  # fmt: skip
    return [str(a) for a in args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


RECIPE = ("--epochs", 10, "--batch-size", 8, "--lr", 0.05, "--warmup-epochs", 1, "--log-every", 4)


@pytest.fixture(scope="module")
def trained(roberta: Path, squad: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("squad-run") / "run"
    return out, train(parse_args(cli(roberta, squad["train"], squad["val"], out, *RECIPE)))


def test_held_out_f1_rises_well_above_chance(trained) -> None:
    out, _ = trained
    evals = [m for m in metrics(out) if "f1" in m]
    assert len(evals) == 11 and evals[0]["step"] == 0  # before training and after each epoch
    assert evals[0]["f1"] < 20 and evals[0]["total"] == 24
    assert evals[-1]["f1"] >= 70 and evals[-1]["exact"] >= 70, evals[-1]


def test_only_prompts_gates_and_span_head_changed(trained, roberta: Path) -> None:
    _, model = trained
    fresh = AutoModelForQuestionAnswering.from_pretrained(roberta).state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) | {"qa_outputs.weight", "qa_outputs.bias"}
    assert len(adapter_parameters(model)) == 6  # prompt and gate in each of the 3 layers (the default: all)
    for name, t in model.state_dict().items():
        if name not in trainable:
            assert torch.equal(t, fresh[name]), name
        elif name in fresh:
            assert not torch.equal(t, fresh[name]), f"{name} did not train"
    assert all(layer.attention.self.adapter.gate.abs().min() > 0 for layer in model.roberta.encoder.layer)


def test_adapter_file_reproduces_the_validation_scores(trained, roberta: Path, squad: dict[str, Path]) -> None:
    out, _ = trained
    _, info = read_backbone_adapter(out, task="squad")
    assert (info.library, info.backbone, info.shape) == ("transformers", str(roberta), {"depth": 3, "dim": 32, "heads": 4})
    assert info.task_config == {"max_seq_len": 64, "doc_stride": 16, "max_answer_len": 30, "version_2": False}
    assert info.trainable_parameters == 3 * (10 * 32 + 4) + 2 * 32 + 2
    answerer = load_question_answerer(out)
    questions, _ = read_squad(squad["val"])
    predictions = {q.qid: answerer.answer(q.question, q.context) for q in questions}
    scores = squad_scores(predictions, {q.qid: [a for a, _ in q.answers] for q in questions}, version_2=False)
    last = [m for m in metrics(out) if "f1" in m][-1]
    assert scores["f1"] == pytest.approx(last["f1"]) and scores["exact"] == pytest.approx(last["exact"])


def test_v2_learns_when_to_answer_nothing(roberta: Path, squad: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main(cli(roberta, squad["train2"], squad["val2"], tmp_path / "v2", *RECIPE)) == 0
    assert "SQuAD v2.0 (with unanswerable questions)" in capsys.readouterr().out
    first, last = [m for m in metrics(tmp_path / "v2") if "f1" in m][::10]
    assert first["NoAns_total"] + first["HasAns_total"] == first["total"] == 24
    assert last["NoAns_f1"] >= 70 and last["HasAns_f1"] >= 50 and last["f1"] >= first["f1"] + 40, last
    assert read_backbone_adapter(tmp_path / "v2")[1].task_config["version_2"] is True
    # Training on v2.0 and validating on v1.1 (or the reverse) is refused.
    assert main(cli(roberta, squad["train2"], squad["val"], tmp_path / "mixed")) == 2
    assert "--train is SQuAD v2.0 (unanswerable questions) but --val is not" in capsys.readouterr().err


def test_interrupted_and_resumed_run_equals_uninterrupted_with_dropout(roberta: Path, squad: dict[str, Path], tmp_path: Path) -> None:
    # The tiny RoBERTa keeps transformers' default dropout (0.1), so resuming must restore the RNG exactly.
    common = ("--epochs", 2, "--batch-size", 12, "--accum-steps", 2, "--lr", 0.05, "--warmup-epochs", 0.5, "--log-every", 1)
    assert main(cli(roberta, squad["train"], squad["val"], tmp_path / "whole", *common)) == 0
    assert main(cli(roberta, squad["train"], squad["val"], tmp_path / "split", *common, "--stop-after", 3)) == 0
    assert main(cli(roberta, squad["train"], squad["val"], tmp_path / "split", *common, "--resume")) == 0
    whole, split = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(tmp_path / "split" / "adapter.safetensors")
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    drop_speed = [{k: v for k, v in m.items() if k != "examples_per_s"} for m in metrics(tmp_path / "whole")]
    assert drop_speed == [{k: v for k, v in m.items() if k != "examples_per_s"} for m in metrics(tmp_path / "split")]


def test_two_process_torchrun_scores_as_one_process(roberta: Path, squad: dict[str, Path], tmp_path: Path) -> None:
    common = ("--epochs", 1, "--lr", 0.05, "--warmup-epochs", 0)
    assert main(cli(roberta, squad["train2"], squad["val2"], tmp_path / "one", "--batch-size", 8, *common)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = cli(roberta, squad["train2"], squad["val2"], tmp_path / "two", "--batch-size", 4, *common)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, "-m", "llama_adapter.backbones.squad", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("trainable:") == 1
    # Each process decodes its share of the questions; together they score exactly as one process.
    assert metrics(tmp_path / "one")[0] == metrics(tmp_path / "two")[0]
    assert (tmp_path / "two" / "adapter.safetensors").is_file()


# ---------------------------------------------------------------- windows and decoding


def test_long_contexts_are_cut_into_overlapping_windows_labelled_with_the_answer(roberta: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(roberta)
    words = ("the a of to in is it that was for on are as with his they at be this from " * 3).split()
    context = " ".join([*words, "marker", "cloud", *words]) + "."
    start = context.index("cloud")
    q = Question("q", "Which word follows the marker?", context, (("cloud", start),), False, "test")
    windows = tokenize([q], tokenizer, max_seq_len=40, doc_stride=10)
    assert len(windows) > 3 and all(len(ids) <= 40 for ids in windows.input_ids)
    inside = [w for w in range(len(windows)) if windows.start[w] != 0]
    assert inside and len(inside) < len(windows)  # windows without the answer point at CLS
    for w in inside:
        ids = windows.input_ids[w][windows.start[w] : windows.end[w] + 1]
        assert tokenizer.decode(ids).strip() == "cloud"
        assert context[windows.offsets[w][windows.start[w]][0] : windows.offsets[w][windows.end[w]][1]] == "cloud"
    # Consecutive windows share --doc-stride context tokens.
    first = [o for o in windows.offsets[0] if o is not None]
    second = [o for o in windows.offsets[1] if o is not None]
    assert first[-10:] == second[:10]
    # Decoding: the best span over all windows, within --max-answer-len, mapped back to the context's characters.
    w = inside[-1]
    logits = {v: (torch.zeros(len(windows.input_ids[v])), torch.zeros(len(windows.input_ids[v]))) for v in range(len(windows))}
    logits[w][0][windows.start[w]] = 5.0
    logits[w][1][windows.end[w]] = 5.0
    assert best_answer(q, windows, logits, max_answer_len=30, version_2=False) == "cloud"
    logits[w][1][windows.end[w] + 3] = 6.0  # a longer span scores higher, but is cut by max_answer_len
    assert best_answer(q, windows, logits, max_answer_len=4, version_2=False) != best_answer(q, windows, logits, 1, False)
    assert best_answer(q, windows, logits, max_answer_len=1, version_2=False) == "cloud"
    for v in logits:  # v2.0: a "no answer" score above every span's gives the empty answer
        logits[v][0][0] = logits[v][1][0] = 6.0
    assert best_answer(q, windows, logits, max_answer_len=1, version_2=True) == ""


# ---------------------------------------------------------------- bad data


def test_bad_squad_records_are_named_before_any_model_loads(squad: dict[str, Path], tmp_path: Path, capsys) -> None:
    doc = keyword_squad(4, 0, version_2=True)
    paragraphs = doc["data"][0]["paragraphs"]
    answerable = [p for p in paragraphs if not p["qas"][0]["is_impossible"]]
    answerable[0]["qas"][0]["answers"][0]["answer_start"] += 1  # the span no longer matches the context
    bad_id = answerable[0]["qas"][0]["id"]
    paragraphs.append({"context": "no answers here", "qas": [{"id": "empty", "question": "what?", "answers": []}]})
    data = write(tmp_path / "bad.json", doc)
    code = main(cli(tmp_path / "no-model", data, squad["val2"], tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert "2 problems in the data" in err
    i = paragraphs.index(answerable[0])
    assert f"bad.json: data[0].paragraphs[{i}].qas[0] (id '{bad_id}'): answer " in err and "is not in the context" in err
    assert f"bad.json: data[0].paragraphs[{len(paragraphs) - 1}].qas[0] (id 'empty'): no answers; mark unanswerable" in err
    assert "no-model" not in err and not (tmp_path / "out").exists()
    (tmp_path / "broken.json").write_text('{"data": [')
    assert main(cli(tmp_path / "no-model", tmp_path / "broken.json", squad["val"], tmp_path / "out")) == 2
    assert "broken.json: invalid JSON at line 1" in capsys.readouterr().err


def test_duplicate_ids_and_impossible_questions_with_answers_are_refused(tmp_path: Path) -> None:
    doc = keyword_squad(2, 0)
    qa = doc["data"][0]["paragraphs"][0]["qas"][0]
    doc["data"][0]["paragraphs"][1]["qas"][0]["id"] = qa["id"]
    qa["is_impossible"] = True
    with pytest.raises(ValueError) as e:
        read_squad(write(tmp_path / "d.json", doc))
    assert "marked is_impossible but has answers" in str(e.value)
    doc["data"][0]["paragraphs"][0]["qas"][0].pop("is_impossible")
    with pytest.raises(ValueError, match=r"data\[0\]\.paragraphs\[1\]\.qas\[0\] \(id 'q0-0'\): duplicate id \(also .*paragraphs\[0\]"):
        read_squad(write(tmp_path / "d.json", doc))
