"""How many CPUs this process may really use, and choosing a thread count by timing.

``os.cpu_count()`` counts the machine's CPUs, not the ones this process gets: CPU affinity (taskset,
a cpuset cgroup) and a cgroup CPU quota (``docker --cpus``, Kubernetes limits) both give fewer. Thread
pools sized from ``os.cpu_count()`` then oversubscribe, and OpenMP's barrier-synchronised pools
(torch's intra-op threads) wait at every operator for a thread that is not running.

Every reader here is defensive: the files are read only when they are regular files (a FIFO would
block), at most a few KiB, and anything unreadable or malformed counts as "no limit", logged at
debug level; none of them raises. ``root`` (``/`` by default) lets tests point them at a fake tree.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fastgen.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

#: The most threads fastgen accepts for a pool: beyond any real machine's use, and low enough that a
#: typo (10**6) is refused instead of making torch or onnxruntime try to start that many threads.
MAX_THREADS = 1024

#: cgroup v1 mount points of the ``cpu`` controller (alone or co-mounted with cpuacct).
_V1_CPU_MOUNTS = ("sys/fs/cgroup/cpu", "sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpuacct,cpu")
#: cgroup v2 mount points: unified, or the unified part of a hybrid hierarchy.
_V2_MOUNTS = ("sys/fs/cgroup", "sys/fs/cgroup/unified")
_MIN_QUOTA_US, _MAX_PERIOD_US = 1000, 1_000_000  # the kernel's bounds of cfs quota and period
_READ_LIMIT = 4096  # every file read here is a line or a few: more is not a cgroup file


def _read(path: Path) -> str | None:
    """The text of a small regular file, or None (missing, not a regular file, unreadable, not UTF-8)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or stream forever
            return None
        # O_NONBLOCK: the file may have been swapped for a FIFO since the stat.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            data = os.read(fd, _READ_LIMIT)
        finally:
            os.close(fd)
        return data.decode("utf-8")
    except (OSError, ValueError) as exc:  # ValueError: undecodable bytes, NUL in the path
        logger.debug("cannot read %s: %s", path, exc)
        return None


def _cgroup_paths(root: Path) -> dict[str, PurePosixPath]:
    """This process's cgroup path per hierarchy from ``/proc/self/cgroup``: ``{"": v2 path, "cpu": v1}``."""
    text = _read(root / "proc" / "self" / "cgroup") or ""
    paths: dict[str, PurePosixPath] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        path = PurePosixPath(parts[2])
        if ".." in path.parts:  # a path that climbs out of the cgroup mount is nobody's real cgroup
            continue
        controllers = parts[1].split(",")
        if parts[0] == "0" and parts[1] == "":
            paths[""] = path
        elif "cpu" in controllers:
            paths["cpu"] = path
    return paths


def _ancestors(mount: Path, path: PurePosixPath | None) -> list[Path]:
    """The cgroup's directory under ``mount`` and each parent up to the mount itself: a parent's quota
    limits its children too. Inside a cgroup namespace the path is not under the mount: the mount root."""
    dirs = [mount]
    if path is not None:
        parts = path.parts[1:]
        dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return dirs


def _quota(quota: str, period: str) -> float | None:
    """CPUs of a quota over a period (integers in microseconds), or None for no (valid) limit."""
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max" (v2's no limit), garbage, 5000 digits
        return None
    # The kernel's own bounds (1 ms to 1 s periods, quotas of 1 ms or more; -1: no limit in v1):
    # anything else was not written by a kernel, and a quota near zero would mean "no CPU at all".
    if not (_MIN_QUOTA_US <= p <= _MAX_PERIOD_US and q >= _MIN_QUOTA_US):
        return None
    if q >= p * MAX_THREADS:  # more CPUs than any pool here gets: no limit (and no float overflow)
        return None
    return q / p


