"""fastgen.core.paths (one resolver for every cache directory) and fastgen.core.stats (one percentile)."""

from pathlib import Path

import pytest

from fastgen.core.paths import cache_dir
from fastgen.core.stats import percentile
from fastgen.errors import InvalidArgumentError


def test_cache_dir_overrides_xdg_and_home(monkeypatch, tmp_path):
    for env in ("FASTGEN_CACHE_DIR", "FASTGEN_AUTOTUNE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(env, raising=False)
    assert cache_dir("engines") == Path.home() / ".cache" / "fastgen" / "engines"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("autotune") == tmp_path / "xdg" / "fastgen" / "autotune"
    assert cache_dir("ort-tensorrt") == tmp_path / "xdg" / "fastgen" / "ort-tensorrt"
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("FASTGEN_AUTOTUNE_DIR", str(tmp_path / "tuned"))
    assert cache_dir("engines") == tmp_path / "engines"
    assert cache_dir("autotune") == tmp_path / "tuned"
    assert cache_dir("ort-tensorrt") == tmp_path / "xdg" / "fastgen" / "ort-tensorrt"  # no override of its own
    assert not (tmp_path / "engines").exists()  # resolving creates nothing
    with pytest.raises(InvalidArgumentError, match="cache kind 'models'.*engines, autotune, ort-tensorrt"):
        cache_dir("models")


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0  # unsorted input is sorted first
    assert percentile([], 50) is None
