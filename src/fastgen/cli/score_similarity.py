"""``fastgen score`` with a two-tower model (CLIP / SigLIP): the image-text similarity matrix.

``fastgen score tiny-clip --image a.png --text "a red car" --text "a shoe"`` (or ``--model tiny-clip a.png
...``) prints one row per image and one column per text: CLIP's ``logit_scale * cosine``, SigLIP's
probabilities (``--json`` also gives SigLIP's logits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fastgen.cli.options import printable
from fastgen.errors import InvalidArgumentError


def model_and_files(model: str | None, files: tuple[str, ...], images: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The model (``--model``, else the first positional argument) and the input files (the other positional
    arguments, then the ``--image`` ones)."""
    if model is None:
        first = Path(files[0]) if files else None
        # an input file is not a model: only a name, a folder, an .onnx or a .safetensors file can be
        if first is None or (first.is_file() and first.suffix.lower() not in (".onnx", ".safetensors")):
            raise click.UsageError("Missing option '--model' (or the model as the first argument).")
        model, files = files[0], files[1:]
    return model, tuple(files) + tuple(images)


def print_similarity(scorer: Any, model: str, files: tuple[str, ...], kinds: list[str], texts: tuple[str, ...],
                     as_json: bool) -> None:
    """The similarity matrix of the image ``files`` against ``texts`` on a two-tower ``scorer``."""
    videos = [f for f, k in zip(files, kinds) if k != "image"]
    if videos:
        raise InvalidArgumentError("FILES", printable(videos[0]), reason="image-text similarity takes images, not videos")
    if scorer.text_engine is None:
        raise InvalidArgumentError("--model", model, reason="has no text tower; image-text similarity needs one")
    if not files or not texts:
        raise InvalidArgumentError("--text" if files else "--image", None,
                                   reason=f"{model} scores images against texts: give both --image and --text")
    with scorer:
        logits = scorer.similarity(list(files), list(texts), logits=True)  # (n_images, n_texts)
        shown = logits.sigmoid() if scorer.family == "siglip" else logits
        info = {"model": model, "family": scorer.family, "backend": scorer.engine.backend,
                "device": str(scorer.engine.device), "precision": scorer.engine.precision,
                "logit_scale": scorer.logit_scale, "logit_bias": scorer.logit_bias}
    if as_json:
        click.echo(json.dumps({**info, "images": list(files), "texts": list(texts),
                               "similarity": shown.tolist(), "logits": logits.tolist()}, indent=2))
        return
    from rich.table import Table

    from fastgen.cli.main import _console

    what = "sigmoid probability" if scorer.family == "siglip" else "logit_scale x cosine"
    title = f"{printable(model)} image-text similarity ({what}; {info['backend']}, {info['device']})"
    table = Table(title=title, min_width=min(len(title) + 4, 150))
    table.add_column("image", overflow="fold")
    for text in texts:
        table.add_column(printable(text), justify="right", overflow="fold")
    for name, row in zip(files, shown.tolist()):
        table.add_row(printable(name), *(f"{v:.4f}" for v in row))
    _console().print(table)


__all__ = ["model_and_files", "print_similarity"]
