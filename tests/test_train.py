"""The training script end to end on a tiny model: zero-init, frozen base, learning, resume, DDP, data checks."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import llama_adapter
from llama_adapter import AdapterConfig, read_adapter
from llama_adapter.train import lr_factor, main, parse_args, summed_nll, train
from llama_adapter.train.data import (
    IGNORE_INDEX,
    InstructionRecord,
    LengthGroupedBatches,
    collate,
    encode_records,
    padding_efficiency,
    read_records,
    shard,
)

from .conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
FILLER = "the a of to in is it that was for on are as with his they at be this from have or one had by".split()
# A synthetic instruction task: the instruction names a topic somewhere among filler words; the response is the topic's sentence.
ANSWERS = {
    "water": "the water is long and people come to find it.",
    "oil": "oil was made by many people at first.",
    "day": "each day they go down to look at the time.",
    "word": "write one word, then call it a number.",
}


def task_records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        topic = rng.choice(sorted(ANSWERS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), topic)
        records.append({"instruction": " ".join(words), "output": ANSWERS[topic]})
    return records


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("task")
    return {"train": write_jsonl(d / "train.jsonl", task_records(32, 0)), "val": write_jsonl(d / "val.jsonl", task_records(12, 1))}


def cli(hf_dir: Path, data: Path, out: Path, *extra: object) -> list[str]:
    args = ["--base", hf_dir, "--data", data, "--out", out, "--adapter-len", 6, "--adapter-layer", 2, "--max-seq-len", 256, *extra]
    return [str(a) for a in args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def base_nll(pipe, records: list, max_seq_len: int = 256) -> float:
    """The base model's mean NLL over the response tokens, from its plain forward."""
    examples = encode_records(records, pipe.tokenizer, max_seq_len).examples
    inputs, targets = collate(examples, pipe.tokenizer.pad_id)
    with torch.no_grad():
        logits = pipe.model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).item()


# ---------------------------------------------------------------- a short run: zero-init and the frozen base


@pytest.fixture(scope="module")
def short_run(hf_dir: Path, task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("short") / "run"
    # One batch holds all 32 examples, so step 1's loss is over the whole training set.
    args = parse_args(cli(hf_dir, task["train"], out, "--val-data", task["val"], "--batch-size", 32, "--epochs", 4,
                          "--lr", 0.05, "--warmup-epochs", 0, "--log-every", 1, "--stop-after", 3))  # fmt: skip
    return out, train(args)


def test_step0_loss_equals_base_model_loss(short_run, pipe, task: dict[str, Path]) -> None:
    out, _ = short_run
    lines = metrics(out)
    assert lines[0]["step"] == 0
    assert lines[0]["eval_loss"] == pytest.approx(base_nll(pipe, read_records(task["val"])), rel=1e-5)
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3]
    # The first training step's loss is computed before any update: the zero gates change nothing.
    assert steps[0]["loss"] == pytest.approx(base_nll(pipe, read_records(task["train"])), rel=1e-5)
    assert steps[2]["loss"] < steps[0]["loss"]


def test_only_adapter_parameters_change(short_run, pipe, hf_dir: Path) -> None:
    _, trained = short_run
    model = trained.model
    adapter = model.adapter_parameters()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter)
    base = pipe.model.state_dict()
    for name, t in model.state_dict().items():
        if name not in adapter:
            assert torch.equal(t, base[name]), name
    torch.manual_seed(0)  # the run's --seed: the same fresh adapter
    fresh = llama_adapter.load(hf_dir, AdapterConfig(6, 2), device="cpu", dtype="fp32").model.adapter_parameters()
    for name, p in adapter.items():
        assert p.dtype == torch.float32
        assert not torch.equal(p, fresh[name]), f"{name} did not train"
    assert all(adapter[f"layers.{i}.attention.gate"].abs().min() > 0 for i in (2, 3))


