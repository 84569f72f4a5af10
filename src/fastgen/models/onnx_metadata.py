"""Component metadata from an ONNX graph's ``metadata_props``: a YOLO-style detector's labels, input
size and stride as ultralytics writes them (:func:`detector_metadata_from_onnx`), parsed without
evaluating anything."""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Mapping
from typing import Any

from fastgen.models.metadata import DetectorMetadata

logger = logging.getLogger(__name__)

# Longest ONNX metadata value parsed: a real label table (80 COCO names) is about 1 kB.
_MAX_PROP_CHARS = 1 << 20


def _literal(key: str, text: str) -> Any:
    """An ONNX metadata value as data: JSON, else a Python literal that is one dict / list / tuple of
    constants or a constant (ultralytics writes ``names`` as ``{0: 'person', 1: 'car'}``). Only that
    form reaches ``ast.literal_eval``, which evaluates nothing; None when it is not that form."""

    if len(text) > _MAX_PROP_CHARS:
        logger.warning("ONNX metadata %r: %d characters, ignored", key, len(text))
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        pass
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    children = ([*tree.keys, *tree.values] if isinstance(tree, ast.Dict)
                else list(tree.elts) if isinstance(tree, (ast.List, ast.Tuple)) else [])
    if not isinstance(tree, (ast.Dict, ast.List, ast.Tuple, ast.Constant)) or not all(
            isinstance(c, ast.Constant) for c in children):
        return None
    return ast.literal_eval(tree)


def _size_value(value: Any) -> int | list[int] | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    if ok(value) or (isinstance(value, list) and len(value) == 2 and all(ok(v) for v in value)):
        return value
    return None


def detector_metadata_from_onnx(props: Mapping[str, str]) -> DetectorMetadata | None:
    """:class:`DetectorMetadata` from an ONNX graph's ``metadata_props`` as ultralytics writes them
    (``names``: ``{0: 'person', ...}``, ``imgsz``: ``[640, 640]``, ``stride``: ``32``, ``task``:
    ``detect``); None when they do not describe a detector (no ``names``, or another ``task``: a
    segmentation or pose model). Values that do not parse are left out, with a warning."""
    task = props.get("task")
    if "names" not in props or (task is not None and task != "detect"):
        return None
    fields: dict[str, Any] = {}
    names = _literal("names", props["names"])
    if isinstance(names, dict) and names and all(str(k).isdigit() for k in names):
        table = {int(k): str(v) for k, v in names.items()}
        if sorted(table) == list(range(len(table))):
            fields["labels"] = tuple(table[i] for i in range(len(table)))
    elif isinstance(names, list) and names:
        fields["labels"] = tuple(str(v) for v in names)
    if "labels" not in fields:
        logger.warning("ONNX metadata 'names' is not an {index: name} table (%.80r): labels are label_<i>",
                       props["names"])
    for key, name in (("imgsz", "image_size"), ("stride", "stride")):
        if key in props:
            value = _size_value(_literal(key, props[key]))
            if key == "stride" and isinstance(value, list):
                value = max(value)
            if value is None:
                logger.warning("ONNX metadata %r %.40r is not a size: ignored", key, props[key])
            else:
                fields[name] = value
    return DetectorMetadata(**fields)


__all__ = ["detector_metadata_from_onnx"]
