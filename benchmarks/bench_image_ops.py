"""fastgen.ops image conversions: the C++ extension against PyTorch on the CPU.

    python benchmarks/bench_image_ops.py                      # table of medians and speed-ups
    python benchmarks/bench_image_ops.py --batch 1 --size 1024 --json benchmarks/results/image_ops.json
    python -m pytest benchmarks/bench_image_ops.py --benchmark-only

Three contenders per case, on the same input (batch 8 of 512x512, 3 channels by default):
``ext`` (fastgen._C), ``torch`` (fastgen's own PyTorch path: in-place ops, contiguous output) and
``expr`` (the plain out-of-place PyTorch expression a user would write). All three give identical
values; the script checks that before timing. Threads: torch.get_num_threads() for all of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastgen.ops import _ext, normalize_nchw, to_uint8_nhwc

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKENDS = ("ext", "torch", "expr")


def expr_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The reference as one would write it: out of place, then channels last."""
    v = torch.nan_to_num(x.float() * 127.5 + 127.5, nan=0.0).clamp(0, 255).round().to(torch.uint8)
    return v.permute(0, 2, 3, 1).contiguous()


def expr_normalize(u: torch.Tensor) -> torch.Tensor:
    """Classifier preprocessing as usually written (channels-last strided result)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return u.permute(0, 3, 1, 2).to(torch.float32).div(255).sub(mean).div(std)


def make_cases(batch: int, size: int) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    x32 = (torch.randn(batch, 3, size, size, generator=g) * 0.6).clamp(-1.2, 1.2)  # decoder-like output
    x16 = x32.half()
    u8 = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    return {
        "to_uint8 fp32": {"ext": lambda: to_uint8_nhwc(x32, backend="ext"),
                          "torch": lambda: to_uint8_nhwc(x32, backend="torch"),
                          "expr": lambda: expr_to_uint8(x32)},
        "to_uint8 fp16": {"ext": lambda: to_uint8_nhwc(x16, backend="ext"),
                          "torch": lambda: to_uint8_nhwc(x16, backend="torch"),
                          "expr": lambda: expr_to_uint8(x16)},
        "normalize uint8->fp32": {"ext": lambda: normalize_nchw(u8, MEAN, STD, backend="ext"),
                                  "torch": lambda: normalize_nchw(u8, MEAN, STD, backend="torch"),
                                  "expr": lambda: expr_normalize(u8)},
    }


# ------------------------------------------------------------------------------------------------
# pytest-benchmark

_PYTEST_CASES = make_cases(8, 512)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_PYTEST_CASES))
def test_image_ops(benchmark, case, backend):
    if backend == "ext" and not _ext.available():
        pytest.skip(_ext.unavailable_reason() or "extension unavailable")
    benchmark.group = case
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark(_PYTEST_CASES[case][backend])


# ------------------------------------------------------------------------------------------------
# Script

def measure(fns: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call; contenders alternate within each round so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: allocator, lookup tables, thread start-up
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="height and width in pixels")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _ext.available():
        print(f"fastgen._C unavailable ({_ext.unavailable_reason()}): timing the PyTorch paths only")

    cases = make_cases(args.batch, args.size)
    rows = []
    for case, fns in cases.items():
        if not _ext.available():
            fns = {k: v for k, v in fns.items() if k != "ext"}
        outs = [fn() for fn in fns.values()]
        if not all(torch.equal(outs[0], o) for o in outs[1:]):
            print(f"{case}: results differ between contenders", file=sys.stderr)
            return 1
        times = measure(fns, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"case": case, **{f"{k}_ms": med[k] * 1e3 for k in med},
                     **({"speedup_vs_torch": med["torch"] / med["ext"], "speedup_vs_expr": med["expr"] / med["ext"]}
                        if "ext" in med else {})})

    shape = f"batch {args.batch} x 3 x {args.size} x {args.size}"
    print(f"{shape}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"median of {args.rounds}")
    print(f"{'case':<24}{'ext ms':>9}{'torch ms':>10}{'expr ms':>9}{'ext vs torch':>14}{'ext vs expr':>13}")
    for r in rows:
        ext = f"{r['ext_ms']:9.2f}" if "ext_ms" in r else f"{'-':>9}"
        sp = (f"{r['speedup_vs_torch']:13.2f}x{r['speedup_vs_expr']:12.2f}x" if "speedup_vs_torch" in r
              else f"{'-':>14}{'-':>13}")
        print(f"{r['case']:<24}{ext}{r['torch_ms']:10.2f}{r['expr_ms']:9.2f}{sp}")

    if args.json:
        record = {"benchmark": "image_ops", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "shape": shape, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                  "machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
                  "rounds": args.rounds, "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
