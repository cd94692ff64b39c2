"""Hostile and broken input: no upload, message, file or cancel may take the server's memory, time or state.

Each test reproduces one hole of issue 12 against the real thing: the running app (gradio_client or raw
HTTP), the command lines, the loaders.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from llama_adapter.cancel import Cancelled, CancelToken
from llama_adapter.errors import ImageError
from llama_adapter.inputs.images import MAX_ASPECT_RATIO, check_image_file, load_image
from llama_adapter.serve.threaded import iterate_in_thread

from .conftest import FINISHED, STARTED, AppServer
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
    assert pipe.cache_slot._busy is False  # the KV cache went back for the next request


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


def test_the_next_job_starts_only_after_the_cancelled_one_ended(client: Client, app_server: AppServer) -> None:
    other = Client(app_server.url, verbose=False)
    offset = len(app_server.log())
    long = client.submit("Write a very long story.", 0.1, 0.75, 2048, api_name="/chat")
    wait_streaming(long)
    queued = other.submit("Name a color.", 0.1, 0.75, 4, api_name="/chat")
    long.cancel()
    assert queued.result(timeout=60)
    events = log_events(app_server, offset)
    (_, first, _), *_ = events
    ends = [i for i, (_, rid, what) in enumerate(events) if rid == first and "cancelled after" in what]
    starts = [i for i, (_, rid, what) in enumerate(events) if rid != first and what == "started"]
    assert ends and starts and ends[0] < starts[0], events


def test_a_cancelled_caption_stops_preprocessing_before_the_next_job(client: Client, app_server: AppServer, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 5000), (200, 30, 30)).save(big, compress_level=1)  # 25 MP: seconds of decoding and resizing
    other = Client(app_server.url, verbose=False)
    offset = len(app_server.log())
    job = client.submit(handle_file(big), "Describe this picture.", 0.1, 0.75, 64, api_name="/caption")
    wait_for(lambda: job.status().code.name == "PROCESSING", "the caption never started")
    queued = other.submit("Name a color.", 0.1, 0.75, 4, api_name="/chat")
    job.cancel()
    assert queued.result(timeout=60)
    events = log_events(app_server, offset)
    caption_end = [i for i, (kind, _, what) in enumerate(events) if kind == "caption" and "cancelled after" in what]
    chat_start = [i for i, (kind, _, what) in enumerate(events) if kind == "chat" and what == "started"]
    assert caption_end and chat_start and caption_end[0] < chat_start[0], events


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
    queued = client.submit("Name a color.", 0.1, 0.75, 4, api_name="/chat")  # same client, so same session
    wait_for(lambda: queued.status().code.name == "IN_QUEUE", "the second job was not queued")
    queued.cancel()
    assert running.result(timeout=120).strip()  # with Gradio's session-wide cancel: killed, and never answered
    ends = FINISHED.findall(app_server.log()[offset:])
    assert len(ends) == 1 and ends[0][1] != "cancelled", ends  # the running job ran to its end; the other never ran
    assert len(STARTED.findall(app_server.log()[offset:])) == 1


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
