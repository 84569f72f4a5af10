"""Kernel config tables: autotune cache, shipped tables and defaults, with a fake timer (no GPU, no tuning)."""

from __future__ import annotations

import json
import logging

import pytest

from fastgen.kernels import launch_configs
from fastgen.kernels.launch_configs import ConfigTable, pow2_bucket

CANDIDATES = [{"BLOCK_M": 64, "num_warps": 4}, {"BLOCK_M": 128, "num_warps": 8}, {"BLOCK_M": 32, "num_warps": 2}]
DEFAULT = {"BLOCK_M": 16, "num_warps": 1}


@pytest.fixture()
def sm90(monkeypatch, tmp_path):
    """Pretend to be on an sm90 GPU with Triton 3.6; isolated autotune and shipped dirs."""
    monkeypatch.setenv("FASTGEN_AUTOTUNE_DIR", str(tmp_path / "user"))
    monkeypatch.setattr(launch_configs, "device_arch", lambda device: "sm90")
    monkeypatch.setattr(launch_configs, "triton_version", lambda: "3.6")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    return shipped


def _timer(times):
    """A fake do_bench: launches the config, then returns the time listed for its BLOCK_M."""
    launched = []

    def timer(fn):
        fn()
        return times[launched[-1]["BLOCK_M"]]

    return timer, launched


def test_default_when_no_table(sm90):
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    assert table.config("key", "sm90", DEFAULT) == DEFAULT


def test_tune_picks_fastest_persists_and_is_reused(sm90):
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    timer, launched = _timer({64: 2.0, 128: 1.0, 32: 3.0})
    best = table.tune("key", "sm90", launched.append, DEFAULT, timer=timer)
    assert best == CANDIDATES[1] and len(launched) == 3
    data = json.loads(table.path.read_text())
    assert data["archs"]["sm90"]["key"] == {**CANDIDATES[1], "triton": "3.6"}
    # A new process (new table) finds it without timing again.
    fresh = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    assert fresh.config("key", "sm90", DEFAULT) == CANDIDATES[1]
    launched.clear()
    assert fresh.tune("key", "sm90", launched.append, DEFAULT, timer=timer) == CANDIDATES[1]
    assert launched == []
    # Other keys keep their own entries (merge, not overwrite).
    timer2, launched2 = _timer({64: 1.0, 128: 2.0, 32: 3.0})
    assert fresh.tune("other", "sm90", launched2.append, DEFAULT, timer=timer2) == CANDIDATES[0]
    archs = json.loads(table.path.read_text())["archs"]["sm90"]
    assert set(archs) == {"key", "other"}
    assert not list(table.path.parent.glob(".*"))  # no temp file left behind


def test_shipped_table_below_user_cache(sm90):
    (sm90 / "k.json").write_text(json.dumps(
        {"format": 1, "kernel": "k", "archs": {"sm90": {"key": CANDIDATES[2], "old": {**CANDIDATES[0], "triton": "3.0"}},
                                               "sm80": {"key": CANDIDATES[0]}}}))
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    assert table.config("key", "sm90", DEFAULT) == CANDIDATES[2]
    assert table.config("old", "sm90", DEFAULT) == DEFAULT  # tuned under another Triton: ignored
    timer, launched = _timer({64: 1.0, 128: 2.0, 32: 3.0})
    table.tune("key", "sm90", launched.append, DEFAULT, timer=timer)  # user cache has nothing yet: tunes
    assert ConfigTable("k", CANDIDATES, shipped_dir=sm90).config("key", "sm90", DEFAULT) == CANDIDATES[0]


def test_corrupt_or_foreign_files_are_ignored(sm90, caplog):
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    table.path.parent.mkdir(parents=True)
    table.path.write_text("{not json")
    (sm90 / "k.json").write_text(json.dumps({"format": 99, "archs": {}}))
    with caplog.at_level(logging.WARNING, logger="fastgen.kernels.launch_configs"):
        assert table.config("key", "sm90", DEFAULT) == DEFAULT
    assert "unreadable" in caplog.text and "not format 1" in caplog.text
    # An entry with unknown fields or bad values is not trusted either.
    table.path.write_text(json.dumps({"format": 1, "archs": {"sm90": {"a": {"BLOCK_M": -1}, "b": {"EVIL": 1}}}}))
    fresh = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    assert fresh.config("a", "sm90", DEFAULT) == DEFAULT and fresh.config("b", "sm90", DEFAULT) == DEFAULT
    # Tuning rewrites a corrupt cache file into a valid one.
    table.path.write_text("{not json")
    fresh.tune("key", "sm90", lambda cfg: None, DEFAULT, timer=lambda fn: 1.0)
    assert json.loads(table.path.read_text())["archs"]["sm90"]["key"]["BLOCK_M"] == 64


def test_failing_candidates_are_skipped(sm90):
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)

    def launch(cfg):
        if cfg["BLOCK_M"] != 32:
            raise RuntimeError("out of shared memory")

    assert table.tune("key", "sm90", launch, DEFAULT, timer=lambda fn: (fn(), 1.0)[1]) == CANDIDATES[2]

    def never(cfg):
        raise RuntimeError("nothing compiles")

    assert table.tune("other", "sm90", never, DEFAULT, timer=lambda fn: (fn(), 1.0)[1]) == DEFAULT


