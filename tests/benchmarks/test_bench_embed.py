"""``benchmarks/bench_embed.py --quick``: the JSON layout of a run (tiny BERT, 16 texts, one pass).

Figures are not judged here (no timing assertions): only their shape and consistency, and that every
fastgen row embeds as sentence-transformers does (cosine >= 0.9999)."""

from __future__ import annotations

import datetime
import json

import pytest

pytest.importorskip("sentence_transformers")

import bench_embed  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench-embed")
    out = tmp / "result.json"
    assert bench_embed.main(["--quick", "--json", str(out)]) == 0
    assert not list(tmp.glob(".result.json.*"))  # written atomically
    return json.loads(out.read_text())


def test_layout(quick):
    assert quick["benchmark"] == "embed" and quick["device"].startswith("CPU: ")
    datetime.date.fromisoformat(quick["date"])
    assert quick["command"] == "python benchmarks/bench_embed.py --quick --json " + quick["command"].split()[-1]
    assert {"fastgen", "torch", "onnxruntime", "transformers", "sentence_transformers", "python"} <= set(quick["versions"])
    assert quick["model"]["name"] == "tiny" and quick["model"]["parameters"] > 0
    assert quick["texts"] == {"count": 16, "min_tokens": 4, "max_tokens": 256}
    rows = quick["rows"]
    assert [(r["name"], r["backend"], r["precision"]) for r in rows] == [
        ("sentence-transformers", "torch", "fp32"), ("sentence-transformers", "torch", "bf16"),
        ("fastgen", "onnxruntime", "fp32"), ("fastgen", "torch", "fp32"), ("fastgen", "torch", "bf16")]
    assert rows[0]["speedup"] == 1.0 and rows[0]["min_cosine"] == pytest.approx(1.0)
    for row in rows:
        assert 0 < row["seconds_min"] <= row["seconds"]
        assert row["texts_per_s"] == pytest.approx(16 / row["seconds"])
        assert row["speedup"] == pytest.approx(rows[0]["seconds"] / row["seconds"])
        assert row["min_cosine"] >= 0.9999  # equal outputs, bf16 included
    best = quick["best"]
    assert best["speedup"] == max(r["speedup"] for r in rows if r["name"] == "fastgen")
    assert quick["meets_goal"] == (best["speedup"] >= quick["goal"] == 2.0)
    assert quick["meets_goal_same_precision"] == any(r["speedup_same_precision"] >= 2.0 for r in rows[2:])
    assert rows[4]["speedup_same_precision"] == pytest.approx(rows[1]["seconds"] / rows[4]["seconds"])


def test_texts_spread_over_the_token_range():
    from fastgen.models import tokenizers

    texts = bench_embed.make_texts(256, 4, 256)
    tok = tokenizers.bert_tokenizer(1000, 512)
    lengths = sorted(len(ids) for ids in tok(texts)["input_ids"])
    assert lengths[0] == 4 and lengths[-1] == 256 and len(set(lengths)) > 200


@pytest.mark.parametrize("argv", [["--backends", "tensorflow"], ["--texts", "0"], ["--precisions", "bf16"],
                                  ["--precisions", "fp16"], ["--threads", "-1"], ["--model", "huge"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_embed.main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
