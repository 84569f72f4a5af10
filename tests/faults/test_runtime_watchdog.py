"""Hostile use of the batched runtime (issue 15), part 2: a hung engine (the watchdog, shutdown
timeouts, runtimes dropped or left at interpreter exit without shutdown), image files decoded off the
caller's thread with bad files failing through their future, and the probes next to them (passed and
extreme deadlines, huge priorities, BaseException from an engine or its preparation, thread leaks).

Fake executors and scorers (``runtime_fakes.py``, no model is built): every call that could hang runs
under a hard timeout (``hangs.within``), and no thread may outlive a test (``no_leaked_threads``).
Cancellation, out-of-memory back-off and callbacks are in ``test_runtime_cancellation.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hangs import within
from runtime_fakes import (
    LIMIT,
    FakeDeferred,
    FakeScoring,
    Gate,
    eventually,
    ours,
    start,
    submit,
    text_runtime,
)

from fastgen.errors import FastgenError, InvalidArgumentError
from fastgen.runtime.requests import (
    DeadlineExceededError,
    RequestError,
    RequestStatus,
    ScoreRequest,
    ShutdownError,
)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


# --- 1. a hung engine: watchdog, shutdown timeout, runtimes never shut down ------------------------

def test_a_hung_engine_fails_its_requests_and_the_others_keep_serving():
    from fastgen.runtime.requests import EngineTimeoutError

    text, image = FakeScoring(), FakeScoring()
    hang = text.hang = Gate()
    worker = start({"text": text, "image": image}, max_wait_ms=0, call_timeout_s=0.3)
    stuck, _ = submit(worker, "text", "stuck")
    assert hang.entered.wait(LIMIT)
    assert submit(worker, "image", "img")[0].result(LIMIT) == "IMG"  # another engine is not blocked
    err = stuck.exception(LIMIT)
    assert isinstance(err, EngineTimeoutError) and isinstance(err, FastgenError) and "\n" not in str(err)
    assert "text" in str(err) and "call_timeout_s" in str(err)
    t0 = time.monotonic()
    with pytest.raises(EngineTimeoutError):  # wedged: refused at once
        submit(worker, "text", "next")
    assert time.monotonic() - t0 < 0.5
    assert submit(worker, "image", "img2")[0].result(LIMIT) == "IMG2"
    text.hang = None
    hang.opened.set()  # the call returns after all: the engine serves again
    eventually(lambda: not worker.stalled("text"))
    assert submit(worker, "text", "back")[0].result(LIMIT) == "BACK"
    within(LIMIT, worker.close)


@pytest.mark.parametrize("drain", [False, True])
def test_shutdown_honours_its_timeout_with_a_hung_engine(drain):
    ex = FakeScoring()
    hang = ex.hang = Gate()
    worker = start({"text": ex}, max_wait_ms=0, call_timeout_s=None)
    stuck, _ = submit(worker, "text", "stuck")
    queued, _ = submit(worker, "text", "queued")
    assert hang.entered.wait(LIMIT)
    t0 = time.monotonic()
    within(5.0, worker.close, drain=drain, timeout=0.5)
    assert time.monotonic() - t0 < 1.0  # no hidden grace
    assert isinstance(stuck.exception(0), ShutdownError) and isinstance(queued.exception(0), ShutdownError)
    ex.hang = None
    hang.opened.set()  # let the stuck thread go: it exits on its own (checked by no_leaked_threads)


def test_a_runtime_dropped_without_shutdown_stops_its_threads():
    before = ours()
    rt = text_runtime()
    fut = rt.submit(ScoreRequest("a"))
    fut.add_done_callback(lambda f: None)
    assert fut.result(LIMIT) == 0.0 and ours() - before
    del rt
    gc.collect()
    eventually(lambda: not ours() - before)


def test_interpreter_exit_without_shutdown_fails_pending_requests_and_exits():
    code = textwrap.dedent("""
        import threading, types
        from fastgen.runtime.config import RuntimeConfig
        from fastgen.runtime.metrics import Metrics
        from fastgen.runtime.request_scheduler import Job, RequestScheduler
        from fastgen.runtime.requests import RequestFuture
        from fastgen.runtime.worker import Ticket, Worker

        hung = types.SimpleNamespace(run=lambda decision: threading.Event().wait())
        worker = Worker(RequestScheduler(RuntimeConfig(max_wait_ms=0)), {"text": hung, "image": hung}, Metrics())
        worker.start()
        for rid, kind in ((1, "text"), (2, "image"), (3, "image")):
            fut = RequestFuture(rid, kind)
            fut.add_done_callback(lambda f: print("ended", f.request_id, type(f.exception()).__name__, flush=True))
            worker.submit(Job(rid, kind, 16, payload=Ticket(fut, "x")))
        print("exiting", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "exiting" and sorted(lines[1:]) == [f"ended {i} ShutdownError" for i in (1, 2, 3)]


# --- 2. images are decoded off the caller's thread -------------------------------------------------

class FakeImageScorer:
    """An image scorer whose preprocessor records the threads that decode files."""

    kind = "image"

    def __init__(self) -> None:
        from fastgen.pipelines.classifier_images import images_to_uint8

        self.decoders: list[threading.Thread] = []

        def to_uint8(images, argument="images"):
            if any(isinstance(i, (str, os.PathLike)) for i in images):
                self.decoders.append(threading.current_thread())
            return images_to_uint8(images, (8, 8), argument=argument)

        self.image_preprocessor = SimpleNamespace(size=(8, 8), channels=3, to_uint8=to_uint8,
                                                  feeds=lambda px: {"pixels": px.float()})
        self.engine = SimpleNamespace(spec=SimpleNamespace(inputs=[SimpleNamespace(shape=(64, 3, 8, 8))]))

    logits = staticmethod(lambda feeds: feeds["pixels"].mean(dim=(1, 2, 3)))
    scores = staticmethod(lambda logits: [round(float(x), 3) for x in logits])


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb when huge)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_image_files_are_decoded_off_the_callers_thread_and_bad_files_fail_through_the_future(tmp_path):
    from PIL import Image

    from fastgen.runtime import Runtime

    Image.fromarray(np.full((600, 800, 3), 200, np.uint8)).save(good := tmp_path / "big.jpg", quality=90)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(_png(40000, 40000))
    (tmp_path / "dir.jpg").mkdir()
    bad = ["empty.jpg", "truncated.jpg", "text.png", "bomb.png", "dir.jpg", "missing.jpg"]
    scorer = FakeImageScorer()
    with Runtime(scorer=scorer, max_wait_ms=0) as rt:
        assert rt.submit(ScoreRequest(good)).result(LIMIT) == pytest.approx(200.0, abs=1.0)
        assert scorer.decoders and threading.current_thread() not in scorer.decoders

        async def main():
            loop_thread = threading.current_thread()
            score = await rt.score(str(good))
            again = await rt.submit_async(ScoreRequest(good, priority=3))
            return loop_thread, score, again

        loop_thread, score, again = asyncio.run(main())
        assert score == again == pytest.approx(200.0, abs=1.0) and loop_thread not in scorer.decoders
        futures = [rt.submit(ScoreRequest(tmp_path / name)) for name in bad]  # nothing raises here
        for name, fut in zip(bad, futures):
            err = fut.exception(LIMIT)
            assert isinstance(err, InvalidArgumentError) and name in str(err) and "\n" not in str(err), (name, err)
            assert fut.status is RequestStatus.FAILED
        for item in (np.zeros((4, 4), np.float32), np.zeros((1, 4, 4, 3), np.uint8), {"not": "an image"},
                     torch.zeros(2, 2, 2, 2)):
            with pytest.raises(InvalidArgumentError) as err:  # cheap checks still refuse at submission
                rt.submit(ScoreRequest(item, kind="image"))
            assert "item" in str(err.value) and "\n" not in str(err.value)
        assert rt.stats()["inflight"] == 0


