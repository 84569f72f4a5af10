"""Static GPU report: every fastgen Triton kernel compiled for A100, L4, H100 and B200, without a GPU.

    python benchmarks/static_gpu_report.py                 # the report: defaults and autotune candidates
    python benchmarks/static_gpu_report.py --choose        # re-choose kernels/configs/sm*.json, then report

For every case of :mod:`fastgen.kernels.aot_cases` (representative shapes of SD 1.5 / SDXL attention and
linears) and every target (sm80, sm89, sm90, sm100), the launches are planned by the launchers
themselves (``plan_<op>(..., arch=...)``) and compiled with Triton's NVIDIA backend; the figures per
kernel x config x target (registers, spills, shared memory, occupancy, MMA instruction kind and count,
cp.async / TMA loads, ptxas advisories) go to ``benchmarks/results/static_gpu_<triton>.json``, and a
headline table (the defaults) to ``docs/static_gpu.md``.

``--choose``: for each kernel family, shape class and target, the candidates are compiled in order of
expected speed (:data:`PREFERENCE`: bigger tiles and deeper pipelines first) over every case of the
class, and the first that passes the compile gate's rules everywhere (:func:`fastgen.kernels.aot.problems`:
no spills, shared memory within the target's limit, the expected MMA kind, 128-bit cp.async or TMA
loads) becomes the default, written with its static figures to ``kernels/configs/<arch>.json``; a class
where none passes is written as ``null`` (the launcher refuses it; attention dispatch routes to SDPA).

Speed is not measured here: the figures bound it (the expected bound per config is in the JSON:
``bound``), a GPU run of ``benchmarks/gpu_run.sh`` measures it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cfg(bm, bn, w, s, **extra):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, **extra}


def _gemm(bm, bn, bk, w, s):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}


def preference(family: str, shape_class: str) -> list[dict]:
    """Candidate defaults of a class, most promising first (what --choose tries in order)."""
    if family == "attention":
        if shape_class.startswith("f32"):
            return [_cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2), _cfg(32, 16, 4, 2), _cfg(16, 16, 4, 1)]
        width = int(shape_class.split("-d")[1])
        if width <= 64:
            return [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3),
                    _cfg(64, 32, 4, 2)]
        if width <= 128:
            return [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3),
                    _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)]
        return [_cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2),
                _cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)]
    if family == "attention_tma":  # the helper-chosen shapes first; warp-specialised only matters on sm100
        width = int(shape_class.split("-d")[1])
        ws = [_cfg(128, 128 if width <= 64 else 64, 8, 3 if width <= 128 else 2, WARP_SPECIALIZE=1)]
        plain = [_cfg(128, 128, 8, 3, WARP_SPECIALIZE=0)] if width <= 64 else []
        plain += [_cfg(128, 64, 8, 3 if width <= 128 else 2, WARP_SPECIALIZE=0), _cfg(64, 64, 8, 2, WARP_SPECIALIZE=0),
                  _cfg(64, 64, 4, 2, WARP_SPECIALIZE=0), _cfg(64, 32, 4, 2, WARP_SPECIALIZE=0)]
        return ws + plain
    if family == "attention_int8":
        return [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3),
                _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)]
    if family in ("gemm_int8", "gemm_fp8"):
        if shape_class == "m<=64":
            return [_gemm(64, 128, 128, 4, 4), _gemm(64, 128, 128, 4, 3), _gemm(64, 128, 64, 4, 4),
                    _gemm(64, 64, 128, 4, 4), _gemm(64, 64, 64, 4, 3)]
        return [_gemm(128, 128, 128, 8, 4), _gemm(128, 128, 128, 8, 3), _gemm(128, 128, 64, 8, 4),
                _gemm(128, 128, 64, 4, 3), _gemm(64, 128, 128, 4, 3), _gemm(64, 64, 128, 4, 3)]
    if family == "gemm_weight_only":
        f32, bm = shape_class.startswith("f32"), int(shape_class.split("-m")[1])
        if f32:  # one config for every M of the class: no tensor cores, so short tiles cost little
            return [_gemm(min(bm, 64), 64, 32, 4, 2), _gemm(min(bm, 32), 64, 32, 4, 2), _gemm(16, 64, 32, 4, 2),
                    _gemm(16, 32, 32, 4, 2), _gemm(16, 32, 16, 4, 1)]
        if bm <= 64:
            return [_gemm(bm, 64, 128, 4, 4), _gemm(bm, 64, 128, 4, 3), _gemm(bm, 64, 64, 4, 4),
                    _gemm(bm, 32, 64, 4, 3)]
        return [_gemm(128, 128, 128, 8, 3), _gemm(128, 128, 64, 8, 3), _gemm(128, 64, 64, 4, 3),
                _gemm(64, 64, 64, 4, 3)]
    raise ValueError(family)


def bound(rec: dict) -> str:
    """The expected limiter of a launch, from its figures (no timing): tensor-core issue when its MMAs
    run on wgmma / tcgen05 with enough warps resident to hide the softmax and loads; memory for the
    quantizer and FMA issue for fp32 kernels (no MMA); latency (occupancy) when few warps are resident;
    mma.sync issue otherwise."""
    kind = rec.get("mma_kind", "none")
    if kind == "none":  # the quantizer streams bytes; fp32 attention / GEMMs run on FMA units
        return "memory" if rec["case"].startswith("quantize") else "CUDA-core FMA (no tensor cores)"
    if rec.get("occupancy_warps", 0) < 8:
        return "latency (occupancy < 8 warps/SM)"
    if any(k in kind for k in ("GMMA", "UTC")):
        return "tensor-core issue (async MMA)"
    return "tensor-core issue (mma.sync)"


def _compile(pairs, args):
    from fastgen.kernels import aot

    return aot.compile_cases(pairs, jobs=args.jobs, advisories=not args.no_advisories,
                             cache_dir=args.cache_dir, progress=True)


def _compile_elsewhere(python: str, pairs) -> list[dict]:
    """The same compiles under another Python environment (another Triton): ``python -m fastgen.kernels.aot``."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        jobs, out = os.path.join(d, "jobs.json"), os.path.join(d, "out.json")
        with open(jobs, "w") as f:
            json.dump([list(p) for p in pairs], f)
        subprocess.run([python, "-m", "fastgen.kernels.aot", jobs, out], check=True, cwd=d)
        with open(out) as f:
            return json.load(f)


