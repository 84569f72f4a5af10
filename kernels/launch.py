"""A kernel launch as data: what a launcher plans, a GPU runs and the compile gate compiles.

Every launcher in ``fastgen.kernels`` is split in two: ``plan_<op>(..., arch=...)`` checks the
arguments, allocates the outputs, chooses a launch config for the target architecture and returns the
:class:`KernelLaunch` list (plus the outputs); ``<op>_fwd`` plans for the tensors' own device and runs
the launches. The compile gate (``tests/kernels/test_compile_gate.py``) and the static report
(``benchmarks/static_gpu_report.py``) call the same ``plan_<op>`` with CPU tensors and ``arch="sm90"``
(or any other target), so what they compile is exactly what a GPU launch would run: the same
arguments, strides, constexprs, options and config.

``arch``: ``"sm80"``, ``"sm89"``, ``"sm90"``, ``"sm100"``, ... (compute capability), or ``"cpu"`` for
Triton's interpreter (``TRITON_INTERPRET=1``), which takes small fixed configs and emulates what the
CPU lacks (fp8 conversions, libdevice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fastgen.errors import UnsupportedError

__all__ = ["KernelLaunch", "arch_capability", "compiled_misfit", "launch_arch", "run_launches"]


@dataclass(frozen=True)
class KernelLaunch:
    """One ``kernel[grid](*args, **kwargs)`` call."""

    kernel: Any
    """The ``@triton.jit`` function."""
    grid: tuple[int, ...]
    """Program grid."""
    args: tuple
    """Positional arguments: tensors (pointers), sizes, strides, scalars."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constexpr meta-parameters and compile options (``num_warps``, ``num_stages``, ...)."""
    table: str = ""
    """The launch-config table this launch's config came from (``"attention"``, ...); "" for a fixed one."""

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)

    @property
    def name(self) -> str:
        fn = self.kernel
        return getattr(fn, "__name__", None) or fn.fn.__name__

    @property
    def config(self) -> dict[str, int]:
        """The integer meta-parameters and options (block sizes, warps, stages) of this launch."""
        return {k: v for k, v in self.kwargs.items() if isinstance(v, int) and not isinstance(v, bool)}


def run_launches(launches: list[KernelLaunch]) -> None:
    for launch in launches:
        launch.run()


def launch_arch(device: torch.device) -> str:
    """The architecture to plan for: ``"sm90"`` for a CUDA device of capability 9.0, ``"cpu"`` otherwise
    (the interpreter; the launchers' own device check refuses the CPU without it)."""
    from fastgen.kernels.launch_configs import device_arch

    arch = device_arch(device)
    return arch if arch.startswith("sm") else "cpu"


def arch_capability(arch: str) -> tuple[int, int]:
    """``(9, 0)`` for ``"sm90"``, ``(10, 0)`` for ``"sm100"``, ``(0, 0)`` for ``"cpu"``."""
    if arch == "cpu":
        return (0, 0)
    if not arch.startswith("sm") or not arch[2:].isdigit() or len(arch) < 4:
        raise UnsupportedError(f"unknown kernel target architecture {arch!r} (expected 'cpu' or 'smXY', e.g. 'sm90')")
    digits = arch[2:]
    return int(digits[:-1]), int(digits[-1])


def compiled_misfit(launches: list[KernelLaunch]) -> str | None:
    """Why these launches should not be timed on this GPU, or None: the autotuner's filter.

    Compiles each launch for the current device (``kernel.warmup``: Triton's cache makes the later
    timed launch free) and reads what ptxas reported: register spills, and shared memory over the
    device's per-block opt-in limit (which would fail at launch). Never called under the interpreter.
    """
    import triton

    for launch in launches:
        compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
        device = triton.runtime.driver.active.get_current_device()
        limit = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
        if compiled.metadata.shared > limit:
            return f"{launch.name} needs {compiled.metadata.shared} B of shared memory (limit {limit})"
        compiled._init_handles()  # loads the module: fills n_regs / n_spills
        if compiled.n_spills:
            return f"{launch.name} spills {compiled.n_spills} bytes of registers"
    return None
