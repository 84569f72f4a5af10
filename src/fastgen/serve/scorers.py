"""The scorers one server serves: their names, their ``/v1/models`` entries, and which one a request means.

Each scorer has its runtime name (``--scorer NAME=MODEL``'s NAME; without one, its kind: ``text``
or ``image``) and an id that ``/v1/models`` lists: a named scorer's id is its name, an unnamed one's
``MODEL:COMPONENT`` as before names existed (``tiny:classifier``). A request picks one by either
(``"model"`` of ``/v1/score``, ``"scorer"`` of best-of-N generation), or takes the only scorer of
its items' kind that does what it asks; two or more: a one-line error naming the ids to choose from.
Nothing here imports fastapi or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.scorer_names import takes, task_of
from fastgen.serve.config import model_label

#: A scorer's ``/v1/models`` kind, by its task.
TASK_KINDS = {"classify": "classifier", "embed": "embedder", "detect": "detector", "similarity": "text-similarity"}


@dataclass(frozen=True)
class ServedScorer:
    """One scorer of the server: its runtime name, its ``/v1/models`` id, and the Scorer."""

    name: str
    id: str
    scorer: Any

    @property
    def kind(self) -> str:
        """``text`` or ``image``."""
        return self.scorer.kind

    @property
    def task(self) -> str:
        return task_of(self.scorer)

    def entry(self, created: int, ready: bool) -> dict[str, Any]:
        """Its ``/v1/models`` entry."""
        out: dict[str, Any] = {"id": self.id, "object": "model", "created": created, "owned_by": "fastgen",
                               "kind": f"{self.kind}-{TASK_KINDS.get(self.task, self.task)}", "ready": ready,
                               "scorer": self.name}
        if self.task != "embed":
            labels = getattr(self.scorer, "labels", None)
            if labels is not None:
                out["labels"] = list(labels)
        return out


def directory(config: Any, scorers: Mapping[str, Any]) -> list[ServedScorer]:
    """The served scorers of ``config`` (its ``--scorer`` specs, in order) over the runtime's
    ``scorers`` (name -> Scorer); a runtime scorer no spec names is listed under its name."""
    out: list[ServedScorer] = []
    seen: set[str] = set()
    for name, model, component in config.named_scorer_specs():
        if name is None:
            guess = "text" if (component or "").startswith("text") else "image"
            # An engine folder's kind is known once loaded: the unnamed scorer not yet listed.
            name = guess if guess in scorers and guess not in seen else next(
                (k for k in ("text", "image") if k in scorers and k not in seen), guess)
            sid = f"{model_label(model)}:{component or 'classifier'}"
        else:
            sid = name
        if name in scorers and name not in seen:
            out.append(ServedScorer(name, sid, scorers[name]))
            seen.add(name)
    out += [ServedScorer(name, name, s) for name, s in scorers.items() if name not in seen]
    return out


def pick(served: list[ServedScorer], model: str | None, *, kind: str, request: str = "ScoreRequest",
         argument: str = "model", what: str | None = None) -> ServedScorer | None:
    """The scorer a request means: ``model`` (an id or a runtime name), which must take ``kind``
    items in runtime requests of type ``request`` (``ScoreRequest``: classifiers, detectors, a
    two-tower scorer's aesthetic head; ``EmbedRequest``: encoders and two-tower scorers;
    ``DetectRequest``: detectors); none: the only such scorer (None when there is none at all).
    Raises a one-line InvalidArgumentError naming ``argument`` and the ids allowed otherwise."""
    doers = [s for s in served if kind in takes_in(s.scorer, request)]
    what = what or f"{kind} scorer"
    if model is not None:
        found = next((s for s in served if model in (s.id, s.name)), None)
        if found is None:
            raise InvalidArgumentError(argument, model, [s.id for s in served] or None,
                                       reason="no scorer of that name on this server")
        if found not in doers:
            label = f"{found.kind} {TASK_KINDS.get(found.task, found.task)}"
            raise InvalidArgumentError(argument, model, [s.id for s in doers] or None,
                                       reason=f"{model} is {_a(label)}; this needs {_a(what)}")
        return found
    if len(doers) > 1:
        raise InvalidArgumentError(argument, None, [s.id for s in doers],
                                   reason=f"this server has {len(doers)} {what}s: name one")
    return doers[0] if doers else None


def takes_in(scorer: Any, request: str) -> tuple[str, ...]:
    """:func:`fastgen.runtime.scorer_names.takes`, and ``rank``: what ranks best-of-N candidates (an
    image scorer, or a two-tower scorer: each candidate against its prompt)."""
    if request == "rank":
        return ("image",) if getattr(scorer, "needs_texts", False) or "image" in takes(scorer, "ScoreRequest") else ()
    return takes(scorer, request)


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


__all__ = ["ServedScorer", "TASK_KINDS", "directory", "pick", "takes_in"]
