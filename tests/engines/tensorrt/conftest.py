"""TensorRT backend tests: NVIDIA's real bindings (TensorRT 10 and 11) and stand-ins generated from them.

``trt`` runs a test once per TensorRT major version with the backend on a stand-in of that version
(host memory, CPU device), recording every TensorRT call; after the test each recorded call is
checked against BOTH versions' real signatures, so the backend cannot use an API one of them lacks.
Without the bindings (``make install`` puts them in .venv) the tests skip, except under CI, where
they fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import trt_bindings  # noqa: E402

MAJORS = tuple(trt_bindings.VERSIONS)


def require_api(major: int) -> dict:
    api = trt_bindings.api(major)
    if api is None:
        message = (f"TensorRT {major} bindings not installed (make install, or "
                   f"python tests/engines/tensorrt/trt_bindings.py)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return api


@pytest.fixture(params=MAJORS, ids=[f"trt{m}" for m in MAJORS])
def trt(request):
    """The backend running on a stand-in of TensorRT ``major`` (the param); yields the stand-in module."""
    import trt_standin

    from fastgen.engines import trt_lib

    api = require_api(request.param)
    record: list = []
    module = trt_standin.make_standin(api, record=record)
    trt_lib.use(module, host_memory=True)
    try:
        yield module
    finally:
        trt_lib.use(None)
    check_calls(record)


def check_calls(record: list) -> None:
    """Every recorded TensorRT call must be accepted by the real signatures of every major version.

    ``FASTGEN_TRT_CALLS=FILE`` also appends the calls to FILE (JSON lines), to list what was checked.
    """
    import json

    import trt_standin

    if os.environ.get("FASTGEN_TRT_CALLS"):
        with open(os.environ["FASTGEN_TRT_CALLS"], "a") as f:
            for call in sorted(set(record), key=repr):
                f.write(json.dumps(call) + "\n")

    for major in MAJORS:
        api = require_api(major)
        for call in set(record):
            problem = trt_standin.check_call(api, call)
            assert problem is None, f"TensorRT {api['version']}: {problem}"
