"""``benchmarks/bench_http.py``: the plumbing of a run (in-process and over HTTP, one short probe each).

A real ``fastgen serve`` process is started on loopback and every request of both scenarios goes
through it; the figures themselves are docs/benchmarks.md's business (a shared 2-core box measures
nothing reliable in a few seconds), so only the JSON's shape, and that every request succeeded, are
checked. The benchmark runs in a subprocess: it pins intra-op threads and freezes the garbage
collector, which must not leak into the other tests."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import bench_http
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

SCRIPT = Path(bench_http.__file__)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-http") / "http.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--modes", "inprocess,http", "--loads", "0.2",
           "--text-duration", "1", "--mix-duration", "3", "--low-duration", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.parent.glob(f".{out.name}.*"))  # written atomically: no temporary left behind
    return json.loads(out.read_text())


def test_header(run):
    assert run["benchmark"] == "http" and run["preset"] == "tiny" and run["backend"] == "onnxruntime"
    assert run["device"].startswith("CPU: ")
    datetime.date.fromisoformat(run["date"])
    assert {"fastgen", "torch", "onnxruntime", "fastapi", "uvicorn", "python"} <= set(run["versions"])
    assert run["settings"]["client"] == "raw"  # benchmarks/raw_http.py, the default
    assert "--modes inprocess,http" in run["command"] and run["settings"]["threads"] == 1
    assert run["engines"]["unet_intra_op_threads"] == 1  # pinned, as the server's are
    assert run["skipped"] == {} and set(run["modes"]) == {"inprocess", "http"}
    assert "fastgen.cli serve tiny --scorer tiny --scorer tiny:text-classifier" in run["modes"]["http"]["server"]
    healthz = run["modes"]["http"]["healthz_ms"]
    assert 0 < healthz["p50"] <= healthz["p99"] and healthz["client_cpu_ms_per_request"] > 0
    for key in ("start", "end", "inprocess", "http"):
        snapshot = run["machine"][key] if key in ("start", "end") else run["machine"][key]["before"]
        assert {"loadavg_1min", "others_running", "cpu_pressure_avg10", "busiest"} <= set(snapshot)
    assert "2 cores" in run["note"]


def test_every_request_succeeded(run):
    probes = [(name, mode, p) for name, sc in run["scenarios"].items() for mode, pts in sc["modes"].items()
              for p in pts] + [("text-low", mode, p) for mode, p in run["scenarios"]["text"]["low_load"].items()]
    assert len(probes) == 6  # one probe per mode and scenario, and the low-load probe of text
    for name, mode, p in probes:
        assert p["submitted"] > 0 and p["missed"] == 0, (name, mode, p)
        if mode == "http":  # every response was a 200 (anything else counts as a failure)
            assert p["requests"] == {"200": p["submitted"], "cancelled": 0}, (name, mode, p["requests"])
        else:
            assert p["requests"] == {"cancelled": 0}, (name, mode, p["requests"])
        assert p["kinds"] and set(p["kinds"]) <= ({"text", "image", "generate"} if name == "mix" else {"text"})


def test_scenarios_and_summary(run):
    assert set(run["scenarios"]) == {"mix", "text"}
    for name, sc in run["scenarios"].items():
        assert set(sc["modes"]) == {"inprocess", "http"} and sc["sequential_capacity_rps"] > 0
        metric = name
        for target, caps in sc["capacity"][metric].items():
            assert set(caps) == {"inprocess", "http"}, target
            assert set(sc["ratios"][metric][target]) == {"http/inprocess", "ray1/inprocess", "ray2/ray1"}
            assert sc["ratios"][metric][target]["ray2/ray1"]["bound"] == "mode not run"
    summary = run["summary"]
    assert set(summary["text_p50_ms_low_load"]) == {"inprocess", "http"}
    assert summary["text_p50_added_ms"]["http"] == pytest.approx(
        summary["text_p50_ms_low_load"]["http"] - summary["text_p50_ms_low_load"]["inprocess"])
    assert set(summary["goals_met"]) <= {"mix_http_over_inprocess_ge_0.9", "text_p50_added_by_http_le_2ms"}
    assert "text_p50_added_by_http_le_2ms" in summary["goals_met"]


@pytest.mark.parametrize("argv", [["--modes", "grpc"], ["--scenarios", "generate"], ["--threads", "-1"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_http.parse_args(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
