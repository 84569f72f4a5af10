"""A runtime's scorers by name, and which one a request goes to.

``Runtime(scorers={"moderation": s1, "quality": s2, "brief": s3})`` serves any number of scorers,
several of one kind (text or image) included; each has its own executor (queue, buckets, batch
limits, device thread) and its name is its requests' kind in the scheduler and its label in the
metrics. A single scorer, or a list, is named by its kind (``text``, ``image``) as before names
existed, so ``Runtime(gen, [text_scorer, image_scorer])`` and its metric labels are unchanged.

A request names its scorer (``ScoreRequest(item, scorer="moderation")``), or takes the only scorer
of its item's kind that does what it asks (classify, embed, detect); several: a one-line error
naming them. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.requests import check_scorer_name

KINDS = ("text", "image")
#: The scorer tasks that can take each request type (a detector scores too: each label's best confidence).
REQUEST_TASKS = {"ScoreRequest": ("classify", "detect"), "EmbedRequest": ("embed",), "DetectRequest": ("detect",)}
#: What a request type asks for, in messages.
_DOING = {"ScoreRequest": "classifies", "EmbedRequest": "embeds", "DetectRequest": "detects"}


def task_of(scorer: Any) -> str:
    """A scorer's task (``classify``, ``embed``, ``detect``); a scorer-like object without one classifies."""
    return getattr(scorer, "task", None) or "classify"


def named_scorers(scorer: Any) -> dict[str, Any]:
    """``{name: scorer}`` from a Scorer, a list of Scorers and ``(name, Scorer)`` pairs, or a dict
    name -> Scorer. A scorer given without a name is named by its kind (``text`` / ``image``); the
    names ``text`` and ``image`` are kept for scorers of that kind (so a request's ``kind`` and a
    name never disagree). Bad or duplicate names raise a one-line error naming ``scorers``."""
    if scorer is None:
        return {}
    if isinstance(scorer, Mapping):
        pairs: list[tuple[str | None, Any]] = list(scorer.items())
    else:
        items = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer]
        pairs = [(item[0], item[1]) if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                 else (None, item) for item in items]
    out: dict[str, Any] = {}
    for name, s in pairs:
        kind = getattr(s, "kind", None)
        if kind not in KINDS or not hasattr(s, "logits"):
            raise InvalidArgumentError("scorers", type(s).__name__, "fastgen.Scorer instances")
        if name is None:
            name = kind
            if name in out:
                raise InvalidArgumentError("scorers", f"two {kind} scorers", reason="name them: "
                                           "Runtime(scorers={'moderation': s1, 'quality': s2})")
        else:
            check_scorer_name(name, "scorers")
            if name in KINDS and name != kind:
                raise InvalidArgumentError("scorers", name, reason=f"the name {name!r} is kept for {'an' if name == 'image' else 'a'} "
                                           f"{name} scorer; "
                                           f"this one scores {kind}s")
            if name in out:
                raise InvalidArgumentError("scorers", name, reason="two scorers of that name")
        out[name] = s
    return out


def takes(scorer: Any, what: str) -> tuple[str, ...]:
    """The item kinds (``text``, ``image``) a scorer takes in requests of type ``what`` (a
    ScoreRequest, EmbedRequest or DetectRequest): its own kind when its task can do what the request
    asks; a two-tower (similarity) scorer embeds images, and texts with its text tower, and scores
    images with its aesthetic head."""
    task = task_of(scorer)
    if task == "similarity":
        if what == "EmbedRequest":
            return ("image", "text") if getattr(scorer, "text_engine", None) is not None else ("image",)
        if what == "ScoreRequest" and getattr(scorer, "aesthetic_head", None) is not None:
            return ("image",)
        return ()
    return (scorer.kind,) if task in REQUEST_TASKS.get(what, ()) else ()


def lane(name: str, scorer: Any, kind: str) -> str:
    """The executor (device thread, queues, metrics label) of scorer ``name``'s ``kind`` items: the
    name itself, or ``name:text`` for a two-tower scorer's texts (its text tower)."""
    return name if kind == scorer.kind else f"{name}:{kind}"


def resolve(scorers: Mapping[str, Any], request: Any) -> tuple[str, str]:
    """The scorer ``request`` goes to (a ScoreRequest, EmbedRequest or DetectRequest) and the kind of
    its item: ``(name, kind)``.

    Named: that scorer, which must do what the request asks and take its ``kind`` if one is given.
    Not named: the only scorer that does the task for the item's kind (``request.kind``; else text
    for a ``str`` when a scorer takes texts, else image). Raises a one-line InvalidArgumentError
    naming the choices otherwise."""
    what = type(request).__name__
    doers = {n: k for n, s in scorers.items() if (k := takes(s, what))}
    name = getattr(request, "scorer", None)
    kind = getattr(request, "kind", None)
    is_text = isinstance(request.item, str)
    if name is not None:
        scorer = scorers.get(name)
        if scorer is None:
            raise InvalidArgumentError("scorer", name, sorted(scorers) or None,
                                       reason="no scorer of that name in this runtime" if scorers else
                                       "this runtime has no scorers")
        if name not in doers:
            raise InvalidArgumentError("scorer", name, sorted(doers) or None,
                                       reason=f"a {what} needs a scorer that {_DOING.get(what, 'scores')}; "
                                       f"{name!r} is a{'n' if task_of(scorer)[0] in 'aeiou' else ''} "
                                       f"{task_of(scorer)} scorer")
        if kind is not None and kind not in doers[name]:
            raise InvalidArgumentError("kind", kind, doers[name], reason=f"scorer {name!r} takes "
                                       f"{' and '.join(k + 's' for k in doers[name])}")
        return name, kind or ("text" if is_text and "text" in doers[name] else doers[name][0])
    if kind is None:
        kind = "text" if is_text and any("text" in k for k in doers.values()) else "image"
    names = [n for n, k in doers.items() if kind in k]
    if len(names) == 1:
        return names[0], kind
    if not names:
        doing = "" if what == "ScoreRequest" else f" that {_DOING.get(what, 'scores')}"
        raise InvalidArgumentError("request", f"a {kind} {what}", sorted(doers) or None,
                                   reason=f"this runtime has no {kind} scorer{doing}")
    raise InvalidArgumentError("scorer", None, names, reason=f"{len(names)} {kind} scorers can take a {what}: "
                               "name one (scorer=NAME)")


def modalities(executors: Mapping[str, Any]) -> dict[str, str]:
    """Lane -> ``text`` / ``image``: what each scorer executor's queues batch (the scheduler's budgets)."""
    return {key: ex.kind for key, ex in executors.items() if getattr(ex, "kind", None) in KINDS}


__all__ = ["KINDS", "REQUEST_TASKS", "lane", "modalities", "named_scorers", "resolve", "takes", "task_of"]
