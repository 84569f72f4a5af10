"""The compile gate: every kernel a launcher starts, at its default config, compiled for A100 (sm80),
L4 (sm89), H100 (sm90) and B200 (sm100) on the CPU with the ptxas Triton ships.

The launches come from the launchers' own ``plan_<op>(..., arch=...)`` (``fastgen.kernels.aot_cases``),
so the arguments, constexprs and configs are what a GPU launch would use. Each must compile, fit the
target's shared memory, not spill, use the expected tensor cores (wgmma on Hopper, tcgen05 on Blackwell,
integer MMA for int8, fp8 MMA for fp8) and, for attention and the scaled GEMMs, load through 128-bit
cp.async or TMA. The whole sweep and its autotune candidates: ``benchmarks/static_gpu_report.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from fastgen.kernels import aot, aot_cases
from fastgen.kernels.launch_configs import GATE_ARCHS, SHIPPED_DIR


def _have_ptxas() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path) and os.path.exists(knobs.nvidia.cuobjdump.path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this Triton build
        return False


pytestmark = pytest.mark.skipif(not _have_ptxas(), reason="this Triton build ships no ptxas / cuobjdump")

GATE = aot_cases.gate_pairs()


# Two configs that do not fit (compiled with the gate, to show its rules catch them): the old head-dim-256
# default on L4 exceeds its shared memory; 128x64 on 4 warps at head dim 160 spills on H100.
BAD = [("attention/fp16-hd256", "sm89", {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}),
       ("attention/fp16-hd160", "sm90", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3})]


@pytest.fixture(scope="module")
def gate_records() -> dict[tuple, list[dict]]:
    """All gate compiles at once, in worker processes (one per core): about 4.5 minutes on two cores.
    Keyed by (case, arch) for the defaults and (case, arch, "bad") for :data:`BAD`."""
    recs = aot.compile_cases(GATE + BAD, advisories=True)
    out: dict[tuple, list[dict]] = {}
    for r in recs:
        key = (r["case"], r["arch"]) if r.get("requested") is None else (r["case"], r["arch"], "bad")
        out.setdefault(key, []).append(r)
    return out


@pytest.mark.parametrize(("case_id", "arch"), GATE, ids=[f"{c}@{a}" for c, a in GATE])
def test_default_config_compiles_and_fits(gate_records, case_id, arch):
    recs = gate_records.get((case_id, arch))
    assert recs, f"{case_id} on {arch}: nothing compiled"
    problems = [p for r in recs for p in aot.record_problems(r)]
    assert not problems, "\n".join(problems)


def test_gate_covers_every_class_and_target():
    """Every shape class of every default table has a gate case on that target, so no table entry goes
    unchecked; and the gate compiles for all four targets."""
    gated = {(aot_cases.case_by_id(c).family, aot_cases.case_by_id(c).shape_class, a) for c, a in GATE}
    assert {a for _, a in GATE} == set(GATE_ARCHS)
    missing = []
    for arch in GATE_ARCHS:
        table = json.loads((SHIPPED_DIR / f"{arch}.json").read_text())
        assert table["arch"] == arch and table["format"] == 1
        for family, classes in table["kernels"].items():
            for cls in classes:
                if (family, cls, arch) not in gated:
                    missing.append(f"{family} {cls} {arch}")
    assert not missing, f"default-table classes no gate case compiles: {missing}"


def test_every_table_entry_records_its_static_figures():
    for arch in GATE_ARCHS:
        table = json.loads((SHIPPED_DIR / f"{arch}.json").read_text())
        for family, classes in table["kernels"].items():
            for cls, entry in classes.items():
                if entry is None:
                    continue  # no fitting config: refused
                assert entry["config"] and entry["static"], (arch, family, cls)
                for figures in entry["static"].values():
                    assert figures["spills"] == 0, (arch, family, cls, figures)
                    assert figures["smem"] <= aot.LIMITS[arch].smem_block, (arch, family, cls, figures)


def test_the_gate_rejects_a_config_that_does_not_fit(gate_records):
    """What the gate would say if a default were changed to one of :data:`BAD`."""
    hd256 = [p for r in gate_records[("attention/fp16-hd256", "sm89", "bad")] for p in aot.record_problems(r)]
    hd160 = [p for r in gate_records[("attention/fp16-hd160", "sm90", "bad")] for p in aot.record_problems(r)]
    assert any("shared memory" in p for p in hd256), hd256
    assert any("spills" in p for p in hd160), hd160


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
def test_defaults_fit_the_gpu_at_runtime():
    """On a real GPU, what the driver loads agrees with the gate: no default launch spills or exceeds the
    device's shared memory (``compiled_misfit``, the autotuner's own filter)."""
    import torch

    from fastgen.kernels.launch import compiled_misfit, launch_arch

    arch = launch_arch(torch.device("cuda"))
    for case in aot_cases.cases():
        if not case.gate or arch not in case.archs():
            continue
        launches = [dataclass_to_cuda(lc) for lc in case.build(arch)]
        assert compiled_misfit(launches) is None, case.id


def dataclass_to_cuda(launch):
    """The same launch with its tensors (and descriptors' tensors) on the GPU."""
    import dataclasses

    import torch

    def move(a):
        if isinstance(a, torch.Tensor):
            return a.cuda()
        if hasattr(a, "base") and isinstance(getattr(a, "base", None), torch.Tensor):  # TensorDescriptor
            return dataclasses.replace(a, base=a.base.cuda())
        return a

    return dataclasses.replace(launch, args=tuple(move(a) for a in launch.args))
