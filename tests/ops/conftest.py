"""Ops tests run the Triton attention backend on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it must be set before any
kernel module is imported: conftest files are imported before the test modules they govern.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
