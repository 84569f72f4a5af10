"""The fault suite's hang guard: a call that could hang runs in a daemon thread under a hard timeout, so
a regression fails its test instead of hanging CI (and a thread stuck for good cannot block the exit).

Imported as ``from hangs import within``: ``conftest.py`` puts this folder on ``sys.path`` (the suite
runs with ``--import-mode=importlib``, which does not).
"""

from __future__ import annotations

import os
import threading

import pytest

#: Seconds a risky call (a build, a CLI command, a cache read) may take before it counts as hung.
TIMEOUT = float(os.environ.get("FASTGEN_FAULTS_TIMEOUT", "60"))


def within(seconds: float, fn, *args, unblock=None, what: str | None = None, **kwargs):
    """``fn(*args, **kwargs)`` in a daemon thread: its value, or its exception re-raised in the test's
    thread; the test fails if it has not returned in ``seconds``. ``unblock()`` is called first then,
    to let the stuck thread finish instead of leaking it; ``what`` names the call in the failure."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    # (not named "fastgen-...": the runtime tests count the threads with that prefix as fastgen's own)
    thread = threading.Thread(target=target, name="faults-within", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        pytest.fail(f"{what or getattr(fn, '__name__', fn)} did not return within {seconds:g} s (hang)")
    if "error" in box:
        raise box["error"]
    return box.get("value")
