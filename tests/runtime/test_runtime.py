"""fastgen.Runtime end to end on the tiny preset (torch backend; onnxruntime in one test): batched results
equal solo runs, failure isolation with fault injection, backpressure, deadlines, asyncio, shutdown."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig, GenerationResult
from fastgen.pipelines.generator import Generator
from fastgen.runtime import (
    DeadlineExceededError,
    GenerateRequest,
    OutOfMemoryError,
    OverloadedError,
    RequestStatus,
    Runtime,
    RuntimeConfig,
    ScoreRequest,
    ShutdownError,
)
from fastgen.runtime.request_scheduler import GENERATE

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 120

# (prompt, config): mixed step counts, schedulers, guidance (1.0: no unconditional rows), images per prompt.
MIX = [
    ("a red sports car", dict(steps=3, seed=1)),
    ("luxury watch on black marble", dict(steps=2, seed=2, scheduler="euler-ancestral")),
    ("a cozy coffee shop", dict(steps=4, seed=3, scheduler="ddim", guidance_scale=1.0)),
    ("", dict(steps=3, seed=4, scheduler="dpm++", num_images_per_prompt=2, negative_prompt="blurry")),
    ("fresh orange juice", dict(steps=2, seed=5, scheduler="euler", guidance_scale=3.0)),
]


def solo(gen: Generator, prompt: str, **cfg) -> np.ndarray:
    return gen.generate(prompt, output_type="np", progress=False, **cfg).images


class Wrapped:
    """An engine whose calls go through ``check(inputs)`` first (fault injection)."""

    def __init__(self, engine, check) -> None:
        self._engine, self._check = engine, check

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __call__(self, inputs=None, **kwargs):
        inputs = {**(inputs or {}), **kwargs}
        self._check(inputs)
        return self._engine(inputs)


def rebuild(gen: Generator, **engines) -> Generator:
    parts = dict(unet=gen.unet, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder)
    return Generator(**{**parts, **engines})


# --- equality with solo runs ---------------------------------------------------------------------------

def test_step_level_batches_equal_solo_runs(tiny_generator):
    gen = tiny_generator()
    with Runtime(gen, max_step_rows=16) as rt:
        futures = [rt.submit(GenerateRequest(p, GenerateConfig(output_type="np", **cfg))) for p, cfg in MIX]
        results = [f.result(TIMEOUT) for f in futures]
        stats = rt.stats()
    for (prompt, cfg), result in zip(MIX, results):
        assert isinstance(result, GenerationResult)
        n = cfg.get("num_images_per_prompt", 1)
        assert result.seeds == [cfg["seed"] + j for j in range(n)] and result.prompts == [prompt] * n
        alone = gen.generate(prompt, output_type="np", progress=False, **cfg)
        assert len(result.latencies.denoising_step_ms) == len(alone.latencies.denoising_step_ms)  # PNDM: steps + 1
        np.testing.assert_allclose(result.images, alone.images, atol=1e-4, rtol=0)
    # They really shared UNet calls: some step ran more rows than any one request has.
    assert stats["steps"]["64x64"]["rows"]["p99"] > 4
    assert stats["kinds"]["generate"]["requests"] == {"succeeded": len(MIX)}


def test_two_sizes_run_in_their_own_buckets(tiny_generator):
    gen = tiny_generator()
    with Runtime(gen) as rt:
        small = rt.submit(GenerateRequest("a dog", GenerateConfig(steps=2, seed=7, height=32, width=32,
                                                                   output_type="uint8")))
        large = rt.submit(GenerateRequest("a dog", GenerateConfig(steps=2, seed=7, output_type="latent")))
        small_img, large_lat = small.result(TIMEOUT).images, large.result(TIMEOUT).images
        buckets = set(rt.stats()["steps"])
    assert small_img.shape == (1, 32, 32, 3) and small_img.dtype == np.uint8
    ref = gen.generate("a dog", steps=2, seed=7, output_type="latent", progress=False).images
    torch.testing.assert_close(large_lat, ref, atol=1e-4, rtol=0)
    assert buckets == {"32x32", "64x64"}


def test_text_scores_equal_solo_with_length_buckets(tiny_scorer):
    scorer = tiny_scorer("text")
    texts = ["buy now", "", "a photo of a red sports car on a mountain road at sunset, studio lighting",
             "great product fast delivery excellent service " * 6, "electric bicycle " * 80, "x"]
    for buckets in ((8, 16, 32, 64), ()):
        with Runtime(scorer=scorer, text_buckets=buckets, max_wait_ms=20) as rt:
            futures = [rt.submit(ScoreRequest(t)) for t in texts]
            got = [f.result(TIMEOUT) for f in futures]
            used = {b for _, b in rt.metrics.profile.keys()}
        for text, score in zip(texts, got):
            ref = scorer.score_texts([text])[0]
            np.testing.assert_allclose(score.logits, ref.logits, atol=1e-5, rtol=0)
            np.testing.assert_allclose(list(score.probs.values()), list(ref.probs.values()), atol=1e-6, rtol=0)
            assert score.label == ref.label and [k for k, _ in score.top] == [k for k, _ in ref.top]
        assert used <= ({"8", "16", "32", "64", "128"} if buckets else {"longest"}) and used


def test_submission_tokenizes_as_the_tokenizer_does(tiny_scorer):
    scorer = tiny_scorer("text")
    with Runtime(scorer=scorer, start=False) as rt:
        ex = rt.executors["text"]
        prep = scorer.text_preprocessor
        assert ex.text is prep  # the scorer's own preprocessor
        assert prep.encoder is not None  # the tiny preset's tokenizer is fast: the direct path is tested
        for text in ["", "Buy NOW!!", "héllo wörld, ünïcode ☕", "great product " * 100, "a\tb\nc  d"]:
            ref = scorer.tokenizer(text, truncation=True, max_length=scorer.max_length, return_attention_mask=True)
            _, _, _, ids = ex.prepare(ScoreRequest(text))
            assert ids["input_ids"] == ref["input_ids"]
            # What reaches the engine, padded: the tokenizer's own padding of the same text.
            n = len(ref["input_ids"]) + 3
            padded = scorer.tokenizer.pad(dict(ref), padding="max_length", max_length=n, return_tensors="pt")
            feeds = prep.pad([ids], n)
            for name in prep.input_names:
                assert torch.equal(feeds[name][0], padded[name].long()), name
        scorer.tokenizer(["a", "b c d"], padding="max_length", max_length=64)  # the Scorer's own calls pad
        assert len(ex.prepare(ScoreRequest("a"))[3]["input_ids"]) < 64  # the copy never does
        # The preparation thread's batch call gives what one call per text gives (buckets included).
        texts = ["", "Buy NOW!!", "héllo wörld", "great product " * 100, "a\tb\nc  d", "x " * 20]
        assert ex.defers and ex.prepare_many(texts) == [ex.prepare(ScoreRequest(t)) for t in texts]


def test_padding_across_text_buckets_is_priced_from_measured_batches(tiny_scorer):
    scorer = tiny_scorer("text")
    texts = ["buy now", "five stars " * 5, "electric bicycle " * 20, "x"]
    # Fixed by the config: set at once. Measured: buckets stay apart until enough batches of
    # different sizes were timed, then a price within [0, max_batch_tokens] is set.
    with Runtime(scorer=scorer, text_merge_tokens=48) as rt:
        assert rt.scheduler.merge_cost == {"text": 48.0} and rt.executors["text"].call_cost is None
    with Runtime(scorer=scorer, text_buckets=(8, 16, 32, 64), max_wait_ms=0, max_batch_size=4) as rt:
        assert rt.scheduler.merge_cost == {}
        for wave in range(12):
            futures = [rt.submit(ScoreRequest(t)) for t in texts[: 1 + wave % 4]]
            for f in futures:
                f.result(TIMEOUT)
        assert len(rt.executors["text"].call_cost.samples) >= 16
        assert 0.0 <= rt.scheduler.merge_cost["text"] <= rt.config.max_batch_tokens
    with pytest.raises(InvalidArgumentError):
        RuntimeConfig(text_merge_tokens=-1)


def test_image_scores_equal_solo(tiny_scorer, tmp_path):
    from PIL import Image

    scorer = tiny_scorer("image")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (80, 50), (17, 99))]
    Image.fromarray(images[1]).save(path := tmp_path / "img.png")
    items = [*images, Image.fromarray(images[2]), path]
    with Runtime(scorer=scorer, max_wait_ms=20) as rt:
        got = [f.result(TIMEOUT) for f in [rt.submit(ScoreRequest(i)) for i in items]]
    for item, score in zip(items, got):
        np.testing.assert_allclose(score.logits, scorer.score_images([item])[0].logits, atol=1e-5, rtol=0)


# --- asyncio ---------------------------------------------------------------------------------------------

def test_asyncio_api_and_cancelling_a_task_cancels_the_request(tiny_generator, tiny_scorer):
    gen = tiny_generator()
    with Runtime(gen, tiny_scorer("text")) as rt:
        async def main():
            score, image = await asyncio.gather(rt.score("buy now"), rt.generate("a cat", steps=2, seed=3,
                                                                                 output_type="np"))
            long = asyncio.ensure_future(rt.generate("slow", steps=500, seed=1))
            await asyncio.sleep(0.3)
            long.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            return score, image, others

        score, image, others = asyncio.run(main())
        assert not others  # no task left behind
        assert score.label in ("compliant", "misleading", "prohibited")
        np.testing.assert_allclose(image.images, solo(gen, "a cat", steps=2, seed=3), atol=1e-4, rtol=0)
        stats = rt.stats()
    assert stats["kinds"]["generate"]["requests"].get("cancelled") == 1 and stats["active"][GENERATE] == 0


# --- bad input and failures ------------------------------------------------------------------------------

def test_bad_requests_fail_at_submission_and_are_never_queued(tiny_generator, tiny_scorer):
    with Runtime(tiny_generator(), tiny_scorer("image")) as rt:
        for request, needle in [
            (GenerateRequest("x", GenerateConfig(scheduler="lcm", steps=1000)), "steps"),  # LCM takes <= 50
            (GenerateRequest("x", GenerateConfig(height=33)), "height"),
            (ScoreRequest(np.zeros((4, 4), np.float32)), "item"),
            (ScoreRequest("a text", kind="text"), "text scorer"),
        ]:
            with pytest.raises(InvalidArgumentError) as err:
                rt.submit(request)
            assert needle in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(InvalidArgumentError):
            GenerateRequest(3)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            ScoreRequest("x", deadline_s=0)
        assert rt.stats()["inflight"] == 0
    with Runtime(scorer=tiny_scorer("text")) as rt:  # texts are prepared later, but checked at once
        with pytest.raises(InvalidArgumentError) as err:
            rt.submit(ScoreRequest(b"bytes", kind="text"))
        assert "item" in str(err.value) and rt.stats()["inflight"] == 0
    with pytest.raises(InvalidArgumentError):
        Runtime()


def test_a_prompt_that_breaks_the_text_encoder_fails_alone(tiny_generator):
    gen = tiny_generator()
    poison = "this prompt breaks the encoder"
    tok = gen.text_encoder.tokenizer
    bad_ids = tok(poison, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]

    def check(inputs):
        if any(torch.equal(row, bad_ids) for row in inputs["input_ids"]):
            raise RuntimeError("encoder kernel failure")

    broken = rebuild(gen, text_encoder=Wrapped(gen.text_encoder, check))
    rt = Runtime(broken, start=False)
    futures = [rt.submit(GenerateRequest(p, GenerateConfig(steps=2, seed=i, output_type="np")))
               for i, p in enumerate(["good one", poison, "good two"])]
    rt.start()  # all three join the same step: one batched encoder call that fails, then halves
    rt.shutdown()
    assert isinstance(futures[1].exception(), RuntimeError) and futures[1].status is RequestStatus.FAILED
    for i in (0, 2):
        prompt = ["good one", poison, "good two"][i]
        np.testing.assert_allclose(futures[i].result().images, solo(gen, prompt, steps=2, seed=i), atol=1e-4, rtol=0)


def test_unet_out_of_memory_splits_the_step_and_fails_only_what_cannot_fit(tiny_generator):
    gen = tiny_generator()
    calls = []

    def check(inputs):
        rows = inputs["sample"].shape[0]
        calls.append(rows)
        if rows > 4:  # fault injection: the device holds at most 4 UNet rows
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    rt = Runtime(rebuild(gen, unet=Wrapped(gen.unet, check)), start=False, max_step_rows=16)
    fits = [rt.submit(GenerateRequest(f"p{i}", GenerateConfig(steps=3, seed=i, output_type="np"))) for i in range(3)]
    too_big = rt.submit(GenerateRequest("big", GenerateConfig(steps=3, seed=9, num_images_per_prompt=3)))  # 6 rows
    rt.start()
    rt.shutdown()
    err = too_big.exception()
    assert isinstance(err, OutOfMemoryError) and "out of memory" in str(err) and too_big.status is RequestStatus.FAILED
    for i, f in enumerate(fits):
        np.testing.assert_allclose(f.result().images, solo(gen, f"p{i}", steps=3, seed=i), atol=1e-4, rtol=0)
    assert rt.scheduler.limits(GENERATE, (64, 64)).max_batch <= 4
    # The first step found the limit (12 rows as 8 + 4: fails; halves 4: ok, 8: fails; 2: ok; 6 alone: fails);
    # the later steps are chunked under it instead of failing again.
    assert calls[:5] == [8, 4, 8, 2, 6] and len(calls) > 5 and max(calls[5:]) <= 4


# --- queueing ----------------------------------------------------------------------------------------------

def test_full_queue_rejects_at_once_with_retry_after(tiny_scorer):
    rt = Runtime(scorer=tiny_scorer("text"), start=False, max_queue=3, max_wait_ms=0)
    accepted = [rt.submit(ScoreRequest(f"text {i}")) for i in range(3)]
    with pytest.raises(OverloadedError) as err:
        rt.submit(ScoreRequest("one too many"))
    assert err.value.retry_after_s > 0 and err.value.status is RequestStatus.FAILED
    assert rt.stats()["kinds"]["text"]["rejected"] == 1
    rt.start()
    rt.shutdown()
    assert all(f.status is RequestStatus.SUCCEEDED for f in accepted)
    with pytest.raises(ShutdownError):
        rt.submit(ScoreRequest("after shutdown"))


def test_a_request_past_its_deadline_fails_fast_without_running(tiny_scorer):
    rt = Runtime(scorer=tiny_scorer("text"), start=False, max_wait_ms=0)
    doomed = rt.submit(ScoreRequest("late", deadline_s=0.01))
    fine = rt.submit(ScoreRequest("on time", deadline_s=60))
    threading.Event().wait(0.05)
    rt.start()
    rt.shutdown()
    assert isinstance(doomed.exception(), DeadlineExceededError) and doomed.status is RequestStatus.EXPIRED
    assert fine.status is RequestStatus.SUCCEEDED
    stats = rt.stats()["kinds"]["text"]
    assert stats["requests"] == {"expired": 1, "succeeded": 1} and stats["batch_size"]["count"] == 1


# --- shutdown ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_with_generations_in_flight_ends_every_request(tiny_generator, drain):
    rt = Runtime(tiny_generator())
    futures = [rt.submit(GenerateRequest(f"p{i}", GenerateConfig(steps=4 if drain else 400, seed=i)))
               for i in range(4)]
    threading.Event().wait(0.1)
    rt.shutdown(drain=drain)
    assert all(f.done() for f in futures)
    statuses = {f.status for f in futures}
    if drain:
        assert statuses == {RequestStatus.SUCCEEDED}
    else:
        assert statuses == {RequestStatus.FAILED}
        assert all(isinstance(f.exception(), ShutdownError) for f in futures)
    rt.shutdown()  # idempotent


# --- observability and tuning ------------------------------------------------------------------------------

def samples(text: str) -> dict:
    """Prometheus text parsed back: {sample name: {labels: value}} (the parser refuses malformed text)."""
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_stats_and_prometheus_exposition(tiny_scorer):
    with Runtime(scorer=[tiny_scorer("text"), tiny_scorer("image")], max_wait_ms=5) as rt, \
            Runtime(scorer=tiny_scorer("text")) as other:
        for f in [rt.submit(ScoreRequest(t)) for t in ("a", "b c", "d e f")]:
            f.result(TIMEOUT)
        rt.submit(ScoreRequest(np.zeros((64, 64, 3), np.uint8))).result(TIMEOUT)
        other.submit(ScoreRequest("elsewhere")).result(TIMEOUT)
        stats, text, other_text = rt.stats(), rt.metrics_text(), other.metrics_text()
        assert rt.metrics_registry is not other.metrics_registry
        assert generate_latest(rt.metrics_registry).decode() == rt.metrics_text()
    kinds = stats["kinds"]
    assert kinds["text"]["requests"] == {"succeeded": 3} and kinds["image"]["requests"] == {"succeeded": 1}
    for key in ("p50", "p95", "p99"):
        assert kinds["text"]["latency_ms"][key] >= kinds["text"]["queue_wait_ms"][key] >= 0
    assert stats["schedule_decision_us"]["count"] >= 2
    got = samples(text)
    assert got["fastgen_requests_total"] == {(("kind", "image"), ("status", "succeeded")): 1,
                                             (("kind", "text"), ("status", "succeeded")): 3}
    assert got["fastgen_request_latency_seconds_count"][(("kind", "text"),)] == 3
    buckets = {dict(k)["le"]: v for k, v in got["fastgen_request_latency_seconds_bucket"].items()
               if dict(k)["kind"] == "text"}
    counts = [buckets[le] for le in sorted(buckets, key=float)]
    assert counts == sorted(counts) and counts[-1] == 3 and float(max(buckets, key=float)) == float("inf")
    assert got["fastgen_batch_size_count"][(("kind", "text"),)] >= 1
    assert got["fastgen_queue_depth"] == {(("kind", "image"),): 0, (("kind", "text"),): 0}
    assert got["fastgen_inflight_requests"] == {(): 0} and "fastgen_rejected_total" not in got
    assert "# TYPE fastgen_queue_depth gauge" in text and "# TYPE fastgen_requests_total counter" in text
    # The other runtime's registry counts its own request only.
    assert samples(other_text)["fastgen_requests_total"] == {(("kind", "text"), ("status", "succeeded")): 1}


def test_autotune_measures_and_applies_limits(tiny_generator, tiny_scorer):
    with Runtime(tiny_generator(), tiny_scorer("text"), text_buckets=(16, 64)) as rt:
        choices = rt.autotune(1000.0, batch_sizes=(1, 4), iters=2, generation_steps=10)
        assert set(choices) == {"text:16", "text:64", "text:128", "generate:64x64"}
        for key, choice in choices.items():
            kind, label = key.split(":")
            bucket = rt._bucket_of(kind, label)
            assert choice.feasible and rt.scheduler.limits(kind, bucket).max_batch == choice.batch_size
        # The text buckets' profile prices padding across buckets too.
        assert 0.0 <= rt.scheduler.merge_cost["text"] <= rt.config.max_batch_tokens
        # The profile recorded while serving tunes too.
        rt.submit(ScoreRequest("hello")).result(TIMEOUT)
        assert "text:16" in rt.autotune(1000.0, measure_now=False, apply=False)


def test_onnxruntime_backend_end_to_end(tiny_generator, tiny_scorer):
    gen, scorer = tiny_generator("onnxruntime"), tiny_scorer("text", "onnxruntime")
    with Runtime(gen, scorer, config=RuntimeConfig(max_wait_ms=10)) as rt:
        futures = [rt.submit(GenerateRequest(f"p{i}", GenerateConfig(steps=2 + i, seed=i, output_type="np")))
                   for i in range(3)]
        texts = ["buy now", "five stars " * 10]
        scores = [rt.submit(ScoreRequest(t)) for t in texts]
        for i, f in enumerate(futures):
            np.testing.assert_allclose(f.result(TIMEOUT).images, solo(gen, f"p{i}", steps=2 + i, seed=i),
                                       atol=1e-4, rtol=0)
        for t, f in zip(texts, scores):
            np.testing.assert_allclose(f.result(TIMEOUT).logits, scorer.score_texts([t])[0].logits, atol=1e-5)
