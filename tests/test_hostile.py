"""Hostile and broken input: no upload, message, file or cancel may take the server's memory, time or state.

Each test reproduces one hole of issue 12 against the real thing: the running app (gradio_client or raw
HTTP), the command lines, the loaders.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llama_adapter
from llama_adapter.cancel import Cancelled, CancelToken
from llama_adapter.errors import CheckpointError, ImageError
from llama_adapter.generate import main as generate_main
from llama_adapter.inputs.images import MAX_ASPECT_RATIO, check_image_file, load_image
from llama_adapter.serve.threaded import iterate_in_thread
from llama_adapter.tiny import write_tiny
from llama_adapter.train import main as train_main
from llama_adapter.train.state import OutputLock

from .conftest import FINISHED, ROOT, STARTED, AppServer, write_jsonl
from .test_app_client import assert_still_answers, chat, run_job

EVENT = re.compile(r"(chat|caption) #(\d+): (started|\w+ after \d+ tokens in [\d.]+s)")


@pytest.fixture(scope="module")
def client(app_server: AppServer) -> Client:
    return Client(app_server.url, verbose=False)


def log_events(server: AppServer, offset: int) -> list[tuple[str, int, str]]:
    """(kind, request id, 'started' or the end line) in the order the app logged them."""
    return [(kind, int(rid), what) for kind, rid, what in EVENT.findall(server.log()[offset:])]


def wait_streaming(job: Any, n: int = 3, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(job.outputs()) < n:
        assert time.monotonic() < deadline and not job.done(), "the reply did not start streaming"
        time.sleep(0.02)


def wait_for(predicate: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


# ---------------------------------------------------------------- 1. thin images


def test_thin_image_is_refused_before_preprocessing(tmp_path: Path) -> None:
    path = tmp_path / "line.png"
    Image.new("RGB", (1, 60_000)).save(path)  # a few hundred bytes; CLIP's resize would make it 224 x 13.4M
    assert path.stat().st_size < 1000
    with pytest.raises(ImageError, match=r"1x60000 pixels, more than 20 times as long"):
        load_image(path)
    with pytest.raises(ImageError, match="more than 20 times"):
        check_image_file(path)  # training's header-only check refuses it too
    wide = tmp_path / "panorama.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 10, 10)).save(wide)  # at the limit: accepted
    assert load_image(wide).size == (MAX_ASPECT_RATIO * 10, 10)


def test_aspect_ratio_is_checked_after_exif_orientation(tmp_path: Path) -> None:
    """An EXIF rotation turns a stored 4000x100 strip into 100x4000: the check sees the upright pixels."""
    img = Image.new("RGB", (4000, 100))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    with pytest.raises(ImageError, match=r"100x4000 pixels"):
        load_image(path)


def test_thin_image_upload_gets_a_message(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "line.png"
    Image.new("RGB", (1, 60_000)).save(path)
    _, _, error = run_job(client.submit(handle_file(path), "Describe this picture.", 0.1, 0.75, 8, api_name="/caption"))
    assert isinstance(error, AppError) and "line.png is 1x60000 pixels" in str(error), error


# ---------------------------------------------------------------- 2. cancel stops the work


def test_cancel_token_stops_the_decode_loop_at_the_next_step(pipe: Any) -> None:
    cancel = CancelToken()
    stream = pipe.stream("the water", max_new_tokens=200, temperature=0, cancel=cancel)
    next(stream)
    cancel.cancel()  # as another thread would
    with pytest.raises(Cancelled):
        for _ in stream:
            pass
    assert len(stream.generated_ids) < 10
    assert pipe.scheduler.stats()["rows"] == 0  # the row and its cache are freed for the next request


def test_a_cancelled_task_ends_only_when_its_thread_work_has_stopped() -> None:
    seen: list[str] = []

    def work(cancel: CancelToken):
        try:
            for i in range(1000):
                time.sleep(0.05)  # one step in progress when the cancel comes
                cancel.check()
                yield i
        except Cancelled:
            seen.append("cancelled at a step boundary")
            raise
        finally:
            seen.append("closed")

    async def main() -> None:
        async def consume() -> None:
            async for _ in iterate_in_thread(work):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The task's end is the work's end: nothing of it runs on afterwards.
        assert seen == ["cancelled at a step boundary", "closed"]

    asyncio.run(main())


def test_a_cancelled_chat_stops_decoding_while_others_go_on(client: Client, app_server: AppServer) -> None:
    """Jobs are batched, not queued behind each other: the cancel must stop the cancelled row itself (its end
    line says so, long before its 2048 tokens), and the job that runs beside it is answered."""
    other = Client(app_server.url, verbose=False)
    offset = len(app_server.log())
    long = client.submit("Write a very long story.", 0.1, 0.75, 2048, api_name="/chat")
    wait_streaming(long)
    beside = other.submit("Name a color.", 0.1, 0.75, 4, api_name="/chat")
    long.cancel()
    assert beside.result(timeout=60)
    (_, first, _), *_ = log_events(app_server, offset)
    end = wait_for(lambda: [w for _, rid, w in log_events(app_server, offset) if rid == first and w != "started"], "no end line")
    assert end[0].startswith("cancelled after"), end
    assert int(end[0].split()[2]) < 2048


def test_a_cancelled_caption_stops_preprocessing(client: Client, app_server: AppServer, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 5000), (200, 30, 30)).save(big, compress_level=1)  # 25 MP: seconds of decoding and resizing
    other = Client(app_server.url, verbose=False)
    offset = len(app_server.log())
    job = client.submit(handle_file(big), "Describe this picture.", 0.1, 0.75, 64, api_name="/caption")
    wait_for(lambda: job.status().code.name == "PROCESSING", "the caption never started")
    beside = other.submit("Name a color.", 0.1, 0.75, 4, api_name="/chat")
    job.cancel()
    assert beside.result(timeout=60)
    ends = wait_for(lambda: [w for kind, _, w in log_events(app_server, offset) if kind == "caption" and w != "started"], "no end")
    assert ends[0].startswith("cancelled after 0 tokens"), ends  # stopped in preprocessing: no token was decoded


# ---------------------------------------------------------------- 5. text that is not Unicode


def call_api(server: AppServer, endpoint: str, data: list[Any]) -> str:
    """Gradio's documented HTTP API (as curl uses it): POST the inputs, then read the event stream."""
    body = json.dumps({"data": data}).encode()  # ensure_ascii: a lone surrogate travels as "\ud800"
    request = urllib.request.Request(f"{server.url}gradio_api/call/{endpoint}", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{server.url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as r:
        return r.read().decode()


def test_lone_surrogate_gets_a_message_over_the_api(app_server: AppServer, client: Client) -> None:
    events = call_api(app_server, "chat", ["hello \ud800 there", 0.1, 0.75, 8])
    assert "event: error" in events and "not valid Unicode" in events and "character 7" in events, events
    assert_still_answers(client)


def test_tokenizer_encodes_a_lone_surrogate_as_the_replacement_character(pipe: Any) -> None:
    tok = pipe.tokenizer
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


# ---------------------------------------------------------------- 6. a cancel reaches only its own job


def test_cancel_reaches_only_its_own_job_on_one_client(client: Client, app_server: AppServer) -> None:
    offset = len(app_server.log())
    running = client.submit("Write a long story.", 0.1, 0.75, 160, api_name="/chat")
    wait_streaming(running)
    second = client.submit("Name a color.", 0.1, 0.75, 400, api_name="/chat")  # same client, so same session
    wait_streaming(second, n=2)
    second.cancel()
    assert running.result(timeout=120).strip()  # with Gradio's session-wide cancel: killed, and never answered
    ends = wait_for(lambda: len(found := FINISHED.findall(app_server.log()[offset:])) == 2 and found, "both jobs did not end")
    reasons = sorted(reason for _, reason, _ in ends)
    assert reasons[0] == "cancelled" and reasons[1] != "cancelled", ends  # the running job ran to its end


# ---------------------------------------------------------------- 7. message size


def test_huge_message_is_refused_before_tokenising(client: Client, app_server: AppServer) -> None:
    offset = len(app_server.log())
    _, _, error = chat(client, "x" * 3_000_000)
    assert isinstance(error, AppError) and "3,000,000 characters long" in str(error) and "65,536 characters" in str(error), error
    assert not STARTED.search(app_server.log()[offset:])


# ---------------------------------------------------------------- 13. smaller ones


def test_upload_errors_name_the_file_not_the_server_path(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "holiday.png"
    path.write_text("not really a picture")
    _, _, error = run_job(client.submit(handle_file(path), "Describe this picture.", 0.1, 0.75, 8, api_name="/caption"))
    assert isinstance(error, AppError) and "holiday.png" in str(error), error
    assert "/tmp" not in str(error) and "gradio" not in str(error), error


@pytest.mark.parametrize(("settings", "expected"), [((-1.0, 0.75, 8), "less than minimum"), ((0.1, "high", 8), "is not a number")])
def test_bad_settings_leave_no_traceback_in_the_server_log(
    client: Client, app_server: AppServer, settings: tuple[Any, ...], expected: str
) -> None:
    offset = len(app_server.log())
    _, _, error = run_job(client.submit("Hi", *settings, api_name="/chat"))
    assert isinstance(error, AppError) and expected in str(error), error
    time.sleep(0.2)
    assert "Traceback" not in app_server.log()[offset:]


def test_api_client_gets_the_truncation_notice(client: Client) -> None:
    _, logs, error = chat(client, "tell me about the river " * 600, max_new_tokens=8)
    assert error is None
    assert any("tokens were dropped" in message for message, _ in logs), logs


# ---------------------------------------------------------------- 5 (CLI, training), 8-12: files and command lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny base in Meta's layout (one consolidated.00.pth shard) and its adapter (our safetensors)."""
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def copy_base(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def generate_cli(*args: object) -> list[str]:
    return [str(a) for a in args]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: truncate(p), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: 8 + int.from_bytes(p.read_bytes()[:8], "little")]), id="header-only"),
    ],
)
def test_corrupt_safetensors_is_a_checkpoint_error(hf_dir: Path, tiny: tuple[Path, Path], tmp_path: Path, damage: Any, capsys: Any) -> None:
    base = copy_base(hf_dir, tmp_path / "base")
    damage(base / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors \([\d,]+ bytes\) is truncated or not a safetensors file.*copy it again"):
        llama_adapter.load(base, device="cpu")
    adapter = tmp_path / "adapter.safetensors"
    shutil.copy(tiny[1], adapter)
    damage(adapter)
    assert generate_main(generate_cli("--base", tiny[0], "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "adapter.safetensors" in err and "Traceback" not in err


def test_truncated_pth_shard_and_refused_pickle(tiny: tuple[Path, Path], tmp_path: Path, capsys: Any) -> None:
    base = copy_base(tiny[0], tmp_path / "base")
    truncate(base / "consolidated.00.pth")
    assert generate_main(generate_cli("--base", base, "--prompt", "hi")) == 2
    err = capsys.readouterr().err
    assert "consolidated.00.pth" in err and "truncated or corrupt" in err and "Traceback" not in err
    evil = tmp_path / "evil.pth"
    torch.save({"adapter_query.weight": torch.zeros(1), "payload": Path("x")}, evil)
    assert generate_main(generate_cli("--base", tiny[0], "--adapter", evil, "--prompt", "hi")) == 2
    err = capsys.readouterr().err
    assert "evil.pth holds Python objects other than tensors" in err
    assert "weights_only" not in err and "trust" not in err  # never torch's advice to load it unsafely


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"n_layers": 1e9}, "n_layers 1000000000 is out of range"),
        ({"n_layers": "32"}, "n_layers must be an integer"),
        ({"dim": -128}, "dim -128 is out of range"),
        ({"n_heads": 3}, "dim 128 is not divisible by n_heads 3"),
        ({"norm_eps": 0}, "norm_eps 0 is out of range"),
        ({"n_kv_heads": 8}, "n_kv_heads 8 is more than n_heads 4"),
    ],
)
def test_params_json_is_validated_before_allocation(tiny: tuple[Path, Path], tmp_path: Path, change: dict, expected: str) -> None:
    base = copy_base(tiny[0], tmp_path / "base")
    params = json.loads((base / "params.json").read_text()) | change
    (base / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        llama_adapter.load(base, device="cpu")
    assert "params.json" in str(err.value)


def test_hf_config_is_validated(hf_dir: Path, tmp_path: Path) -> None:
    base = copy_base(hf_dir, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 10**7}))
    with pytest.raises(ValueError, match=r"config\.json: n_layers 10000000 is out of range"):
        llama_adapter.load(base, device="cpu")
    del config["hidden_size"]
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: lacks hidden_size"):
        llama_adapter.load(base, device="cpu")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--device", "cuda"], "no CUDA GPU is available" if not torch.cuda.is_available() else None),
        (["--device", "tpu9"], "unknown device 'tpu9'"),
        (["--base", "x" * 5000], "(5,000 characters) cannot be a path (File name too long)"),
    ],
)
def test_device_and_names_are_checked(tiny: tuple[Path, Path], args: list[str], expected: str | None, capsys: Any) -> None:
    if expected is None:
        pytest.skip("this machine has a GPU")
    argv = generate_cli("--base", tiny[0], "--prompt", "hi", "--max-new-tokens", 1, *args)
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err) < 600, err