def test_export_is_a_shippable_table(sm90):
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    table.tune("key", "sm90", lambda cfg: None, DEFAULT, timer=lambda fn: 1.0)
    exported = table.export()
    assert exported["format"] == 1 and exported["archs"]["sm90"]["key"]["BLOCK_M"] == 64
    (sm90 / "k.json").write_text(json.dumps(exported))
    table.path.unlink()
    assert ConfigTable("k", CANDIDATES, shipped_dir=sm90).config("key", "sm90", DEFAULT) == CANDIDATES[0]


def test_pow2_bucket_and_arch():
    assert [pow2_bucket(n) for n in (1, 2, 3, 77, 1024, 1025)] == [1, 2, 4, 128, 1024, 2048]
    assert launch_configs.device_arch("cpu") == "cpu"


def test_autotune_dir_is_the_autotune_cache(monkeypatch, tmp_path):
    from fastgen.core.paths import cache_dir

    monkeypatch.setenv("FASTGEN_AUTOTUNE_DIR", str(tmp_path / "tuned"))
    assert launch_configs.autotune_dir() == tmp_path / "tuned" == cache_dir("autotune")
    monkeypatch.delenv("FASTGEN_AUTOTUNE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert launch_configs.autotune_dir() == tmp_path / "xdg" / "fastgen" / "autotune"
    assert ConfigTable("k", CANDIDATES).path == tmp_path / "xdg" / "fastgen" / "autotune" / "k.json"


def test_shipped_configs_folder_exists():
    """pyproject ships ``kernels/configs/*.json``: the folder is real and says what belongs there."""
    folder = launch_configs.SHIPPED_DIR
    assert folder.is_dir() and (folder / "README.md").is_file()
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["format"] == 1
        if path.stem in launch_configs.TABLE_FOR_ARCH.values():  # a per-architecture default table
            assert data["arch"] == path.stem and isinstance(data["kernels"], dict)
        else:  # a tuned table of one kernel
            assert data["kernel"] == path.stem and isinstance(data["archs"], dict)


def test_tune_never_times_a_candidate_that_does_not_fit(sm90):
    """The launcher's ``fits`` (the compiled kernel's spills / shared memory on this GPU) filters the
    candidates before anything is timed."""
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    timer, launched = _timer({64: 2.0, 128: 1.0, 32: 3.0})
    fits = {64: None, 128: "spills 96 bytes", 32: None}
    best = table.tune("key", "sm90", launched.append, DEFAULT, timer=timer, fits=lambda cfg: fits[cfg["BLOCK_M"]])
    assert best == CANDIDATES[0] and [c["BLOCK_M"] for c in launched] == [64, 32]
    # nothing fits: the default, untimed
    launched.clear()
    assert table.tune("other", "sm90", launched.append, DEFAULT, timer=timer, fits=lambda cfg: "too big") == DEFAULT
    assert launched == []


def test_choose_under_the_interpreter_is_the_default(sm90):
    table = ConfigTable("k", CANDIDATES, shipped_dir=sm90)
    assert table.choose("key", "cpu", lambda cfg: None, DEFAULT, autotune=True) == DEFAULT


def test_arch_default_tables():
    """Every GPU maps to a default table; a null entry refuses with a message; older GPUs are refused."""
    import pytest as _pytest

    from fastgen.errors import UnsupportedError

    assert launch_configs.table_for("sm86") == "sm89" and launch_configs.table_for("sm120") == "sm89"
    assert launch_configs.table_for("sm103") == "sm100" and launch_configs.table_for("sm110") == "sm89"
    with _pytest.raises(UnsupportedError, match="compute capability >= 8.0"):
        launch_configs.table_for("sm75")
    fallback = {"BLOCK_M": 1}
    assert launch_configs.arch_default("attention", "cpu", "f16-d64", fallback) == fallback
    assert launch_configs.arch_default("attention", "sm90", "no-such-class", fallback) == fallback
    for arch in launch_configs.GATE_ARCHS:
        for kernel, classes in launch_configs._arch_table(arch).items():
            for cls, entry in classes.items():
                if entry is None:
                    assert not launch_configs.has_fitting_config(kernel, arch, cls)
                    with _pytest.raises(launch_configs.NoFittingConfig, match=f"{kernel}.*{cls}.*{arch}"):
                        launch_configs.arch_default(kernel, arch, cls, fallback)
                else:
                    assert launch_configs.has_fitting_config(kernel, arch, cls)
                    assert launch_configs.arch_default(kernel, arch, cls, fallback) == entry["config"]
    assert not launch_configs.has_fitting_config("attention", "sm75", "f16-d64")


def test_attention_shape_key_buckets():
    import torch

    from fastgen.kernels.attention import shape_key

    assert shape_key(4096, 77, 40, torch.float16, True, False) == "d40-float16-q4096-k128-mask"
    assert shape_key(1000, 1000, 64, torch.bfloat16, False, True) == "d64-bfloat16-q1024-k1024-causal"
