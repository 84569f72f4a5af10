"""onnxruntime session options, built in one place for engines, export verification and quantization.

onnxruntime is imported inside the functions only: importing this module stays free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fastgen.core.cpus import MAX_THREADS
from fastgen.errors import InvalidArgumentError

#: ``graph_optimization`` names -> onnxruntime's ``GraphOptimizationLevel`` members.
GRAPH_OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                             "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

#: Session entries under which onnxruntime computes what a quantized graph states:
#: ``session.qdq_matmulnbits_accuracy_level`` 1 keeps weight-only MatMulNBits in fp32 (the default,
#: 4, quantizes the activations to int8 too); ``session.x64quantprecision`` 1 turns U8S8 GEMMs into
#: U8U8 on x86 CPUs without VNNI, whose U8S8 kernel saturates (measured on AVX2 with onnxruntime
#: 1.32: the static QDQ text classifier's top-1 agreement falls from 100% to 98.4% without it).
EXACT_QUANT_ENTRIES = {"session.qdq_matmulnbits_accuracy_level": "1", "session.x64quantprecision": "1"}

#: onnxruntime's log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
LOG_ERRORS = 3

CPU_PROVIDER = "CPUExecutionProvider"


def session_options(*, intra_op_threads: int = 0, inter_op_threads: int = 0, spin_wait: bool | None = None,
                    graph_optimization: str = "all", exact_quant: bool = True, log_severity: int = LOG_ERRORS,
                    entries: Mapping[str, str] | None = None) -> Any:
    """An ``onnxruntime.SessionOptions`` with fastgen's settings.

    ``intra_op_threads`` / ``inter_op_threads``: 0 to :data:`fastgen.core.cpus.MAX_THREADS`; 0 keeps
    onnxruntime's default (intra-op: one thread per physical core of the machine, which engines cut
    to :func:`fastgen.core.cpus.limited_cpus`; inter-op: its own default). ``spin_wait``: whether
    idle intra- and inter-op threads spin between runs; None keeps onnxruntime's default (they
    spin). ``graph_optimization``: ``disable``, ``basic``, ``extended`` or ``all`` (onnxruntime's
    default). ``exact_quant``: the
    :data:`EXACT_QUANT_ENTRIES`, so quantized graphs compute what they state (fp32 math is
    unaffected). ``log_severity``: onnxruntime's own log level (3: errors only; it prints every
    provider-assignment warning to stderr otherwise). ``entries``: further session config entries,
    applied last (they win over ``exact_quant``'s).
    """
    if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
        raise InvalidArgumentError("graph_optimization", graph_optimization, GRAPH_OPTIMIZATION_LEVELS)
    for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
        # onnxruntime would try to start any count it is given: 10**6 threads exhausts the machine.
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THREADS:
            raise InvalidArgumentError(name, value, f"integers 0 to {MAX_THREADS}")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION_LEVELS[graph_optimization])
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        so.inter_op_num_threads = inter_op_threads
    config: dict[str, str] = {}
    if spin_wait is not None:
        spin = "1" if spin_wait else "0"
        config.update({"session.intra_op.allow_spinning": spin, "session.inter_op.allow_spinning": spin})
    if exact_quant:
        config.update(EXACT_QUANT_ENTRIES)
    config.update(entries or {})
    for key, value in config.items():  # each key once: onnxruntime warns when one is overwritten
        so.add_session_config_entry(key, value)
    so.log_severity_level = log_severity
    return so


def cpu_session(path: str | os.PathLike, options: Any = None, **settings: Any) -> Any:
    """An ``onnxruntime.InferenceSession`` of the model at ``path`` on the CPU provider, with ``options``
    or :func:`session_options` (``**settings``)."""
    if options is not None and settings:
        raise InvalidArgumentError("settings", sorted(settings), reason="give options or settings, not both")
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options if options is not None else session_options(**settings),
                                providers=[CPU_PROVIDER])


__all__ = ["CPU_PROVIDER", "EXACT_QUANT_ENTRIES", "GRAPH_OPTIMIZATION_LEVELS", "LOG_ERRORS", "cpu_session",
           "session_options"]
