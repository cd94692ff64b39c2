"""Image-text training end to end on a tiny LLaMA and a tiny CLIP: learning from the image, phases, output, resume, data checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import llama_adapter
from llama_adapter import ClipSpec, caption_prompt, format_prompt, read_adapter
from llama_adapter.inputs.prompts import format_chat
from llama_adapter.model.visual import build_clip
from llama_adapter.roles import trains_in_phase
from llama_adapter.train import main, parse_args, summed_nll, train
from llama_adapter.train.data import DataError, encode_records
from llama_adapter.train.image_data import image_text_record, read_image_text_records
from llama_adapter.train.visual import ImageFeeder

from .conftest import write_jsonl
from .test_multimodal import write_clip_dir

# The caption names the picture's colour (in words the tiny tokenizer knows): only the image can tell which.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
CAPTIONS = {"red": "the water.", "green": "one oil.", "blue": "a long day."}
SHAPE = ("--adapter-len", 10, "--adapter-layer", 4, "--visual-dim", 32, "--visual-depth", 1, "--visual-heads", 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def colour_picture(colour: str, rng: np.random.Generator) -> Image.Image:
    width, height = rng.integers(120, 300, 2)
    pixels = np.array(COLOURS[colour]) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def caption_data(root: Path, split: str, n: int, seed: int) -> Path:
    """``n`` noisy single-colour pictures of varied sizes under ``root/split`` and their caption records."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    records = []
    for i in range(n):
        colour = sorted(COLOURS)[i % 3]
        colour_picture(colour, rng).save(root / split / f"{i}.png")
        records.append({"image": f"{split}/{i}.png", "caption": CAPTIONS[colour]})
    return write_jsonl(root / f"{split}.jsonl", records)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {
        "root": root,
        "train": caption_data(root, "train", 24, 0),
        "val": caption_data(root, "val", 6, 1),
        "clip": write_clip_dir(tmp_path_factory.mktemp("clip")),
    }


