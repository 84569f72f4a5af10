"""One generation request of the HTTP API, from its parsed fields to its response body.

:class:`GenerationParams` is what the app parsed; :meth:`fastgen.serve.service.Service.submit_generation`
checks it and submits one runtime request per image; :class:`GenerationJob` awaits them (without
blocking the event loop), streams ``progress`` and ``image`` events if asked, scores best-of-N
candidates as they finish, ranks them, and builds the response.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig
from fastgen.runtime.requests import RequestFuture

#: Names of the generation settings a request may set (GenerateConfig fields).
CONFIG_FIELDS = ("steps", "guidance_scale", "scheduler", "strength", "negative_prompt", "eta", "mask_blur",
                 "padding_mask_crop", "true_cfg_scale", "max_sequence_length")
#: A callback for streamed events: (event name, JSON-able body), called on the event loop.
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class GenerationParams:
    """One generation request as the HTTP layer parsed it (None: the server's default)."""

    prompt: str
    n: int = 1
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    candidates: int | None = None
    keep: int | None = None
    rank_by: str | None = None
    scorer: str | None = None
    """Best-of-N: the image classifier that ranks the candidates (a ``/v1/models`` id or a scorer
    name); None: the only one."""
    model: str | None = None
    deadline_s: float | None = None
    image: Any = None
    """Image-to-image: the decoded RGB PIL input image."""
    mask: Any = None
    """Inpainting of ``image``: the mask, an ``L`` PIL image of its size (white: regenerate)."""
    adapters: dict[str, float] | None = None
    """LoRA adapters of the server's to run with (name -> scale); None: the server's active ones."""
    settings: dict[str, Any] = field(default_factory=dict)
    """GenerateConfig fields given (``CONFIG_FIELDS``)."""

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"


def score_body(score: Any) -> dict[str, Any]:
    """A ``Score`` as JSON: every label's probability, and the top labels."""
    return {"scores": {k: float(v) for k, v in score.probs.items()},
            "top": [{"label": k, "prob": float(p)} for k, p in score.top]}


class ProgressRelay:
    """Step progress of a job's runtime requests, from the runtime's callback threads to an event sink.

    Made before the requests are submitted and passed as ``Runtime.submit(..., progress=relay.for_image(i))``
    so no step is missed; the sink (a stream) is attached later, on the event loop: the steps seen before
    that are replayed to it in order (at most steps x images of them), later ones forwarded as they come."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EventSink | None = None
        self._early: list[dict[str, int]] = []

    def for_image(self, index: int) -> Callable[[Any, int, int], None]:
        def progress(_future: Any, step: int, steps: int) -> None:
            body = {"step": int(step), "steps": int(steps), "candidate": index}
            with self._lock:
                loop, sink = self._loop, self._sink
                if sink is None:
                    self._early.append(body)
                    return
            try:
                loop.call_soon_threadsafe(sink, "progress", body)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        return progress

    def attach(self, loop: asyncio.AbstractEventLoop, sink: EventSink) -> None:
        """Forward from now on (called on ``loop``), after replaying what came before."""
        with self._lock:
            self._loop, self._sink = loop, sink
            earlier, self._early = self._early, []
        for body in earlier:
            sink("progress", body)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1e3, 3)


class GenerationJob:
    """The runtime requests of one generation request (one per image), from submission to response."""

    def __init__(self, service: Any, futures: list[RequestFuture], *, seeds: list[int], keep: int | None,
                 rank_by: str | None, config: GenerateConfig, started: float | None = None,
                 relay: ProgressRelay | None = None, scorer: str | None = None, prompt: str = "") -> None:
        self.service = service
        self.relay = relay
        self.futures = futures
        self.seeds = seeds
        self.keep = keep
        self.rank_by = rank_by
        self.scorer = scorer
        self.prompt = prompt
        self.config = config
        self.started = time.perf_counter() if started is None else started  # perf_counter at submission
        self.request_id = f"gen-{secrets.token_hex(8)}"

    @property
    def best_of(self) -> bool:
        return self.keep is not None

    def cancel(self) -> None:
        """Cancel every image's request (queued: removed; running: freed at its next step)."""
        for future in self.futures:
            future.cancel()

    async def run(self, sink: EventSink | None = None) -> dict[str, Any]:
        """Await every image; with ``sink``, stream ``progress`` and ``image`` events as they come.
        Returns the response body; cancelling the awaiting task cancels the requests."""
        import anyio

        from fastgen.serve.images import png_base64

        if sink is not None and self.relay is not None:
            self.relay.attach(asyncio.get_running_loop(), sink)
        service = self.service
        timings = {"generation": 0.0, "queue": 0.0, "scoring": 0.0, "encode": 0.0}
        size: list[str] = []

        async def one(i: int) -> dict[str, Any]:
            result = await asyncio.wrap_future(self.futures[i])
            timings["generation"] = max(timings["generation"], float(result.latencies.total_ms))
            timings["queue"] = max(timings["queue"], float(result.extras.get("queue_ms", 0.0)))
            step_ms = result.latencies.denoising_step_ms
            if step_ms:  # the mean batched UNet step this image took part in (the slowest image's)
                timings["step"] = max(timings.get("step", 0.0), float(sum(step_ms)) / len(step_ms))
            image = result.images[0]
            size[:] = [f"{image.width}x{image.height}"]
            t0 = time.perf_counter()
            b64 = await anyio.to_thread.run_sync(png_base64, image)
            timings["encode"] += _ms(t0)
            score = value = None
            if self.best_of:
                t0 = time.perf_counter()
                score = (await service.rank_images([image], [self.prompt], scorer=self.scorer))[0]
                timings["scoring"] = max(timings["scoring"], _ms(t0))
                label = self.rank_by or next(iter(score.probs))
                if label not in score.probs:
                    raise InvalidArgumentError("rank_by", label, list(score.probs))
                value = float(score.probs[label])
            item = {"index": i, "b64_json": b64, "seed": int(result.seeds[0]),
                    "score": None if score is None else {**score_body(score), "rank_by": label, "value": value}}
            if sink is not None:
                sink("image", dict(item))
            return item

        try:
            items = list(await asyncio.gather(*(one(i) for i in range(len(self.futures)))))
        finally:
            self.cancel()  # a failed or cancelled image ends its siblings too (no-op for finished ones)
        if self.best_of:
            ranked = sorted(items, key=lambda it: -it["score"]["value"])[: self.keep]  # stable: ties keep seed order
            data = [self._datum(it, rank) for rank, it in enumerate(ranked)]
        else:
            data = [self._datum(it, None) for it in items]
        cfg = self.config
        return {
            "created": int(time.time()),
            "data": data,
            "fastgen": {
                "request_id": self.request_id,
                "model": service.model_name,
                "seeds": list(self.seeds),
                "size": size[0] if size else None,
                "steps": cfg.steps,
                "candidates": len(self.seeds) if self.best_of else None,
                "rank_by": self.rank_by if self.best_of else None,
                "scorer": self.scorer if self.best_of else None,
                "runtime_request_ids": [f.request_id for f in self.futures],
                "latency_ms": {"total": _ms(self.started), **{k: round(v, 3) for k, v in timings.items()}},
            },
        }

    @staticmethod
    def _datum(item: dict[str, Any], rank: int | None) -> dict[str, Any]:
        return {"b64_json": item["b64_json"], "seed": item["seed"], "revised_prompt": None, "score": item["score"],
                "rank": rank, "index": item["index"]}


__all__ = ["CONFIG_FIELDS", "EventSink", "GenerationJob", "GenerationParams", "score_body"]