def choose(args) -> dict:
    """Pick each class's default on each target; write kernels/configs/<arch>.json; returns the tables."""
    from fastgen.kernels import aot, aot_cases

    by_class = collections.defaultdict(list)
    for c in aot_cases.cases():
        if c.family != "quantize_per_token" and (not args.families or c.family in args.families):
            # (the per-token quantizer's blocks follow K: no table; see quantize_per_token._default_config)
            by_class[(c.family, c.shape_class)].append(c)
    archs = args.archs
    pending = {(fam, cls, a): 0 for (fam, cls), cs in by_class.items() for a in archs
               if any(a in c.archs() for c in cs)}
    chosen: dict = {}
    others_all: list = []
    rounds = 0
    while pending:
        rounds += 1
        jobs = []
        for (fam, cls, a), i in pending.items():
            cfg = preference(fam, cls)[i]
            jobs += [(c.id, a, cfg) for c in by_class[(fam, cls)] if a in c.archs()]
        print(f"round {rounds}: {len(pending)} classes, {len(jobs)} compiles", file=sys.stderr)
        recs = _compile(jobs, args)
        others = [r for py in args.also_python for r in _compile_elsewhere(py, jobs)]
        others_all += others
        per = collections.defaultdict(list)
        for r in recs + others:
            per[(aot_cases.case_by_id(r["case"]).family, aot_cases.case_by_id(r["case"]).shape_class, r["arch"])].append(r)
        for key in list(pending):
            fam, cls, a = key
            rs = [r for r in per.get(key, []) if "triton" not in r]  # this environment's
            # This Triton: every rule. Another (--also-python): compiles, fits shared memory, no spills.
            bad = [p for r in per.get(key, []) for p in aot.record_problems(r, expectations="triton" not in r)]
            cands = preference(fam, cls)
            if rs and not bad:
                main = [r for r in rs if r["role"] == "main"]
                # What the launch really used (e.g. WARP_SPECIALIZE is dropped where it does not apply).
                used = main[0]["config"]
                cfg = {k: used.get(k, v) for k, v in cands[pending[key]].items()}
                chosen[key] = {"config": cfg, "static": {
                    r["case"].split("/", 1)[1]: _summary(r) for r in main}}
                del pending[key]
            elif pending[key] + 1 < len(cands):
                pending[key] += 1
            else:
                chosen[key] = None
                print(f"  no fitting config: {fam} {cls} {a}: {bad[:2]}", file=sys.stderr)
                del pending[key]
    import triton

    for a in archs:
        path = ROOT / "kernels" / "configs" / f"{a}.json"
        kernels: dict = {}
        if args.families and path.exists():  # re-choosing some families: keep the others' entries
            kernels = {f: e for f, e in json.loads(path.read_text())["kernels"].items() if f not in args.families}
        for (fam, cls, arch), entry in sorted(chosen.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            if arch == a:
                kernels.setdefault(fam, {})[cls] = entry
        kernels = dict(sorted(kernels.items()))
        from fastgen.kernels.launch_configs import GATE_ARCHS

        data = {"format": 1, "arch": a, "gpus": GATE_ARCHS.get(a, ""),
                "chosen_with": f"benchmarks/static_gpu_report.py --choose, triton {triton.__version__}, "
                               f"{datetime.date.today().isoformat()}",
                "rule": "first candidate (most promising first) with no spills, shared memory within the "
                        "per-block limit, the expected MMA kind and wide loads on every case of the class; "
                        "null = none fits (refused; attention routes to SDPA)",
                "also_fits_triton": sorted({r["triton"] for r in others_all}),
                "kernels": kernels}
        _write_json(path, data)
        print(f"wrote {path}", file=sys.stderr)
    return chosen


def _summary(r: dict) -> dict:
    return {"regs": r["regs"], "spills": r["spill_instrs"], "smem": r["smem"], "mma": r["mma_kind"],
            "mma_count": sum(r["mma"].values()), "loads": r["loads"], "occupancy_warps": r["occupancy_warps"]}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def report(args) -> list[dict]:
    """Every case at the launcher's defaults, plus the autotune candidates of the main families."""
    from fastgen.kernels import aot, aot_cases

    jobs = [(c.id, a) for c in aot_cases.cases() for a in args.archs if a in c.archs()]
    if args.autotune:  # every autotune candidate on the gate's cases (one per class and flag set)
        import importlib

        for c in aot_cases.cases():
            if c.gate and c.family in ("attention", "attention_tma", "attention_int8", "gemm_int8", "gemm_weight_only"):
                mod = importlib.import_module(f"fastgen.kernels.{c.family}")
                jobs += [(c.id, a, cfg) for cfg in mod.AUTOTUNE_CONFIGS for a in args.autotune_archs
                         if a in c.archs()]
    recs = _compile(jobs, args)
    for r in recs:
        r["bound"] = bound(r) if r.get("ok", True) and not r.get("plan_error") else "-"
        r["problems"] = aot.record_problems(r)  # for a candidate: why the tuner's filter would drop it
    return recs


#: The cases of the headline table: SD 1.5's head dims (40 / 80 / 160), SDXL's (64), DiT's (128) and 256,
#: int8 attention, the UNet's linears at 8192 tokens, the weight-only GEMM at 1 and 154 tokens.
HEADLINE = ("attention/fp16-hd40", "attention/fp16-hd64", "attention/fp16-hd80", "attention/fp16-hd128",
            "attention/fp16-hd160", "attention/fp16-hd256", "attention/fp32-hd64",
            "attention_tma/fp16-hd40", "attention_tma/fp16-hd64", "attention_tma/fp16-hd80",
            "attention_tma/fp16-hd128", "attention_tma/fp16-hd160", "attention_tma/fp16-hd256",
            "attention_int8/pvfp8-hd64", "attention_int8/pvfp8-hd128", "attention_int8/pvfp16-hd64",
            "gemm_int8/m8192-silu-bias", "gemm_fp8/m8192-silu-bias", "gemm_weight_only/fp16-m1-int4-g128",
            "gemm_weight_only/fp16-m154-int8-gch", "quantize_per_token/k5120-int8")


def headline(recs: list[dict]) -> str:
    """Markdown: one row per (headline case, target) at the default config, main launches only."""
    rows = ["| case | target | default config | regs | spills | smem (B) | occupancy (warps/SM) | MMA | loads | TMA | bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in recs if r.get("requested") is None and r.get("role") == "main"
                     and r["case"] in HEADLINE), key=lambda r: (HEADLINE.index(r["case"]), int(r["arch"][2:]))):
        if r.get("plan_error"):
            what = "pointer kernel instead" if r["case"].startswith("attention_tma") else "refused (dispatch routes around it)"
            rows.append(f"| {r['case']} | {r['arch']} | no fitting config: {what} | | | | | | | | |")
            continue
        c = r["config"]
        cfg = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
        cfg += f" w{c.get('num_warps', 4)}" + (f" s{c['num_stages']}" if "num_stages" in c else "")
        rows.append(f"| {r['case']} | {r['arch']} | {cfg} | {r['regs']} | {r['spill_instrs']} | {r['smem']} | "
                    f"{r['occupancy_warps']} | {r['mma_kind']} ({sum(r['mma'].values())}) | {r['loads']} | "
                    f"{'yes' if r['utmaldg'] else 'no'} | {r['bound']} |")
    return "\n".join(rows)