def cli(hf_dir: Path, data: dict[str, Path], out: Path, phase: str, *extra: object, train_file: Path | None = None) -> list[str]:
    args = ["--base", hf_dir, "--data", train_file or data["train"], "--image-root", data["root"], "--phase", phase,
            "--clip", f"local-dir:{data['clip']}", "--out", out, "--max-seq-len", 256, "--device", "cpu", *extra]  # fmt: skip
    return [str(a) for a in args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def clip_spec(data: dict[str, Path]) -> ClipSpec:
    return ClipSpec(f"local-dir:{data['clip']}", None)


# ---------------------------------------------------------------- pretrain: learning from the image


@pytest.fixture(scope="module")
def pretrained(hf_dir: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    args = cli(hf_dir, data, out, "pretrain", *SHAPE, "--val-data", data["val"], "--batch-size", 4, "--epochs", 20,
               "--lr", 0.03, "--warmup-epochs", 0.5, "--log-every", 6)  # fmt: skip
    return out, train(parse_args(args))


def val_nll(pipe, data: dict[str, Path], shift: int) -> float:
    """Mean NLL of the held-out captions given their own images (shift 0) or other colours' (shift 1, 2)."""
    records = read_image_text_records(data["val"], data["root"])
    examples = encode_records(records, pipe.tokenizer, 256).examples
    with torch.no_grad():
        visual = pipe.visual.encode([e.image for e in examples]).roll(shift, 0)
        total = summed_nll(pipe.model, examples, pipe.tokenizer.pad_id, torch.device("cpu"), False, visual)
    return total.item() / sum(e.n_targets for e in examples)


def test_held_out_captions_are_learned_from_the_image(pretrained, data: dict[str, Path]) -> None:
    out, pipe = pretrained
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 21
    assert evals[-1] < 0.1 * evals[0], evals
    # The captions differ only by colour: with another colour's picture the learned caption is wrong.
    right = val_nll(pipe, data, 0)
    assert right == pytest.approx(evals[-1], rel=1e-4)
    assert min(val_nll(pipe, data, 1), val_nll(pipe, data, 2)) > right + 1.0


def test_pretrain_trains_only_the_visual_adapter_prompts_and_gates(pretrained, pipe, hf_dir: Path, data: dict[str, Path]) -> None:
    _, trained = pretrained
    cfg = trained.model.adapter_config
    assert (cfg.bias, cfg.norm, cfg.lora_rank) == (False, False, 0)  # no biases at all, as the official pretrain model
    adapter = trained.adapter_tensors()
    assert all(trains_in_phase(n, "pretrain") for n in adapter)
    base = pipe.model.state_dict()
    for name, t in trained.model.state_dict().items():
        if name not in adapter:
            assert torch.equal(t, base[name]), name
    clip, _ = build_clip(clip_spec(data))
    for name, t in clip.state_dict().items():
        assert torch.equal(trained.visual.clip.state_dict()[name], t), name
    torch.manual_seed(0)  # the run's --seed: the same fresh adapter
    fresh = llama_adapter.load(hf_dir, cfg, device="cpu", dtype="fp32", clip=clip_spec(data)).adapter_tensors()
    for name, t in adapter.items():
        assert not torch.equal(t, fresh[name]), f"{name} did not train"


def test_output_loads_by_its_clip_and_captions(pretrained, hf_dir: Path, data: dict[str, Path]) -> None:
    out, trained = pretrained
    meta = read_adapter(out / "adapter.safetensors").metadata
    assert (meta["format_version"], meta["bias"], meta["norm"], meta["lora_rank"]) == ("2", "false", "false", "0")
    visual = json.loads(meta["visual"])
    assert (visual["clip_model"], visual["clip_dim"], visual["embed_dim"], visual["depth"]) == (f"local-dir:{data['clip']}", 16, 32, 1)
    loaded = llama_adapter.load(hf_dir, out, device="cpu", dtype="fp32")  # the CLIP the metadata names
    for name, t in trained.adapter_tensors().items():
        assert torch.equal(loaded.adapter_tensors()[name], t), name
    rng = np.random.default_rng(7)
    for colour, caption in CAPTIONS.items():
        image = colour_picture(colour, rng)
        assert "".join(loaded.stream(caption_prompt(), image=image, max_new_tokens=12, temperature=0)) == caption


# ---------------------------------------------------------------- finetune from the pretrain output


@pytest.fixture(scope="module")
def finetuned(pretrained, hf_dir: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    pretrain_out, _ = pretrained
    root = data["root"]
    records = []
    for i in range(12):
        colour = sorted(COLOURS)[i % 3]
        question = {"from": "human", "value": "<image>\nwhat is in the water?"}
        records.append({"image": f"train/{i}.png", "conversations": [question, {"from": "gpt", "value": f"it is {colour}."}]})
        records.append({"image": f"train/{i}.png", "instruction": "tell the day", "input": "one word", "output": "the water."})
    records.append({"instruction": "what is one?", "output": "one is a number."})  # text-only, no visual prompt
    out = tmp_path_factory.mktemp("finetune") / "run"
    args = cli(hf_dir, data, out, "finetune", "--init-adapter", pretrain_out / "adapter.safetensors", "--lora-rank", 2,
               "--batch-size", 5, "--epochs", 2, "--lr", 0.01, "--warmup-epochs", 0,
               train_file=write_jsonl(root / "instruct.jsonl", records))  # fmt: skip
    return out, train(parse_args(args))


def test_finetune_trains_only_biases_norms_and_lora(finetuned, pretrained, pipe, data: dict[str, Path]) -> None:
    out, tuned = finetuned
    start = read_adapter(pretrained[0] / "adapter.safetensors").tensors
    cfg = tuned.model.adapter_config
    assert (cfg.bias, cfg.norm, cfg.lora_rank, cfg.adapter_len, cfg.adapter_layer) == (True, True, 2, 10, 4)
    adapter = tuned.adapter_tensors()
    trained = {n for n in adapter if trains_in_phase(n, "finetune")}
    assert {n.rsplit(".", 2)[-2] for n in trained} >= {"wq", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm", "lora_wq_l1"}
    for name, t in adapter.items():
        if name in trained:
            assert not torch.equal(t, pipe.model.state_dict().get(name, torch.zeros_like(t))), f"{name} did not train"
        elif name in start:  # prompts, gates, visual adapter: as pretrained
            assert torch.equal(t, start[name]), name
        else:
            assert name.endswith(".new_gate") and torch.equal(t, torch.ones_like(t)), name
    base = pipe.model.state_dict()
    for name, t in tuned.model.state_dict().items():
        if name not in adapter:
            assert torch.equal(t, base[name]), name
    clip, _ = build_clip(clip_spec(data))
    for name, t in clip.state_dict().items():
        assert torch.equal(tuned.visual.clip.state_dict()[name], t), name
    assert read_adapter(out / "adapter.safetensors").metadata["lora_rank"] == "2"


def test_finetune_starts_from_an_official_v2_file(hf_dir: Path, pipe, data: dict[str, Path], tmp_path: Path) -> None:
    """An official V2 checkpoint (visual adapter, prompts, gates, biases, norms) is a valid --init-adapter for finetune."""
    from .test_multimodal import official_v2_file

    ckpt = official_v2_file(tmp_path / "v2.pth", pipe.model.args, lora=False)["model"]
    out = tmp_path / "run"
    args = cli(hf_dir, data, out, "finetune", "--init-adapter", tmp_path / "v2.pth", "--batch-size", 4, "--lr", 0.01, "--stop-after", 1)
    tuned = train(parse_args(args))
    adapter = tuned.adapter_tensors()
    assert (tuned.model.adapter_config.adapter_len, tuned.model.adapter_config.adapter_layer) == (4, 3)
    for key, value in ckpt.items():
        name = key.removeprefix("llama.")
        if name in adapter:
            assert torch.equal(adapter[name], value) != trains_in_phase(name, "finetune"), name


# ---------------------------------------------------------------- resume


def test_interrupted_and_resumed_multimodal_run_equals_uninterrupted(hf_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    common = (*SHAPE, "--batch-size", 4, "--accum-steps", 2, "--epochs", 2, "--lr", 0.03, "--warmup-epochs", 0.5, "--log-every", 1)
    assert main(cli(hf_dir, data, tmp_path / "whole", "pretrain", *common)) == 0
    assert main(cli(hf_dir, data, tmp_path / "split", "pretrain", *common, "--stop-after", 2)) == 0
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert "visual_blocks.0.attn.qkv.weight" in state["adapter"] and state["position"]["step"] == 2
    assert main(cli(hf_dir, data, tmp_path / "split", "pretrain", *common, "--resume")) == 0
    whole, split = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(tmp_path / "split" / "adapter.safetensors")
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name


def test_training_crops_are_seeded_per_example_and_epoch(pretrained, data: dict[str, Path]) -> None:
    _, pipe = pretrained
    feeder = ImageFeeder(pipe.visual, seed=0)
    examples = encode_records(read_image_text_records(data["val"], data["root"])[:2], pipe.tokenizer, 256).examples
    with torch.no_grad():
        first = feeder.train_prompts(examples, [0, 1], epoch=0)
        assert torch.equal(first, feeder.train_prompts(examples, [0, 1], epoch=0))
        assert not torch.equal(first, feeder.train_prompts(examples, [0, 1], epoch=1))
        # Evaluation sees CLIP's plain transform, as inference does.
        assert torch.equal(feeder.eval_prompts(examples), pipe.visual.encode([e.image for e in examples]))


# ---------------------------------------------------------------- data and flags


def test_bad_images_are_named_by_record_before_any_model_is_loaded(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    root = data["root"]
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.jpg").write_text("this is text, not a picture")
    lines = [
        {"image": "train/0.png", "caption": "the water."},
        {"image": "missing.png", "caption": "the water."},
        {"image": "corrupt.png", "caption": "one oil."},
        {"image": "notes.jpg", "instruction": "what is it?", "output": "a long day."},
        {"image": "train/1.png"},
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    args = ["--base", str(tmp_path / "no-such-base"), "--data", str(bad), "--image-root", str(root), "--phase", "pretrain",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "4 bad record(s)" in err
    assert "line 2: image 'missing.png': image file not found" in err
    assert "line 3: image 'corrupt.png': corrupt.png is not an image PIL can read" in err
    assert "line 4: image 'notes.jpg': notes.jpg is not an image PIL can read" in err
    assert "line 5: needs exactly one of 'caption', 'instruction' (with 'output') or 'conversations'; found none of them" in err
    assert "line 1" not in err and "no-such-base" not in err
    assert not (tmp_path / "out").exists()


def test_records_split_into_prompt_and_response() -> None:
    caption = image_text_record({"image": "a.jpg", "caption": "a red bus."})
    assert (caption.prompt(), caption.response(), caption.image) == (caption_prompt(), "a red bus.", Path("a.jpg"))
    instruction = image_text_record({"image": "a.jpg", "instruction": "count", "input": "the buses", "output": "two"})
    assert (instruction.prompt(), instruction.response()) == (format_prompt("count", "the buses"), "two")
    turns = [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A bus."},
        {"from": "human", "value": "Which colour?\n<image>"},
        {"from": "gpt", "value": "Red."},
    ]
    chat = image_text_record({"image": "a.jpg", "conversations": turns})
    assert chat.prompt() == format_chat([("What is this?", "A bus.")], "Which colour?") and chat.response() == "Red."
    single = image_text_record({"image": "a.jpg", "conversations": turns[:2]})
    assert (single.prompt(), single.response()) == (format_prompt("What is this?"), "A bus.")
    assert image_text_record({"instruction": "say hi", "output": "hi"}).image is None  # text-only examples mix in


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"caption": "no picture"}, "a caption record needs an 'image'"),
        ({"image": "a.jpg", "caption": "x", "instruction": "y", "output": "z"}, "found 'caption' and 'instruction'"),
        ({"image": "", "caption": "x"}, "field 'image' must be a non-empty path string"),
        ({"image": "a.jpg", "conversations": [{"from": "gpt", "value": "hi"}]}, "turn 0 is from 'gpt', expected 'human'"),
        ({"image": "a.jpg", "conversations": [{"from": "human", "value": "hi"}]}, "must end with a 'gpt' turn"),
        ({"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, "turn 0 is empty"),
        ({"image": "a.jpg", "conversations": "hi"}, "'conversations' must be a non-empty list"),
    ],
)
def test_malformed_records_say_what_is_wrong(record: dict, message: str) -> None:
    from llama_adapter.train.data import RecordError

    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")):
        image_text_record(record)


def test_text_training_refuses_image_records(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "instruction": "x", "output": "y"}])
    assert main(["--base", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "line 1: has an 'image': image-text data is trained with --image-root DIR and --phase" in capsys.readouterr().err
    with pytest.raises(DataError, match="is not a directory"):
        read_image_text_records(data, tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--phase", "pretrain"], "needs both --image-root DIR and --phase"),
        (["--clip", "ViT-B-32"], "--clip only apply to image-text training"),
        (["--image-root", ".", "--phase", "pretrain", "--lora-rank", "4"], "--lora-rank is for --phase finetune"),
        (["--image-root", ".", "--phase", "finetune", "--init-adapter", "a", "--adapter-len", "4"], "shape comes from --init-adapter"),
    ],
)
def test_flags_that_do_not_go_together_are_refused(extra: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--base", "b", "--data", "d", "--out", "o", *extra])
    assert message in capsys.readouterr().err


def test_phase_defaults_are_the_official_recipes() -> None:
    common = ["--base", "b", "--data", "d", "--out", "o", "--image-root", "."]
    pre = parse_args([*common, "--phase", "pretrain"])
    assert (pre.blr, pre.weight_decay, pre.epochs, pre.warmup_epochs, pre.adapter_len, pre.adapter_layer) == (1e-4, 0.05, 3, 0.1, 10, 31)
    assert (pre.visual_dim, pre.visual_depth, pre.visual_heads) == (768, 8, 16)
    fine = parse_args([*common, "--phase", "finetune", "--init-adapter", "x"])
    assert (fine.blr, fine.weight_decay, fine.epochs, fine.warmup_epochs, fine.adapter_len) == (1e-3, 0.02, 4, 1.0, None)
