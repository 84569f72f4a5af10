"""Video frame sampling: seeking to keyframes against decoding the whole video (``fastgen.pipelines.video``).

The bench writes its own clip with PyAV (default: 2 minutes at 30 fps, 256x144, h264 with x264's usual
GOP of 250 frames and B-frames; a moving texture, so every frame differs), then, per case (8 frames
uniformly, and 1 frame per second), times three ways of getting the same frames as RGB arrays:

* ``seek``: ``sample_video(path, ...)``, fastgen's sampling: a packet scan, then a seek to the keyframe
  before each chosen frame (or decoding on, when that frame is in reach), threaded decoding, only the
  chosen frames converted to RGB;
* ``full_decode``: ``sample_video(path, ..., seek=False)``: the same frames by decoding from the start
  up to the last chosen frame (what fastgen did before seeking: for a uniform sample, the whole video);
* ``plain_loop``: the loop a user writes with PyAV, decoding every frame and keeping the chosen ones
  (``for i, frame in enumerate(container.decode(video=0))``, PyAV's default threading).

The frames of all three are checked equal (pixel for pixel) before anything is timed. Each figure is the
fastest of ``--rounds`` rounds (the medians are recorded too), the contenders alternating within a
round; on a machine shared with other jobs the fastest round is the least disturbed one. The file is in
the page cache.

    python benchmarks/bench_video.py --json benchmarks/results/video_cpu.json
    python benchmarks/bench_video.py --quick        # a 10 s clip at 64x48, one round: the plumbing (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import fastgen
from fastgen.core import cpus
from fastgen.core.fs import write_json_atomic
from fastgen.pipelines.video import sample_video

CASES: dict[str, dict[str, Any]] = {"8 frames": {"frames": 8}, "1 fps": {"fps": 1.0}}
CONTENDERS = ("seek", "full_decode", "plain_loop")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    import av

    out: dict[str, str | None] = {"fastgen": fastgen.__version__, "av": av.__version__,
                                  "numpy": np.__version__, "python": platform.python_version()}
    with contextlib.suppress(Exception):  # informative only
        out["libavcodec"] = ".".join(str(x) for x in av.library_versions["libavcodec"])
    with contextlib.suppress(Exception):
        out["ffmpeg"] = str(av.ffmpeg_version_info)
    return out


def write_clip(path: Path, seconds: float, fps: int, width: int, height: int, gop: int) -> dict[str, Any]:
    """An h264 mp4 of a blocky noise texture sliding one pixel a frame; returns what it is."""
    import av

    n = int(round(seconds * fps))
    rng = np.random.default_rng(0)
    texture = np.kron(rng.integers(0, 256, (height // 4 + 1, 2 * width // 4 + 1, 3), dtype=np.uint8),
                      np.ones((4, 4, 1), np.uint8))  # (rows, cols, 3): 4x4 blocks, twice the width
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "keyint": str(gop)}
        for i in range(n):
            x = i % width
            frame = np.ascontiguousarray(texture[:height, x:x + width])  # (height, width, 3) uint8
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        keys = sum(p.is_keyframe for p in packets)
    return {"seconds": seconds, "fps": fps, "width": width, "height": height, "codec": "h264 (libx264 veryfast)",
            "gop": gop, "frames": len(packets), "keyframes": keys, "bytes": path.stat().st_size}


def plain_loop(path: str, chosen: list[int]) -> list[np.ndarray]:
    """Decode every frame with PyAV, keep the chosen ones as RGB."""
    import av

    wanted = set(chosen)
    out = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out.append(frame.to_ndarray(format="rgb24"))
    return out


def measure(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call; contenders alternate within each round so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def bench_case(path: str, name: str, request: dict[str, Any], rounds: int) -> dict[str, Any]:
    seek = sample_video(path, **request)
    full = sample_video(path, **request, seek=False)
    plain = plain_loop(path, seek.indices)
    same = (seek.indices == full.indices and len(plain) == len(seek.frames)
            and all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(seek.frames, full.frames, plain)))
    if not same:
        raise RuntimeError(f"{name}: the contenders' frames differ")
    fns = {"seek": lambda: sample_video(path, **request), "full_decode": lambda: sample_video(path, **request, seek=False),
           "plain_loop": lambda: plain_loop(path, seek.indices)}
    times = measure(fns, rounds)
    best = {k: min(v) * 1e3 for k, v in times.items()}
    return {"case": name, "request": request, "frames": len(seek.indices), "same_frames": same,
            "seek_ms": best["seek"], "full_decode_ms": best["full_decode"], "plain_loop_ms": best["plain_loop"],
            **{f"{k}_ms_median": statistics.median(v) * 1e3 for k, v in times.items()},
            "seek_decoded_frames": seek.decoded, "seeks": seek.seeks, "full_decode_decoded_frames": full.decoded,
            "full_over_seek": best["full_decode"] / best["seek"], "plain_over_seek": best["plain_loop"] / best["seek"]}


def print_table(result: dict[str, Any]) -> None:
    clip = result["clip"]
    print(f"\n{clip['seconds']:g} s at {clip['fps']} fps, {clip['width']}x{clip['height']} {clip['codec']}, "
          f"{clip['frames']} frames, {clip['keyframes']} keyframes; {result['device']}; fastest of {result['rounds']}")
    head = f"{'case':10s} {'frames':>6s} {'seek ms':>9s} {'full ms':>9s} {'plain ms':>9s} {'full/seek':>9s} " \
           f"{'plain/seek':>10s} {'decoded':>8s} {'seeks':>5s}"
    print(f"{head}\n{'-' * len(head)}")
    for r in result["cases"]:
        print(f"{r['case']:10s} {r['frames']:6d} {r['seek_ms']:9.1f} {r['full_decode_ms']:9.1f} {r['plain_loop_ms']:9.1f} "
              f"{r['full_over_seek']:8.1f}x {r['plain_over_seek']:9.1f}x {r['seek_decoded_frames']:8d} {r['seeks']:5d}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=None, help="clip length (default 120; --quick 10)")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT, even (default 256x144; --quick 64x48)")
    ap.add_argument("--gop", type=int, default=250, help="keyframe interval in frames (default 250, x264's)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="a short small clip, one round: the plumbing (CI)")
    ap.add_argument("--json", default=None, help="write the result here (atomically)")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (10.0 if args.quick else 120.0)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 9)
    try:
        width, height = (int(v) for v in (args.size or ("64x48" if args.quick else "256x144")).lower().split("x"))
    except ValueError:
        width = height = 0
    if not 1 <= seconds <= 3600 or rounds < 1 or args.gop < 1 or not (16 <= width <= 4096 and 16 <= height <= 4096) \
            or width % 2 or height % 2:
        ap.error("--seconds from 1 to 3600; --rounds, --gop: integers >= 1; --size WIDTHxHEIGHT, even, 16 to 4096")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    result: dict[str, Any] = {
        "benchmark": "video", "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_video.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": f"CPU: {cpu_name()}, {cpus.usable_cpus()} usable of {os.cpu_count()} CPUs",
        "versions": versions(), "rounds": rounds, "quick": args.quick, "cases": [],
        "load_average_1min": os.getloadavg()[0],  # other work on the machine: what the medians were taken under
    }
    with tempfile.TemporaryDirectory(prefix="fastgen-bench-video-") as tmp:
        path = Path(tmp) / "clip.mp4"
        result["clip"] = write_clip(path, seconds, 30, width, height, args.gop)
        for name, request in CASES.items():
            result["cases"].append(bench_case(str(path), name, request, rounds))
    if args.json:
        write_json_atomic(Path(args.json), result)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
