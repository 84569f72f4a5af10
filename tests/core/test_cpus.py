"""fastgen.core.cpus: usable CPUs from affinity and cgroup quotas (fake /proc and /sys trees), and the
thread-count calibration and collapse watch the torch engine uses (fake timings, no clock)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastgen.core import cpus
from fastgen.errors import InvalidArgumentError

AFFINITY = cpus.affinity_cpus()


def tree(tmp_path: Path, cgroup: str = "0::/\n", files: dict[str, str] | None = None, *, v2: bool = True) -> Path:
    """A fake root: ``proc/self/cgroup`` and the given files, a cgroup2 mount at ``sys/fs/cgroup`` when ``v2``."""
    root = tmp_path / "root"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    if v2:
        (root / "sys" / "fs" / "cgroup").mkdir(parents=True)
        (root / "sys" / "fs" / "cgroup" / "cgroup.controllers").write_text("cpu io memory\n")
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_v2_quota(tmp_path):
    root = tree(tmp_path, files={"sys/fs/cgroup/cpu.max": "150000 100000\n"})
    assert cpus.cgroup_cpu_limit(root) == 1.5
    assert cpus.usable_cpus(root) == 1  # a fractional quota rounds down


def test_v2_unlimited_and_no_cgroup_at_all(tmp_path):
    assert cpus.cgroup_cpu_limit(tree(tmp_path, files={"sys/fs/cgroup/cpu.max": "max 100000\n"})) is None
    assert cpus.usable_cpus(tree(tmp_path / "x", files={"sys/fs/cgroup/cpu.max": "max 100000\n"})) == AFFINITY
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cpus.cgroup_cpu_limit(empty) is None and cpus.usable_cpus(empty) == AFFINITY


def test_v2_nested_cgroup_takes_the_smallest_ancestor_limit(tmp_path):
    root = tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000\n",
        "sys/fs/cgroup/kubepods/cpu.max": "800000 100000\n",
    })
    assert cpus.cgroup_cpu_limit(root) == 2.0


def test_v2_inside_a_cgroup_namespace_reads_the_mount_root(tmp_path):
    root = tree(tmp_path, "0::/not/visible/here\n", {"sys/fs/cgroup/cpu.max": "50000 100000\n"})
    assert cpus.cgroup_cpu_limit(root) == 0.5
    assert cpus.usable_cpus(root) == 1  # below one CPU: still one thread


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_v1_quota(tmp_path, mount):
    root = tree(tmp_path, f"4:{mount}:/docker/abc\n", {
        f"sys/fs/cgroup/{mount}/docker/abc/cpu.cfs_quota_us": "300000\n",
        f"sys/fs/cgroup/{mount}/docker/abc/cpu.cfs_period_us": "100000\n",
    }, v2=False)
    assert cpus.cgroup_cpu_limit(root) == 3.0
    assert cpus.usable_cpus(root) == min(AFFINITY, 3)


def test_v1_unlimited(tmp_path):
    root = tree(tmp_path, "4:cpu:/\n", {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                                        "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, v2=False)
    assert cpus.cgroup_cpu_limit(root) is None


def test_v2_files_without_a_cgroup2_mount_are_ignored(tmp_path):
    """A v1 host's /sys/fs/cgroup is a tmpfs: a stray cpu.max there is not a quota."""
    root = tree(tmp_path, files={"sys/fs/cgroup/cpu.max": "100000 100000\n"}, v2=False)
    assert cpus.cgroup_cpu_limit(root) is None


def test_limited_cpus_is_zero_unless_the_process_gets_fewer_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: AFFINITY)
    assert cpus.limited_cpus(tree(tmp_path)) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: AFFINITY + 8)
    assert cpus.limited_cpus(tree(tmp_path / "x")) == AFFINITY


def test_this_machine():
    assert 1 <= cpus.usable_cpus() <= AFFINITY <= (os.cpu_count() or 1)
    snap = cpus.load_snapshot()
    assert set(snap) == {"loadavg_1min", "others_running", "cpu_pressure_avg10"}


def test_load_readers(tmp_path):
    root = tree(tmp_path, files={"proc/loadavg": "3.10 2.00 1.00 4/300 12345\n",
                                 "proc/pressure/cpu": "some avg10=12.50 avg60=3.00 avg300=1.00 total=99\n"
                                                      "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"})
    assert cpus.others_running(root) == 3
    assert cpus.cpu_pressure(root) == 12.5
    assert cpus.others_running(tmp_path) is None and cpus.cpu_pressure(tmp_path) is None


