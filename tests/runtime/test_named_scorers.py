"""Named scorers in one Runtime: requests to several scorers (two of one kind) interleaved are batched per
scorer and score as each scorer does alone; names are checked at construction and submission (one-line
errors listing the choices); each scorer has its own queue, budget, merge price, thread and metrics label."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.scorer import Scorer
from fastgen.runtime import Runtime, RuntimeConfig, ScoreRequest

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 120

TEXTS = ["buy now", "", "a photo of a red sports car on a mountain road at sunset, studio lighting",
         "great product fast delivery " * 8, "x", "électrique ☕ vélo " * 30]


class Spy:
    """A scorer that records the size and thread of each engine call (and otherwise is the scorer)."""

    def __init__(self, scorer) -> None:
        self._scorer = scorer
        self.calls: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def logits(self, feeds):
        rows = next(iter(feeds.values())).shape[0]
        with self._lock:
            self.calls.append((rows, threading.current_thread().name))
        return self._scorer.logits(feeds)


@pytest.fixture
def three(tiny_scorer):
    """Two text classifiers (softmax, and sigmoid over the same engine) and an image classifier."""
    text = tiny_scorer("text")
    return {"moderation": Spy(text), "brief": Spy(Scorer(text.engine, multi_label=True, top_k=2)),
            "quality": Spy(tiny_scorer("image"))}


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (80, 50), (17, 99), (33, 33), (120, 7)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def metric_samples(text: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_interleaved_requests_are_batched_per_scorer_and_equal_each_scorers_own(three):
    pics = images(5)
    plan = [(name, item) for i in range(len(TEXTS))
            for name, item in (("moderation", TEXTS[i]), ("brief", TEXTS[-1 - i]), ("quality", pics[i % 5]))]
    # Queued before the threads start, with a long wait: every scorer's requests are there for its first batch.
    rt = Runtime(scorers=three, max_wait_ms=500, text_buckets=(), start=False)
    with rt:
        futures = [rt.submit(ScoreRequest(item, scorer=name)) for name, item in plan]
        assert [f.kind for f in futures[:3]] == ["moderation", "brief", "quality"]
        rt.start()
        got = [f.result(TIMEOUT) for f in futures]
        stats, metrics = rt.stats(), rt.metrics_text()
        assert set(rt.executors) == {"moderation", "brief", "quality"} and rt.scorers == three
    for (name, item), score in zip(plan, got):
        spy = three[name]
        ref = spy._scorer.score_texts([item])[0] if name != "quality" else spy._scorer.score_images([item])[0]
        np.testing.assert_allclose(score.logits, ref.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(list(score.probs.values()), list(ref.probs.values()), atol=1e-6, rtol=0)
        assert [k for k, _ in score.top] == [k for k, _ in ref.top]
    # The two text scorers share an engine but not a batch: one call each, on each one's own thread.
    for name, spy in three.items():
        assert spy.calls == [(6, f"fastgen-runtime-{name}")], (name, spy.calls)
    sigmoid = got[1].probs
    assert len(got[1].top) == 2 and abs(sum(sigmoid.values()) - 1) > 1e-3  # brief's own settings: multi-label
    # Metrics per name.
    for name in three:
        assert stats["kinds"][name]["requests"] == {"succeeded": 6}
        assert stats["kinds"][name]["batch_size"]["count"] == 1
    assert stats["queued"] == {"moderation": 0, "brief": 0, "quality": 0}
    got_metrics = metric_samples(metrics)
    assert got_metrics["fastgen_requests_total"] == {(("kind", n), ("status", "succeeded")): 6.0 for n in three}
    assert set(got_metrics["fastgen_batch_size_count"]) == {(("kind", n),) for n in three}


def test_each_scorer_has_its_own_buckets_budget_and_padding_price(three):
    config = RuntimeConfig(text_buckets=(8, 16, 64), text_merge_tokens=48, max_batch_tokens=512,
                           max_batch_pixels=64 * 64 * 3)
    with Runtime(scorers=three, config=config) as rt:
        assert rt.scheduler.merge_cost == {"moderation": 48.0, "brief": 48.0}
        assert rt.scheduler.limits("moderation").max_cost == 512 == rt.scheduler.limits("brief").max_cost
        assert rt.scheduler.limits("quality").max_cost == 64 * 64 * 3
        futures = [rt.submit(ScoreRequest(t, scorer=n)) for t in TEXTS for n in ("moderation", "brief")]
        for f in futures:
            f.result(TIMEOUT)
        queues = set(rt.metrics.profile.keys())
        choices = rt.autotune(1000.0, measure_now=False, apply=True)
    assert {e for e, _ in queues} == {"moderation", "brief"}
    assert {b for _, b in queues} <= {"8", "16", "64", "128"}
    assert {k.split(":")[0] for k in choices} == {"moderation", "brief"}


def test_which_scorer_a_request_goes_to(three, tiny_scorer):
    pic = images(1)[0]
    with Runtime(scorers=three) as rt:
        # No name: the only scorer of the item's kind; two of that kind: a one-line error naming them.
        only = rt.submit(ScoreRequest(pic))
        with pytest.raises(InvalidArgumentError) as err:
            rt.submit(ScoreRequest("buy now"))
        assert err.value.argument == "scorer" and "moderation" in str(err.value) and "brief" in str(err.value)
        assert "quality" not in str(err.value).split("allowed:")[1] and "\n" not in str(err.value)
        # An unknown name fails fast, listing the names; nothing is queued.
        with pytest.raises(InvalidArgumentError) as err:
            rt.submit(ScoreRequest("buy now", scorer="moderaton"))
        assert err.value.argument == "scorer" and "brief, moderation, quality" in str(err.value)
        # A name and a kind that disagree.
        with pytest.raises(InvalidArgumentError) as err:
            rt.submit(ScoreRequest("buy now", kind="text", scorer="quality"))
        assert err.value.argument == "kind" and "quality" in str(err.value)
        assert rt.stats()["inflight"] <= 1
        np.testing.assert_allclose(only.result(TIMEOUT).logits, three["quality"].score_images([pic])[0].logits,
                                   atol=1e-5)
    # A single scorer and a list keep today's names ("text", "image"), and their rule without a name.
    with Runtime(scorer=[tiny_scorer("text"), tiny_scorer("image")]) as rt:
        assert set(rt.scorers) == {"text", "image"}
        assert rt.submit(ScoreRequest("buy now", scorer="text")).result(TIMEOUT).label
        text = rt.submit(ScoreRequest("buy now"))
        assert text.kind == "text" and text.result(TIMEOUT).label
    with Runtime(scorer=tiny_scorer("image")) as rt:  # a str with no text scorer: an image file's path
        with pytest.raises(InvalidArgumentError, match="no text scorer"):
            rt.submit(ScoreRequest("buy now", kind="text"))


@pytest.mark.parametrize(("scorers", "needle"), [
    ({"bad name": "text"}, "letters, digits"),
    ({"generate": "text"}, "not 'generate'"),
    ({"": "text"}, "letters, digits"),
    ({"image": "text"}, "kept for an image scorer"),
    (["text", "text"], "name them"),
    ({"a": "text", "b": object()}, "fastgen.Scorer"),
])
def test_bad_names_are_refused_in_one_line(tiny_scorer, scorers, needle):
    def real(v):
        return tiny_scorer(v) if v in ("text", "image") else v

    given = {k: real(v) for k, v in scorers.items()} if isinstance(scorers, dict) else [real(v) for v in scorers]
    with pytest.raises(InvalidArgumentError) as err:
        Runtime(scorers=given, start=False)
    assert err.value.argument == "scorers" and needle in str(err.value) and "\n" not in str(err.value)


def test_request_and_constructor_arguments_are_checked(tiny_scorer):
    for bad in ("", "a b", 3, "x" * 65):
        with pytest.raises(InvalidArgumentError) as err:
            ScoreRequest("x", scorer=bad)
        assert err.value.argument == "scorer"
    assert ScoreRequest("x", scorer="Quality-2.v1").scorer == "Quality-2.v1"
    with pytest.raises(InvalidArgumentError, match="give one of them"):
        Runtime(scorer=tiny_scorer("text"), scorers={"a": tiny_scorer("text")}, start=False)
    # (name, scorer) pairs in a list name some and leave the others to their kind.
    rt = Runtime(scorers=[("moderation", tiny_scorer("text")), tiny_scorer("text"), tiny_scorer("image")], start=False)
    with rt:
        assert list(rt.scorers) == ["moderation", "text", "image"]
        assert rt.scheduler.nested_kinds == ("moderation", "text")