def test_max_seq_len_must_be_positive(tiny: tuple[Path, Path], capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        generate_main(generate_cli("--base", tiny[0], "--prompt", "hi", "--max-seq-len", 0))
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "expected"),
    [(float("nan"), "holds 1 NaN or infinite values"), (float("inf"), "holds 1 NaN or infinite values"), (None, "is int64")],
)
def test_adapter_tensors_must_be_finite_floats(
    hf_dir: Path, tiny: tuple[Path, Path], tmp_path: Path, value: float | None, expected: str
) -> None:
    tensors = load_file(str(tiny[1]))
    with safe_open(str(tiny[1]), framework="pt") as f:
        metadata = f.metadata()
    gate = next(k for k in tensors if k.endswith("attention.gate"))
    if value is None:
        tensors[gate] = tensors[gate].long()
    else:
        tensors[gate] = tensors[gate].clone()
        tensors[gate].view(-1)[0] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match=re.escape(gate) + ".*" + re.escape(expected)):
        llama_adapter.load(tiny[0], bad, device="cpu")


def test_generate_cli_reads_the_prompt_from_stdin_and_a_file(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    long = "tell me about the water " * 8000  # 190 kB: more than one command-line argument may hold (128 kB)
    path = tmp_path / "prompt.txt"
    path.write_text(long)
    common = ["--base", tiny[0], "--max-new-tokens", 3, "--temperature", 0]
    assert generate_main(generate_cli(*common, "--prompt-file", path)) == 0
    from_file = capsys.readouterr()
    assert "its first" in from_file.err and "tokens were dropped" in from_file.err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(long.encode())))
    assert generate_main(generate_cli(*common, "--prompt-file", "-")) == 0
    assert capsys.readouterr().out == from_file.out  # the same prompt, so the same greedy reply
    path.write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    assert generate_main(generate_cli(*common, "--prompt-file", path)) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_generate_cli_refuses_a_lone_surrogate(tiny: tuple[Path, Path], capsys: Any) -> None:
    # An argument that is not UTF-8 (here the byte 0xff) reaches Python as a lone surrogate.
    assert generate_main(generate_cli("--base", tiny[0], "--prompt", "hi \udcff")) == 2
    assert "--prompt is not valid Unicode: character 4 is a lone surrogate" in capsys.readouterr().err


