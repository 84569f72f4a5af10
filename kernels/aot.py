"""Compile planned kernel launches ahead of time for NVIDIA GPUs, without a GPU, and read the result.

A :class:`~fastgen.kernels.launch.KernelLaunch` (what a launcher's ``plan_<op>(..., arch=...)``
returns) is specialised exactly as Triton's JIT would on that target (its own binder: pointer
alignment, ``tt.divisibility``, ``== 1`` strides, constexprs, options), compiled with
``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` and read back with the tools Triton ships
(``cuobjdump -sass -res-usage``, ptxas's ``-v`` log): registers, local memory (spills), shared
memory against the target's per-block limit, the tensor-core instructions (HMMA / IMMA / QMMA
mma.sync, HGMMA / IGMMA / QGMMA wgmma on Hopper, UTCHMMA / UTCIMMA / UTCQMMA tcgen05 on Blackwell),
cp.async (LDGSTS) and TMA (UTMALDG) loads and their widths, ptxas advisories, and the resulting
occupancy. :func:`problems` is the compile gate's verdict; ``tests/kernels/test_compile_gate.py``
and ``benchmarks/static_gpu_report.py`` drive it over :mod:`fastgen.kernels.aot_cases`.

The kernels must be imported with ``TRITON_INTERPRET`` unset (the interpreter replaces the JIT
functions), so :func:`compile_cases` runs in fresh worker processes; this module itself imports no
kernel at import time.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fastgen.core.progress import steps
from fastgen.kernels.launch import KernelLaunch, arch_capability
from fastgen.kernels.launch_configs import SMEM_LIMIT

__all__ = ["ArchLimits", "StaticFigures", "compile_cases", "compile_launch", "problems", "record_problems"]


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of a target (CUDA occupancy calculator's figures)."""

    smem_block: int
    """Shared memory one block may use (opt-in limit), bytes."""
    smem_sm: int
    """Shared memory per SM available to blocks, bytes."""
    max_warps: int
    """Resident warps per SM."""
    regs_sm: int = 65536
    """32-bit registers per SM."""


LIMITS = {
    "sm80": ArchLimits(SMEM_LIMIT["sm80"], 167936, 64),
    "sm89": ArchLimits(SMEM_LIMIT["sm89"], 102400, 48),
    "sm90": ArchLimits(SMEM_LIMIT["sm90"], 233472, 64),
    "sm100": ArchLimits(SMEM_LIMIT["sm100"], 233472, 64),
}
MMA_KINDS = ("HGMMA", "IGMMA", "QGMMA", "UTCHMMA", "UTCIMMA", "UTCQMMA", "HMMA", "IMMA", "QMMA")


@dataclass
class StaticFigures:
    """What one compiled launch looks like on one target."""

    kernel: str
    arch: str
    config: dict[str, int]
    ok: bool = True
    error: str = ""
    regs: int = 0
    local_bytes: int = 0  # per-thread local memory: register spills (and stack arrays)
    spill_instrs: int = 0  # STL + LDL in the SASS
    smem: int = 0
    smem_limit: int = 0
    mma: dict[str, int] = field(default_factory=dict)  # tensor-core opcode -> count
    ldgsts: dict[int, int] = field(default_factory=dict)  # cp.async width (bits) -> count
    ldg: dict[int, int] = field(default_factory=dict)  # plain global load width (bits) -> count
    utmaldg: int = 0  # TMA loads
    advisories: list[str] = field(default_factory=list)
    occupancy_warps: int = 0  # resident warps per SM (registers, shared memory, warp slots)
    num_warps: int = 4
    compile_s: float = 0.0

    @property
    def mma_kind(self) -> str:
        return "+".join(k for k in MMA_KINDS if self.mma.get(k)) or "none"

    @property
    def loads(self) -> str:
        """``"TMA"``, ``"cp.async.128"``, ``"cp.async.32+128"``, or ``"ldg"`` (registers only)."""
        if self.utmaldg:
            return "TMA"
        if self.ldgsts:
            return "cp.async." + "+".join(str(w) for w in sorted(self.ldgsts))
        return "ldg"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mma_kind": self.mma_kind, "loads": self.loads}


def occupancy(regs: int, smem: int, num_warps: int, lim: ArchLimits) -> int:
    """Resident warps per SM: the least of what registers (allocated per warp in units of 256),
    shared memory (plus 1 KiB reserved per block) and warp slots allow."""
    regs_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    blocks_regs = lim.regs_sm // (regs_warp * num_warps)
    blocks_smem = lim.smem_sm // (smem + 1024) if smem else 1 << 10
    blocks_warps = lim.max_warps // num_warps
    return min(blocks_regs, blocks_smem, blocks_warps) * num_warps