def _replace_table(path: Path, body: str) -> None:
    """Put ``body`` between the file's table markers (the whole file if it has none)."""
    begin, end = "<!-- table:begin -->", "<!-- table:end -->"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin) + len(begin)] + "\n" + body + text[text.index(end):]
    else:
        text = body
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--choose", action="store_true", help="re-choose kernels/configs/sm*.json first")
    ap.add_argument("--archs", default="sm80,sm89,sm90,sm100", type=lambda s: s.split(","))
    ap.add_argument("--families", default="", type=lambda s: [f for f in s.split(",") if f],
                    help="--choose: only these kernel families (the tables keep the others' entries)")
    ap.add_argument("--autotune", action="store_true", help="also compile every autotune candidate")
    ap.add_argument("--autotune-archs", default="sm80,sm89,sm90,sm100", type=lambda s: s.split(","),
                    help="targets of --autotune (default: all)")
    ap.add_argument("--jobs", type=int, default=None, help="compiler processes (default: CPU count)")
    ap.add_argument("--no-advisories", action="store_true", help="skip ptxas -v (its advisories, e.g. C7515)")
    ap.add_argument("--cache-dir", default=None, help="Triton cache for the compiles (default: Triton's)")
    ap.add_argument("--also-python", action="append", default=[],
                    help="--choose: a Python whose Triton the defaults must also fit (compile, shared memory, no "
                         "spills), e.g. one with the GPU machine's Triton 3.6; repeatable")
    ap.add_argument("--from-json", default=None, help="re-render an earlier run's bounds and table; compile nothing")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/static_gpu_<triton>.json)")
    ap.add_argument("--table", default=str(ROOT / "docs" / "static_gpu.md"),
                    help="markdown file whose <!-- table:begin --> ... <!-- table:end --> part gets the headline table")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import triton

    if args.from_json:  # re-render the bounds and the table of an earlier run, compiling nothing
        data = json.loads(Path(args.from_json).read_text())
        for r in data["records"]:
            r["bound"] = bound(r) if r.get("ok", True) and not r.get("plan_error") else "-"
        _write_json(Path(args.from_json), data)
        _replace_table(Path(args.table), f"Generated by `benchmarks/static_gpu_report.py` with Triton {data['triton']} "
                                         f"on {data['date']}.\n\n{headline(data['records'])}\n")
        return 0
    if args.choose:
        choose(args)  # the tables were rewritten; the report's worker processes read them fresh
    recs = report(args)
    import torch

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"static_gpu_triton{triton.__version__}.json")
    problems = [p for r in recs if r.get("requested") is None for p in r["problems"]]
    tried = [r for r in recs if r.get("requested") is not None and r.get("role") == "main"]
    rejected = collections.Counter((r["case"].split("/")[0], r["arch"]) for r in tried if r["problems"])
    _write_json(out, {"benchmark": "static_gpu_report", "device": "none (ahead-of-time compiles on a CPU)",
                      "targets": args.archs, "triton": triton.__version__, "torch": torch.__version__,
                      "date": datetime.date.today().isoformat(), "gate_problems": problems,
                      "autotune_candidates_rejected": {f"{f} {a}": n for (f, a), n in sorted(rejected.items())},
                      "autotune_candidates_compiled": len(tried), "records": recs})
    table = headline(recs)
    _replace_table(Path(args.table), f"Generated by `benchmarks/static_gpu_report.py` with Triton {triton.__version__} "
                                     f"on {datetime.date.today().isoformat()}.\n\n{table}\n")
    print(table)
    print(f"\n{len(recs)} compiles; {len(problems)} gate problems at the defaults; wrote {out}", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
