"""Per-request LoRA adapters in ``fastgen.Runtime``: requests of different adapter selections never
share a UNet call (the weights are fused on every backend), each gives exactly what
``Generator.set_adapters`` + ``generate`` gives alone; the scheduler keeps the adapters in place
while they have work and switches without starving anyone; bad adapters are refused at submission.

The scheduler tests run on a fake clock with strings standing in for selections (it never looks
inside them). The end-to-end tests use the tiny preset on torch and onnxruntime, with LoRA files
written by peft / diffusers (tests/lora/lora_files.py); the reference images come from the same
generator after the runtime has shut down (``Generator.set_adapters`` + ``generate``, same seeds),
whose own LoRA parity with diffusers is tests/lora/test_lora_parity.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.metrics import bucket_label
from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
from fastgen.runtime.requests import GenerateRequest, RequestStatus, adapter_pairs
from fastgen.runtime.step_policy import weights_of

# tests/lora's helpers (LoRA files written by peft / diffusers), as tests/serve/test_lora_serve.py does.
LORA_TESTS = str(Path(__file__).resolve().parents[1] / "lora")
if LORA_TESTS not in sys.path:
    sys.path.insert(0, LORA_TESTS)

TIMEOUT = 120


# --- the scheduler (pure Python, fake clock) -------------------------------------------------------------

class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


_ids = iter(range(1, 10**9))


def gen(adapters=None, *, arrival=None, rows=2, size=(64, 64)) -> Job:
    """A generation job of one selection (a string stands in for it; None: the base weights)."""
    bucket = size if adapters is None else (*size, adapters)
    return Job(next(_ids), GENERATE, bucket, rows=rows, cost=1.0, arrival=arrival)


def make(**cfg) -> tuple[RequestScheduler, Clock]:
    clock = Clock()
    return RequestScheduler(RuntimeConfig(**cfg), clock=clock), clock


def run_to_end(s: RequestScheduler, clock: Clock, steps_each: int = 2, limit: int = 100) -> list[Job]:
    """Step until nothing is left, each request leaving after ``steps_each`` steps; returns the
    bucket order of the steps as the jobs' selections (one entry per step)."""
    taken: dict[int, int] = {}
    order = []
    for _ in range(limit):
        d = s.schedule()
        if not d.jobs:
            return order
        assert len({weights_of(j.bucket) for j in d.jobs}) == 1  # one selection per step, always
        order.append(weights_of(d.jobs[0].bucket))
        clock.t += 0.1
        for j in d.jobs:
            taken[j.id] = taken.get(j.id, 0) + 1
            if taken[j.id] == steps_each:
                s.finish(j, RequestStatus.SUCCEEDED)
    raise AssertionError("did not finish")


def test_bucket_keys_and_labels():
    assert weights_of((64, 64)) is None and weights_of((64, 64, "A")) == "A" and weights_of(32) is None
    assert bucket_label((64, 48, "A")) == "64x48" == bucket_label((64, 48))  # no series per selection


def test_selections_never_share_a_step_and_the_one_in_place_runs_to_its_end():
    """Interleaved submissions of two selections and the base: each step runs one selection, and the
    scheduler does not alternate between them (equal urgency: the adapters in place keep the UNet)."""
    s, clock = make(max_step_rows=16)
    for _ in range(3):
        for sel in ("A", "B", None):
            s.submit(gen(sel))
    order = run_to_end(s, clock)
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches == 2 and len(order) == 6, order  # A A B B None None: each selection once


def test_without_adapters_shape_buckets_still_take_turns():
    s, clock = make(max_step_rows=8)
    s.submit(gen(size=(64, 64)))
    s.submit(gen(size=(128, 128)))
    first, second = s.schedule(), s.schedule()
    assert {first.queue[1], second.queue[1]} == {(64, 64), (128, 128)}  # unchanged: no swap to avoid


def test_a_more_urgent_selection_switches_only_beyond_the_swap_hold():
    s, clock = make(max_step_rows=8, slowdown_target=0)
    s.observe_swap(0.5)
    assert s.switch_hold_s == pytest.approx(1.0)
    s.submit(a := gen("A", arrival=100.0))
    assert s.schedule().jobs == [a]  # A is on the UNet now
    s.submit(b := gen("B", arrival=99.5))  # due 0.5 s earlier: less than the hold
    assert s.schedule().jobs == [a]
    s.submit(c := gen("B", arrival=98.5))  # due 1.5 s earlier: worth the swap there and back
    d = s.schedule()
    assert set(d.jobs) == {b, c} and d.queue == (GENERATE, (64, 64, "B"))
    assert s.schedule().queue == (GENERATE, (64, 64, "B"))  # B in place now: B keeps it


