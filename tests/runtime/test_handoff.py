"""RequestFuture.add_handoff_callback: called in the resolving (or cancelling) thread, once, without
the hop to the runtime's callback threads that done-callbacks take."""

from __future__ import annotations

import logging
import threading

import pytest

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.requests import RequestFuture, RequestStatus


def _future(dispatched: list) -> RequestFuture:
    # A dispatcher that only queues: done-callbacks run when the test says so (as on callback threads).
    return RequestFuture(1, "text", callbacks=lambda fn: dispatched.append(fn) or True)


def test_handoff_runs_in_the_resolving_thread_before_the_dispatched_callbacks():
    dispatched: list = []
    future = _future(dispatched)
    order: list = []
    future.add_done_callback(lambda f: order.append("done"))
    future.add_handoff_callback(lambda f: order.append(("handoff", threading.current_thread().name, f.result())))
    resolver = threading.Thread(target=lambda: future._finish(RequestStatus.SUCCEEDED, result=7), name="device")
    resolver.start()
    resolver.join()
    assert order == [("handoff", "device", 7)]  # the done-callback is still queued on the dispatcher
    for fn in dispatched:
        fn()
    assert order[-1] == "done"


def test_handoff_once_and_at_once_when_already_done():
    future = _future([])
    calls: list = []
    future.add_handoff_callback(calls.append)
    assert future._finish(RequestStatus.SUCCEEDED, result=1)
    assert not future._finish(RequestStatus.SUCCEEDED, result=2)  # resolved once: nothing runs again
    assert calls == [future]
    future.add_handoff_callback(calls.append)  # added late: runs now, in this thread
    assert calls == [future, future]


def test_cancel_runs_handoffs_and_a_failing_one_is_logged(caplog):
    future = _future([])
    seen: list = []

    def boom(f):
        raise RuntimeError("bad handoff")

    future.add_handoff_callback(boom)
    future.add_handoff_callback(lambda f: seen.append(f.cancelled()))
    with caplog.at_level(logging.ERROR):
        assert future.cancel()
    assert seen == [True] and "bad handoff" in caplog.text
    assert future.status is RequestStatus.CANCELLED


def test_handoff_must_be_callable():
    with pytest.raises(InvalidArgumentError, match="fn"):
        _future([]).add_handoff_callback(None)
