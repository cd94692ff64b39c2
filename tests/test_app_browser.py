"""The running app in a headless Chromium (Debian's package) driven by Playwright; screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api

from .conftest import EXAMPLE_IMAGE, FINISHED, AppServer, serve_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

# Records every distinct length of the last bot message as the page re-renders it.
WATCH_REPLY = """() => {
  window.replyLengths = [];
  const log = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = log.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const n = bots[bots.length - 1].innerText.length;
    if (window.replyLengths.at(-1) !== n) window.replyLengths.push(n);
  }).observe(log, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        # A persistent context is how Playwright takes a fresh --user-data-dir.
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, viewport=DESKTOP
        )
        yield context
        context.close()


def open_app(browser: object, url: str, viewport: dict[str, int]) -> object:
    page = browser.new_page()  # type: ignore[attr-defined]
    page.set_viewport_size(viewport)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    return page


def wait_for_log(server: AppServer, offset: int, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while not (m := pattern.search(server.log(), offset)):
        assert time.monotonic() < deadline, f"no {pattern.pattern!r} in the app log"
        time.sleep(0.1)
    return m


def test_chat_reply_streams_into_the_page(browser: object, app_server: AppServer) -> None:
    page = open_app(browser, app_server.url, DESKTOP)
    page.evaluate(WATCH_REPLY)
    offset = len(app_server.log())
    page.fill("#chat-input textarea", "Tell me about alpacas.")
    page.press("#chat-input textarea", "Enter")
    wait_for_log(app_server, offset, FINISHED)
    page.wait_for_timeout(500)  # the last update's render
    lengths = page.evaluate("window.replyLengths")
    assert len(lengths) >= 3 and lengths == sorted(lengths) and lengths[-1] > 20, lengths
    assert page.locator('#chatbot [data-testid="user"]').inner_text().strip() == "Tell me about alpacas."
    page.screenshot(path=ARTIFACTS / "chat-desktop.png", full_page=True)
    page.close()


def test_caption_tab(browser: object, app_server: AppServer) -> None:
    page = open_app(browser, app_server.url, DESKTOP)
    page.get_by_role("tab", name="Image captioning").click()
    page.locator("#caption-image input[type=file]").set_input_files(EXAMPLE_IMAGE)
    page.locator("#caption-image img").first.wait_for(timeout=30_000)
    page.click("#caption-run")
    output = page.locator("#caption-output textarea")
    page.wait_for_function("el => el.value.length > 20", arg=output.element_handle(), timeout=60_000)
    page.screenshot(path=ARTIFACTS / "caption-desktop.png", full_page=True)
    page.close()


def test_phone_width_screenshots(browser: object, app_server: AppServer) -> None:
    page = open_app(browser, app_server.url, PHONE)
    # Nothing may be wider than the screen: no sideways scrolling on a phone.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=ARTIFACTS / "chat-phone.png", full_page=True)
    page.get_by_role("tab", name="Image captioning").click()
    page.locator("#caption-run").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=ARTIFACTS / "caption-phone.png", full_page=True)
    page.close()


PROMPT_TOKENS = re.compile(r"chat #(\d+): started, prompt (\d+) tokens")


def send(page: object, text: str) -> None:
    page.fill("#chat-input textarea", text)  # type: ignore[attr-defined]
    page.press("#chat-input textarea", "Enter")  # type: ignore[attr-defined]


def test_clear_wins_over_a_streaming_reply(browser: object, app_server: AppServer) -> None:
    """Clear mid-stream: the next message is sent with no old turns, and the page then shows only it."""
    page = open_app(browser, app_server.url, DESKTOP)
    question = "Tell me about alpacas."
    offset = len(app_server.log())
    send(page, question)
    fresh_prompt = int(wait_for_log(app_server, offset, PROMPT_TOKENS).group(2))  # a one-turn conversation
    wait_for_log(app_server, offset, FINISHED)
    for _ in range(3):  # the race was lost 3 times in 5
        page.click("#chat-clear")
        offset = len(app_server.log())
        send(page, "Write a very long story about the sea.")
        page.wait_for_function("() => (document.querySelector('#chatbot [data-testid=\"bot\"]:last-of-type')?.innerText.length || 0) > 20")
        page.click("#chat-clear")
        wait_for_log(app_server, offset, FINISHED)
        page.wait_for_timeout(300)  # a late update, if any, has arrived
        offset = len(app_server.log())
        send(page, question)
        assert int(wait_for_log(app_server, offset, PROMPT_TOKENS).group(2)) == fresh_prompt, "the model still saw the old turns"
        wait_for_log(app_server, offset, FINISHED)
        page.wait_for_timeout(300)
        users = page.locator('#chatbot [data-testid="user"]')
        assert users.count() == 1 and users.inner_text().strip() == question
    page.close()


def test_empty_message_shows_why(browser: object, app_server: AppServer) -> None:
    page = open_app(browser, app_server.url, DESKTOP)
    page.press("#chat-input textarea", "Enter")
    # Gradio's error notice (a toast) carries our text.
    page.locator('[data-testid="toast-text"]', has_text="The message is empty: type a question").wait_for(timeout=10_000)
    page.screenshot(path=ARTIFACTS / "empty-message.png")
    # The page stays usable: no error state covers the conversation, and the next message is answered.
    assert page.locator("#chatbot .error").count() == 0
    offset = len(app_server.log())
    send(page, "Name a color.")
    wait_for_log(app_server, offset, FINISHED)
    page.wait_for_timeout(300)
    assert page.locator('#chatbot [data-testid="bot"]').count() == 1
    page.close()


@pytest.fixture(scope="module")
def one_row_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """The app serving one request at a time with no queue: a second request finds it full."""
    yield from serve_app(tmp_path_factory.mktemp("busy"), ("--tiny", "--max-batch", "1", "--max-queue", "0"))


def test_a_full_server_keeps_the_typed_message(browser: object, one_row_server: AppServer) -> None:
    from gradio_client import Client

    client = Client(one_row_server.url, verbose=False)
    offset = len(one_row_server.log())
    job = client.submit("Write a very long story.", 0.0, 0.75, 2000, api_name="/chat")  # holds the only row for ~20 s
    wait_for_log(one_row_server, offset, PROMPT_TOKENS)
    page = open_app(browser, one_row_server.url, DESKTOP)
    typed = "A question typed while the server is busy."
    send(page, typed)
    page.locator('[data-testid="toast-text"]', has_text="The server is busy").wait_for(timeout=10_000)
    assert page.locator("#chat-input textarea").input_value() == typed
    assert page.locator('#chatbot [data-testid="user"]').count() == 0
    assert not job.done(), "the busy request ended before the message was sent: the test proved nothing"
    offset = len(one_row_server.log())
    job.cancel()
    deadline = time.monotonic() + 30
    while one_row_server.log().find("cancelled after", offset) < 0:  # the row is free again
        assert time.monotonic() < deadline, "the cancelled /chat job did not stop"
        time.sleep(0.1)
    offset = len(one_row_server.log())
    page.press("#chat-input textarea", "Enter")  # the same message, sent again, is now answered
    wait_for_log(one_row_server, offset, FINISHED)
    assert page.locator('#chatbot [data-testid="user"]').inner_text().strip() == typed
    page.close()
