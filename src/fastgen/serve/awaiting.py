"""Runtime futures from an asyncio server: submitting a request's runtime requests all or none, and
awaiting them without blocking the event loop (the device's thread hands each outcome straight to
the loop)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastgen.runtime.requests import RequestFuture


def submit_all(runtime: Any, requests: list[Any]) -> list[RequestFuture]:
    """Submit every request, or none: when one is refused (a full queue), those already accepted are
    cancelled before the error goes on."""
    futures: list[RequestFuture] = []
    try:
        for request in requests:
            futures.append(runtime.submit(request))
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return futures


def awaitable(future: RequestFuture, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """An asyncio future completed from ``future`` by a handoff callback: the device's thread posts the
    outcome straight into the loop (``asyncio.wrap_future`` would go through the runtime's callback
    threads first, one more thread switch per request)."""
    waiter = loop.create_future()

    def settle(done: RequestFuture) -> None:
        if waiter.done():  # the awaiting task was cancelled meanwhile
            return
        if done.cancelled():
            waiter.cancel()
        elif done.exception() is not None:
            waiter.set_exception(done.exception())
        else:
            waiter.set_result(done.result())

    def handoff(done: RequestFuture) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits any more
            loop.call_soon_threadsafe(settle, done)

    future.add_handoff_callback(handoff)
    return waiter


async def gather(futures: list[RequestFuture]) -> list[Any]:
    """The results of runtime futures, awaited without blocking the loop; cancelled if the awaiting
    task is (the ``finally`` cancels every request not done: a no-op for the others)."""
    loop = asyncio.get_running_loop()
    try:
        return list(await asyncio.gather(*(awaitable(f, loop) for f in futures)))
    finally:
        for future in futures:
            future.cancel()


__all__ = ["awaitable", "gather", "submit_all"]