def run_generate(tiny: tuple[Path, Path], *shell_tail: str, max_new_tokens: int = 300) -> subprocess.CompletedProcess:
    command = (
        f"{shlex.quote(sys.executable)} -m llama_adapter.generate --base {shlex.quote(str(tiny[0]))} "
        f"--prompt 'the water' --max-new-tokens {max_new_tokens} --temperature 1 {' '.join(shell_tail)}"
    )
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_generate_cli_on_a_closed_pipe_closed_stdout_and_full_disk(tiny: tuple[Path, Path]) -> None:
    piped = run_generate(tiny, "2>/tmp/.hostile-stderr | head -c 10 >/dev/null; echo ${PIPESTATUS[0]}; cat /tmp/.hostile-stderr")
    status, *stderr = piped.stdout.splitlines()
    # Quiet: only the lines saying what was loaded (the package's log), no traceback, no message.
    assert status == "141" and all(line.startswith("llama_adapter: ") for line in stderr), piped.stdout
    closed = run_generate(tiny, ">&-", max_new_tokens=2)
    assert closed.returncode == 2 and closed.stderr.splitlines()[-1].startswith("error: stdout is closed"), closed.stderr
    full = run_generate(tiny, ">/dev/full", max_new_tokens=2)
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 2 and last == "error: could not write the output: No space left on device", full.stderr


