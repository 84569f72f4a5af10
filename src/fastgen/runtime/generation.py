"""Step-level continuous batching of generation requests over a Generator's engines.

One :meth:`GenerationExecutor.run` is one denoising step of one shape bucket (image size):

1. the requests that join at this step get their prompts encoded in ONE text-encoder call and
   their initial noise from their own generators;
2. ONE UNet call over every row of the bucket's active set, each request at its own timestep and
   guidance weight (:func:`fastgen.pipelines.stepping.denoise_step`), then each request's own
   scheduler steps on its slice;
3. the requests whose last step this was are decoded in ONE VAE-decoder call and leave.

Image-to-image requests (``GenerateRequest.image``) share the buckets of text-to-image ones of
their size: the input images of the requests joining at a step are VAE-encoded in ONE call (in 1.),
and they step from their schedule's tail (fewer steps). The futures that asked for progress
(:meth:`~fastgen.runtime.requests.RequestFuture.add_progress_callback`) are told of each step their
request took, right after its UNet call; the others cost nothing. Inpainting requests
(``GenerateRequest.mask_image``) join the same buckets: with a regular UNet they share its calls
with text-to-image and image-to-image requests; an inpainting UNet takes only inpainting requests. ControlNet requests
(``GenerateRequest.control_image``) share the same calls too: before each UNet call each net runs
once over the rows of the requests using it (:func:`fastgen.pipelines.controlnet.residuals`).

LoRA adapters (``GenerateRequest.adapters``): the bucket is ``(height, width, adapters)`` when a
request's adapters change the UNet's weights, so one UNet call runs one selection; right before it,
this thread (the generation lane, which runs the text encoder, the UNet and the VAE) fuses that
selection into the UNet, and before each text-encoder call (one per text-encoder selection of the
joining requests) into the text encoders, through :meth:`fastgen.lora.AdapterManager.use`, whose
lock is held across the call. The swaps go back to the worker (:meth:`GenerationExecutor.take_swaps`).

Failures stay with their request: a call that raises is retried in halves down to the request
that causes it (:func:`fastgen.runtime.execution.isolate`); the UNet row counts that fit in device
memory and those that did not go back to the worker, which lowers the bucket's row limit after an
out-of-memory error and raises it again once steps fit (:mod:`fastgen.runtime.backoff`); an active set
formed under a higher limit runs in chunks under the current one. What a step measured (its time,
the row counts) goes back to the worker in the step's :class:`~fastgen.runtime.execution.Outcomes`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fastgen.errors import InvalidArgumentError
from fastgen.lora.config import AdapterSelection
from fastgen.pipelines import controlnet, inpaint, stepping
from fastgen.pipelines import vae_images as imaging
from fastgen.pipelines.config import GenerateConfig, GenerationResult, Latencies
from fastgen.runtime.execution import Outcome, Outcomes, isolate
from fastgen.runtime.request_scheduler import Decision, Job
from fastgen.runtime.requests import GenerateRequest, RequestStatus, adapter_pairs

#: The components a prompt's encoding runs (their adapters are swapped right before it).
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def _read(argument: str, noun: str, load: Callable[[Any], Any], item: Any) -> Any:
    """``load(item)``, read at submission: a PIL image whose lazy decode fails is a one-line error
    naming ``argument`` too."""
    try:
        return load(item)
    except InvalidArgumentError:
        raise
    except (OSError, ValueError, TypeError, SyntaxError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidArgumentError(argument, type(item).__name__, reason=f"cannot read {noun}: {detail}") from None


def _text_key(generator: Any, state: stepping.SampleState) -> tuple:
    """What else a request's bucket needs beside its image size: a DiT request's T5 length when it is
    not the family's default (rows of different text lengths cannot share a transformer call)."""
    requested = state.config.max_sequence_length
    encoder = getattr(generator, "prompt_encoder", None)
    if requested is None or not hasattr(encoder, "sequence_length"):
        return ()
    length = encoder.sequence_length(requested)
    return () if length == encoder.sequence_length(None) else (("text_tokens", length),)


