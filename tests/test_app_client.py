"""The running app (``python app.py --tiny``) driven through its API with gradio_client."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from llama_adapter.tiny import write_tiny

from .conftest import EXAMPLE_IMAGE, FINISHED, STARTED, AppServer, serve_app


@pytest.fixture(scope="module")
def client(app_server: AppServer) -> Client:
    return Client(app_server.url, verbose=False)


def run_job(job: Any) -> tuple[list[Any], list[tuple[str, str]], BaseException | None]:
    """Wait for a job; return its streamed outputs, the warnings it showed, and the error it ended with."""
    error: BaseException | None = None
    try:
        job.result(timeout=120)
    except Exception as e:
        error = e

    async def updates() -> list[Any]:
        return [u async for u in job]

    logs = [u.log for u in asyncio.run(updates()) if getattr(u, "log", None)]
    return list(job.outputs()), logs, error


def chat(client: Client, message: str, **kw: float) -> tuple[list[str], list[tuple[str, str]], BaseException | None]:
    job = client.submit(message, kw.get("temperature", 0.1), kw.get("top_p", 0.75), kw.get("max_new_tokens", 16), api_name="/chat")
    return run_job(job)


def assert_still_answers(client: Client) -> None:
    outputs, _, error = chat(client, "Name a color.", max_new_tokens=4)
    assert error is None and outputs and outputs[-1]


def assert_streamed(outputs: list[str]) -> None:
    """Several partial updates, each extending the previous one, ending in a non-empty text."""
    assert len(outputs) >= 3, outputs
    for before, after in itertools.pairwise(outputs):
        assert after.startswith(before) and len(after) >= len(before)
    assert outputs[-1].strip()


def finished_since(server: AppServer, offset: int) -> list[tuple[int, str, int]]:
    return [(int(i), why, int(n)) for i, why, n in FINISHED.findall(server.log()[offset:])]


def test_api_lists_chat_and_caption(client: Client) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in api["/chat"]["parameters"]] == ["message", "temperature", "top_p", "max_new_tokens"]
    assert [p["parameter_name"] for p in api["/caption"]["parameters"]] == ["image", "prompt", "temperature", "top_p", "max_new_tokens"]


def test_chat_streams_a_reply(client: Client) -> None:
    outputs, logs, error = chat(client, "Tell me about alpacas.", max_new_tokens=24)
    assert error is None
    assert_streamed(outputs)
    assert not logs


def test_caption_streams_a_caption(client: Client) -> None:
    job = client.submit(handle_file(EXAMPLE_IMAGE), "Describe this picture.", 0.1, 0.75, 24, api_name="/caption")
    outputs, _, error = run_job(job)
    assert error is None
    assert_streamed(outputs)


@pytest.fixture(scope="module")
def text_only_server(tmp_path_factory: pytest.TempPathFactory):
    """The app on local weight paths (no --tiny) with a chat adapter and no image model."""
    base, adapter = write_tiny(tmp_path_factory.mktemp("weights"))
    args = ("--base", str(base), "--adapter", str(adapter), "--caption-adapter", "none", "--device", "cpu")
    yield from serve_app(tmp_path_factory.mktemp("app_text"), args)


def test_local_weights_chat_and_say_no_image_model_is_loaded(text_only_server: AppServer) -> None:
    client = Client(text_only_server.url, verbose=False)
    outputs, _, error = chat(client, "Tell me about alpacas.", max_new_tokens=12)
    assert error is None and outputs
    job = client.submit(handle_file(EXAMPLE_IMAGE), "Describe this picture.", 0.1, 0.75, 24, api_name="/caption")
    outputs, _, error = run_job(job)
    assert isinstance(error, AppError) and "No image model is loaded" in str(error)
    assert not outputs
    assert_still_answers(client)


def test_cancel_stops_the_generation(client: Client, app_server: AppServer) -> None:
    offset = len(app_server.log())
    job = client.submit("Write a very long story.", 0.1, 0.75, 2048, api_name="/chat")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3:
        assert time.monotonic() < deadline and not job.done(), "the reply did not start streaming"
        time.sleep(0.02)
    job.cancel()
    # The generator is closed, the loop stops, and the app logs why and after how many tokens.
    while not (ended := finished_since(app_server, offset)):
        assert time.monotonic() < deadline, "the cancelled generation never ended"
        time.sleep(0.05)
    (_, reason, tokens), *_ = ended
    assert reason == "cancelled"
    assert tokens < 1000, f"{tokens} tokens were generated after the cancel"
    # The model is free again at once: a short request is answered with no wait for 2048 tokens.
    start = time.monotonic()
    assert_still_answers(client)
    assert time.monotonic() - start < 15


def test_two_clients_stream_at_the_same_time(app_server: AppServer) -> None:
    """Two /chat jobs both stream partial replies before either finishes: the model batches them."""
    offset = len(app_server.log())
    clients = [Client(app_server.url, verbose=False) for _ in range(2)]
    jobs = [c.submit("Write a very long story.", 0.1, 0.75, 1500, api_name="/chat") for c in clients]
    deadline = time.monotonic() + 90
    try:
        while not all(len(job.outputs()) >= 3 for job in jobs):
            assert time.monotonic() < deadline, [len(job.outputs()) for job in jobs]
            assert not any(job.done() for job in jobs), "a reply finished before the other started streaming"
            time.sleep(0.02)
    finally:
        for job in jobs:
            job.cancel()
    for job in jobs:
        assert_streamed(job.outputs())
    # In the log, both generations started before either ended.
    log = app_server.log()[offset:]
    while len(FINISHED.findall(log)) < 2:
        assert time.monotonic() < deadline, "the cancelled generations never ended"
        time.sleep(0.05)
        log = app_server.log()[offset:]
    starts = [m.start() for m in STARTED.finditer(log)]
    ends = [m.start() for m in FINISHED.finditer(log)]
    assert len(starts) == 2 and max(starts) < min(ends), log


def test_overlong_message_is_truncated_with_a_notice(client: Client) -> None:
    outputs, logs, error = chat(client, "tell me about the river " * 2000, max_new_tokens=8)
    assert error is None and outputs and outputs[-1]
    assert any("too long" in message and "tokens were dropped" in message for message, _ in logs), logs


@pytest.mark.parametrize(
    ("message", "settings", "expected"),
    [
        ("", {}, "The message is empty"),
        ("   \n ", {}, "The message is empty"),
        ("Hi", {"temperature": -1.0}, "-1.0 is less than minimum value 0.0"),
        ("Hi", {"top_p": 0.0}, "0.0 is less than minimum value 0.05"),
        ("Hi", {"max_new_tokens": 0}, "0 is less than minimum value 1"),
        ("Hi", {"max_new_tokens": 10**6}, "is greater than maximum value 2048"),
    ],
)
def test_bad_chat_input_gets_a_message(client: Client, message: str, settings: dict[str, float], expected: str) -> None:
    _, _, error = chat(client, message, **settings)
    assert isinstance(error, AppError) and expected in str(error), error
    assert_still_answers(client)


def _corrupt(tmp: Path) -> Path:
    good = EXAMPLE_IMAGE.read_bytes()
    path = tmp / "corrupt.jpg"
    path.write_bytes(good[:200] + b"\x00" * 300)  # a JPEG header, then garbage
    return path


def _not_an_image(tmp: Path) -> Path:
    path = tmp / "notes.png"
    path.write_text("this is a text file with an image's name")
    return path


def _huge(tmp: Path) -> Path:
    path = tmp / "huge.png"
    Image.new("RGB", (9000, 6000), (200, 30, 30)).save(path)  # 54 megapixels, yet a small file
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (None, "No image: upload an image"),
        (_corrupt, "is corrupt or unsupported|is not an image PIL can read"),
        (_not_an_image, "is not an image PIL can read"),
        (_huge, "megapixel limit"),
    ],
)
def test_bad_image_gets_a_message(client: Client, tmp_path: Path, make: Any, expected: str) -> None:
    image = handle_file(make(tmp_path)) if make else None
    job = client.submit(image, "Describe this picture.", 0.1, 0.75, 8, api_name="/caption")
    _, _, error = run_job(job)
    assert isinstance(error, AppError) and re.search(expected, str(error)), error
    assert_still_answers(client)


def test_server_survived_everything(app_server: AppServer) -> None:
    assert app_server.alive()
    # Gradio logs its own input checks (slider ranges) with tracebacks; none may come from our code.
    assert not re.search(r'File ".*(app\.py|llama_adapter/)', app_server.log())