def test_training_validation_names_the_line_of_a_lone_surrogate(tmp_path: Path, capsys: Any) -> None:
    data = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "say hi", "output": "hi"})
    data.write_text(good + "\n" + '{"instruction": "bad \\ud800 text", "output": "x"}\n')  # a JSON escape of a lone surrogate
    # The base does not exist: the data is refused first, before anything is loaded.
    assert train_main(["--base", str(tmp_path / "no-such-base"), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 2: field 'instruction' is not valid Unicode: character 5 is a lone surrogate" in err


def train_cli(base: Path, data: Path, out: Path, *extra: object) -> list[str]:
    args = ["--base", base, "--data", data, "--out", out, "--adapter-len", 2, "--adapter-layer", 1, "--max-seq-len", 256]
    return [str(a) for a in [*args, "--epochs", 1, *extra]]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = [{"instruction": f"count to {i}", "output": " ".join(str(j) for j in range(i))} for i in range(1, 9)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records)


def test_training_out_dir_is_checked_before_loading(tmp_path: Path, train_data: Path, capsys: Any) -> None:
    missing_base = tmp_path / "no-such-base"  # any loading would fail on it: the --out error must come first
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(b"an earlier run's adapter")
    assert train_main(train_cli(missing_base, train_data, out)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run's adapter.safetensors but no checkpoint" in err and "--overwrite" in err
    assert "no-such-base" not in err
    as_file = tmp_path / "a-file"
    as_file.write_text("x")
    assert train_main(train_cli(missing_base, train_data, as_file)) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_two_runs_cannot_write_one_directory(tmp_path: Path, train_data: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out):  # another run holds the directory
        assert train_main(train_cli(tmp_path / "no-such-base", train_data, out)) == 2
    err = capsys.readouterr().err
    assert f"another training run (pid {os.getpid()}) is writing to {out}" in err


def test_overwrite_then_truncated_checkpoint_on_resume(
    tiny: tuple[Path, Path], tmp_path: Path, train_data: Path, capsys: Any, monkeypatch: Any, one_thread: None
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    assert train_main(train_cli(tiny[0], train_data, out, "--overwrite")) == 0
    capsys.readouterr()
    # The checkpoint and the adapter reached the disk under their temporary names, before the rename.
    assert any(s.endswith("checkpoint.pt.tmp") for s in synced) and any(s.endswith("adapter.safetensors.tmp") for s in synced), synced
    truncate(out / "checkpoint.pt")
    assert train_main(train_cli(tiny[0], train_data, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'checkpoint.pt'}" in err and "is truncated or corrupt" in err and "Traceback" not in err
