"""python -m llama_adapter.eval coco-caption: COCO, Karpathy and BLIP annotation files, pycocoevalcap scores, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import llama_adapter
from llama_adapter.eval import coco_caption

from .eval_helpers import picture, read_jsonl, run_eval, write_multimodal_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
# Scoring (and so the command, which checks for Java before it captions) needs Java; reading annotations does not.
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java: apt-get install default-jre-headless")

# Five val2014 images with two references each: distinct words, so that CIDEr's document frequencies are not all 1.
CAPTIONS = {
    391895: ["A man riding a red bicycle down a dirt road.", "A person on a bike on a country path."],
    522418: ["A woman cutting a large white cake.", "Someone slices a birthday cake in a kitchen."],
    184613: ["Two dogs playing with a ball on the grass.", "Puppies chase a toy in a green park."],
    318219: ["A plate of pasta with tomato sauce.", "Spaghetti and meatballs served on a table."],
    554625: ["A train waiting at a station platform.", "An old locomotive stopped near passengers."],
}


def file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same five images described by the three annotation formats, and their val2014/ folder."""
    root = tmp_path_factory.mktemp("coco")
    for n, image_id in enumerate(CAPTIONS):
        picture(root / "val2014" / file_name(image_id), n)
    images = [{"id": i, "file_name": file_name(i), "height": 60, "width": 80} for i in CAPTIONS]
    anns = [{"image_id": i, "id": 10 * i + k, "caption": c} for i, caps in CAPTIONS.items() for k, c in enumerate(caps)]
    (root / "captions_val2014.json").write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    karpathy = [{"filepath": "val2014", "filename": file_name(i), "imgid": n, "split": "test", "cocoid": i, "sentids": [],
                 "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": n} for c in caps]}
                for n, (i, caps) in enumerate(CAPTIONS.items())]  # fmt: skip
    karpathy.append({**karpathy[0], "split": "train", "cocoid": 1, "filename": file_name(1)})  # not in the test split
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    blip = [{"image": f"val2014/{file_name(i)}", "caption": caps} for i, caps in CAPTIONS.items()]
    (root / "coco_karpathy_test.json").write_text(json.dumps(blip))
    return root


@pytest.fixture(scope="module")
def mm_adapter(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path) -> Path:
    return write_multimodal_adapter(tmp_path_factory.mktemp("mm"), hf_dir)


def test_the_three_annotation_formats_agree(coco: Path) -> None:
    coco_format = coco_caption.read_annotations(coco / "captions_val2014.json", coco / "val2014")
    assert [(it.id, it.image.name, list(it.references)) for it in coco_format] == [
        (str(i), file_name(i), caps) for i, caps in CAPTIONS.items()
    ]
    assert all(it.image.is_file() for it in coco_format)
    assert coco_caption.read_annotations(coco / "dataset_coco.json", coco, split="test") == coco_format
    assert coco_caption.read_annotations(coco / "coco_karpathy_test.json", coco) == coco_format
    assert [it.id for it in coco_caption.read_annotations(coco / "dataset_coco.json", coco, split="train")] == ["1"]


@needs_java
def test_scores_on_identical_and_disjoint_captions() -> None:
    refs = {str(i): caps for i, caps in CAPTIONS.items()}
    same = coco_caption.scores(refs, {k: v[0] for k, v in refs.items()})
    assert set(same) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert same["Bleu_4"] == pytest.approx(1.0) and same["Bleu_1"] == pytest.approx(1.0)
    assert same["ROUGE_L"] == pytest.approx(1.0) and same["METEOR"] == pytest.approx(1.0, abs=0.01)
    assert same["CIDEr"] > 0
    disjoint = coco_caption.scores(refs, dict.fromkeys(refs, "purple elephants juggle quietly"))
    assert disjoint["Bleu_4"] == pytest.approx(0.0, abs=1e-9) and disjoint["Bleu_1"] == pytest.approx(0.0, abs=1e-9)
    assert disjoint["CIDEr"] == pytest.approx(0.0) and disjoint["ROUGE_L"] == 0.0


