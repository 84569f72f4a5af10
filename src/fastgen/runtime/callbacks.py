"""The threads that run clients' done-callbacks, so a slow callback never stalls a device thread.

A small pool owned by one :class:`~fastgen.runtime.runtime.Runtime`: threads start on demand (a
runtime whose clients add no callbacks starts none), up to ``max_threads``, and are daemons (a
callback stuck forever does not hold up the interpreter's exit). One future's callbacks run in
one task, in the order they were added. ``close`` may be called from one of the pool's own
threads (a callback that shuts the runtime down): it never joins the thread it runs on.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable

logger = logging.getLogger(__name__)

_POOLS: weakref.WeakSet[CallbackPool] = weakref.WeakSet()
_hooked = False


def _close_at_exit() -> None:
    """Interpreter exit: callbacks of requests failed from now on run in the failing thread (daemon
    pool threads may not get to run them any more)."""
    for pool in list(_POOLS):
        pool.close(timeout=0.0)


class CallbackPool:
    """``submit(fn) -> bool``: run ``fn()`` on one of the pool's threads (False once closed: the caller
    runs it itself)."""

    def __init__(self, max_threads: int = 2, name: str = "fastgen-callbacks") -> None:
        self.max_threads = max_threads
        self.name = name
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._pending = 0
        self._closed = False
        global _hooked
        if not _hooked:  # registered after the worker's own exit hook, so it runs before it (LIFO)
            _hooked = True
            atexit.register(_close_at_exit)
        _POOLS.add(self)

    def submit(self, fn: Callable[[], None]) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._pending += 1
            self._tasks.put(fn)
            if self._pending > self._idle and len(self._threads) < self.max_threads:
                thread = threading.Thread(target=self._main, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return True

    def _main(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            fn = self._tasks.get()
            with self._lock:
                self._idle -= 1
                if fn is not None:
                    self._pending -= 1
            if fn is None:
                return
            try:
                fn()
            except BaseException:  # a callback's KeyboardInterrupt / SystemExit must not end the thread silently
                logger.exception("a done callback raised")

    @property
    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def close(self, timeout: float | None = None) -> None:
        """Run what was submitted, then stop the threads; wait up to ``timeout`` seconds (None: until
        they end) unless called from one of them. Idempotent; later submissions return False."""
        with self._lock:
            if not self._closed:
                self._closed = True
                for _ in self._threads:
                    self._tasks.put(None)  # after every task already queued: those still run
            threads = list(self._threads)
        me = threading.current_thread()
        if me in threads:
            return  # a callback closing its own pool: the threads end once their tasks are done
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        for thread in threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))


__all__ = ["CallbackPool"]