def test_checkpoint_loads_with_weights_only(short_run) -> None:
    out, trained = short_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["position"]["step"] == 3
    assert set(state["adapter"]) == set(trained.model.adapter_parameters())
    assert set(state) >= {"optimizer", "scheduler", "rng", "trajectory"}
    assert not (out / "adapter.safetensors").exists()  # stopped early: no final adapter yet


# ---------------------------------------------------------------- learning, outputs


@pytest.fixture(scope="module")
def trained_run(hf_dir: Path, task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("learn") / "run"
    args = cli(hf_dir, task["train"], out, "--val-data", task["val"], "--batch-size", 8, "--epochs", 16, "--lr", 0.3,
               "--warmup-epochs", 0.5, "--log-every", 2)  # fmt: skip
    args[args.index("--adapter-len") + 1], args[args.index("--adapter-layer") + 1] = "30", "4"
    return out, train(parse_args(args))


def test_held_out_response_nll_halves(trained_run) -> None:
    out, _ = trained_run
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 17  # before training and after each epoch
    assert evals[-1] <= 0.5 * evals[0], evals


def test_metrics_lines_have_loss_lr_and_throughput(trained_run) -> None:
    out, _ = trained_run
    steps = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(2, 65, 2))
    assert all(m["tokens_per_s"] > 0 and math.isfinite(m["loss"]) for m in steps)
    # Linear warmup over 2 steps (half an epoch of 4), then the cosine decays towards 0.
    lrs = [m["lr"] for m in steps]
    assert lrs[0] == pytest.approx(0.3)
    assert all(a >= b for a, b in pairwise(lrs)) and lrs[-1] < 0.001


def test_output_loads_and_generates(trained_run, hf_dir: Path) -> None:
    out, trained = trained_run
    adapter = read_adapter(out / "adapter.safetensors")
    assert adapter.config == AdapterConfig(adapter_len=30, adapter_layer=4, gate_activation="tanh")
    assert adapter.base_dims == trained.model.args.summary()
    training_args = json.loads(adapter.metadata["training_args"])
    assert training_args["epochs"] == 16 and training_args["lr"] == 0.3 and training_args["effective_batch"] == 8
    loaded = llama_adapter.load(hf_dir, out, device="cpu", dtype="fp32")
    for name, p in trained.model.adapter_parameters().items():
        assert torch.equal(loaded.model.state_dict()[name], p.detach())
    prompt = llama_adapter.format_prompt("is it the oil of one")
    assert loaded.generate([prompt], max_new_tokens=12, temperature=0) == trained.generate([prompt], max_new_tokens=12, temperature=0)
    assert "".join(loaded.stream(prompt, max_new_tokens=12, temperature=0))


# ---------------------------------------------------------------- resume and data parallelism


def test_interrupted_and_resumed_run_equals_uninterrupted(hf_dir: Path, task: dict[str, Path], tmp_path: Path, capsys) -> None:
    # 32 examples in batches of 3 with 2 accumulation steps: 11 micro-batches, the last step of an epoch has one.
    common = ("--batch-size", 3, "--accum-steps", 2, "--epochs", 2, "--blr", 2, "--warmup-epochs", 0.5, "--log-every", 1)
    assert main(cli(hf_dir, task["train"], tmp_path / "whole", *common)) == 0
    assert "6 effective; lr 0.04688 (blr 2 x 6 / 256)" in capsys.readouterr().out
    assert main(cli(hf_dir, task["train"], tmp_path / "split", *common, "--stop-after", 4)) == 0
    assert not (tmp_path / "split" / "adapter.safetensors").exists()
    assert main(cli(hf_dir, task["train"], tmp_path / "split", *common)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(cli(hf_dir, task["train"], tmp_path / "split", *common, "--resume")) == 0
    whole, split = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(tmp_path / "split" / "adapter.safetensors")
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    drop_speed = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics(tmp_path / "whole")]
    assert drop_speed == [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics(tmp_path / "split")]
    changed = cli(hf_dir, task["train"], tmp_path / "split", *common, "--resume")
    changed[changed.index("--blr") + 1] = "1"
    assert main(changed) == 2
    assert "lr: 0.046875 -> 0.0234375" in capsys.readouterr().err


