"""One builder of onnxruntime session options (fastgen.core.ort), as each of its callers had them."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from fastgen.core.ort import EXACT_QUANT_ENTRIES, cpu_session, session_options
from fastgen.errors import InvalidArgumentError

SPIN = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def entry(options, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # onnxruntime raises for a key that was never set
        return None


def summary(options) -> dict:
    """What fastgen sets on a SessionOptions, as comparable data."""
    return {"level": int(options.graph_optimization_level), "intra": options.intra_op_num_threads,
            "inter": options.inter_op_num_threads, "log": options.log_severity_level,
            **{k: entry(options, k) for k in (*SPIN, *EXACT_QUANT_ENTRIES, "session.extra")}}


def test_defaults_are_onnxruntimes_plus_exact_quantization_and_a_quiet_log():
    import onnxruntime as ort

    got = summary(session_options())
    plain = summary(ort.SessionOptions())
    assert got == {**plain, "log": 3, **EXACT_QUANT_ENTRIES}
    assert got["level"] == 99 and got[SPIN[0]] is None  # ORT_ENABLE_ALL; spinning left to onnxruntime
    assert entry(session_options(exact_quant=False), "session.x64quantprecision") is None


def test_engine_options_as_before():
    """engines.ort_backend: level, threads and spinning from the execution options, both spin entries set."""
    from fastgen.engines.config import ExecutionOptions
    from fastgen.engines.ort_backend import session_options as engine_options

    got = summary(engine_options(ExecutionOptions(graph_optimization="basic", intra_op_threads=2, inter_op_threads=1)))
    assert got == {"level": 1, "intra": 2, "inter": 1, "log": 3, SPIN[0]: "0", SPIN[1]: "0",
                   **EXACT_QUANT_ENTRIES, "session.extra": None}
    assert summary(engine_options(ExecutionOptions(spin_wait=True)))[SPIN[1]] == "1"


def test_engine_log_follows_debug_logging(caplog):
    from fastgen.engines.config import ExecutionOptions
    from fastgen.engines.ort_backend import session_options as engine_options

    caplog.set_level(logging.DEBUG, logger="fastgen.engines.ort_backend")
    assert engine_options(ExecutionOptions()).log_severity_level == 1


def test_quant_and_verify_options_as_before(tmp_path):
    """quant.onnx.exact_session_options and export.verify.ort_runner: exact entries, quiet log, threads."""
    import onnx
    from onnx import TensorProto, helper

    from fastgen.quant.onnx import exact_session_options

    got = summary(exact_session_options(**{"session.extra": "1", "session.x64quantprecision": "0"}))
    assert got["session.extra"] == "1" and got["session.x64quantprecision"] == "0"  # given entries win
    assert got["session.qdq_matmulnbits_accuracy_level"] == "1" and got["log"] == 3 and got[SPIN[0]] is None

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "relu.onnx"))
    session = cpu_session(tmp_path / "relu.onnx", intra_op_threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    got = summary(session.get_session_options())
    assert got["intra"] == 1 and got["log"] == 3 and got["session.x64quantprecision"] == "1"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"graph_optimization": "max"}, "graph_optimization"),
    ({"intra_op_threads": -1}, "intra_op_threads"),
    ({"inter_op_threads": 1.5}, "inter_op_threads"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        session_options(**kwargs)


def test_importing_does_not_import_onnxruntime():
    code = "import sys, fastgen.core.ort; assert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
