"""Server-sent events for ``"stream": true``: each event is ``event: NAME\\ndata: JSON\\n\\n``.

``progress`` ``{"step": k, "steps": n, "candidate": i}`` after each denoising step of image ``i``,
``image`` ``{"index": i, "b64_json": ..., "seed": s, "score": {...} | null}`` as each image is done,
then ``done`` with the body of the non-streaming response, or ``error`` ``{"error": {...}}``.
The stream ends after ``done`` or ``error``; a comment line (``: keep-alive``) comes after 15 s
without an event. A client that disconnects cancels the images still
running, at their next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastgen.serve.errors import from_exception
from fastgen.serve.generation import GenerationJob

logger = logging.getLogger(__name__)

#: Response headers of an event stream: no caching, and no buffering by proxies (nginx) on the way.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: Seconds without an event after which a comment line is sent (proxies close idle streams).
KEEPALIVE_S = 15.0


def event(name: str, data: Any) -> bytes:
    """One event in the wire format (the JSON is on one line: ``json.dumps`` escapes newlines)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream(job: GenerationJob) -> AsyncIterator[bytes]:
    """The events of ``job`` as they happen. Closing the iterator (the client went away, or the
    server gave up on it) cancels the job's requests."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    finished = object()

    def sink(name: str, data: dict[str, Any]) -> None:
        queue.put_nowait((name, data))

    async def produce() -> None:
        try:
            body = await job.run(sink)
            queue.put_nowait(("done", body))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait(("error", from_exception(exc).body()))
        finally:
            queue.put_nowait(("", finished))

    task = asyncio.create_task(produce())
    try:
        while True:
            try:
                name, data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:  # a long wait in the queue: keep proxies from closing the stream
                yield b": keep-alive\n\n"
                continue
            if data is finished:
                break
            yield event(name, data)
    finally:
        if not task.done():
            task.cancel()
        job.cancel()


__all__ = ["HEADERS", "event", "stream"]
