"""``Service``: the models of one server and the one :class:`fastgen.Runtime` that batches them.

The HTTP routes (:mod:`fastgen.serve.app`) call it; it knows nothing of HTTP. Loading (building or
fetching the engines, starting the runtime, warming it up) is :meth:`Service.load`, which the app
runs on a thread after startup, so the server answers ``/healthz`` at once and ``/readyz`` once the
engines are warm. Generation is :meth:`Service.submit_generation` (checks and submits, raising at
once for bad input or a full queue) then :meth:`fastgen.serve.generation.GenerationJob.run` (awaits the images without
blocking the event loop). An image of a request is one runtime request, so every image streams as
soon as it is done and a disconnecting client's images are all cancelled at the next step. Image
``i`` of a request with seed ``s`` uses seed ``s + i``, as :meth:`fastgen.Generator.generate` does:
asking for that seed alone, with the same settings, gives the same image.

Best-of-N (``candidates``): that many images are generated, each scored by an image classifier
(the one the request names in ``scorer``, else the only one: the runtime's, through scoring
requests, or the ``image_scorer`` client given, e.g. a Ray deployment), ranked by one label's
probability (highest first; ties keep seed order), and the ``keep`` best are returned with their
seeds and scores. Scorers have names (:mod:`fastgen.serve.scorers`): any number of them, each its
own runtime executor.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from fastgen.errors import InvalidArgumentError
from fastgen.lora.config import parse_lora_arg
from fastgen.pipelines.config import GenerateConfig, check_seed
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.requests import DetectRequest, EmbedRequest, GenerateRequest, RequestFuture, ScoreRequest
from fastgen.runtime.scorer_names import takes
from fastgen.serve.awaiting import gather, submit_all
from fastgen.serve.config import ServeConfig, lora_name, model_label
from fastgen.serve.content import detections_body, pair_scores
from fastgen.serve.generation import CONFIG_FIELDS, GenerationJob, GenerationParams, ProgressRelay, score_body
from fastgen.serve.scorers import ServedScorer, directory, pick, takes_in

logger = logging.getLogger(__name__)


class ImageScorerClient(Protocol):
    """Scores images somewhere else (a Ray deployment, say) for best-of-N and ``/v1/score``.
    ``labels`` (optional attribute): the label names, checked against ``rank_by`` before any work;
    ``name`` (optional attribute): the scorer name requests may give for it (default ``image``)."""

    async def score_images(self, images: list[Any]) -> list[Any]: ...


class Service:
    """The generator, the classifiers and the runtime behind one server.

    ``generator`` / ``scorers``: already built models to serve (tests, embedding); else :meth:`load`
    builds them from ``config``. ``scorers``: a list (each named by its kind, or by the name of its
    ``config.scorers`` entry, in order) or a dict name -> Scorer. ``image_scorer``: an
    :class:`ImageScorerClient` used to rank best-of-N candidates (and score images) when there is
    no local image classifier, or when a request names it.
    """

    def __init__(self, config: ServeConfig, *, generator: Any = None, scorers: Sequence[Any] | Mapping[str, Any] = (),
                 image_scorer: ImageScorerClient | None = None) -> None:
        self.config = config
        self.generator = generator
        if isinstance(scorers, Mapping):
            self.scorer_names: list[str | None] = list(scorers)
            self.scorers = list(scorers.values())
        else:
            self.scorers = list(scorers)
            names = [name for name, _, _ in config.named_scorer_specs()]
            self.scorer_names = names if len(names) == len(self.scorers) else [None] * len(self.scorers)
        self.served: list[ServedScorer] = []
        """The scorers as served (names, ids), once the runtime exists."""
        self.image_scorer = image_scorer
        self.runtime: Any = None
        self.state = "loading"
        self.error: BaseException | None = None
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None

    # --- loading ----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start_loading(self, on_failure: Callable[[BaseException], None] | None = None,
                      on_ready: Callable[[], None] | None = None) -> threading.Thread:
        """:meth:`load` on a daemon thread (once); then ``on_ready()``, or ``on_failure(error)`` if it
        failed, run on that thread."""
        with self._lock:
            if self._loader is None:
                def main() -> None:
                    try:
                        self.load()
                    except BaseException as exc:
                        if on_failure is not None:
                            on_failure(exc)
                        return
                    if on_ready is not None and self.ready:
                        on_ready()
                self._loader = threading.Thread(target=main, name="fastgen-serve-load", daemon=True)
                self._loader.start()
            return self._loader

    def load(self) -> None:
        """Build (or fetch from the cache) the engines, start the runtime and warm it up (blocking)."""
        try:
            started = time.perf_counter()
            if self.generator is None and self.config.model is None and not self.scorers and not self.config.scorers:
                raise InvalidArgumentError("model", None, reason="nothing to serve: give a generator model, a "
                                           "scorer, or both")
            if self.generator is None and self.config.model is not None:
                self.generator = self._load_generator()
            if not self.scorers:
                specs = self.config.named_scorer_specs()
                self.scorers = [self._load_scorer(model, component) for _, model, component in specs]
                self.scorer_names = [name for name, _, _ in specs]
            runtime = self._make_runtime()
            self.served = directory(self.config, runtime.scorers)
            with self._lock:
                closed = self.state == "closed"
                if not closed:
                    self.runtime = runtime
            if closed:  # closed while loading: nothing to serve any more
                runtime.shutdown(drain=False, timeout=5.0)
                return
            if self.config.warmup:
                self._warmup()
            with self._lock:
                if self.state == "loading":
                    self.state = "ready"
            logger.info("engines loaded and warm in %.1f s", time.perf_counter() - started)
        except BaseException as exc:
            self.error = exc
            self.state = "failed"
            logger.error("loading the engines failed: %s", " ".join(str(exc).split()) or type(exc).__name__)
            raise

    def _cache(self) -> Any:
        if self.config.cache_dir is None:
            return None  # the default cache ($FASTGEN_CACHE_DIR or ~/.cache/fastgen/engines)
        from fastgen.engines.cache import EngineCache

        return EngineCache(self.config.cache_dir)

    def _execution(self) -> Any:
        from fastgen.engines.config import ExecutionOptions

        return ExecutionOptions(intra_op_threads=self.config.intra_op_threads)

    def _load_generator(self) -> Any:
        from fastgen.engines.config import BuildConfig
        from fastgen.pipelines.generator import Generator

        cfg = self.config
        generator = Generator.from_pretrained(cfg.model, backend=cfg.backend, device=cfg.device,
                                              precision=cfg.precision, cache=self._cache(), profile=cfg.profile,
                                              quantization=cfg.quantization,
                                              build_config=BuildConfig(execution=self._execution()))
        for text in cfg.loras:
            path, scale = parse_lora_arg(text)
            generator.load_lora(path, name=lora_name(path), weight=scale)
        return generator

    def _load_scorer(self, model: str, component: str | None) -> Any:
        from fastgen.pipelines.scorer import Scorer

        cfg = self.config
        return Scorer.from_pretrained(model, component, backend=cfg.backend, device=cfg.device,
                                      precision=cfg.precision, cache=self._cache(), execution=self._execution())

    def _make_runtime(self) -> Any:
        from fastgen.runtime.runtime import Runtime

        rt_config = self.config.runtime
        unet = getattr(self.generator, "unet", None)
        batch = unet.spec.profile.dims.get("batch") if unet is not None else None
        # The default step size exceeds small UNet profiles (tiny's batch ends at 8): fit it, rather
        # than split every step in two calls and warn; a size the user chose is kept as given.
        if batch is not None and rt_config.max_step_rows == RuntimeConfig().max_step_rows > batch.max:
            rt_config = rt_config.replace(max_step_rows=batch.max)
        scorers = [s if name is None else (name, s) for name, s in zip(self.scorer_names, self.scorers)]
        return Runtime(self.generator, scorers=scorers or None, config=rt_config)

    def _warmup(self) -> None:
        """One small request per engine, so the first client does not pay for first calls."""
        from PIL import Image

        futures = []
        if self.generator is not None:
            futures.append(self.runtime.submit(GenerateRequest("", GenerateConfig(steps=1, seed=0))))
        for name, scorer in self.runtime.scorers.items():
            for kind in ("text", "image"):
                request = warmup_request("warm-up" if kind == "text" else Image.new("RGB", (64, 64)), name, scorer, kind)
                if request is not None:
                    futures.append(self.runtime.submit(request))
        for future in futures:
            future.result()

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the accepted requests (up to ``timeout`` seconds), then stop the runtime."""
        with self._lock:
            self.state = "closed" if self.state != "failed" else self.state
            runtime = self.runtime
        if runtime is not None:
            runtime.shutdown(drain=True, timeout=timeout)

    # --- what is served ---------------------------------------------------------------------------

    @property
    def model_name(self) -> str | None:
        return self.config.served_name

    def _image_classifier(self, name: str | None, argument: str = "scorer", request: str = "ScoreRequest"
                          ) -> ServedScorer | None:
        """The local image classifier ``name`` means (or the only one); None: the ``image_scorer``
        client's (none local, or ``name`` is the client's), if any. A name of none of them raises a
        one-line error naming the choices."""
        remote = self.image_scorer
        if remote is not None and name is not None and name == (getattr(remote, "name", None) or "image") and not any(
                name in (s.id, s.name) for s in self.served):
            return None
        return pick(self.served, name, kind="image", argument=argument, request=request, what="image classifier")

    def image_labels(self, scorer: str | None = None) -> list[str] | None:
        """Labels of the image classifier that ranks candidates (None: unknown until it scores)."""
        local = self._image_classifier(scorer, request="rank")
        if local is not None:
            return list(local.scorer.pair_labels if getattr(local.scorer, "needs_texts", False) else local.scorer.labels)
        labels = getattr(self.image_scorer, "labels", None)
        return list(labels) if labels else None

    def has_image_scorer(self) -> bool:
        return self.image_scorer is not None or any(takes_in(s.scorer, "rank") for s in self.served)

    def models(self) -> list[dict[str, Any]]:
        """What ``/v1/models`` lists: the generator, then the scorers (by id; ``scorer``: the name)."""
        out = []
        if self.config.model is not None:
            entry = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fastgen",
                     "kind": "generator", "ready": self.ready}
            if self.generator is not None and self.config.loras:
                entry["adapters"] = self.generator.active_adapters  # what requests may name, at their scales
            out.append(entry)
        if self.served:
            return out + [s.entry(self.created, self.ready) for s in self.served]
        for name, model, component in self.config.named_scorer_specs():  # still loading
            kind = "text" if (component or "").startswith("text") else "image"
            task = "embedder" if (component or "").endswith("encoder") else "classifier"
            out.append({"id": name or f"{model_label(model)}:{component or 'classifier'}", "object": "model",
                        "created": self.created, "owned_by": "fastgen", "kind": f"{kind}-{task}",
                        "ready": False, "scorer": name or kind})
        return out

    def metrics_text(self) -> str:
        """The runtime's metrics (Prometheus text); empty before the runtime exists."""
        return self.runtime.metrics_text() if self.runtime is not None else ""

    # --- generation -------------------------------------------------------------------------------

    def submit_generation(self, params: GenerationParams, *, stream: bool = False) -> GenerationJob:
        """Check ``params`` and submit one runtime request per image. Bad input raises
        InvalidArgumentError (nothing submitted), a full queue OverloadedError (what was submitted of
        this request is cancelled). ``stream``: report each step (the runtime dispatches nothing per
        step to requests nobody streams)."""
        cfg = self.config
        if self.generator is None:
            raise InvalidArgumentError("model", params.model, reason="this server has no generator (scoring only)")
        if params.model is not None and params.model != self.model_name:
            raise InvalidArgumentError("model", params.model, [self.model_name])
        n = params.n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cfg.max_images:
            raise InvalidArgumentError("n", n, f"integers from 1 to {cfg.max_images} (max_images)")
        best_of = params.candidates is not None
        count, keep, label = n, n, None
        if best_of:
            count = params.candidates
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= cfg.max_images:
                raise InvalidArgumentError("candidates", count, f"integers from 1 to {cfg.max_images} (max_images)")
            if params.keep is not None and n != 1 and params.keep != n:
                raise InvalidArgumentError("keep", params.keep, reason=f"n ({n}) and keep disagree: give one of them")
            keep = params.keep if params.keep is not None else n
            if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= count:
                raise InvalidArgumentError("keep", keep, f"integers from 1 to candidates ({count})")
            if not self.has_image_scorer():
                raise InvalidArgumentError("candidates", count, reason="best-of-N needs an image classifier: "
                                           "start the server with --scorer MODEL")
            labels = self.image_labels(params.scorer)
            label = params.rank_by if params.rank_by is not None else (labels[0] if labels else None)
            if labels is not None and label not in labels:
                raise InvalidArgumentError("rank_by", params.rank_by, labels)
        else:
            for name in ("keep", "rank_by", "scorer"):
                if getattr(params, name) is not None:
                    raise InvalidArgumentError(name, getattr(params, name), reason="only used with candidates")
        if params.width is not None and params.height is not None and params.width * params.height > cfg.max_image_pixels:
            raise InvalidArgumentError("size", params.size_text,
                                       reason=f"more than {cfg.max_image_pixels} pixels (max_image_pixels)")
        unknown = sorted(set(params.settings) - set(CONFIG_FIELDS))
        if unknown:
            raise InvalidArgumentError("generate option", unknown[0], CONFIG_FIELDS)
        settings = {k: v for k, v in params.settings.items() if v is not None}
        config = GenerateConfig(height=params.height, width=params.width, output_type="pil", **settings)
        base = params.seed if params.seed is not None else secrets.randbelow(2**31)
        base = check_seed(base, count, "seed")
        futures: list[RequestFuture] = []
        relay = ProgressRelay() if stream else None
        started = time.perf_counter()
        try:
            for i in range(count):
                request = GenerateRequest(params.prompt, config.replace(seed=base + i), deadline_s=params.deadline_s,
                                          image=params.image, mask_image=params.mask, adapters=params.adapters)
                try:
                    futures.append(self.runtime.submit(request, progress=None if relay is None else relay.for_image(i)))
                except InvalidArgumentError as exc:
                    if exc.argument in ("height", "width") and params.width is not None:
                        raise InvalidArgumentError("size", params.size_text, reason=str(exc)) from None
                    raise
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return GenerationJob(self, futures, seeds=[base + i for i in range(count)], keep=keep if best_of else None,
                             rank_by=label, config=config, started=started, relay=relay,
                             scorer=params.scorer if best_of else None, prompt=params.prompt)

    # --- scoring ----------------------------------------------------------------------------------

    async def rank_images(self, images: list[Any], prompts: list[str], *, scorer: str | None = None) -> list[Any]:
        """Best-of-N: each candidate's ``Score`` by the scorer ``scorer`` names (else the only one): a
        two-tower scorer scores each image against its own prompt (``Scorer.score_pairs``), any other
        image scorer as :meth:`score_images` does."""
        if not images:
            return []
        ranker = self._image_classifier(scorer, request="rank")
        if ranker is not None and getattr(ranker.scorer, "needs_texts", False):
            return await pair_scores(self, ranker, images, prompts)
        # A ranker that is no two-tower scorer takes image ScoreRequests (takes_in's "rank"), so it is
        # the scorer score_images would pick for the same name: it scores them, not picked twice.
        return await self._score_by(ranker, images)

    async def score_images(self, images: list[Any], *, deadline_s: float | None = None,
                           scorer: str | None = None, argument: str = "scorer") -> list[Any]:
        """``Score`` of each PIL image: by the image classifier ``scorer`` names (an id or a name), else
        the runtime's only one, else the ``image_scorer`` client."""
        if not images:
            return []
        return await self._score_by(self._image_classifier(scorer, argument), images, deadline_s)

    async def _score_by(self, local: ServedScorer | None, images: list[Any], deadline_s: float | None = None
                        ) -> list[Any]:
        """:meth:`score_images` once the scorer is picked: ``local`` (None: the ``image_scorer`` client)."""
        if local is not None:
            return await gather(submit_all(self.runtime, [ScoreRequest(im, kind="image", deadline_s=deadline_s,
                                                                        scorer=local.name) for im in images]))
        if self.image_scorer is not None:
            scores = list(await self.image_scorer.score_images(list(images)))
            if len(scores) != len(images):
                raise RuntimeError(f"the image scorer returned {len(scores)} scores for {len(images)} images")
            return scores
        raise InvalidArgumentError("images", f"{len(images)} images", reason="this server has no image classifier")

    async def score(self, texts: list[str], images: list[Any], *, deadline_s: float | None = None,
                    model: str | None = None) -> list[dict[str, Any]]:
        """``/v1/score``'s data: one entry per text, then one per image (``index`` within its list).
        ``model``: the scorer to use (an id or a name from ``/v1/models``); none: the only text
        classifier for the texts, the only image classifier for the images."""
        total = len(texts) + len(images)
        if total == 0:
            raise InvalidArgumentError("texts", None, reason="give texts, images, or both")
        self.config.check_items(total, "texts" if texts else "images")
        if model is not None and model == self.model_name:
            raise InvalidArgumentError("model", model, [s.id for s in self.served] or None,
                                       reason="that is the generator: name a scorer")
        text_futures: list[RequestFuture] = []
        if texts:
            text = pick(self.served, model, kind="text", what="text classifier")
            if text is None:
                raise InvalidArgumentError("texts", f"{len(texts)} texts", reason="this server has no text classifier")
            text_futures = submit_all(self.runtime, [ScoreRequest(t, kind="text", deadline_s=deadline_s,
                                                                  scorer=text.name) for t in texts])
        try:
            image_data: list[dict[str, Any]] = []
            if images:
                local = self._image_classifier(model, "model")
                if local is not None and local.task == "detect":  # scores, and the boxes they come from
                    image_data = await detections_body(self, local, images, deadline_s=deadline_s)
                else:
                    image_scores = await self._score_by(local, images, deadline_s)
                    image_data = [{"index": i, "kind": "image", **score_body(s)} for i, s in enumerate(image_scores)]
            text_scores = await gather(text_futures)
        finally:
            for future in text_futures:
                future.cancel()  # no-op once done; a client that went away frees the queue
        return [{"index": i, "kind": "text", **score_body(s)} for i, s in enumerate(text_scores)] + image_data


def warmup_request(item: Any, name: str, scorer: Any, kind: str) -> Any:
    """A warm-up request of one of the runtime's scorers for ``kind`` items (by what it does), or None
    when it takes none (each of a two-tower scorer's towers gets one)."""
    for what, make in (("DetectRequest", DetectRequest), ("ScoreRequest", ScoreRequest), ("EmbedRequest", EmbedRequest)):
        if kind in takes(scorer, what):
            return make(item, scorer=name) if what == "DetectRequest" else make(item, kind=kind, scorer=name)
    return None


__all__ = ["GenerationJob", "GenerationParams", "ImageScorerClient", "Service"]