@needs_java
def test_captions_end_to_end(coco: Path, hf_dir: Path, mm_adapter: Path, tmp_path: Path, capsys) -> None:
    rc, out, err = run_eval(capsys, "coco-caption", "--annotations", coco / "captions_val2014.json", "--images", coco / "val2014",
                            "--base", hf_dir, "--adapter", mm_adapter, "--out", tmp_path, "--max-new-tokens", 8,
                            "--device", "cpu", "--batch-size", 2, "--name", "tiny")  # fmt: skip
    assert rc == 0, err
    api = llama_adapter.load(hf_dir, mm_adapter, device="cpu", dtype="fp32")
    preds = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in preds] == [str(i) for i in CAPTIONS]
    for r, image_id in zip(preds, CAPTIONS, strict=True):  # the official caption prompt, each row with its own image
        image = coco / "val2014" / file_name(image_id)
        expected = "".join(api.stream(llama_adapter.caption_prompt(), image=image, max_new_tokens=8, temperature=0))
        assert r["caption"] == expected.strip()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == [{"image_id": i, "caption": r["caption"]} for i, r in zip(CAPTIONS, preds, strict=True)]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    refs = {str(i): caps for i, caps in CAPTIONS.items()}
    assert metrics["scores"] == pytest.approx(coco_caption.scores(refs, {r["id"]: r["caption"] for r in preds}))
    assert "--spice" in metrics["spice"]
    assert out.splitlines()[0] == "| Model | BLEU@1 | BLEU@2 | BLEU@3 | BLEU@4 | METEOR | ROUGE-L | CIDEr |"
    assert out.splitlines()[2].startswith("| tiny | ")


# ---------------------------------------------------------------- bad input


def test_wrong_annotation_format_names_the_expected_keys(tmp_path: Path) -> None:
    path = tmp_path / "anns.json"
    path.write_text(json.dumps({"questions": [], "images": [{"id": 1}]}))
    with pytest.raises(coco_caption.EvalError) as e:
        coco_caption.read_annotations(path, tmp_path)
    message = str(e.value)
    assert "not a COCO captions annotation file" in message
    assert '"annotations": [{"image_id", "caption"}' in message and '"file_name"' in message and '"sentences"' in message
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "text": "x"}]}))
    with pytest.raises(coco_caption.EvalError, match=r"annotations\[0\]: needs 'image_id' and a string 'caption'"):
        coco_caption.read_annotations(path, tmp_path)
    with pytest.raises(coco_caption.EvalError, match="no images in split 'val'; its splits are test, train"):
        coco_caption.read_annotations(_karpathy_copy(tmp_path), tmp_path, split="val")


def _karpathy_copy(tmp_path: Path) -> Path:
    path = tmp_path / "dataset_coco.json"
    images = [{"filepath": "val2014", "filename": "a.jpg", "split": s, "cocoid": n, "sentences": [{"raw": "a cat"}]}
              for n, s in enumerate(["test", "train"])]  # fmt: skip
    path.write_text(json.dumps({"images": images}))
    return path


@needs_java
def test_missing_image_is_reported_with_its_id(coco: Path, hf_dir: Path, mm_adapter: Path, tmp_path: Path, capsys) -> None:
    images = shutil.copytree(coco / "val2014", tmp_path / "val2014")
    (images / file_name(184613)).unlink()
    rc, _, err = run_eval(capsys, "coco-caption", "--annotations", coco / "captions_val2014.json", "--images", images,
                          "--base", hf_dir, "--adapter", mm_adapter, "--out", tmp_path / "o", "--device", "cpu")  # fmt: skip
    assert rc == 2
    assert f"image 184613: image file not found: {images / file_name(184613)}" in err
    assert not (tmp_path / "o" / "predictions.jsonl").exists()


@needs_java
def test_a_text_only_model_is_refused(coco: Path, hf_dir: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = run_eval(capsys, "coco-caption", "--annotations", coco / "captions_val2014.json", "--images", coco / "val2014",
                          "--base", hf_dir, "--out", tmp_path, "--device", "cpu")  # fmt: skip
    assert rc == 2 and "coco-caption needs a multimodal adapter" in err


def test_without_java_the_command_stops_before_captioning(coco: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coco_caption.shutil, "which", lambda name: None)
    rc, _, err = run_eval(capsys, "coco-caption", "--annotations", coco / "captions_val2014.json", "--images", coco / "val2014",
                          "--base", tmp_path / "no-such-model", "--out", tmp_path / "o")  # fmt: skip
    assert rc == 2 and "needs Java" in err and "apt-get install default-jre-headless" in err
    assert not (tmp_path / "o").exists()