class GenerationExecutor:
    """Runs generation steps for a :class:`~fastgen.Generator`; ``clock`` is the scheduler's."""

    def __init__(self, generator: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.generator = generator
        self.clock = clock
        self._feeds_cache: dict = {}
        self._encoder_lock = threading.Lock()  # a lazily given VAE encoder is built once, by one client
        self.swaps: list[tuple[str, float]] = []
        """LoRA swaps made by the runs since :meth:`take_swaps` (component, seconds); the lane's thread only."""

    def prepare(self, request: GenerateRequest) -> tuple[Any, int, float, stepping.SampleState]:
        """(bucket, rows, cost, state) of one request, in the caller's thread; bad input raises here
        (an image-to-image request's image is read here too)."""
        cfg = request.config if request.config is not None else GenerateConfig()
        if not isinstance(cfg, GenerateConfig):
            raise InvalidArgumentError("config", type(cfg).__name__, "a fastgen.GenerateConfig")
        image = self._image(request.image) if request.image is not None else None
        mask = self._mask(request.mask_image) if request.mask_image is not None else None
        control = self._control(request.control_image) if request.control_image is not None else None
        state = stepping.prepare(self.generator, request.prompt, cfg, image=image, mask=mask, control=control)
        return self._bucket(state, request.adapters), state.rows, float(state.rows * state.height * state.width), state

    def _bucket(self, state: stepping.SampleState, adapters: Any) -> tuple:
        """The request's bucket: ``(height, width)``, and third the adapters that change the UNet's
        weights (:meth:`AdapterManager.effective`) when there are any, so requests whose UNet weights
        differ never share a step; ``state.adapters`` gets the whole selection (a snapshot of the
        generator's active one for None). Unknown adapter names raise here, at submission."""
        pairs = adapter_pairs(adapters)
        manager = getattr(self.generator, "adapter_manager", None)
        size, text = (state.height, state.width), _text_key(self.generator, state)
        if manager is None:
            if pairs:
                raise InvalidArgumentError("adapters", pairs[0][0], "none loaded (Generator.load_lora first)")
            state.adapters = AdapterSelection()  # base weights, also if adapters are loaded before it runs
            return size + text
        selection = manager.selection if pairs is None else AdapterSelection(
            tuple(n for n, _ in pairs), tuple(w for _, w in pairs))
        manager.check(selection, "adapters")
        state.adapters = selection
        unet = manager.effective("unet", selection)
        # The adapters third (step_policy.weights_of reads them there), a DiT text length last.
        return (*size, unet, *text) if unet.names else size + text

    def _image(self, item: Any) -> Any:
        """An image-to-image request's input as an RGB PIL image; a one-line error naming ``image``."""
        with self._encoder_lock:
            if self.generator.vae_encoder is None:
                raise InvalidArgumentError("image", type(item).__name__,
                                           reason="this generator has no vae-encoder engine (image-to-image needs one)")
        return _read("image", "image", imaging.load_image, item)

    def _control(self, item: Any) -> list[Any]:
        """A ControlNet request's condition images, one per net; a one-line error naming ``control_image``."""
        return _read("control_image", "image", lambda i: controlnet.request_images(self.generator, i), item)

    @staticmethod
    def _mask(item: Any) -> Any:
        """An inpainting request's mask as a grayscale PIL image; a one-line error naming ``mask_image``."""
        return _read("mask_image", "mask", inpaint.load_mask, item)

    @staticmethod
    def work(state: stepping.SampleState) -> float:
        """Denoising steps of a prepared request (what the scheduler's urgency scales with)."""
        return float(len(state.timesteps))

    # --- one step --------------------------------------------------------------------------------

    def run(self, decision: Decision) -> Outcomes:
        """One step of ``decision.queue``'s active set: the requests that ended at it, the step's time
        (when it ran whole) and the UNet row counts that fit in device memory or did not."""
        ended: list[Outcome] = []
        failed: set[int] = set()
        memory: list[tuple[int, bool]] = []
        step: tuple[int, int, float] | None = None

        def fail(job: Job, error: BaseException) -> None:
            failed.add(job.id)
            ended.append(Outcome(job, RequestStatus.FAILED, error))

        with torch.inference_mode():
            if decision.joined:
                for job, ok, value in self._encode_joined(decision.joined):
                    if not ok:
                        fail(job, value)
            active = [j for j in decision.jobs if j.id not in failed]
            # Image-to-image at a low strength may have no step to run: it is only encoded and decoded.
            stepping_jobs = [j for j in active if not j.payload.data.done]
            start, swaps_before = time.perf_counter(), len(self.swaps)
            for chunk in self._chunks(stepping_jobs, decision.max_rows):
                results = isolate(lambda jobs: self._step(jobs, memory), chunk, what="UNet step",
                                  on_oom=lambda group: memory.append((sum(j.rows for j in group), False)))
                for job, ok, value in results:
                    if not ok or value is not None:  # the call failed, or this request's scheduler step did
                        fail(job, value)
            if stepping_jobs and not failed:  # retried halves would skew the fit
                swapped = sum(t for _, t in self.swaps[swaps_before:])  # an adapter swap is not the step's cost
                step = (sum(j.rows for j in stepping_jobs), len(stepping_jobs), time.perf_counter() - start - swapped)
            self._report_progress([j for j in stepping_jobs if j.id not in failed])
            finished = [j for j in active if j.id not in failed and j.payload.data.done]
            to_decode = [j for j in finished if j.payload.data.config.output_type != "latent"]
            decoded: dict[int, torch.Tensor] = {}
            for job, ok, value in isolate(self._decode, to_decode, what="VAE-decoder batch"):
                if ok:
                    decoded[job.id] = value
                else:
                    fail(job, value)
            for job in finished:
                if job.id in failed:
                    continue
                try:
                    ended.append(Outcome(job, RequestStatus.SUCCEEDED, self._result(job, decoded.get(job.id))))
                except Exception as exc:  # output conversion of this request alone
                    fail(job, exc)
        return Outcomes(ended, memory=memory, step=step)

    @staticmethod
    def _report_progress(jobs: list[Job]) -> None:
        for job in jobs:
            future = job.payload.future
            if future.wants_progress:
                state: stepping.SampleState = job.payload.data
                future.progress(state.index, state.total_steps)

    def _encode(self, jobs: list[Job]) -> list[None]:
        states = [j.payload.data for j in jobs]
        # A failed call is retried in halves (isolate): noise drawn before it failed (a request's
        # initial noise, drawn before the VAE encoder ran for another's image) must be drawn again
        # from the same generator states, or the retried requests would differ from a solo run.
        saved = [[g.get_state() for g in s.generators] for s in states]
        try:
            stepping.encode_prompts(self.generator, states)
            stepping.init_latents(self.generator, states)
        except BaseException:
            for s, gens in zip(states, saved):
                for g, state in zip(s.generators, gens):
                    g.set_state(state)
            raise
        return [None] * len(jobs)

    def _step(self, jobs: list[Job], memory: list[tuple[int, bool]]) -> list[BaseException | None]:
        # The UNet's adapters are the bucket's (one selection per bucket: a call never mixes two).
        unet = next((b for b in jobs[0].bucket if isinstance(b, AdapterSelection)), AdapterSelection())
        with self._adapters(("unet",), unet):
            out = stepping.denoise_step(self.generator, [j.payload.data for j in jobs], feeds_cache=self._feeds_cache)
        memory.append((sum(j.rows for j in jobs), True))
        return out

    def _encode_joined(self, jobs: list[Job]) -> list[tuple[Job, bool, Any]]:
        """:meth:`_encode` of the joining requests, one text-encoder call per group of requests whose
        adapters give the text encoders the same weights, each right after its swap (if any)."""
        manager = getattr(self.generator, "adapter_manager", None)
        if manager is None:
            return isolate(self._encode, jobs, what="text-encoder batch")
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            selection = job.payload.data.adapters or AdapterSelection()
            groups.setdefault(tuple(manager.effective(c, selection) for c in TEXT_COMPONENTS), []).append(job)
        out: list[tuple[Job, bool, Any]] = []
        for group in groups.values():
            try:
                with self._adapters(TEXT_COMPONENTS, group[0].payload.data.adapters or AdapterSelection()):
                    out += isolate(self._encode, group, what="text-encoder batch")
            except InvalidArgumentError as exc:  # the swap: an adapter unloaded since the submission
                out += [(job, False, exc) for job in group]
        return out

    @contextlib.contextmanager
    def _adapters(self, components: Sequence[str], selection: AdapterSelection) -> Iterator[None]:
        """Run the block with ``selection`` fused into ``components`` (on this, the lane's thread), holding
        the adapter manager's lock so no swap from another thread lands mid-call; no adapters: nothing."""
        manager = getattr(self.generator, "adapter_manager", None)
        if manager is None:
            yield
            return
        with manager.use(components, selection) as swaps:
            self.swaps.extend(swaps.items())
            yield

    def stopped(self) -> None:
        """The runtime's lane ended (its thread): the engines back to the generator's own adapters
        (``Generator.active_adapters``), which its own ``generate`` calls run with again."""
        manager = getattr(self.generator, "adapter_manager", None)
        if manager is not None:
            manager.restore()

    def take_swaps(self) -> list[tuple[str, float]]:
        """The adapter swaps (component, seconds) since the last call (the worker records them)."""
        swaps, self.swaps = self.swaps, []
        return swaps

    def _decode(self, jobs: list[Job]) -> list[torch.Tensor]:
        return stepping.decode(self.generator, [j.payload.data for j in jobs])

    @staticmethod
    def _chunks(jobs: list[Job], cap: int | None) -> list[list[Job]]:
        """The active set in groups of at most ``cap`` rows (the bucket's current step limit)."""
        if cap is None or sum(j.rows for j in jobs) <= cap:
            return [jobs] if jobs else []
        chunks: list[list[Job]] = [[]]
        rows = 0
        for job in jobs:
            if chunks[-1] and rows + job.rows > cap:
                chunks.append([])
                rows = 0
            chunks[-1].append(job)
            rows += job.rows
        return chunks

    def drop(self, jobs: list[Job]) -> None:
        """Requests that left without finishing (cancelled, expired): release their batch's cached inputs."""
        self._feeds_cache.clear()

    # --- results -----------------------------------------------------------------------------

    def _result(self, job: Job, decoded: torch.Tensor | None) -> GenerationResult:
        s: stepping.SampleState = job.payload.data
        cfg = s.config
        images = (s.latents if cfg.output_type == "latent"
                  else inpaint.to_output(decoded, inpaint.row_sources([s]), cfg.output_type))
        now = self.clock()
        latencies = Latencies(text_encoding_ms=s.text_encoding_ms, vae_encode_ms=s.vae_encode_ms,
                              denoising_ms=float(sum(s.step_ms)),
                              denoising_step_ms=tuple(s.step_ms), vae_decode_ms=s.vae_decode_ms,
                              total_ms=(now - job.arrival) * 1e3)  # type: ignore[operator]
        n = s.images
        return GenerationResult(
            images=images, prompts=[s.prompt] * n, seeds=list(s.seeds), prompt_indices=[0] * n, latencies=latencies,
            config=cfg, extras={"height": s.height, "width": s.width, "pipeline": self.generator.pipeline,
                                "guidance_scale": cfg.resolved(self.generator.pipeline).guidance_scale,
                                "scheduler": cfg.scheduler or self.generator.scheduler_config.get("_class_name"),
                                "mode": ("inpaint" if s.inpaint is not None else
                                         "txt2img" if s.image is None else "img2img"), "request_id": job.id,
                                "queue_ms": ((job.started or now) - job.arrival) * 1e3})  # type: ignore[operator]

    # --- auto-tuning ---------------------------------------------------------------------------

    def synthetic_step(self, bucket: tuple[int, int], rows: int) -> None:
        """One UNet call of ``rows`` random rows at ``bucket`` (height, width): what a step costs."""
        unet = self.generator.unet
        dims = {**unet.spec.profile.shape("opt"), "batch": rows, "height": bucket[0], "width": bucket[1]}
        with torch.inference_mode():
            unet(unet.spec.sample_inputs(dims, device=getattr(unet, "device", "cpu")))

    @property
    def default_bucket(self) -> tuple[int, int]:
        return tuple(self.generator.default_size)  # type: ignore[return-value]


__all__ = ["GenerationExecutor"]