def test_thread_ladder():
    assert cpus.thread_ladder(1) == (1,)
    assert cpus.thread_ladder(2) == (2, 1)
    assert cpus.thread_ladder(8) == (8, 4, 2, 1)
    assert cpus.thread_ladder(6) == (6, 3, 1)
    for bad in (0, -1, True, 2.0, cpus.MAX_THREADS + 1):
        with pytest.raises(InvalidArgumentError, match="threads"):
            cpus.thread_ladder(bad)


# --- calibration: fake per-count timings, no clock --------------------------------------------------

def fake(times: dict[int, float | list[float]]):
    """``time_call`` returning each count's seconds (a list: one value per call, the last repeating);
    ``calls`` records the counts in order."""
    calls: list[int] = []

    def time_call(n: int) -> float:
        calls.append(n)
        value = times[n]
        if isinstance(value, list):
            return value[min(sum(1 for c in calls if c == n) - 1, len(value) - 1)]
        return value

    return time_call, calls


def test_contention_picks_fewer_threads_and_drops_the_bad_count_after_one_call():
    time_call, calls = fake({2: 1.0, 1: 0.02})  # two threads waiting at barriers: 50x slower
    got = cpus.calibrate(time_call, (2, 1), start=1)
    assert got.threads == 1 and calls == [1, 1, 1, 1, 2]  # warm-up, 3 samples, one call at 2: dropped
    assert got.rejected == {2: 1.0} and got.medians == {1: 0.02}


def test_idle_machine_keeps_the_faster_count():
    time_call, calls = fake({4: 0.010, 2: 0.018, 1: 0.035})
    got = cpus.calibrate(time_call, (4, 2, 1))
    assert got.threads == 4 and calls == [4, 4, 4, 4, 2, 2, 2]  # one step down lost: no further
    assert "4: 10.0 ms" in got.describe()


def test_a_tie_prefers_fewer_threads():
    time_call, _ = fake({4: 0.010, 2: 0.0102, 1: 0.02})
    assert cpus.calibrate(time_call, (4, 2, 1)).threads == 2


def test_descends_while_fewer_threads_win():
    time_call, calls = fake({8: 0.08, 4: 0.04, 2: 0.02, 1: 0.01})
    got = cpus.calibrate(time_call, (8, 4, 2, 1))
    assert got.threads == 1 and calls[:4] == [8, 8, 8, 8]


def test_climbs_from_a_low_start_when_more_threads_win():
    time_call, calls = fake({8: 0.01, 4: 0.02, 2: 0.04, 1: 0.08})
    got = cpus.calibrate(time_call, (8, 4, 2, 1), start=3)  # start: the ladder entry at or below 3
    assert got.threads == 8 and calls[:4] == [2, 2, 2, 2] and got.medians[1] == 0.08


def test_warm_up_call_is_not_counted():
    time_call, _ = fake({2: [5.0, 0.01], 1: 0.02})  # the first call pays one-time costs
    assert cpus.calibrate(time_call, (2, 1)).threads == 2


def test_budget_stops_the_search():
    time_call, calls = fake({8: 1.0, 4: 0.9, 2: 0.8, 1: 0.7})
    got = cpus.calibrate(time_call, (8, 4, 2, 1), budget_s=4.5)
    assert calls == [8, 8, 8, 8, 4] and got.threads == 4 and got.spent == pytest.approx(4.9)


def test_a_slow_model_keeps_the_start_after_its_warm_up_call():
    time_call, calls = fake({8: 3.0, 4: 2.0, 2: 1.5, 1: 1.2})
    got = cpus.calibrate(time_call, (8, 4, 2, 1), start=4, budget_s=2.0)
    assert calls == [4] and got.threads == 4 and not got.medians


def test_collapse_watch():
    watch = cpus.CollapseWatch(window=4, factor=4.0)
    assert not any(watch.observe("a", 0.01) for _ in range(8))  # reference, then steady
    assert not any(watch.observe("b", 0.5) for _ in range(4))  # another shape has its own reference
    assert [watch.observe("a", 0.05) for _ in range(4)] == [False, False, False, True]
    assert not watch.observe("a", float("nan")) and not watch.observe("a", -1.0)
    watch.reset()
    assert not any(watch.observe("a", 0.05) for _ in range(4))