def test_no_starvation_under_a_stream_of_the_selection_in_place():
    """A new request of A arrives every step (A could go on forever); B, waiting, gets the UNet as
    soon as A's requests due before it (plus the hold) have finished."""
    s, clock = make(max_step_rows=4, max_active_rows=4, slowdown_target=0)
    s.observe_swap(0.2)
    s.submit(gen("A"))
    s.schedule()
    s.submit(b := gen("B"))
    taken: dict[int, int] = {}
    waited = 0
    while waited < 40:
        clock.t += 0.1
        s.submit(gen("A"))  # a stream: due later and later
        d = s.schedule()
        if b in d.jobs:
            break
        waited += 1
        for j in d.jobs:
            taken[j.id] = taken.get(j.id, 0) + 1
            if taken[j.id] == 3:
                s.finish(j, RequestStatus.SUCCEEDED)
    else:
        raise AssertionError("B starved")
    assert waited < 15, waited  # A's requests due within 0.4 s of B's deadline, 3 steps each


def test_priority_ages_into_a_switch():
    """A higher-priority selection goes first, but a waiting one's priority-adjusted deadline wins in time."""
    s, clock = make(max_step_rows=2, max_active_rows=2, slowdown_target=0, priority_aging_s=1.0)
    s.submit(low := gen("B", arrival=100.0))
    s.submit(high := Job(next(_ids), GENERATE, (64, 64, "A"), priority=3, rows=2, arrival=100.0))
    assert s.schedule().jobs == [high]
    s.finish(high, RequestStatus.SUCCEEDED)
    s.submit(Job(next(_ids), GENERATE, (64, 64, "A"), priority=3, rows=2, arrival=102.5))  # due 99.5
    assert s.schedule().jobs != [low]  # still more urgent than B's 100.0
    clock.t = 104.0
    s.submit(later := Job(next(_ids), GENERATE, (64, 64, "A"), priority=3, rows=2, arrival=104.0))  # due 101
    s.finish(s.active()[0], RequestStatus.SUCCEEDED)
    d = s.schedule()
    assert d.jobs == [low] and later.status is RequestStatus.QUEUED


def test_request_batching_finishes_the_batches_in_place_before_switching():
    s, clock = make(max_step_rows=4, generation_batching="request")
    a1, b1 = gen("A"), gen("B")
    s.submit(a1)
    s.submit(b1)
    assert s.schedule().jobs == [a1]
    for _ in range(3):  # round robin would alternate with B's batch: the A batch runs to its end
        assert s.schedule().jobs == [a1]
    s.submit(a2 := gen("A"))
    s.finish(a1, RequestStatus.SUCCEEDED)
    assert s.schedule().jobs == [b1]  # between batches, queues take turns: B's, not A's next one
    s.finish(b1, RequestStatus.SUCCEEDED)
    assert s.schedule().jobs == [a2]


def test_a_shapes_limits_hold_for_its_adapter_buckets():
    s, clock = make(max_step_rows=8)
    s.set_limits(GENERATE, (64, 64), max_batch=3)
    assert s.limits(GENERATE, (64, 64, "A")).max_batch == 3
    assert s.limits(GENERATE, (32, 32, "A")).max_batch == 8
    s.lower_max_batch(GENERATE, (64, 64, "A"), 2)  # out of memory in one adapter bucket: that one only
    assert s.limits(GENERATE, (64, 64, "A")).max_batch == 2 and s.limits(GENERATE, (64, 64)).max_batch == 3


def test_adapter_forms_and_bad_ones_are_one_line_errors():
    class Selection:
        names, weights = ("a", "b"), (0.5, -1.0)

    assert adapter_pairs(None) is None and adapter_pairs({}) == () and adapter_pairs([]) == ()
    assert adapter_pairs("a") == (("a", 1.0),)
    assert adapter_pairs({"a": 0.5, "b": 2}) == (("a", 0.5), ("b", 2.0))
    assert adapter_pairs(["a", ("b", -1)]) == (("a", 1.0), ("b", -1.0))
    assert adapter_pairs(Selection()) == (("a", 0.5), ("b", -1.0))
    for bad, match in [(5, "adapters.*AdapterSelection"), ({"a": float("nan")}, "adapters.*finite"),
                       ([("a", 1, 2)], "adapters"), (["a", "a"], "named twice"), ({"": 1.0}, "adapters"),
                       ({"a": True}, "finite numbers")]:
        with pytest.raises(InvalidArgumentError, match=match) as info:
            GenerateRequest("p", adapters=bad)
        assert "\n" not in str(info.value)