def specialize(launch: KernelLaunch, cap: int):
    """``(signature, constexprs, attrs, options)`` as ``JITFunction.run`` computes them for capability ``cap``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", cap, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(launch.kwargs)
    kw.setdefault("debug", False)
    try:  # Triton 3.9 binds these too; 3.6 does not know them
        from triton import knobs

        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    except (ImportError, AttributeError):
        pass
    try:
        bound, spec, opts = binder(*launch.args, **kw)
    except TypeError:  # an older binder that does not take the newer knobs
        kw.pop("instrumentation_mode", None)
        kw.pop("fpsan_homomorphic_casts", None)
        bound, spec, opts = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return signature, constexprs, attrs, options


def _sass_and_usage(cubin: bytes) -> tuple[str, str]:
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", "-res-usage", path], capture_output=True,
                             text=True, check=False).stdout
    return out, out


_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _width(op: str) -> int:
    for tok in op.split(".")[1:]:
        if tok in ("128", "64"):
            return int(tok)
        if tok in ("U16", "S16"):
            return 16
        if tok in ("U8", "S8"):
            return 8
    return 32


def _read_sass(fig: StaticFigures, sass: str) -> None:
    ops: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = _SASS_OP.match(line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        ops[base] += 1
        if base == "HMMA" and re.search(r"E4M3|E5M2", op):
            base = "QMMA"  # sm_89 runs fp8 mma.sync as HMMA.*.E4M3
        if base in MMA_KINDS or base == "OMMA":
            fig.mma[base] = fig.mma.get(base, 0) + 1
        elif base == "LDGSTS":
            fig.ldgsts[_width(op)] = fig.ldgsts.get(_width(op), 0) + 1
        elif base == "LDG":
            fig.ldg[_width(op)] = fig.ldg.get(_width(op), 0) + 1
    fig.utmaldg = ops["UTMALDG"]
    fig.spill_instrs = ops["STL"] + ops["LDL"]
    m = _USAGE.search(sass)
    if m:
        fig.regs, fig.local_bytes = int(m.group(1)), int(m.group(4))


def _ptxas_log(ptx: str, cap: int, fp_fusion: bool) -> str:
    """ptxas -v with Triton's flags (advisories such as C7515 only appear in its log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cap).path  # the one Triton itself picks for this target
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = sm_arch_from_capability(cap)
        cmd = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", f"--gpu-name={arch}", src,
               "-o", os.path.join(d, "k.o")]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return p.stderr + p.stdout


@contextlib.contextmanager
def _ptxas_log_printed():
    """Have Triton print ptxas's ``-v`` log (its advisories) when it compiles; restored afterwards."""
    from triton import knobs

    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = saved