def _v2_limit(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    fields = text.split()
    if len(fields) != 2:  # "$MAX $PERIOD"
        if fields:
            logger.debug("%s/cpu.max: unexpected %r", directory, text[:80])
        return None
    return _quota(*fields)


def _v1_limit(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _quota(quota.strip(), period.strip())


def cgroup_cpu_limit(root: str | os.PathLike = "/") -> float | None:
    """The CPUs this process's cgroup quota allows (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` in v1; the smallest along the cgroup and its ancestors), e.g. 1.5; None when
    there is no quota or it cannot be read."""
    root = Path(root)
    paths = _cgroup_paths(root)
    limits = []
    for mount in _V2_MOUNTS:
        if _read(root / mount / "cgroup.controllers") is not None:  # a cgroup2 mount, not the v1 tmpfs
            limits += [_v2_limit(d) for d in _ancestors(root / mount, paths.get(""))]
    for mount in _V1_CPU_MOUNTS:
        limits += [_v1_limit(d) for d in _ancestors(root / mount, paths.get("cpu"))]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (``os.sched_getaffinity``), else ``os.cpu_count()``, at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def usable_cpus(root: str | os.PathLike = "/") -> int:
    """CPUs this process may really use: its affinity, cut to its cgroup CPU quota, at least 1.

    A fractional quota rounds down (1.5 CPUs -> 1): a thread beyond the quota runs only by taking
    time from the others, and the whole group is throttled once the quota is spent.
    """
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, int(limit)))
    return cpus


def limited_cpus(root: str | os.PathLike = "/") -> int:
    """:func:`usable_cpus` when affinity or a quota gives this process fewer CPUs than the machine has,
    else 0 (then libraries' own defaults, which count the machine's cores, are right)."""
    usable = usable_cpus(root)
    return usable if usable < (os.cpu_count() or 1) else 0


def others_running(root: str | os.PathLike = "/") -> int | None:
    """Runnable threads on the machine right now besides the caller (``/proc/loadavg``'s running count
    minus one), or None where unknown. Machine-wide, noisy: a hint where to start measuring, no more."""
    text = _read(Path(root) / "proc" / "loadavg")
    try:
        running = int(text.split()[3].split("/")[0]) if text else None
    except (IndexError, ValueError):
        running = None
    return None if running is None or running < 1 else running - 1


def cpu_pressure(root: str | os.PathLike = "/") -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (``/proc/pressure/cpu``,
    "some avg10", percent), or None where the kernel has no pressure stall information."""
    text = _read(Path(root) / "proc" / "pressure" / "cpu") or ""
    for line in text.splitlines():
        if line.startswith("some "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def load_snapshot(root: str | os.PathLike = "/") -> dict[str, float | int | None]:
    """The machine's load as data, for benchmark reports: 1-minute load average, runnable threads now
    besides the caller, CPU pressure."""
    try:
        load1: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load1 = None
    return {"loadavg_1min": load1, "others_running": others_running(root), "cpu_pressure_avg10": cpu_pressure(root)}


def thread_ladder(most: int) -> tuple[int, ...]:
    """Thread counts worth trying, most first, halving down to 1: ``8 -> (8, 4, 2, 1)``, ``6 -> (6, 3, 1)``."""
    if isinstance(most, bool) or not isinstance(most, int) or not 1 <= most <= MAX_THREADS:
        raise InvalidArgumentError("threads", most, f"integers 1 to {MAX_THREADS}")
    ladder = [most]
    while ladder[-1] > 1:
        ladder.append(max(1, ladder[-1] // 2))
    return tuple(ladder)


@dataclass
class Calibration:
    """What :func:`calibrate` measured and chose."""

    threads: int
    """The thread count chosen."""
    medians: dict[int, float] = field(default_factory=dict)
    """Median seconds per call of each count measured in full."""
    rejected: dict[int, float] = field(default_factory=dict)
    """Counts given up after one call slower than ``abort`` times the best median: that call's seconds."""
    spent: float = 0.0
    """Seconds of all calibration calls together (the warm-up included)."""

    def describe(self) -> str:
        timed = {**{n: f"{t * 1e3:.1f} ms" for n, t in self.medians.items()},
                 **{n: f">{t * 1e3:.0f} ms (dropped)" for n, t in self.rejected.items()}}
        return ", ".join(f"{n}: {timed[n]}" for n in sorted(timed, reverse=True))


