"""A cancel that reaches only its own job.

Gradio's ``/cancel`` request names the session, the endpoint and the event to cancel, but Gradio
(6.x) cancels every running task of that session and endpoint: ``job.cancel()`` on one of two
``/chat`` jobs of one ``gradio_client.Client`` (one session) killed the other as well, and the
other's client then waited forever, as no completion message was ever sent for it.

``PerEventCancel`` reads the event id of each ``/cancel`` request, and while Gradio handles that
request its task cancellation (``gradio.routes.cancel_tasks``) is narrowed to the task of that one
event.  A cancel without an event id (older clients) keeps Gradio's behaviour.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import gradio.routes
from starlette.middleware import Middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TASK_SEPARATOR = "<gradio-sep>"  # Gradio names a job's task f"{session}_{fn_index}<gradio-sep>{event_id}"
_cancel_event: contextvars.ContextVar[str | None] = contextvars.ContextVar("cancel_event", default=None)
_gradio_cancel_tasks = gradio.routes.cancel_tasks


async def _cancel_tasks(task_ids: set[str]) -> list[str]:
    """Gradio's ``cancel_tasks``, limited to the event the current ``/cancel`` request names."""
    event_id = _cancel_event.get()
    if event_id is None:
        return await _gradio_cancel_tasks(task_ids)
    names = {f"{task_id}{_TASK_SEPARATOR}{event_id}" for task_id in task_ids}
    tasks = [task for task in asyncio.all_tasks() if task.get_name() in names]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # returns once the job has really stopped
    return [event_id] if tasks else []


class PerEventCancel:
    """ASGI middleware: each ``POST .../cancel`` is handled by Gradio with its cancellation narrowed to its event."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/cancel"):
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        try:
            event_id = json.loads(body).get("event_id")
        except (ValueError, AttributeError):
            event_id = None

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        token = _cancel_event.set(event_id if isinstance(event_id, str) and event_id else None)
        try:
            await self.app(scope, replay, send)
        finally:
            _cancel_event.reset(token)


def per_event_cancel() -> dict[str, Any]:
    """Install the narrowed cancellation; returns the ``app_kwargs`` for ``Blocks.launch``."""
    gradio.routes.cancel_tasks = _cancel_tasks
    return {"middleware": [Middleware(PerEventCancel)]}
