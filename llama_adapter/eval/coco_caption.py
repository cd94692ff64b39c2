"""COCO Caption: the annotation files as distributed, the official caption prompt, and the scores COCO results are
reported with (pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE on request).

Three annotation formats are read:
- COCO's own, e.g. ``captions_val2014.json``: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}``, images under ``--images`` (e.g. ``val2014/``);
- Karpathy's split, ``dataset_coco.json``: ``{"images": [{"filepath", "filename", "cocoid", "split",
  "sentences": [{"raw"}]}]}``, one ``--split`` of it, images under ``--images``/``filepath``;
- the Karpathy test/val lists of BLIP and LAVIS, ``coco_karpathy_test.json``: ``[{"image": "val2014/...jpg",
  "caption": [...]}]``, images under ``--images``.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llama_adapter

from .runner import EvalError, Example, read_json, report

COCO_KEYS = '{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}'
KARPATHY_KEYS = '{"images": [{"filepath", "filename", "cocoid", "split", "sentences": [{"raw"}, ...]}, ...]}'
LIST_KEYS = '[{"image", "caption": [...]}, ...]'
# pycocoevalcap's names, and the paper's (CIDEr and BLEU@4 are the ones LLaMA-Adapter reports).
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
COLUMNS = {"Bleu_1": "BLEU@1", "Bleu_2": "BLEU@2", "Bleu_3": "BLEU@3", "Bleu_4": "BLEU@4", "METEOR": "METEOR",
           "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One image and its reference captions; ``id`` is COCO's image id (as a string)."""

    id: str
    image: Path
    references: tuple[str, ...]


def _wrong_format(path: Path, detail: str) -> EvalError:
    return EvalError(
        f"{path}: not a COCO captions annotation file ({detail}). Expected one of:\n"
        f"  COCO captions (captions_val2014.json): {COCO_KEYS}\n"
        f"  Karpathy split (dataset_coco.json): {KARPATHY_KEYS}\n"
        f"  Karpathy test list (coco_karpathy_test.json): {LIST_KEYS}"
    )


def read_annotations(path: str | Path, images: str | Path, split: str = "test") -> list[Item]:
    """The images to caption with their references, in file order; all bad entries are reported at once.

    ``split`` only applies to Karpathy's ``dataset_coco.json`` (test, val, train or restval).
    """
    path, images = Path(path), Path(images)
    data = read_json(path, "annotation file")
    if isinstance(data, list):
        return _read_list(path, data, images)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        found = ", ".join(map(repr, data)) if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise _wrong_format(path, f"found {found or 'an empty object'}")
    if "annotations" in data:
        return _read_coco(path, data, images)
    if data["images"] and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
        return _read_karpathy(path, data, images, split)
    raise _wrong_format(path, "it has 'images' but neither 'annotations' nor per-image 'sentences'")


def _read_coco(path: Path, data: dict, images: Path) -> list[Item]:
    files: dict[str, str] = {}
    errors = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            errors.append(f"images[{i}]: needs 'id' and 'file_name'")
        else:
            files[str(im["id"])] = im["file_name"]
    refs: dict[str, list[str]] = {k: [] for k in files}
    if not isinstance(data["annotations"], list):
        raise _wrong_format(path, "'annotations' is not a list")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            errors.append(f"annotations[{i}]: needs 'image_id' and a string 'caption'")
        elif str(ann["image_id"]) not in refs:
            errors.append(f"annotations[{i}]: image_id {ann['image_id']} is not in 'images'")
        else:
            refs[str(ann["image_id"])].append(ann["caption"])
    errors += [f"image {k}: has no caption in 'annotations'" for k, v in refs.items() if not v]
    if errors:
        raise EvalError(report(path, errors, f"bad entries; the COCO captions format is {COCO_KEYS}"))
    return [Item(k, images / files[k], tuple(v)) for k, v in refs.items()]