def calibrate(time_call: Callable[[int], float], ladder: Sequence[int], *, start: int | None = None,
              samples: int = 3, tie: float = 1.05, abort: float = 2.0, budget_s: float = 2.0) -> Calibration:
    """Choose the fastest thread count of ``ladder`` (most first) by timing calls: ``time_call(n)`` runs
    one call with ``n`` threads and returns its seconds.

    A local search, so a big machine does not time every count: one warm-up call, then ``samples``
    calls at ``start`` (the entry of ``ladder`` at or below it; default the most), then the next count
    down while it is no slower than ``tie`` times the best (fewer threads leave CPUs to the neighbours
    and are steadier when the machine is shared); when the first step down loses, the counts above
    ``start`` while each is faster by that margin. A candidate whose single call takes over ``abort``
    times the best median is dropped at once: under contention a bad count can be 100x slower, and
    one such call is enough to know. The search stops once the calls took ``budget_s`` (a model
    whose warm-up call alone takes that long keeps ``start``: barrier waits matter little to long
    operators, and timing several counts would cost seconds of the caller's first call).
    """
    ladder = list(ladder)
    index = 0 if start is None else next((i for i, n in enumerate(ladder) if n <= start), len(ladder) - 1)
    result = Calibration(threads=ladder[index])

    def run(n: int) -> float:
        seconds = time_call(n)
        result.spent += seconds
        return seconds

    def measure(n: int, ref: float) -> float | None:
        """Median of ``samples`` calls with ``n`` threads, or None once a call exceeds ``abort * ref``
        (``ref`` inf: never); fewer calls once the budget is spent."""
        times: list[float] = []
        while len(times) < samples and (not times or result.spent < budget_s):
            times.append(run(n))
            if times[-1] > abort * ref:
                result.rejected[n] = times[-1]
                return None
        result.medians[n] = statistics.median(times)
        return result.medians[n]

    run(ladder[index])  # warm-up: the first call pays one-time allocations and kernel selection
    if result.spent >= budget_s:  # a big model: one call took the budget, the start stands
        return result
    best = measure(ladder[index], math.inf) or 0.0  # never None: nothing is compared with inf
    for step in (1, -1):  # 1: fewer threads, -1: more
        moved = False
        candidate = index + step
        while 0 <= candidate < len(ladder) and result.spent < budget_s:
            got = measure(ladder[candidate], best)
            better = got is not None and (got <= tie * best if step == 1 else got * tie < best)
            if not better:
                break
            index, best, moved = candidate, got, True
            candidate += step
        if moved:  # it went down: the counts above lost already
            break
    result.threads = ladder[index]
    return result


class CollapseWatch:
    """Notices when calls get much slower than they were: per input shape (``key``), the median of the
    first ``window`` calls is the reference; afterwards, a ``window`` median over ``factor`` times the
    reference is a collapse (the engine's threads now wait for CPUs another process took)."""

    def __init__(self, *, window: int = 8, factor: float = 4.0, max_keys: int = 64) -> None:
        self.window, self.factor, self.max_keys = window, factor, max_keys
        self._ref: dict[object, float] = {}
        self._recent: dict[object, list[float]] = {}

    def observe(self, key: object, seconds: float) -> bool:
        """Record one call; True when this key's recent calls collapsed against its reference."""
        if not math.isfinite(seconds) or seconds < 0:
            return False
        recent = self._recent.setdefault(key, [])
        if len(self._recent) > self.max_keys:  # many shapes: forget the oldest, it re-learns
            oldest = next(iter(self._recent))
            self._recent.pop(oldest)
            self._ref.pop(oldest, None)
        recent.append(seconds)
        if len(recent) < self.window:
            return False
        median = statistics.median(recent)
        recent.clear()
        if key not in self._ref:
            self._ref[key] = median
            return False
        return median > self.factor * self._ref[key]

    def reset(self) -> None:
        self._ref.clear()
        self._recent.clear()


__all__ = ["MAX_THREADS", "Calibration", "CollapseWatch", "affinity_cpus", "calibrate", "cgroup_cpu_limit",
           "cpu_pressure", "limited_cpus", "load_snapshot", "others_running", "thread_ladder", "usable_cpus"]