def test_two_process_torchrun_matches_one_process(hf_dir: Path, task: dict[str, Path], tmp_path: Path) -> None:
    # 29 examples in global batches of 4: the last batch has one example, so one process gets none.
    data = write_jsonl(tmp_path / "train.jsonl", task_records(29, 0))
    common = ("--epochs", 2, "--lr", 0.05, "--warmup-epochs", 0.5, "--device", "cpu")
    assert main(cli(hf_dir, data, tmp_path / "one", "--batch-size", 4, *common)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llama_adapter.train",
           *cli(hf_dir, data, tmp_path / "two", "--batch-size", 2, *common)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("padding efficiency") == 1  # only rank 0 prints
    one, two = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), name
    assert [m["step"] for m in metrics(tmp_path / "one")] == [m["step"] for m in metrics(tmp_path / "two")]


def test_non_finite_loss_stops_and_keeps_checkpoint(hf_dir: Path, task: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(cli(hf_dir, task["train"], out, "--batch-size", 8, "--lr", 1e30, "--warmup-epochs", 0, "--save-every", 1))
    err = capsys.readouterr().err
    assert code == 2
    assert "the loss is nan at step 3" in err and "checkpoint.pt (step 2), is kept" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"] == 2
    assert not (out / "adapter.safetensors").exists()


# ---------------------------------------------------------------- data


def test_bad_records_are_named_before_any_model_is_loaded(tmp_path: Path, capsys) -> None:
    lines = [
        json.dumps({"instruction": "say hi", "output": "hi"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"instruction": "no output"}),
        "",
        json.dumps({"instruction": "x", "input": 3, "output": "y"}),
        '{"instruction": "broken", ',
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # The base does not exist: the data error must come first, before anything is loaded.
    assert main(["--base", str(tmp_path / "no-such-base"), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 6: invalid JSON" in err
    data.write_text("\n".join(lines[:5]) + "\n")
    assert main(["--base", str(tmp_path / "no-such-base"), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "3 malformed record(s)" in err
    assert "line 2: expected a JSON object" in err
    assert "line 3: missing field 'output'" in err
    assert "line 5: field 'input' must be a string, not int" in err
    assert "line 1" not in err and "no-such-base" not in err
    assert not (tmp_path / "out").exists()


def test_json_list_records_are_named_by_index(tmp_path: Path, capsys) -> None:
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "output": None}]))
    assert main(["--base", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "record 1: missing field 'output'" in capsys.readouterr().err
    data.write_text(json.dumps({"instruction": "a", "output": "b"}, indent=2))
    assert main(["--base", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "holds one JSON dict; expected a JSON list" in capsys.readouterr().err


def test_targets_are_the_response_and_eos_only(pipe) -> None:
    records = [InstructionRecord("name a day", "the first day.", input="in a word")]
    [example] = encode_records(records, pipe.tokenizer, 256).examples
    inputs, targets = collate([example], pipe.tokenizer.pad_id)
    prompt_ids = pipe.tokenizer.encode(llama_adapter.format_prompt("name a day", "in a word"))
    response = targets[0][targets[0] != IGNORE_INDEX].tolist()
    assert pipe.tokenizer.decode(response[:-1]) == "the first day." and response[-1] == pipe.tokenizer.eos_id
    assert (targets[0, : len(prompt_ids) - 1] == IGNORE_INDEX).all()
    assert inputs[0].tolist() == prompt_ids + response[:-1]
    cut = encode_records(records, pipe.tokenizer, len(prompt_ids) + 2)
    assert cut.truncated == 1 and cut.dropped == 0 and cut.examples[0].n_targets == 2
    assert encode_records(records, pipe.tokenizer, len(prompt_ids)).dropped == 1


# ---------------------------------------------------------------- batching and schedule


def alpaca_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Alpaca's shape: most examples 60-250 tokens after the template, a long tail to the 512 cut."""
    rng = random.Random(seed)
    return [min(512, max(30, int(rng.lognormvariate(math.log(120), 0.55)))) for _ in range(n)]


def test_length_grouping_wastes_little_on_padding() -> None:
    lengths = alpaca_like_lengths(8000)
    plan = LengthGroupedBatches(lengths, batch_size=32, seed=0)
    batches = plan.epoch(0)
    grouped = padding_efficiency(batches, lengths, world_size=8)
    pad_to_512 = sum(lengths) / (len(lengths) * 512)
    assert grouped > 0.95 and pad_to_512 < 0.3
    assert grouped / pad_to_512 > 3


def test_batches_cover_every_example_once_per_epoch_across_ranks() -> None:
    lengths = alpaca_like_lengths(1001)
    plan = LengthGroupedBatches(lengths, batch_size=12, seed=3, group_batches=4)
    first = plan.epoch(0)
    assert len(first) == len(plan) == 84
    seen = sorted(i for batch in first for rank in range(4) for i in shard(batch, rank, 4))
    assert seen == list(range(1001))
    assert first == LengthGroupedBatches(lengths, batch_size=12, seed=3, group_batches=4).epoch(0)  # deterministic
    assert first != plan.epoch(1)  # reshuffled each epoch
    # Batches are sorted longest first and ranks take every 4th: rank r pads to the r-th longest, not to the longest.
    for batch in first:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        widths = [max(lengths[i] for i in shard(batch, r, 4)) for r in range(min(4, len(batch)))]
        assert widths == [lengths[i] for i in batch[:4]]


def test_lr_warms_up_linearly_then_follows_a_half_cosine() -> None:
    factors = [lr_factor(s, warmup_steps=4, total_steps=12, min_ratio=0.1) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[8] == pytest.approx(0.55)
    assert all(a > b for a, b in pairwise(factors[4:])) and factors[-1] > 0.1


def test_defaults_are_the_paper_recipe() -> None:
    args = parse_args(["--base", "b", "--data", "d", "--out", "o"])
    assert args.blr == 9e-3 and args.lr is None and args.weight_decay == 0.02 and args.epochs == 5 and args.warmup_epochs == 2
    assert (args.adapter_len, args.adapter_layer, args.max_seq_len, args.min_lr) == (10, 30, 512, 0)


# ---------------------------------------------------------------- the training forward


def adapter_grads(model, examples, pad_id: int, recompute: bool) -> dict[str, torch.Tensor]:
    params = model.adapter_parameters()
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    summed_nll(model, examples, pad_id, torch.device("cpu"), recompute).backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_checkpointing_gives_the_same_gradients(hf_dir: Path, task: dict[str, Path], dtype: str) -> None:
    torch.manual_seed(0)
    pipe = llama_adapter.load(hf_dir, AdapterConfig(6, 2), device="cpu", dtype=dtype)
    with torch.no_grad():  # open the gates so that every adapter parameter gets a gradient
        for i in (2, 3):
            pipe.model.layers[i].attention.gate.fill_(0.3)
    examples = encode_records(read_records(task["train"])[:4], pipe.tokenizer, 256).examples
    grad_mode: dict[int, bool] = {}

    def record(layer_id: int):
        def hook(module, args, out) -> None:
            grad_mode.setdefault(layer_id, torch.is_grad_enabled())

        return hook

    for i, layer in enumerate(pipe.model.layers):
        layer.register_forward_hook(record(i))
    plain = adapter_grads(pipe.model, examples, pipe.tokenizer.pad_id, recompute=False)
    # The frozen layers below the adapter keep nothing for backward.
    assert grad_mode == {0: False, 1: False, 2: True, 3: True}
    recomputed = adapter_grads(pipe.model, examples, pipe.tokenizer.pad_id, recompute=True)
    for name, g in plain.items():
        assert g.dtype == torch.float32 and g.abs().sum() > 0, name
        assert torch.equal(g, recomputed[name]), name
