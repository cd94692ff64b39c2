"""python -m llama_adapter.eval scienceqa: the official release files, answer parsing, the paper's table, resume, --to-train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import llama_adapter
from llama_adapter.eval import scienceqa
from llama_adapter.train.image_data import read_image_text_records

from .eval_helpers import files, picture, read_jsonl, run_eval, write_multimodal_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

# Five test problems whose paper columns are known, and two train problems.  (pid, subject, grade, hint, image, choices, answer)
PROBLEMS = [
    ("11", "natural science", "grade3", "", True, ["sand", "rock"], 0),  # NAT IMG G1-6
    ("12", "social science", "grade8", "The map shows a state.", False, ["Ohio", "Utah", "Iowa"], 2),  # SOC TXT G7-12
    ("13", "language science", "grade5", "", False, ["formal", "informal"], 1),  # LAN NO G1-6
    ("14", "natural science", "grade10", "Read the text.", True, ["yes", "no"], 1),  # NAT TXT IMG G7-12
    ("15", "social science", "grade2", "", True, ["north", "south", "east", "west"], 3),  # SOC IMG G1-6
    ("3", "natural science", "grade4", "", True, ["hot", "cold"], 1),
    ("4", "language science", "grade9", "A poem.", False, ["rhyme", "no rhyme"], 0),
]
SPLITS = {"train": ["3", "4"], "val": [], "test": ["11", "12", "13", "14", "15"]}


def write_release(root: Path, problems: list[tuple] = PROBLEMS) -> Path:
    """problems.json, pid_splits.json and images/SPLIT/ID/image.png, as ScienceQA distributes them."""
    data = {}
    for n, (pid, subject, grade, hint, image, choices, answer) in enumerate(problems):
        split = next(s for s, ids in SPLITS.items() if pid in ids)
        data[pid] = {"question": f"Which one is it, number {n}?", "choices": choices, "answer": answer, "hint": hint,
                     "image": "image.png" if image else None, "task": "closed choice", "grade": grade, "subject": subject,
                     "topic": "topic", "category": "category", "skill": "skill", "lecture": "", "solution": "", "split": split}  # fmt: skip
        if image:
            picture(root / "images" / split / pid / "image.png", n)
    (root / "problems.json").write_text(json.dumps(data))
    (root / "pid_splits.json").write_text(json.dumps(SPLITS))
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_release(tmp_path_factory.mktemp("scienceqa"))


@pytest.fixture(scope="module")
def mm_adapter(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path) -> Path:
    return write_multimodal_adapter(tmp_path_factory.mktemp("mm"), hf_dir)


# ---------------------------------------------------------------- answers and scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is B.", 1),
        ("the answer is (C) because", 2),
        ("(A) sand", 0),
        ("B.", 1),
        ("C", 2),
        ("A dog is not a choice", None),  # "A" is an article here, not option A
        ("rock", 1),
        ("It is made of rock.", 1),
        ("The answer is E.", None),  # past the last option
        ("sand or rock", None),  # two choices named
        ("", None),
    ],
)
def test_answer_letter_is_parsed_robustly(text: str, expected: int | None) -> None:
    assert scienceqa.parse_answer(text, ("sand", "rock", "glass")) == expected


def test_category_accuracy_on_known_answers(release: Path) -> None:
    problems = scienceqa.read_problems(release, "test")
    outputs = {"11": "The answer is A.", "12": "The answer is B.", "13": "I do not know.", "14": "(B) no", "15": "D"}
    preds = {p.id: scienceqa.parse_answer(outputs[p.id], p.choices) for p in problems}
    assert preds == {"11": 0, "12": 1, "13": None, "14": 1, "15": 3}  # right, wrong, unparsed, right, right
    acc = scienceqa.scores(problems, preds)["accuracy"]
    # By hand from the table at the top: NAT {11, 14}, SOC {12, 15}, LAN {13}, TXT {12, 14}, IMG {11, 14, 15},
    # NO {13}, G1-6 {11, 13, 15}, G7-12 {12, 14}; 3 of 5 right.
    expected = {"NAT": 100, "SOC": 50, "LAN": 0, "TXT": 50, "IMG": 100, "NO": 0, "G1-6": 200 / 3, "G7-12": 50, "Avg": 60}
    assert acc == pytest.approx(expected)
    header, _, row = scienceqa.table(acc, "m").splitlines()
    assert header == "| Model | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |"
    assert row == "| m | 100.00 | 50.00 | 0.00 | 50.00 | 100.00 | 0.00 | 66.67 | 50.00 | 60.00 |"


def test_prompt_has_context_question_and_lettered_options(release: Path) -> None:
    problem = scienceqa.read_problems(release, "test")[1]
    assert scienceqa.prompt(problem) == llama_adapter.format_prompt(
        "Context: The map shows a state.\nQuestion: Which one is it, number 1?\nOptions: (A) Ohio (B) Utah (C) Iowa"
    )
    assert "Context: N/A\n" in scienceqa.prompt(scienceqa.read_problems(release, "test")[0])


# ---------------------------------------------------------------- end to end


def test_text_model_end_to_end(release: Path, hf_dir: Path, pipe, tmp_path: Path, capsys) -> None:
    rc, out, err = run_eval(capsys, "scienceqa", "--data", release, "--base", hf_dir, "--out", tmp_path, "--max-new-tokens", 6,
                            "--device", "cpu", "--batch-size", 3, "--name", "tiny")  # fmt: skip
    assert rc == 0, err
    problems = scienceqa.read_problems(release, "test")
    preds = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in preds] == ["11", "12", "13", "14", "15"]  # the split's order, whatever the batches were
    for p, r in zip(problems, preds, strict=True):  # a text-only model answers from the text alone
        assert r["output"] == "".join(pipe.stream(scienceqa.prompt(p), max_new_tokens=6, temperature=0))
        assert r["answer"] == p.letter
        parsed = scienceqa.parse_answer(r["output"], p.choices)
        assert r["pred"] == (None if parsed is None else scienceqa.LETTERS[parsed])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["examples"] == 5 and metrics["images_used"] is False
    preds_idx = {r["id"]: None if r["pred"] is None else scienceqa.LETTERS.index(r["pred"]) for r in preds}
    assert metrics["accuracy"] == pytest.approx(scienceqa.scores(problems, preds_idx)["accuracy"])
    assert metrics["unparsed"] == [r["id"] for r in preds if r["pred"] is None]
    assert out.startswith("| Model | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |\n")
    assert (tmp_path / "table.md").read_text() == out


def test_multimodal_adapter_sees_each_problems_image(release: Path, hf_dir: Path, mm_adapter: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = run_eval(capsys, "scienceqa", "--data", release, "--base", hf_dir, "--adapter", mm_adapter, "--out", tmp_path,
                          "--max-new-tokens", 6, "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    api = llama_adapter.load(hf_dir, mm_adapter, device="cpu", dtype="fp32")
    preds = {r["id"]: r["output"] for r in read_jsonl(tmp_path / "predictions.jsonl")}
    for p in scienceqa.read_problems(release, "test"):
        assert preds[p.id] == "".join(api.stream(scienceqa.prompt(p), image=p.image, max_new_tokens=6, temperature=0))
        if p.image is not None:  # the test means something only if the picture changes the answer
            assert preds[p.id] != "".join(api.stream(scienceqa.prompt(p), max_new_tokens=6, temperature=0))
    assert json.loads((tmp_path / "metrics.json").read_text())["images_used"] is True


def test_resume_gives_the_files_of_an_uninterrupted_run(
    release: Path, hf_dir: Path, mm_adapter: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("scienceqa", "--data", release, "--base", hf_dir, "--adapter", mm_adapter, "--max-new-tokens", 5, "--device", "cpu")
    names = ("predictions.jsonl", "metrics.json", "table.md", "run.json")
    assert run_eval(capsys, *args, "--out", tmp_path / "whole", "--batch-size", 4)[0] == 0

    # Stopped after 2 records: --limit, then a Ctrl-C in the middle of the rest.
    out = tmp_path / "stopped"
    assert run_eval(capsys, *args, "--out", out, "--batch-size", 1, "--limit", 2)[0] == 0
    assert [r["id"] for r in read_jsonl(out / "predictions.jsonl")] == ["11", "12"]
    generate, calls = llama_adapter.Pipeline.generate, []

    def interrupted(self, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(self, prompts, **kw)

    monkeypatch.setattr(llama_adapter.Pipeline, "generate", interrupted)
    rc, _, err = run_eval(capsys, *args, "--out", out, "--batch-size", 1)
    assert rc == 130 and "rerun the same command to continue" in err
    assert len(read_jsonl(out / "predictions.jsonl")) == 3
    monkeypatch.setattr(llama_adapter.Pipeline, "generate", generate)
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"id": "1')  # and a line cut short by a kill: dropped, its example runs again
    rc, _, err = run_eval(capsys, *args, "--out", out, "--batch-size", 2)
    assert rc == 0, err
    assert files(out, names) == files(tmp_path / "whole", names)


def test_resuming_with_other_settings_is_refused(release: Path, hf_dir: Path, tmp_path: Path, capsys) -> None:
    args = ("scienceqa", "--data", release, "--base", hf_dir, "--out", tmp_path, "--device", "cpu", "--limit", 1)
    assert run_eval(capsys, *args, "--max-new-tokens", 3)[0] == 0
    rc, _, err = run_eval(capsys, *args, "--max-new-tokens", 4)
    assert rc == 2 and "other settings (different max_new_tokens)" in err


# ---------------------------------------------------------------- bad input


def test_missing_image_is_reported_with_its_problem_id(release: Path, hf_dir: Path, mm_adapter: Path, tmp_path: Path, capsys) -> None:
    root = shutil.copytree(release, tmp_path / "sqa")
    (root / "images" / "test" / "14" / "image.png").unlink()
    rc, _, err = run_eval(capsys, "scienceqa", "--data", root, "--base", hf_dir, "--adapter", mm_adapter, "--out", tmp_path / "o",
                          "--device", "cpu")  # fmt: skip
    assert rc == 2
    assert "problem 14: image file not found" in err and "test/14/image.png" in err
    assert not (tmp_path / "o" / "predictions.jsonl").exists()  # checked before any generation


def test_problem_without_choices_is_reported(tmp_path: Path, hf_dir: Path, capsys) -> None:
    problems = [p if p[0] != "13" else (*p[:5], [], 0) for p in PROBLEMS]
    root = write_release(tmp_path, problems)
    rc, _, err = run_eval(capsys, "scienceqa", "--data", root, "--base", hf_dir, "--out", tmp_path / "o")
    assert rc == 2
    assert "problem 13: has no choices" in err


def test_wrong_problems_file_names_the_expected_keys(tmp_path: Path, release: Path) -> None:
    shutil.copy(release / "pid_splits.json", tmp_path)
    (tmp_path / "problems.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(scienceqa.EvalError, match="maps problem ids to objects with question, choices, answer, hint, image"):
        scienceqa.read_problems(tmp_path, "test")
    (tmp_path / "problems.json").write_text(json.dumps({pid: {"question": "q"} for pid in SPLITS["test"]}))
    with pytest.raises(scienceqa.EvalError, match=r"problem 11: lacks choices, answer, hint, image, subject, grade, split"):
        scienceqa.read_problems(tmp_path, "test")
    with pytest.raises(scienceqa.EvalError, match="has no split 'dev'; it has test, train, val"):
        scienceqa.read_problems(release, "dev")


# ---------------------------------------------------------------- --to-train


def test_to_train_writes_records_that_training_reads(release: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "sqa_train.jsonl"
    rc, out, err = run_eval(capsys, "scienceqa", "--data", release, "--to-train", path)
    assert rc == 0, err
    assert "wrote 2 training records" in out and f"--image-root {release / 'images'} --phase pretrain" in out
    records = read_image_text_records(path, release / "images")
    train = scienceqa.read_problems(release, "train")
    assert [r.image for r in records] == [release / "images" / "train" / "3" / "image.png", None]
    for record, problem in zip(records, train, strict=True):
        assert record.prompt() == scienceqa.prompt(problem)  # the prompt evaluation uses
        assert record.response() == f"The answer is {problem.letter}."
        assert scienceqa.parse_answer(record.response(), problem.choices) == problem.answer


def test_to_train_reports_a_missing_image(release: Path, tmp_path: Path, capsys) -> None:
    root = shutil.copytree(release, tmp_path / "sqa")
    (root / "images" / "train" / "3" / "image.png").unlink()
    rc, _, err = run_eval(capsys, "scienceqa", "--data", root, "--to-train", tmp_path / "t.jsonl")
    assert rc == 2 and "problem 3: image file not found" in err