# --- probes: deadlines, priorities, BaseException from an engine -----------------------------------

def test_a_deadline_already_passed_expires_without_running_and_extreme_deadlines():
    ex = FakeScoring()
    worker = start({"text": ex}, max_wait_ms=0)
    fut, _ = submit(worker, "text", "late", deadline=worker.scheduler.clock() - 1.0)
    err = fut.exception(LIMIT)
    assert isinstance(err, DeadlineExceededError) and fut.status is RequestStatus.EXPIRED and ["late"] not in ex.batches
    within(LIMIT, worker.close)
    assert ScoreRequest("x", deadline_s=sys.float_info.max).deadline_s == sys.float_info.max
    for bad in (float("nan"), float("inf"), -1.0, 0, np.float64("nan"), True, "1"):
        with pytest.raises(InvalidArgumentError):
            ScoreRequest("x", deadline_s=bad)


def test_priority_overflow_is_refused_in_one_line():
    for bad in (10**400, -(10**400), 2**63, np.int64(2**62), 1.5, True):
        with pytest.raises(InvalidArgumentError) as err:
            ScoreRequest("x", priority=bad)
        assert "priority" in str(err.value) and "\n" not in str(err.value)
    assert ScoreRequest("x", priority=-(10**9)).priority == -(10**9)
    with text_runtime() as rt:
        assert rt.submit(ScoreRequest("x", priority=10**9)).result(LIMIT) == 0.0


@pytest.mark.parametrize("poison", ["kbd", "exit", "prep-kbd"])
def test_an_engine_raising_base_exceptions_fails_its_batch_and_the_runtime_keeps_serving(poison, caplog):
    staged = poison.startswith("prep")
    worker = start({"text": FakeDeferred() if staged else FakeScoring()}, max_wait_ms=0)
    fut, _ = submit(worker, "text", poison, staged=staged)
    err = fut.exception(LIMIT)
    assert isinstance(err, RequestError) and isinstance(err, Exception)  # never re-raised as a KeyboardInterrupt
    assert ("SystemExit" if poison == "exit" else "KeyboardInterrupt") in str(err) and "\n" not in str(err)
    assert submit(worker, "text", "after", staged=staged)[0].result(LIMIT) == "AFTER"  # not killed, silently or not
    within(LIMIT, worker.close)
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