def _read_karpathy(path: Path, data: dict, images: Path, split: str) -> list[Item]:
    items, errors, splits = [], [], set()
    for i, im in enumerate(data["images"]):
        ok = isinstance(im, dict) and all(isinstance(im.get(k), str) for k in ("filepath", "filename", "split"))
        sentences = im.get("sentences") if isinstance(im, dict) else None
        if not ok or not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            errors.append(f"images[{i}]: needs 'filepath', 'filename', 'split' and 'sentences' with 'raw' text")
            continue
        splits.add(im["split"])
        if im["split"] != split:
            continue
        if not sentences:
            errors.append(f"images[{i}] ({im['filename']}): has no sentences")
            continue
        image_id = str(im.get("cocoid", im.get("imgid", i)))
        items.append(Item(image_id, images / im["filepath"] / im["filename"], tuple(s["raw"] for s in sentences)))
    if errors:
        raise EvalError(report(path, errors, f"bad entries; the Karpathy split format is {KARPATHY_KEYS}"))
    if not items:
        raise EvalError(f"{path} has no images in split {split!r}; its splits are {', '.join(sorted(splits))} (choose with --split)")
    return items


def _read_list(path: Path, data: list, images: Path) -> list[Item]:
    items, errors = [], []
    for i, entry in enumerate(data):
        caption = entry.get("caption") if isinstance(entry, dict) else None
        refs = [caption] if isinstance(caption, str) else caption
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(refs, list) or not refs:
            errors.append(f"[{i}]: needs 'image' (a path) and 'caption' (a reference or a list of them)")
            continue
        # COCO's image id is the number in the file name (COCO_val2014_000000391895.jpg -> 391895).
        digits = re.findall(r"\d+", Path(entry["image"]).stem)
        items.append(Item(str(int(digits[-1])) if digits else entry["image"], images / entry["image"], tuple(map(str, refs))))
    if errors:
        raise EvalError(report(path, errors, f"bad entries; the Karpathy test list format is {LIST_KEYS}"))
    if not items:
        raise _wrong_format(path, "an empty list")
    return items


def examples(items: list[Item]) -> list[Example]:
    prompt = llama_adapter.caption_prompt()
    return [Example(it.id, prompt, it.image) for it in items]


def prediction(item: Item, output: str) -> dict:
    return {"id": item.id, "image": item.image.name, "caption": output.strip()}


def coco_results(records: list[dict]) -> list[dict]:
    """The COCO results format (``[{"image_id", "caption"}]``) that the official tools and leaderboards take."""
    return [{"image_id": int(r["id"]) if r["id"].isdigit() else r["id"], "caption": r["caption"]} for r in records]


# ---------------------------------------------------------------- scores


def require_java() -> None:
    if shutil.which("java") is None:
        raise EvalError(
            "scoring captions needs Java (pycocoevalcap runs the PTB tokenizer and METEOR on it): install a JRE, "
            "e.g. apt-get install default-jre-headless, and rerun the same command (the captions are kept)"
        )


def scores(
    references: dict[str, list[str]] | dict[str, tuple[str, ...]], captions: dict[str, str], spice: bool = False
) -> dict[str, float]:
    """pycocoevalcap's scores of ``captions`` against ``references`` (both keyed by image id), as COCO's own
    evaluation computes them: PTB-tokenized, corpus-level, on a 0-1 scale (CIDEr up to 10)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    if set(references) != set(captions):
        raise EvalError(f"captions and references cover different images ({len(captions)} vs {len(references)})")
    tokenizer = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its progress; stdout is for our table
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
        res = tokenizer.tokenize({k: [{"caption": captions[k]}] for k in references})
    # The PTB tokenizer drops punctuation-only captions to nothing; the scorers need one (possibly empty) string.
    res = {k: v or [""] for k, v in res.items()}
    scorers: list[tuple[object, tuple[str, ...]]] = [
        (Bleu(4), METRICS[:4]),
        (_meteor(), ("METEOR",)),
        (Rouge(), ("ROUGE_L",)),
        (Cider(), ("CIDEr",)),
    ]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), ("SPICE",)))
    out: dict[str, float] = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):
            score, _ = scorer.compute_score(gts, res)
        values = score if isinstance(score, list) else [score]
        out |= {n: float(v) for n, v in zip(names, values, strict=True)}
    return out


@cache
def _meteor() -> object:
    """One METEOR process per Python process: starting it loads its paraphrase tables (about 10 s)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def table(metrics: dict[str, float], name: str) -> str:
    """One row as captioning papers print it: scores x 100."""
    cols = [c for c in COLUMNS if c in metrics]
    cells = [f"{100 * metrics[c]:.1f}" for c in cols]
    return "\n".join(
        [f"| Model | {' | '.join(COLUMNS[c] for c in cols)} |", "| --- |" + " ---: |" * len(cols), f"| {name} | {' | '.join(cells)} |"]
    )
