"""fastgen.Runtime: image-to-image requests (equal to Generator.generate alone, batched with text-to-image
ones), and progress callbacks (in order, on the callback threads, before the done-callbacks, cancellable)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading

import numpy as np
import pytest
from PIL import Image

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig
from fastgen.pipelines.generator import Generator
from fastgen.runtime import GenerateRequest, RequestStatus, Runtime
from fastgen.runtime.callbacks import CallbackPool
from fastgen.runtime.progress import SerialDispatch

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
TIMEOUT = 120


def picture(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def solo(gen: Generator, prompt: str, image=None, **cfg) -> np.ndarray:
    return gen.generate(prompt, image=image, output_type="np", progress=False, **cfg).images


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


# --- image-to-image ---------------------------------------------------------------------------------------

def test_img2img_equals_generate_alone_also_batched_with_txt2img(tiny_generator, tmp_path):
    gen = tiny_generator()
    Image.fromarray(picture(3, 40, 56)).save(path := tmp_path / "in.png")
    pil, array = Image.fromarray(picture(1)), picture(2)
    # (prompt, image, config): all of the 64x64 bucket join the first step together; the file's image
    # has its own size (40x56 rounded down to what the models take), so its own bucket.
    cases = [
        ("a cat", pil, dict(steps=5, seed=7, strength=0.6, scheduler="euler-ancestral")),
        ("a dog", None, dict(steps=4, seed=8)),
        ("", array, dict(steps=6, seed=9, strength=0.5, scheduler="ddim", num_images_per_prompt=2,
                         negative_prompt="blurry")),
        ("a bird", path, dict(steps=4, seed=10, strength=0.75, guidance_scale=1.0)),
        ("a car", array, dict(steps=2, seed=11, strength=0.3)),  # int(2 * 0.3) = 0 steps: encoded and decoded
    ]
    rt = Runtime(gen, start=False, max_step_rows=16)
    futures = [rt.submit(GenerateRequest(p, GenerateConfig(output_type="np", **cfg), image=image))
               for p, image, cfg in cases]
    rt.start()
    results = [f.result(TIMEOUT) for f in futures]
    stats = rt.stats()
    rt.shutdown()
    for (prompt, image, cfg), result in zip(cases, results):
        alone = gen.generate(prompt, image=image, output_type="np", progress=False, **cfg)
        np.testing.assert_allclose(result.images, alone.images, atol=1e-4, rtol=0)
        assert result.seeds == alone.seeds
        assert result.extras["mode"] == alone.extras["mode"] == ("txt2img" if image is None else "img2img")
        assert (result.extras["height"], result.extras["width"]) == (alone.extras["height"], alone.extras["width"])
        assert len(result.latencies.denoising_step_ms) == len(alone.latencies.denoising_step_ms)
        assert (result.latencies.vae_encode_ms > 0) == (image is not None)
    assert len(results[0].latencies.denoising_step_ms) < 5 and results[4].latencies.denoising_step_ms == ()
    # The 64x64 requests shared UNet calls (up to 2 + 2 + 4 rows), and the file ran at its own size.
    own = "{height}x{width}".format(**results[3].extras)
    assert stats["steps"]["64x64"]["rows"]["p99"] > 4 and own != "64x64" and own in stats["steps"]
    assert stats["kinds"]["generate"]["requests"] == {"succeeded": len(cases)}


def test_a_failing_vae_encode_fails_only_its_request(tiny_generator):
    gen = tiny_generator()
    black = np.zeros((64, 64, 3), np.uint8)

    def check(inputs):
        if (inputs["image"] == -1).flatten(1).all(dim=1).any():  # an all-black input: the encoder "fails"
            raise RuntimeError("encoder kernel failure")

    broken = Generator(unet=gen.unet, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder,
                       vae_encoder=Wrapped(gen.vae_encoder, check))
    rt = Runtime(broken, start=False)
    cfg = GenerateConfig(steps=3, seed=5, output_type="np", strength=0.7)
    text = rt.submit(GenerateRequest("a dog", cfg))  # its noise is drawn before the failing call: drawn again
    bad = rt.submit(GenerateRequest("a cat", cfg, image=black))
    good = rt.submit(GenerateRequest("a cat", cfg, image=picture(4)))
    rt.start()  # all three join one step: one encoder batch that fails, then halves
    rt.shutdown()
    assert isinstance(bad.exception(), RuntimeError) and bad.status is RequestStatus.FAILED
    np.testing.assert_allclose(text.result().images, solo(gen, "a dog", steps=3, seed=5), atol=1e-4, rtol=0)
    np.testing.assert_allclose(good.result().images, solo(gen, "a cat", picture(4), steps=3, seed=5, strength=0.7),
                               atol=1e-4, rtol=0)


def test_bad_images_and_a_generator_without_encoder_fail_at_submission(tiny_generator, tmp_path):
    gen = tiny_generator()
    png = tmp_path / "cut.png"
    Image.fromarray(picture(5)).save(png)
    png.write_bytes(png.read_bytes()[:200])  # a truncated file: PIL opens it lazily, decoding fails
    with Runtime(gen) as rt:
        for image in (np.zeros((8, 8), np.float32), tmp_path / "missing.png", png, Image.open(png), b"bytes",
                      picture(6, 4, 4)):  # the last: smaller than one latent pixel
            with pytest.raises(InvalidArgumentError) as err:
                rt.submit(GenerateRequest("x", GenerateConfig(steps=2), image=image))
            message = str(err.value)
            assert err.value.argument == "image" and "\n" not in message, message
        assert rt.stats()["inflight"] == 0
    plain = Generator(unet=gen.unet, vae_decoder=gen.vae_decoder, text_encoder=gen.text_encoder)
    with Runtime(plain) as rt:
        with pytest.raises(InvalidArgumentError, match="vae-encoder") as err:
            rt.submit(GenerateRequest("x", image=picture(7)))
        assert err.value.argument == "image" and "\n" not in str(err.value)
        assert rt.stats()["inflight"] == 0


# --- progress callbacks ----------------------------------------------------------------------------------

def test_progress_reports_every_step_in_order_before_the_done_callbacks(tiny_generator):
    gen = tiny_generator()
    events: dict[int, list] = {0: [], 1: []}
    threads: set[str] = set()

    def record(i):
        def on_progress(future, step, steps):
            threads.add(threading.current_thread().name)
            if step == 1:  # a slow first callback: later steps queue up behind it, on a pool of 2 threads
                threading.Event().wait(0.05)
            events[i].append((step, steps))
        return on_progress

    rt = Runtime(gen, start=False)
    txt = rt.submit(GenerateRequest("a dog", GenerateConfig(steps=4, seed=1, scheduler="ddim")))
    img = rt.submit(GenerateRequest("a cat", GenerateConfig(steps=6, seed=2, strength=0.5, scheduler="euler"),
                                    image=picture(8)))
    for i, f in enumerate((txt, img)):
        f.add_progress_callback(record(i))
        f.add_progress_callback(lambda future, step, steps, i=i: events[i].append(("second", step)))
        f.add_done_callback(lambda future, i=i: events[i].append("done"))
    rt.start()
    txt.result(TIMEOUT), img.result(TIMEOUT)
    rt.shutdown()  # joins the callback threads: every callback has run
    for i, steps in ((0, 4), (1, 3)):  # image-to-image at strength 0.5: 3 of its 6 steps
        expected = [e for k in range(1, steps + 1) for e in ((k, steps), ("second", k))] + ["done"]
        assert events[i] == expected
    assert threads and all(name.startswith("fastgen-callbacks") for name in threads)


def test_a_request_without_progress_callbacks_dispatches_nothing_per_step(tiny_generator):
    rt = Runtime(tiny_generator())
    calls = []
    submit = rt._callbacks.submit
    rt._callbacks.submit = lambda fn: calls.append(fn) or submit(fn)  # what each future dispatches
    plain = rt.submit(GenerateRequest("a", GenerateConfig(steps=5, seed=1)))
    plain.result(TIMEOUT)
    assert calls == [] and not plain.wants_progress
    done = rt.submit(GenerateRequest("b", GenerateConfig(steps=5, seed=1)))
    done.add_done_callback(lambda f: None)
    done.result(TIMEOUT)
    rt.shutdown()
    assert len(calls) == 1  # its done-callbacks only


def test_cancelling_from_a_progress_callback_stops_the_request(tiny_generator):
    gen = tiny_generator()
    seen: list = []
    other: list[concurrent.futures.Future] = []
    with Runtime(gen) as rt:
        def on_progress(future, step, steps):
            seen.append(step)
            if step == 2:
                # Wait for another request to run end to end: on the engine thread this would never return.
                other.append(rt.submit(GenerateRequest("quick", GenerateConfig(steps=2, seed=2))))
                other[0].result(TIMEOUT)
                future.cancel()

        long = rt.submit(GenerateRequest("slow", GenerateConfig(steps=400, seed=1, scheduler="ddim")),
                         progress=on_progress)  # added before it is queued: it sees step 1 on
        long.add_done_callback(lambda f: seen.append(f.status))
        with pytest.raises(concurrent.futures.CancelledError):
            long.result(TIMEOUT)
    stats = rt.stats()
    assert other[0].status is RequestStatus.SUCCEEDED and long.status is RequestStatus.CANCELLED
    assert seen == [1, 2, RequestStatus.CANCELLED]  # no step reported after the cancel; done-callbacks last
    assert stats["kinds"]["generate"]["requests"] == {"cancelled": 1, "succeeded": 1}
    assert stats["steps"]["64x64"]["latency_ms"]["count"] < 400  # it left long before its last step


def test_a_raising_progress_callback_is_logged_and_the_request_succeeds(tiny_generator, caplog):
    gen = tiny_generator()
    steps: list[int] = []

    def broken(future, step, total):
        raise RuntimeError(f"callback bug at step {step}")

    with caplog.at_level(logging.ERROR, logger="fastgen.runtime.requests"), Runtime(gen) as rt:
        f = rt.submit(GenerateRequest("a", GenerateConfig(steps=3, seed=3, scheduler="ddim", output_type="np")),
                      progress=broken)
        f.add_progress_callback(lambda future, step, total: steps.append(step))  # (the request may have started)
        result = f.result(TIMEOUT)
    np.testing.assert_allclose(result.images, solo(gen, "a", steps=3, seed=3, scheduler="ddim"), atol=1e-4, rtol=0)
    assert f.status is RequestStatus.SUCCEEDED and steps == list(range(4 - len(steps), 4))  # in order, to the last
    assert sum("progress callback" in r.getMessage() for r in caplog.records) == 3  # every step, none skipped
    with pytest.raises(InvalidArgumentError, match="fn"):
        f.add_progress_callback("not callable")  # type: ignore[arg-type]


def test_serial_dispatch_keeps_order_on_a_multi_thread_pool():
    pool = CallbackPool(max_threads=4)
    serial = SerialDispatch(pool.submit)
    got: list[int] = []
    for i in range(300):
        serial.post(lambda i=i: got.append(i), required=False)
    done = threading.Event()
    serial.post(done.set)
    assert done.wait(TIMEOUT)
    assert got == list(range(300))
    pool.close()
    # A closed pool: progress (not required) is dropped, never run on the posting thread; done-callbacks run there.
    ran: list[str] = []
    serial.post(lambda: ran.append("progress"), required=False)
    serial.post(lambda: ran.append(threading.current_thread().name))
    assert ran == [threading.current_thread().name]