# --- end to end: tiny preset, torch and onnxruntime ----------------------------------------------------

PROMPTS = ["a red sports car", "a bowl of ramen", "an old lighthouse"]
STEPS = 3


@pytest.fixture(scope="module")
def lora_paths(tmp_path_factory):
    from lora_files import save_diffusers_lora

    from fastgen.models import load_component

    models = {name: load_component("tiny", name).model for name in ("unet", "text-encoder")}
    root = tmp_path_factory.mktemp("rt-loras")
    return {"both": save_diffusers_lora(root / "both", models, rank=4, alpha=8.0, seed=7),
            "unet": save_diffusers_lora(root / "unet", models, rank=2, alpha=2.0, seed=13, text=False)}


def _generator(backend: str):
    from fastgen.engines.config import BuildConfig
    from fastgen.export.config import ExportConfig
    from fastgen.pipelines.generator import Generator

    return Generator.from_pretrained("tiny", backend=backend, device="cpu",
                                     build_config=BuildConfig(export=ExportConfig(verify="opt")))


def _config(seed: int):
    from fastgen.pipelines.config import GenerateConfig

    return GenerateConfig(steps=STEPS, seed=seed, output_type="np")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_interleaved_selections_equal_set_adapters_alone(lora_paths, backend, monkeypatch, no_leaked_threads):
    from fastgen.lora import AdapterSelection
    from fastgen.pipelines import stepping
    from fastgen.runtime import Runtime

    g = _generator(backend)
    g.load_lora(lora_paths["both"], name="both", weight=0.9)
    g.load_lora(lora_paths["unet"], name="unet", weight=0.0)  # active: both=0.9 (unet at 0 adds nothing)
    manager = g.adapter_manager
    # (adapters of the request, the selection it must run with): two selections, none (the active
    # one at submission), the base weights, and one differing from another in the UNet only.
    cases = [({"both": -0.7}, (["both"], [-0.7])),
             ([("unet", 1.5)], (["unet"], [1.5])),
             (None, (["both", "unet"], [0.9, 0.0])),
             ({}, ([], [])),
             ({"both": -0.7, "unet": 1.5}, (["both", "unet"], [-0.7, 1.5]))]
    calls: list[tuple[set, object, int]] = []
    real_step = stepping.denoise_step

    def spy(generator, states, **kwargs):  # what each UNet call mixes, and what the UNet holds then
        calls.append(({manager.effective("unet", s.adapters) for s in states}, manager.current.get("unet"), len(states)))
        return real_step(generator, states, **kwargs)

    monkeypatch.setattr(stepping, "denoise_step", spy)
    rt = Runtime(g, max_step_rows=16, start=False)
    try:
        futures = []
        for i, prompt in enumerate(PROMPTS):  # interleaved: every selection for each prompt in turn
            for j, (adapters, _) in enumerate(cases):
                futures.append(rt.submit(GenerateRequest(prompt, _config(10 * i + j), adapters=adapters)))
        g.set_adapters(["unet"], [0.4])  # after submission: the None requests keep their snapshot
        futures.append(rt.submit(GenerateRequest(PROMPTS[0], _config(99))))  # ... this one gets unet=0.4
        rt.start()
        results = [f.result(TIMEOUT).images for f in futures]
        stats = rt.stats()
        text = rt.metrics_text()
    finally:
        rt.shutdown()
    monkeypatch.undo()

    # A UNet call never mixed selections, and ran on the weights of the one it had.
    assert calls and all(len(mixed) == 1 and next(iter(mixed)) == (held or AdapterSelection())
                         for mixed, held, _ in calls)
    assert max(n for _, _, n in calls) >= len(PROMPTS)  # requests of one selection did share calls
    # The runtime put the generator's own adapters back when it stopped.
    assert g.active_adapters == {"unet": 0.4}
    assert all(manager.current.get(c, AdapterSelection()) == manager.effective(c, manager.selection)
               for c in ("unet", "text_encoder"))

    expected = {}
    for i, prompt in enumerate(PROMPTS):
        for j, (_, (names, weights)) in enumerate(cases):
            g.set_adapters(names, weights)
            expected[(i, j)] = g.generate(prompt, config=_config(10 * i + j), progress=False).images
    g.set_adapters(["unet"], [0.4])
    last = g.generate(PROMPTS[0], config=_config(99), progress=False).images
    k = 0
    for i in range(len(PROMPTS)):
        for j in range(len(cases)):
            np.testing.assert_allclose(results[k], expected[(i, j)], atol=1e-4, rtol=0, err_msg=str((i, j)))
            k += 1
    np.testing.assert_allclose(results[k], last, atol=1e-4, rtol=0)
    # The selections really differ in their images (the check above is not vacuous).
    for j in range(1, len(cases)):
        assert np.abs(expected[(0, j)] - expected[(0, 0)]).max() > 1e-2, j
    # Swaps counted: the UNet swapped; the text encoder only between selections that change it.
    swaps = stats["adapter_swaps"]
    print(f"[{backend}] {len(calls)} UNet calls; swaps: " + ", ".join(
        f"{c} {v['count']} x {v['mean']:.1f} ms" for c, v in swaps.items()))
    assert swaps["unet"]["count"] >= 4 and swaps["unet"]["total_ms"] > 0
    assert 'fastgen_adapter_swap_seconds_count{component="unet"}' in text
    g.unload_lora()
    g.close()


