"""The compile gate's reading of machine code and its rules, on synthetic figures (no compile)."""

from __future__ import annotations

from fastgen.kernels import aot, aot_cases
from fastgen.kernels.launch_configs import GATE_ARCHS

SASS = """
        code for sm_90a
                Function : _attn_fwd_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3+0x800], desc[UR4][R6.64] ;
        /*0030*/                   LDG.E.U16 R8, desc[UR4][R10.64] ;
        /*0040*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ;
        /*0050*/              @!P0 HGMMA.64x64x16.F32 R24, gdesc[UR12], R24, gsb0 ;
        /*0060*/                   STL [R1], R9 ;
        /*0070*/                   LDL R9, [R1] ;
        /*0080*/                   HMMA.16832.F32.E4M3.E4M3 R4, R8, R12, R4 ;
        /*0090*/                   UTMALDG.2D [UR4], [UR6] ;
 Resource usage:
  REG:168 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_reads_the_sass():
    fig = aot.StaticFigures("_attn_fwd_kernel", "sm90", {})
    aot._read_sass(fig, SASS)
    assert fig.regs == 168
    assert fig.mma == {"HGMMA": 2, "QMMA": 1}  # sm_89's fp8 mma.sync is an HMMA.*.E4M3
    assert fig.ldgsts == {128: 2} and fig.ldg == {16: 1} and fig.utmaldg == 1
    assert fig.spill_instrs == 2
    assert fig.mma_kind == "HGMMA+QMMA" and fig.loads == "TMA"


def test_occupancy_takes_the_tightest_resource():
    lim = aot.LIMITS["sm90"]
    assert aot.occupancy(128, 0, 4, lim) == 16  # 128 regs x 128 threads: 4 blocks of 4 warps
    assert aot.occupancy(255, 0, 8, lim) == 8  # 255 regs x 256 threads: one block of 8 warps
    assert aot.occupancy(64, 200_000, 4, lim) == 4  # shared memory: one block
    assert aot.occupancy(32, 0, 4, aot.LIMITS["sm89"]) == 48  # warp slots


def _fig(**kw):
    base = dict(kernel="k", arch="sm90", config={"BLOCK_M": 128}, regs=128, smem=1000, smem_limit=232448,
                mma={"HGMMA": 4}, ldgsts={128: 8})
    base.update(kw)
    return aot.StaticFigures(**base)


def test_rules():
    assert aot.problems(_fig(), expect_mma=("f16",), expect_wide_loads=True) == []
    assert "does not compile" in aot.problems(_fig(ok=False, error="CompilationError: x"))[0]
    assert "shared memory" in aot.problems(_fig(smem=240_000))[0]
    assert "spills" in aot.problems(_fig(spill_instrs=3))[0]
    assert "expected HGMMA" in aot.problems(_fig(mma={"HMMA": 8}), expect_mma=("f16",))[0]
    assert "expected UTCIMMA" in aot.problems(_fig(arch="sm100", mma={"UTCHMMA": 1}), expect_mma=("int8",))[0]
    assert aot.problems(_fig(arch="sm89", mma={"QMMA": 2, "IMMA": 2}), expect_mma=("int8", "fp8")) == []
    assert aot.problems(_fig(mma={"HMMA": 2}), expect_mma=("f16-any",)) == []
    assert "not 128-bit" in aot.problems(_fig(ldgsts={}, ldg={16: 96}), expect_wide_loads=True)[0]
    assert "not 128-bit" in aot.problems(_fig(ldgsts={128: 4, 32: 2}), expect_wide_loads=True)[0]
    assert aot.problems(_fig(ldgsts={128: 4, 64: 2}), expect_wide_loads=True) == []  # 16-column tail chunk
    assert aot.problems(_fig(ldgsts={}, utmaldg=3), expect_wide_loads=True, expect_tma=True) == []
    assert "TMA" in aot.problems(_fig(), expect_tma=True)[0]
    adv = ["ptxas info : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..."]
    assert "serialized" in aot.problems(_fig(advisories=adv))[0]


def test_a_refusal_for_lack_of_a_fitting_config_passes_the_gate():
    case = aot_cases.gate_pairs()[0][0]
    assert aot.record_problems({"case": case, "arch": "sm89", "plan_error": "NoFittingConfig: ..."}) == []
    assert aot.record_problems({"case": case, "arch": "sm89", "plan_error": "TypeError: ..."})


def test_cases_plan_on_every_target_without_a_gpu():
    """Every case plans (nothing launched) on every target it claims, through the launchers' code, or is
    refused because its default table has no fitting config for it there."""
    from fastgen.kernels.launch_configs import NoFittingConfig

    for case in aot_cases.cases():
        for arch in case.archs():
            try:
                launches = case.build(arch)
            except NoFittingConfig:
                continue
            assert launches and any(case.role(lc) == "main" for lc in launches), (case.id, arch)
    assert set(a for _, a in aot_cases.gate_pairs()) == set(GATE_ARCHS)
