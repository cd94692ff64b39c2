"""Chat templates against transformers' apply_chat_template, end-of-turn stops, and training on a Llama-3-style base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llama_adapter import Tokenizer
from llama_adapter.generate import main as generate
from llama_adapter.inputs.chat_template import AlpacaFormat, ChatTemplate, prompt_format
from llama_adapter.inputs.prompts import fit_chat, format_prompt
from llama_adapter.train import parse_args, train
from llama_adapter.train.data import IGNORE_INDEX, InstructionRecord, collate, encode_record

from .conftest import write_jsonl
from .llama3 import EOT
from .test_train import task_records

SYSTEM = "You answer in one short sentence."
TURNS = [("which way is the water?", "down the long way."), ("and the oil?", "it was made by people.")]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: fastest on one thread, and the cores are shared


@pytest.fixture(scope="module")
def hf_tokenizer(llama3_hf):
    return llama3_hf[1]


def conversation(turns, message: str, system: str | None) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    for user, reply in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return [*out, {"role": "user", "content": message}]


def template_ids(hf_tokenizer, messages: list[dict[str, str]]) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5, a list before


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("turns", [[], TURNS])
def test_template_renders_and_tokenizes_as_transformers(llama3_pipe, hf_tokenizer, turns, system) -> None:
    fmt = prompt_format(llama3_pipe.tokenizer, "auto")
    assert isinstance(fmt, ChatTemplate)
    text = fmt.chat(turns, "tell me about the day", system)
    messages = conversation(turns, "tell me about the day", system)
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref_ids = template_ids(hf_tokenizer, messages)
    assert llama3_pipe.tokenizer.encode(text) == ref_ids  # one BOS, specials read as tokens


def test_alpaca_stays_the_default(llama3_pipe, pipe) -> None:
    assert isinstance(prompt_format(llama3_pipe.tokenizer), AlpacaFormat)
    assert isinstance(prompt_format(pipe.tokenizer, "auto"), AlpacaFormat)  # no template of its own: Alpaca
    assert AlpacaFormat().instruction("Name a color.", None, SYSTEM) == format_prompt("Name a color.")  # no place for a system prompt
    with pytest.raises(ValueError, match="unknown chat template 'chatml'; use alpaca or auto"):
        prompt_format(pipe.tokenizer, "chatml")


def test_templated_greedy_chat_equals_transformers_and_stops_at_end_of_turn(llama3_pipe, llama3_hf) -> None:
    model, hf_tokenizer = llama3_hf
    prompt = prompt_format(llama3_pipe.tokenizer, "auto").chat(TURNS, "tell me about the day", SYSTEM)
    stream = llama3_pipe.stream(prompt, max_new_tokens=30, temperature=0)
    "".join(stream)
    ids = torch.tensor([template_ids(hf_tokenizer, conversation(TURNS, "tell me about the day", SYSTEM))])
    stops = sorted(llama3_pipe.tokenizer.stop_ids)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])[0, ids.shape[1] :]
    ref = out.tolist()
    assert stream.generated_ids == [t for t in ref if t not in stops]
    if ref[-1] in stops:
        assert stream.finish_reason == "eos"


def test_fit_chat_drops_turns_in_the_template_too(llama3_pipe) -> None:
    fmt = prompt_format(llama3_pipe.tokenizer, "auto")
    turns = TURNS * 6

    def render(earlier, text):
        return fmt.chat(earlier, text, SYSTEM)

    budget = llama3_pipe.count_tokens(render(turns[-3:], "and now?"))
    fitted = fit_chat(turns, "and now?", llama3_pipe.count_tokens, budget, render)
    assert fitted.dropped_turns == len(turns) - 3 and fitted.text == render(turns[-3:], "and now?")
    assert fitted.text.count(SYSTEM) == 1  # the system prompt survives the cut


def test_sentencepiece_reads_its_control_pieces_in_text_only_for_a_chat_template(tokenizer_path: Path) -> None:
    plain = Tokenizer(tokenizer_path)  # a base without a chat template, e.g. LLaMA-1 with the official adapters
    assert plain.encode("long </s> day") == [plain.bos_id, *plain.sp.encode("long </s> day")]  # typed text stays text
    tok = Tokenizer(tokenizer_path, read_control_pieces=True)
    ids = tok.encode("<s>[INST] the day [/INST] long </s><s>[INST] oil [/INST]")
    # As Meta's Llama-2 chat code encodes a conversation: each turn on its own, between BOS and EOS ids (one BOS in front).
    sp = tok.sp
    expected = [tok.bos_id, *sp.encode("[INST] the day [/INST] long "), tok.eos_id, tok.bos_id, *sp.encode("[INST] oil [/INST]")]
    assert ids == expected


def test_template_training_masks_the_prompt_and_ends_at_end_of_turn(llama3_pipe) -> None:
    tok = llama3_pipe.tokenizer
    fmt = prompt_format(tok, "auto")
    record = InstructionRecord(instruction="name the topic", output="water.", input="the water is long")
    example = encode_record(record, tok, fmt)
    prompt, full = fmt.training_texts("name the topic", "the water is long", "water.")
    assert full.startswith(prompt) and full.endswith(EOT)
    assert example.ids.tolist() == tok.encode(full)  # ends with <|eot_id|>, no EOS added after it
    assert example.response_start == len(tok.encode(prompt))
    _, targets = collate([example], tok.pad_id)
    learned = targets[targets != IGNORE_INDEX].tolist()
    assert tok.decode(learned) == "water." and learned[-1] == tok.backend.token_to_id(EOT)


def test_training_learns_on_a_llama3_base_with_its_template(llama3_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", task_records(32, 0))
    val = write_jsonl(tmp_path / "val.jsonl", task_records(12, 1))
    args = ["--base", llama3_dir, "--data", data, "--val-data", val, "--out", tmp_path / "run", "--adapter-len", 6,
            "--adapter-layer", 2, "--max-seq-len", 128, "--batch-size", 8, "--epochs", 8, "--lr", 0.3, "--warmup-epochs", 1,
            "--chat-template", "auto"]  # fmt: skip
    train(parse_args([str(a) for a in args]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in lines if "eval_loss" in m]
    assert evals[-1] < 0.8 * evals[0]  # held-out loss: the prompts learn through the frozen Llama-3-style base
    with safe_open(str(tmp_path / "run" / "adapter.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["training_args"])["chat_template"] == "auto"  # what to serve it with


def test_generate_cli_renders_the_template_with_a_system_prompt(llama3_dir: Path, llama3_pipe, capsys) -> None:
    args = ["--base", str(llama3_dir), "--instruction", "the day", "--input", "and the water", "--chat-template", "auto"]
    assert generate([*args, "--system", SYSTEM, "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]) == 0
    prompt = prompt_format(llama3_pipe.tokenizer, "auto").chat([], "the day\n\nand the water", SYSTEM)
    expected = "".join(llama3_pipe.stream(prompt, max_new_tokens=12, temperature=0))
    assert capsys.readouterr().out == expected + "\n"
    assert prompt != prompt_format(llama3_pipe.tokenizer, "auto").chat([], "the day\n\nand the water", None)


def test_app_settings_pick_the_template_and_system_prompt(llama3_dir: Path, capsys) -> None:
    import app

    env = {"LLAMA_ADAPTER_CHAT_TEMPLATE": "auto", "LLAMA_ADAPTER_SYSTEM_PROMPT": SYSTEM}
    args = ["--base", str(llama3_dir), "--adapter", "none", "--caption-adapter", "none", "--device", "cpu"]
    settings = app.parse_settings(args, env=env)
    assert (settings.chat_template, settings.system_prompt) == ("auto", SYSTEM)
    models = app.load_models(settings)
    assert isinstance(models.chat_format, ChatTemplate) and models.system_prompt == SYSTEM
    assert "the base&#x27;s chat template" in app.model_panel(models)
    app.build_demo(models)  # the page builds, with the system prompt box
    assert app.parse_settings([], env={}).chat_template == "alpaca"
    with pytest.raises(SystemExit):
        app.parse_settings([], env={"LLAMA_ADAPTER_CHAT_TEMPLATE": "chatml"})
    assert "use alpaca or auto" in capsys.readouterr().err