def test_a_unet_only_lora_never_swaps_the_text_encoder(lora_paths):
    from fastgen.lora import AdapterSelection

    g = _generator("torch")
    try:
        g.load_lora(lora_paths["unet"], name="unet", weight=0.5)
        g.load_lora(lora_paths["both"], name="both", weight=0.0)
        manager = g.adapter_manager
        u1, u2 = AdapterSelection(("unet",), (1.0,)), AdapterSelection(("unet", "both"), (2.0, 0.0))
        assert manager.activate("text_encoder", u1) is None  # adapts the UNet only: nothing to do
        assert manager.activate("unet", u1) is not None and manager.activate("unet", u1) is None
        assert manager.effective("unet", u2) == AdapterSelection(("unet",), (2.0,))  # scale 0: left out
        assert manager.activate("unet", u2) is not None and manager.activate("text_encoder", u2) is None
        assert manager.activate("text_encoder", AdapterSelection(("both",), (1.0,))) is not None
        assert g.active_adapters == {"unet": 0.5, "both": 0.0}  # the default selection is untouched
        with pytest.raises(InvalidArgumentError, match="adapters.*'nope'.*both.*unet"):
            manager.activate("unet", AdapterSelection(("nope",), (1.0,)))
        manager.restore()  # back to the default on every component
        assert manager.current["unet"] == AdapterSelection(("unet",), (0.5,))
        assert manager.current["text_encoder"] == AdapterSelection()
    finally:
        g.unload_lora()
        g.close()


def test_bad_adapters_are_refused_at_submission(lora_paths, no_leaked_threads):
    from fastgen.runtime import Runtime

    g = _generator("torch")
    try:
        with Runtime(g) as rt:
            with pytest.raises(InvalidArgumentError, match="adapters.*none loaded") as info:
                rt.submit(GenerateRequest("p", _config(1), adapters={"both": 1.0}))
            assert "\n" not in str(info.value)
            rt.submit(GenerateRequest("p", _config(1), adapters={})).result(TIMEOUT)  # the base: fine
            g.load_lora(lora_paths["both"], name="both")
            with pytest.raises(InvalidArgumentError, match=r"adapters 'styl' \(allowed: both\)") as info:
                rt.submit(GenerateRequest("p", _config(1), adapters={"styl": 1.0}))
            assert "\n" not in str(info.value)
            assert rt.stats()["kinds"]["generate"]["requests"] == {"succeeded": 1}  # never queued
        # An adapter unloaded while its request waits: that request fails, naming it; the others run.
        with Runtime(g, start=False) as rt:
            doomed = rt.submit(GenerateRequest("p", _config(2), adapters={"both": 0.5}))
            fine = rt.submit(GenerateRequest("p", _config(3), adapters=[]))
            g.unload_lora("both")
            rt.start()
            with pytest.raises(InvalidArgumentError, match="adapters.*'both'"):
                doomed.result(TIMEOUT)
            assert fine.result(TIMEOUT).images.shape == (1, 64, 64, 3)
    finally:
        g.unload_lora()
        g.close()
