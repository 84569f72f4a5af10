"""What scoring returns (:class:`Score`) and the batch progress bar the scorer's methods share.

Split from :mod:`fastgen.pipelines.scorer` so that the scorer's task mixins (embeddings, similarity,
detection, video) use them without importing the scorer module that imports them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Score:
    """Classification of one input."""

    probs: dict[str, float]
    """Label to probability, in the model's label order."""
    top: list[tuple[str, float]]
    """The ``top_k`` most probable labels, most probable first."""
    logits: list[float]
    """Raw logits, in label order."""

    @property
    def label(self) -> str:
        """The most probable label."""
        return self.top[0][0]

    def to_dict(self) -> dict[str, Any]:
        return {"probs": dict(self.probs), "top": [{"label": k, "prob": p} for k, p in self.top],
                "logits": list(self.logits)}


@contextlib.contextmanager
def batch_progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A transient rich bar on stderr over ``total`` batches (nothing when disabled or one batch)."""
    if not enabled or total <= 1:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


__all__ = ["Score", "batch_progress"]