def compile_launch(launch: KernelLaunch, arch: str, *, advisories: bool = True) -> StaticFigures:
    """Compile ``launch`` for ``arch`` (``"sm90"``) and read back its static figures (never raises for a
    compile error: ``ok=False`` with the message). ptxas's performance advisories come from Triton's own
    ptxas run; ``advisories=True`` reruns ptxas when Triton's cache answered instead."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    major, minor = arch_capability(arch)
    cap = major * 10 + minor
    fig = StaticFigures(kernel=launch.name, arch=arch, config=launch.config, smem_limit=SMEM_LIMIT.get(arch, 0),
                        num_warps=int(launch.kwargs.get("num_warps", 4)))
    t0 = time.perf_counter()
    try:
        signature, constexprs, attrs, options = specialize(launch, cap)
        src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _ptxas_log_printed():
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a compile error is a finding, reported by problems()
        fig.ok, fig.error = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        fig.compile_s = round(time.perf_counter() - t0, 2)
        return fig
    fig.smem = compiled.metadata.shared
    sass, _ = _sass_and_usage(compiled.asm["cubin"])
    _read_sass(fig, sass)
    text = log.getvalue()
    if advisories and "registers" not in text:  # Triton's cache answered: no ptxas ran, so run it
        text = _ptxas_log(compiled.asm["ptx"], cap, bool(getattr(options, "enable_fp_fusion", True)))
    fig.advisories = sorted({ln.strip() for ln in text.splitlines() if "Performance Loss" in ln})
    lim = LIMITS.get(arch)
    if lim is not None:
        fig.occupancy_warps = occupancy(fig.regs, fig.smem, fig.num_warps, lim)
    fig.compile_s = round(time.perf_counter() - t0, 2)
    return fig


def problems(fig: StaticFigures, *, expect_mma: tuple[str, ...] = (), expect_wide_loads: bool = False,
             expect_tma: bool = False, check_advisories: bool = True) -> list[str]:
    """The compile gate's rules for one default launch; an empty list when it passes.

    Always: it compiles, fits the target's shared memory per block, does not spill, and ptxas did not
    serialize its wgmma (advisories C7512 / C7515, when the figures have ptxas's log). ``expect_mma``:
    the operand classes of its tensor-core work (``"f16"``, ``"int8"``, ``"fp8"``): on Hopper each must
    run on wgmma (HGMMA / IGMMA / QGMMA), on Blackwell on tcgen05 (UTC*MMA), elsewhere on mma.sync of
    that class. ``expect_wide_loads``: its main-loop loads are 128-bit cp.async or TMA.
    """
    where = f"{fig.kernel} on {fig.arch} with {fig.config}"
    if not fig.ok:
        return [f"{where}: does not compile: {fig.error}"]
    out = []
    if fig.smem > fig.smem_limit:
        out.append(f"{where}: needs {fig.smem} B of shared memory, over the {fig.smem_limit} B per-block limit")
    if fig.local_bytes or fig.spill_instrs:
        out.append(f"{where}: spills registers ({fig.regs} regs, {fig.local_bytes} B local memory, "
                   f"{fig.spill_instrs} STL/LDL)")
    serialized = [a for a in fig.advisories if "serialized" in a] if check_advisories else []
    if serialized:  # C7512 / C7515: ptxas gave up overlapping Hopper's async wgmma
        out.append(f"{where}: {serialized[0].split(': ', 1)[-1]}")
    major = arch_capability(fig.arch)[0]
    for cls in expect_mma:
        if cls == "f16-any":  # short tiles (weight-only GEMM at a few tokens): any fp16 tensor-core MMA
            if not any(fig.mma.get(k) for k in ("HMMA", "HGMMA", "UTCHMMA")):
                out.append(f"{where}: expected fp16 tensor-core MMAs, found {fig.mma_kind}")
            continue
        prefix = {"f16": "H", "int8": "I", "fp8": "Q"}[cls]
        want = f"{prefix}GMMA" if major == 9 else f"UTC{prefix}MMA" if major >= 10 else f"{prefix}MMA"
        if not fig.mma.get(want):
            out.append(f"{where}: expected {want} for its {cls} MMAs, found {fig.mma_kind}")
    if expect_tma and not fig.utmaldg:
        out.append(f"{where}: expected TMA loads (UTMALDG), found none")
    if expect_wide_loads and not fig.utmaldg:
        # Tiles reach shared memory through cp.async (LDGSTS); plain LDGs are the prologue / epilogue
        # (the q tile, scales, bias, key-padding mask bytes), so only cp.async widths are held to it.
        narrow = {w: c for w, c in fig.ldgsts.items() if w < 64}
        if not fig.ldgsts.get(128) or narrow:
            out.append(f"{where}: main-loop loads are not 128-bit cp.async or TMA "
                       f"(cp.async widths {fig.ldgsts or 'none'}, ldg widths {fig.ldg})")
    return out


def record_problems(rec: dict[str, Any], *, expectations: bool = True) -> list[str]:
    """:func:`problems` of one :func:`compile_cases` record, with its case's expectations (MMA kinds and
    wide loads apply to the case's main launch). A launcher that refuses the case because its default
    table has no fitting config (:class:`~fastgen.kernels.launch_configs.NoFittingConfig`) passes: that
    refusal is what dispatch routes around; any other refusal is a problem. ``expectations=False``
    checks resources only (compiles, shared memory, spills): what another Triton version must also meet,
    whose choice of instructions may legitimately differ (e.g. Triton 3.6 runs int8 dots on mma.sync on
    Blackwell)."""
    from fastgen.kernels.aot_cases import case_by_id

    if rec.get("plan_error"):
        if rec["plan_error"].startswith("NoFittingConfig"):
            return []
        return [f"{rec['case']} on {rec['arch']}: the launcher refuses it: {rec['plan_error']}"]
    case = case_by_id(rec["case"])
    fig = StaticFigures(**{k: rec[k] for k in StaticFigures.__dataclass_fields__ if k in rec})
    fig.ldgsts = {int(k): v for k, v in fig.ldgsts.items()}
    fig.ldg = {int(k): v for k, v in fig.ldg.items()}
    main = rec.get("role") == "main" and expectations
    return problems(fig, expect_mma=case.mma if main else (), expect_wide_loads=case.wide_loads and main,
                    expect_tma=main and case.family == "attention_tma", check_advisories=expectations)


# ------------------------------------------------------------------------------ worker processes
def _init_worker(cache_dir: str | None) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU code path; read when the kernels are decorated
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    import warnings

    warnings.filterwarnings("ignore")


_SEEN: dict[tuple, StaticFigures] = {}  # this worker's compiles, by specialisation (the same launch twice)


def _compile_once(launch: KernelLaunch, arch: str, advisories: bool) -> StaticFigures:
    """:func:`compile_launch`, memoised per worker on what Triton would compile (e.g. int8 attention's
    quantizers, identical for fp8 and fp16 P.V)."""
    try:
        major, minor = arch_capability(arch)
        signature, constexprs, attrs, options = specialize(launch, major * 10 + minor)
        key = (launch.name, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), options.hash(), advisories)
    except Exception:  # noqa: BLE001 - compile_launch reports it
        return compile_launch(launch, arch, advisories=advisories)
    if key not in _SEEN:
        _SEEN[key] = compile_launch(launch, arch, advisories=advisories)
    return _SEEN[key]


def _run_case(case_id: str, arch: str, advisories: bool, config: dict | None = None) -> list[dict[str, Any]]:
    from fastgen.kernels import aot_cases

    case = aot_cases.case_by_id(case_id)
    base = {"case": case_id, "arch": arch, "requested": config}
    try:
        launches = case.build(arch, config)
    except Exception as exc:  # noqa: BLE001 - a launcher that refuses to plan is a finding too
        return [{**base, "role": "main", "ok": False, "plan_error": f"{type(exc).__name__}: {exc}"}]
    out = []
    for launch in launches:
        fig = _compile_once(launch, arch, advisories)
        out.append({**base, "role": case.role(launch), **fig.to_dict()})
    return out


def _run_group(jobs: list[tuple], advisories: bool) -> list[dict[str, Any]]:
    return [r for job in jobs for r in _run_case(job[0], job[1], advisories, job[2] if len(job) > 2 else None)]


def _cost_guess(pair: tuple) -> float:
    """Relative compile time of a case (measured: TMA attention and int8 attention with its quantizers
    are the slowest, sm100's compiles about 1.5x the others')."""
    family = pair[0].split("/")[0]
    base = {"attention_tma": 3.0, "attention_int8": 2.5, "attention": 2.0}.get(family, 1.0)
    return base * (1.5 if pair[1] == "sm100" else 1.0)


def compile_cases(pairs: list[tuple], *, jobs: int | None = None, advisories: bool = True,
                  cache_dir: str | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """Compile each ``(case id, arch)`` or ``(case id, arch, config)`` of :mod:`fastgen.kernels.aot_cases`
    in ``jobs`` fresh processes (default: the CPU count); returns one record per compiled launch
    (:meth:`StaticFigures.to_dict` plus ``case``, ``arch``, ``requested`` (the config asked for, None for
    the launcher's default) and ``role``: ``"main"`` for the launch the case is about, ``"aux"`` for its
    helpers, e.g. the int8 attention's quantizers). A case the launcher refuses to plan on that target
    gives one record with ``ok=False`` and ``plan_error``."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    jobs = jobs or os.cpu_count() or 1
    records: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(cache_dir,)) as pool:
        # Cases that share launches (int8 attention's quantizers) go to one process, one after the other, so
        # the second finds the first's compile; longest groups first, so that the processes finish together.
        groups: dict[tuple, list[tuple]] = {}
        for i, p in enumerate(pairs):
            shared = p[0].startswith("attention_int8/")
            key = (p[1], p[0].split("-hd")[-1], str(p[2] if len(p) > 2 else None)) if shared else (i,)
            groups.setdefault(key, []).append(p)
        ordered = sorted(groups.values(), key=lambda g: sum(map(_cost_guess, g)), reverse=True)
        futures = [pool.submit(_run_group, g, advisories) for g in ordered]
        with steps("compiling", len(futures), enabled=progress) as bar:
            for fut in as_completed(futures):
                recs = fut.result()
                records.extend(recs)
                bar.advance(f"{recs[0]['case']} on {recs[0]['arch']}" if recs else "")
    return records


def _main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.kernels.aot JOBS.json OUT.json``: compile ``[[case, arch, config|null], ...]``
    and write the records; how ``benchmarks/static_gpu_report.py --also-python`` checks a second Triton."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("jobs")
    ap.add_argument("out")
    ap.add_argument("--procs", type=int, default=None)
    args = ap.parse_args(argv)
    with open(args.jobs) as f:
        pairs = [tuple(p) for p in json.load(f)]
    recs = compile_cases(pairs, jobs=args.procs, advisories=False)
    import triton

    for r in recs:
        r["triton"] = triton.__version__
    with open(args.out, "w") as f:
        json.dump(recs, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
