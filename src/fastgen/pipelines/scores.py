"""What scoring returns (:class:`Score`) and the batch steps the scorer's methods share.

Split from :mod:`fastgen.pipelines.scorer` so that the scorer's task mixins (embeddings, similarity,
detection, video) use them without importing the scorer module that imports them: the batch progress
bar, padding a batch up to an engine's minimum (:func:`padded_output`), finding and naming non-finite
rows (:func:`nonfinite_rows`, :func:`nonfinite_error`), and running many inputs through a per-batch step in
a chosen order (:func:`rows_in_batches`: ``Scorer.embed`` and the two towers' ``embed_texts`` /
``embed_images``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastgen.errors import NumericalError, UnsupportedError


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


def pad_batch(feeds: dict[str, torch.Tensor], least: int) -> tuple[dict[str, torch.Tensor], int]:
    """(``feeds`` with at least ``least`` rows, their own row count). TensorRT refuses a batch under its
    profile's minimum (and a fixed-batch graph any other size): the last row is repeated up to it, and the
    caller drops the results of the extra rows."""
    n = next(iter(feeds.values())).shape[0]
    if n < least:
        feeds = {k: torch.cat([v, v[-1:].expand(least - n, *v.shape[1:])]) for k, v in feeds.items()}
    return feeds, n


def padded_output(engine: Any, feeds: dict[str, torch.Tensor], least: int, name: str, *, dims: int,
                  expected: str) -> torch.Tensor:
    """``engine``'s output ``name`` on ``feeds`` padded up to ``least`` rows (:func:`pad_batch`), the padding's
    rows dropped. An output that is not ``dims``-D with one row per fed row is an :class:`UnsupportedError`
    (``expected``: its layout, for the message): slicing it would hand back rows of another input."""
    feeds, n = pad_batch(feeds, least)
    out = engine(feeds)[name]
    rows = max(n, least)
    if out.dim() != dims or out.shape[0] != rows:
        raise UnsupportedError(f"{engine.spec.component} output {name!r} has shape {tuple(out.shape)} for a batch "
                               f"of {rows}; expected {expected}")
    return out[:n]


def nonfinite_rows(batch: torch.Tensor) -> list[int]:
    """Indices of the rows of a batch (batch first, any shape) that hold a NaN or an infinity."""
    return torch.nonzero(~torch.isfinite(batch.reshape(batch.shape[0], -1)).all(dim=1)).flatten().tolist()


def nonfinite_error(source: str, output: str, rows: Sequence[int] = (), what: str = "row") -> NumericalError:
    """The error of ``source`` (``the ... engine``, ``the text tower``) returning non-finite ``output``
    (``logits``, ``embeddings``) for the inputs ``what[i]`` of ``rows`` (the first five named; none: the
    request alone). A NaN passed on as a result would be a made-up answer."""
    where = ", ".join(f"{what}[{i}]" for i in rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
    return NumericalError(f"{source} returned non-finite {output} (NaN or inf)" + (f" for {where}" if rows else ""))


def rows_in_batches(items: Sequence[Any], order: Sequence[int], batch_size: int, run: Callable[[list[Any]], torch.Tensor],
                    fail: Callable[[list[int]], NumericalError], description: str, progress: bool) -> torch.Tensor:
    """``run`` over ``items`` in batches of ``batch_size`` taken in ``order`` (texts: by token count, so that
    each batch pads only to its own longest), stacked back in the items' order: (len(items), ...). A batch with
    a non-finite row raises ``fail`` of those rows' indices into ``items``, sorted (the caller's, never the
    batch order's)."""
    rows: list[torch.Tensor | None] = [None] * len(items)
    with batch_progress(-(-len(order) // batch_size), description, progress) as advance:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out = run([items[i] for i in chunk])
            bad = nonfinite_rows(out)
            if bad:
                raise fail(sorted(chunk[i] for i in bad))
            for i, row in zip(chunk, out):
                rows[i] = row
            advance()
    return torch.stack(rows)  # type: ignore[arg-type]


__all__ = ["Score", "batch_progress", "nonfinite_error", "nonfinite_rows", "pad_batch", "padded_output",
           "rows_in_batches"]
