"""One request's callbacks, in order, on the runtime's callback threads: progress first, then done.

A generation request reports each denoising step to its progress callbacks
(:meth:`~fastgen.runtime.requests.RequestFuture.add_progress_callback`). The callback pool has
several threads, so two steps dispatched as two independent tasks could run out of order (or at the
same time). Each future with progress callbacks therefore gets a :class:`SerialDispatch`: its tasks
(every step's progress, then the done-callbacks) run one at a time in the order they were posted,
as one pool task that drains the queue; a new pool task is submitted only when none is draining.
A future without progress callbacks never gets one (no per-step work at all).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)

Dispatch = Callable[[Callable[[], None]], bool]
"""``dispatch(fn) -> bool``: run ``fn()`` on another thread; False when it cannot (the pool is closed)."""


class SerialDispatch:
    """Runs posted functions one at a time, in posting order, through ``dispatch``.

    ``post(fn, required=False)`` marks a task that may be dropped when ``dispatch`` refuses (the pool
    is closed, at shutdown or interpreter exit): progress never runs on the posting thread, which is
    the engine's. Required tasks (done-callbacks) then run in the posting thread, as a plain
    future's do. A task that raises is logged; the ones after it still run.
    """

    def __init__(self, dispatch: Dispatch | None) -> None:
        self._dispatch = dispatch
        self._lock = threading.Lock()
        self._tasks: deque[tuple[Callable[[], None], bool]] = deque()
        self._draining = False

    def post(self, fn: Callable[[], None], *, required: bool = True) -> None:
        with self._lock:
            self._tasks.append((fn, required))
            if self._draining:  # the running drain takes it, after the ones before it
                return
            self._draining = True
        if self._dispatch is not None and self._dispatch(self._drain):
            return
        self._drain(inline=True)

    def _drain(self, inline: bool = False) -> None:
        while True:
            with self._lock:
                if not self._tasks:
                    self._draining = False
                    return
                fn, required = self._tasks.popleft()
            if inline and not required:
                continue
            try:
                fn()
            except BaseException:  # a callback's error must not stop the ones after it (its done-callbacks)
                logger.exception("a runtime callback raised")


__all__ = ["Dispatch", "SerialDispatch"]
