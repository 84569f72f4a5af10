"""``fastgen score``: classify image, video and text inputs with a classifier engine.

File names are shown as given; bytes in them that are not UTF-8 (legal in Linux file names) print as
U+FFFD. ``--text`` must be valid UTF-8: text that is not (a terminal in another encoding) is refused
in one line naming the option, rather than scored as something the user did not type.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from fastgen.cli.options import engine_cache, field_choices, nonempty, printable, utf8_text
from fastgen.core.config import literal_choices
from fastgen.engines.config import BuildConfig
from fastgen.errors import InvalidArgumentError

#: Most frames sampled per video: each is decoded at full size before scoring (256 frames of 4K video
#: are 6 GB), and a typo (10**12) asked numpy for an 8 TB index table.
MAX_FRAMES = 256

MODEL_HELP = ("a preset (tiny), a local transformers classifier folder, an engine directory made by "
              "`fastgen build`, or an .onnx file")


def _is_engine_path(model: str) -> bool:
    path = Path(model).expanduser()
    return (path / "manifest.json").is_file() or (path.is_file() and path.suffix.lower() == ".onnx")


def _classify_file(path: str) -> str:
    """``image`` or ``video``: by extension when it is a known video one, else by probing PIL then PyAV."""
    from fastgen.pipelines.classifier_images import is_image_file
    from fastgen.pipelines.video import VIDEO_EXTENSIONS, is_video_file

    if os.path.isdir(path):
        raise InvalidArgumentError("file", printable(path), reason="is a directory; pass the image or video files in it")
    if not os.path.isfile(path):
        raise InvalidArgumentError("file", printable(path), reason="no such file")
    if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
        return "video"
    if is_image_file(path):
        return "image"
    if is_video_file(path):
        return "video"
    raise InvalidArgumentError("file", printable(path), reason="not a readable image or video")


def _print_boxes(console: Any, rows: list[dict[str, Any]]) -> None:
    """A detector's boxes: one table per image (label, confidence, x1 y1 x2 y2 in the image's pixels)."""
    from rich.table import Table

    for row in rows:
        if "detections" not in row:
            continue
        table = Table(title=f"{printable(row['input'])}: {len(row['detections'])} boxes")
        for name in ("label", "confidence", "x1", "y1", "x2", "y2"):
            table.add_column(name, justify="left" if name == "label" else "right")
        for d in row["detections"]:
            table.add_row(d["label"], f"{d['confidence']:.3f}", *(f"{v:.1f}" for v in d["box"]))
        console.print(table)


def _fmt_top(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{label} {prob:.3f}" for label, prob in top)


def _print_tables(console: Any, rows: list[dict[str, Any]], videos: list[tuple[str, Any]], labels: list[str],
                  title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("input", overflow="fold")
    table.add_column("kind")
    table.add_column("top labels (probability; videos: mean over frames)")
    for row in rows:
        table.add_row(printable(row["input"]), row["kind"], _fmt_top([(t["label"], t["prob"]) for t in row["top"]]))
    console.print(table)
    for name, vs in videos:
        shown = ", ".join(str(i) for i in vs.indices)
        title = f"{printable(name)}: frames {shown}" + (f" of {vs.total_frames}" if vs.total_frames else "")
        title += f" (decode {vs.decode_ms:.0f} ms, inference {vs.inference_ms:.0f} ms)"
        detail = Table(title=title, min_width=min(len(title) + 4, 150))
        detail.add_column("label")
        detail.add_column("mean", justify="right")
        detail.add_column("max", justify="right")
        for label in labels:
            detail.add_row(label, f"{vs.mean[label]:.4f}", f"{vs.max[label]:.4f}")
        console.print(detail)


def _embed(model: str, component: str | None, files: tuple[str, ...], kinds: list[str], texts: tuple[str, ...],
           normalize: bool | None, as_json: bool, *, batch_size: int | None, cache_dir: str | None,
           **build: Any) -> None:
    """``score --embed``: one embedding per text (a text encoder) or per image (an image encoder)."""
    from fastgen.pipelines.scorer import Scorer

    if texts and files:
        raise InvalidArgumentError("--embed", printable(files[0]), reason="an encoder embeds either texts or images: "
                                   "pass --text or image FILES, not both")
    videos = [f for f, k in zip(files, kinds) if k != "image"]
    if videos:
        raise InvalidArgumentError("FILES", printable(videos[0]), reason="--embed takes images, not videos")
    if component is None and not _is_engine_path(model):
        component = "text-encoder" if texts else "image-encoder"
    cache: Any = engine_cache(cache_dir) if cache_dir or not _is_engine_path(model) else None
    scorer = Scorer.from_pretrained(model, component, cache=cache, batch_size=batch_size,
                                    progress=sys.stderr.isatty(), **build)
    what = f"{model}'s {scorer.engine.spec.component}"
    if scorer.task != "embed":
        raise InvalidArgumentError("--embed", what, reason="is not an encoder (use --component text-encoder or "
                                   "image-encoder)")
    if texts and scorer.kind != "text":
        raise InvalidArgumentError("--text", texts[0], reason=f"{what} is an image encoder; pass image FILES")
    if files and scorer.kind != "image":
        raise InvalidArgumentError("FILES", printable(files[0]), reason=f"{what} is a text encoder; pass --text")
    with scorer:
        inputs = list(texts) if texts else list(files)
        vectors = scorer.embed(inputs, normalize=normalize)
        info = {"model": model, "component": scorer.engine.spec.component, "backend": scorer.engine.backend,
                "device": str(scorer.engine.device), "precision": scorer.engine.precision,
                "pooling": scorer.pooling, "normalize": scorer.embedding.normalize if normalize is None else normalize, "dim": int(vectors.shape[1])}
    kind = "text" if texts else "image"
    if as_json:
        rows = [{"input": x, "kind": kind, "embedding": v} for x, v in zip(inputs, vectors.tolist())]
        click.echo(json.dumps({**info, "results": rows}))
        return
    from rich.table import Table

    from fastgen.cli.main import _console

    table = Table(title=f"{printable(model)} {info['component']} ({info['backend']}, {info['device']}): "
                        f"{info['dim']}-d, " + ("its pooled output" if info["pooling"] == "pooled" else f"{info['pooling']} pooling")
                  + (", normalized" if info["normalize"] else ""))
    table.add_column("input", overflow="fold")
    table.add_column("norm", justify="right")
    table.add_column("embedding (first values)")
    for x, v in zip(inputs, vectors):
        head = ", ".join(f"{a:+.4f}" for a in v[:6].tolist()) + (", ..." if len(v) > 6 else "")
        table.add_row(printable(x), f"{float(v.norm()):.4f}", f"[{head}]")
    _console().print(table)


@click.command("score")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=True), callback=nonempty)
@click.option("--model", "-m", default=None, callback=nonempty,
              help=f"The classifier: {MODEL_HELP} (or a CLIP / SigLIP model: the image-text similarity); "
              "default: the first argument.")
@click.option("--image", "-i", "images", multiple=True, type=click.Path(dir_okay=False), callback=nonempty,
              help="An image file (repeatable), as FILES.")
@click.option("--component", "-c", type=click.Choice(["classifier", "text-classifier", "text-encoder", "image-encoder",
                                                         "text-tower", "image-tower"]),
              default=None, help="Component of MODEL (default: text-classifier when only --text is given, else "
              "classifier; with --embed: text-encoder or image-encoder).")
@click.option("--text", "-t", "texts", multiple=True, callback=utf8_text,
              help="A text to classify (repeatable); UTF-8 (text that is not valid UTF-8 is refused).")
@click.option("--frames", default=None, type=click.IntRange(1, MAX_FRAMES),
              help=f"Frames sampled uniformly from each video (default 8); with --fps, the most taken (default "
              f"{MAX_FRAMES}). At most {MAX_FRAMES}: they are decoded into memory.")
@click.option("--fps", default=None, type=click.FloatRange(0, 1000, min_open=True),
              help="Sample videos at this many frames per second instead of uniformly (capped by --frames).")
@click.option("--top", "top_k", default=3, show_default=True, type=click.IntRange(1), help="Labels shown per input.")
@click.option("--conf", default=0.25, show_default=True, type=click.FloatRange(0, 1),
              help="A detector: boxes above this confidence are kept.")
@click.option("--iou", default=0.45, show_default=True, type=click.FloatRange(0, 1),
              help="A detector: a box overlapping a more confident one of its class above this IoU is dropped.")
@click.option("--batch-size", type=click.IntRange(1), help="Inputs per engine call (default: the engine's opt batch).")
@click.option("--multi-label", is_flag=True, help="Independent sigmoid probabilities instead of a softmax.")
@click.option("--backend", type=click.Choice(list(field_choices(BuildConfig, "backend"))), default="onnxruntime",
              show_default=True, help="Engine backend (not for engine directories).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the engine runs.")
@click.option("--precision", type=click.Choice(list(field_choices(BuildConfig, "precision"))), default="fp32",
              show_default=True,
              help="Engine precision (not for engine directories).")
@click.option("--quantization", type=click.Choice([str(c) for c in literal_choices(BuildConfig, "quantization")]),
              default="none", show_default=True,
              help="Quantize the classifier (fastgen.quant preset; its head stays in float).")
@click.option("--cache-dir", type=click.Path(file_okay=False), callback=nonempty, help="Engine cache root.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--embed", is_flag=True, help="Print embeddings of the --text inputs or image FILES (an encoder "
              "component: text-encoder, image-encoder) instead of classifying.")
@click.option("--normalize/--no-normalize", default=None,
              help="With --embed: L2-normalise the embeddings (default: as the model says).")
def score(files: tuple[str, ...], model: str | None, images: tuple[str, ...], component: str | None, texts: tuple[str, ...], frames: int | None,
          fps: float | None,
          top_k: int, batch_size: int | None, multi_label: bool, backend: str, device: str, precision: str,
          quantization: str, cache_dir: str | None, as_json: bool, embed: bool = False,
          normalize: bool | None = None, conf: float = 0.25, iou: float = 0.45) -> None:
    """Classify image and video FILES, and --text inputs, with a classifier of MODEL.

    Files are images or videos (known video extensions, else whatever PIL or PyAV can open); each
    video is scored on --frames frames sampled uniformly (or --fps frames per second), reported as the
    mean and max probability of every label over those frames, with the decode and inference times.
    """
    from fastgen.cli.score_similarity import model_and_files, print_similarity
    from fastgen.pipelines.scorer import Scorer

    model, files = model_and_files(model, files, images)
    if not files and not texts:
        raise InvalidArgumentError("inputs", None, reason="give image or video FILES, or --text")
    kinds = [_classify_file(f) for f in files]
    if embed:
        _embed(model, component, files, kinds, texts, normalize, as_json, batch_size=batch_size, backend=backend,
               device=device, precision=precision, quantization=quantization, cache_dir=cache_dir)
        return
    if component is None and texts and not files and not _is_engine_path(model):
        component = "text-classifier"
    # Engine directories and .onnx files are loaded as they are: only a model to build needs the cache.
    cache: Any = engine_cache(cache_dir) if cache_dir or not _is_engine_path(model) else None
    scorer = Scorer.from_pretrained(model, component, backend=backend, device=device, precision=precision,
                                    cache=cache, quantization=quantization, top_k=top_k, multi_label=multi_label, batch_size=batch_size,
                                    progress=sys.stderr.isatty())
    if scorer.task == "similarity":  # a CLIP / SigLIP model: the image-text similarity matrix
        print_similarity(scorer, model, files, kinds, texts, as_json)
        return
    what = f"{model}'s {scorer.engine.spec.component}"
    if texts and scorer.kind != "text":
        raise InvalidArgumentError("--text", texts[0], reason=f"{what} is an image classifier; pass image or "
                                   "video FILES (or --component text-classifier)")
    if files and scorer.kind != "image":
        raise InvalidArgumentError("FILES", files[0], reason=f"{what} is a text classifier; pass --text")

    rows: list[dict[str, Any]] = []
    videos: list[tuple[str, Any]] = []
    with scorer:
        images = [f for f, k in zip(files, kinds) if k == "image"]
        found: dict[str, Any] = {}
        if scorer.task == "detect":
            # score_video takes no thresholds: a detector's frames are scored at its conf / iou
            # attributes (detection_logits). This scorer is this command's own, so they are set to the
            # options for every video, with images given or not (detect takes them as arguments).
            scorer.conf, scorer.iou = conf, iou
        if scorer.task == "detect" and images:  # boxes, and each label's best confidence as its score
            found = dict(zip(images, scorer.detect(images, conf=conf, iou=iou)))
            image_scores = dict(zip(found, scorer.detection_scores(list(found.values()))))
        else:
            image_scores = dict(zip(images, scorer.score_images(images))) if images else {}
        for f, k in zip(files, kinds):
            if k == "image":
                rows.append({"input": f, "kind": "image", **image_scores[f].to_dict(),
                             **(found[f].to_dict() if f in found else {})})
            else:
                vs = scorer.score_video(f, frames=frames, fps=fps)
                videos.append((f, vs))
                rows.append({"input": f, "kind": "video", **vs.to_dict()})
        for text, s in zip(texts, scorer.score_texts(list(texts)) if texts else []):
            rows.append({"input": text, "kind": "text", **s.to_dict()})
        labels = scorer.labels
        engine_info = {"model": model, "task": scorer.task, "component": scorer.engine.spec.component,
                       "backend": scorer.engine.backend,
                       "device": str(scorer.engine.device), "precision": scorer.engine.precision}

    if as_json:
        click.echo(json.dumps({**engine_info, "labels": labels, "multi_label": multi_label, "results": rows},
                              indent=2))
        return
    from fastgen.cli.main import _console

    _print_tables(_console(), rows, videos, labels,
                  title=f"{printable(model)} {engine_info['component']} ({engine_info['backend']}, {engine_info['device']})")
    _print_boxes(_console(), rows)


__all__ = ["score"]
