"""The image classification command end to end on a tiny random timm ViT: zero start, learning, frozen backbone,
adapter files, exact resume, torchrun, and bad data reported before compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from llama_adapter.backbones import BackboneError, adapter_parameters, add_vit_adapters, read_backbone_adapter
from llama_adapter.backbones.adapter_file import save_backbone_adapter
from llama_adapter.backbones.classify import load_classifier, main, parse_args, train
from llama_adapter.backbones.image_folder import read_labelled_images
from llama_adapter.backbones.tiny import COLOURS, colour_images, save_tiny_vit

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_images(tmp_path_factory.mktemp("colours"), {"train": 8, "val": 4})


def cli(vit: str, data: Path, out: Path, *extra: object) -> list[str]:
    return [str(a) for a in ("--model", vit, "--data", data, "--out", out, "--adapter-len", 4, "--device", "cpu", *extra)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def val_images(data: Path) -> tuple[list[Image.Image], list[int]]:
    classes = sorted(COLOURS)
    items = sorted((p, classes.index(p.parent.name)) for p in (data / "val").glob("*/*.png"))
    return [Image.open(p).convert("RGB") for p, _ in items], [label for _, label in items]


@pytest.fixture(scope="module")
def trained(vit: str, images: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("classify") / "run"
    args = parse_args(cli(vit, images, out, "--epochs", 6, "--batch-size", 8, "--lr", 0.02, "--warmup-epochs", 1, "--log-every", 1))
    return out, train(args)


def test_step0_scores_are_the_unadapted_backbones(trained, vit: str, images: Path) -> None:
    out, _ = trained
    first = metrics(out)[0]
    assert first["step"] == 0
    # The same backbone and seeded head without any adapter, preprocessed by timm from the model's own config.
    torch.manual_seed(0)
    plain = timm.create_model(vit, pretrained=True, num_classes=3).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(plain), is_training=False)
    pictures, labels = val_images(images)
    with torch.no_grad():
        logits = plain(torch.stack([transform(p) for p in pictures]))
    target = torch.tensor(labels)
    assert first["val_loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    assert first["accuracy"] == pytest.approx(100 * (logits.argmax(-1) == target).float().mean().item())


def test_held_out_accuracy_rises_well_above_chance(trained) -> None:
    out, _ = trained
    evals = [m for m in metrics(out) if "accuracy" in m]
    assert [m["step"] for m in evals] == [0, 3, 6, 9, 12, 15, 18]  # before training and after each of 6 epochs
    assert evals[-1]["accuracy"] >= 90  # chance: 33%
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    steps = [m for m in metrics(out) if "loss" in m]
    assert all(m["examples_per_s"] > 0 for m in steps) and steps[-1]["loss"] < steps[0]["loss"]


def test_only_prompts_gates_and_head_changed(trained, vit: str) -> None:
    _, model = trained
    torch.manual_seed(0)  # the run's --seed: the same fresh head and prompts
    fresh = timm.create_model(vit, pretrained=True, num_classes=3)
    add_vit_adapters(fresh, adapter_len=4, adapter_layer=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) | {"head.weight", "head.bias"}
    before, after = fresh.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]) != (name in trainable), name
    assert all(model.blocks[i].attn.adapter.gate.abs().min() > 0 for i in range(4))


def test_adapter_file_loads_onto_the_named_backbone(trained, vit: str, images: Path) -> None:
    out, model = trained
    tensors, info = read_backbone_adapter(out / "adapter.safetensors", task="classify")
    assert (info.library, info.backbone, info.task) == ("timm", vit, "classify")
    assert (info.adapter_len, info.adapter_layer, info.gate_activation) == (4, 4, "tanh")
    assert info.shape == {"depth": 4, "dim": 32, "heads": 4}
    assert info.task_config == {"classes": ["blue", "green", "red"]}
    assert info.trainable_parameters == sum(t.numel() for t in tensors.values()) == 4 * (4 * 32 + 4) + 3 * 32 + 3
    assert info.training_args["lr"] == 0.02 and info.training_args["effective_batch"] == 8
    classifier = load_classifier(out)  # builds the backbone from the name in the file
    pictures, labels = val_images(images)
    names = classifier.predict(pictures)
    assert sum(classifier.classes.index(n) == label for n, label in zip(names, labels, strict=True)) >= 0.9 * len(labels)
    transform = classifier.transform
    with torch.no_grad():
        expected = model.eval()(torch.stack([transform(p) for p in pictures])).argmax(-1).tolist()
    assert names == [classifier.classes[i] for i in expected]


def test_adapter_file_mismatches_are_named(trained, tmp_path: Path) -> None:
    out, _ = trained
    tensors, info = read_backbone_adapter(out)
    wider = save_tiny_vit(tmp_path / "wider", embed_dim=48)
    with pytest.raises(BackboneError, match=r"was trained on .* \(4 layers, width 32, 4 heads\); this backbone has 4 layers, width 48"):
        load_classifier(out, model=wider)
    del tensors["blocks.3.attn.adapter.gate"]
    save_backbone_adapter(tmp_path / "partial.safetensors", tensors, info)
    with pytest.raises(BackboneError, match="missing blocks.3.attn.adapter.gate"):
        load_classifier(tmp_path / "partial.safetensors")
    with pytest.raises(BackboneError, match="is a 'classify' adapter, not a 'squad' one"):
        read_backbone_adapter(out, task="squad")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="is not a safetensors file"):
        read_backbone_adapter(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------- resume and torchrun


def test_interrupted_and_resumed_run_equals_uninterrupted(vit: str, images: Path, tmp_path: Path, capsys) -> None:
    # 24 images in batches of 5 with 2 accumulation steps: 5 micro-batches, the last step of an epoch has one.
    common = ("--batch-size", 5, "--accum-steps", 2, "--epochs", 2, "--blr", 2, "--warmup-epochs", 0.5, "--log-every", 1)
    assert main(cli(vit, images, tmp_path / "whole", *common)) == 0
    assert main(cli(vit, images, tmp_path / "split", *common, "--stop-after", 4)) == 0
    assert not (tmp_path / "split" / "adapter.safetensors").exists()
    assert main(cli(vit, images, tmp_path / "split", *common)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(cli(vit, images, tmp_path / "split", *common, "--resume")) == 0
    assert "resuming at step 4 of 6 (epoch 2, batch 2)" in capsys.readouterr().out
    whole, split = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(tmp_path / "split" / "adapter.safetensors")
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name

    def no_speed(out: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "examples_per_s"} for m in metrics(out)]

    assert no_speed(tmp_path / "whole") == no_speed(tmp_path / "split")
    changed = cli(vit, images, tmp_path / "split", *common, "--resume")
    changed[changed.index("--blr") + 1] = "1"
    assert main(changed) == 2
    assert "lr: 0.078125 -> 0.0390625" in capsys.readouterr().err


def test_two_process_torchrun_matches_one_process(vit: str, images: Path, tmp_path: Path) -> None:
    common = ("--epochs", 2, "--lr", 0.02, "--warmup-epochs", 0.5)
    assert main(cli(vit, images, tmp_path / "one", "--batch-size", 6, *common)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "llama_adapter.backbones.classify", *cli(vit, images, tmp_path / "two", "--batch-size", 3, *common)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("trainable:") == 1  # only rank 0 prints
    one, two = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-5)
    accuracy = [m["accuracy"] for m in metrics(tmp_path / "one") if "accuracy" in m]
    assert accuracy == [m["accuracy"] for m in metrics(tmp_path / "two") if "accuracy" in m]


# ---------------------------------------------------------------- bad data


def copy_images(images: Path, data: Path) -> Path:
    for split in ("train", "val"):
        for d in (images / split).iterdir():
            (data / split / d.name).mkdir(parents=True)
            for f in d.iterdir():
                (data / split / d.name / f.name).write_bytes(f.read_bytes())
    return data


def test_bad_image_folders_are_reported_by_file_before_any_model_loads(images: Path, tmp_path: Path, capsys) -> None:
    data = copy_images(images, tmp_path / "data")
    (data / "train" / "purple").mkdir()  # empty class folder
    (data / "train" / "purple" / "notes.txt").write_text("not an image")
    (data / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (data / "val" / "orange").mkdir()
    Image.new("RGB", (8, 8), (255, 128, 0)).save(data / "val" / "orange" / "0.png")
    # The model does not exist: the data errors must come first.
    code = main(["--model", f"local-dir:{tmp_path / 'no-model'}", "--data", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 problems in the data" in err
    assert f"{data / 'train' / 'purple'}: empty class folder" in err
    assert "train/red/broken.jpg: unreadable image" in err
    # The classes are the training folders that hold images (the empty one is not a class).
    assert "val/orange/0.png: label 'orange' has no training images (training classes: blue, green, red)" in err
    assert "no-model" not in err
    assert not (tmp_path / "out").exists()


def test_pixels_corrupt_past_the_header_stop_training_naming_the_file(vit: str, images: Path, tmp_path: Path, capsys) -> None:
    data = copy_images(images, tmp_path / "data")
    whole = (data / "train" / "red" / "0.png").read_bytes()
    (data / "train" / "red" / "truncated.png").write_bytes(whole[: len(whole) // 2])  # a valid header, half the pixels
    # Decoded in a loader worker: the message must still arrive as ours, without a traceback.
    assert main(cli(vit, data, tmp_path / "out", "--workers", 1, "--batch-size", 25)) == 2
    err = capsys.readouterr().err
    assert "train/red/truncated.png: cannot decode image" in err and "then --resume" in err
    assert "Traceback" not in err


def test_csv_data_is_read_relative_to_the_file_and_checked_by_line(images: Path, tmp_path: Path) -> None:
    rows = ["path,label"] + [f"{p.relative_to(images)},{p.parent.name}" for p in sorted((images / "train").glob("*/*.png"))]
    (images / "train.csv").write_text("\n".join(rows) + "\n")
    (images / "val.csv").write_text("val/red/0.png,red\nval/red/missing.png,red\nval/red/1.png\n,blue\n")
    with pytest.raises(ValueError) as e:
        read_labelled_images(images / "train.csv", images / "val.csv")
    message = str(e.value)
    assert "val.csv line 2: image file not found" in message
    assert "val.csv line 3: expected two columns path,label" in message and "val.csv line 4" in message
    (images / "val.csv").write_text("val/red/0.png,red\nval/blue/1.png,blue\n")
    train, val, classes = read_labelled_images(images / "train.csv", images / "val.csv")
    assert classes == ["blue", "green", "red"] and len(train) == 24
    assert [(i.path, i.label) for i in val] == [(images / "val/red/0.png", "red"), (images / "val/blue/1.png", "blue")]
