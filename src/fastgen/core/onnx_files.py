"""A user's ONNX file and its external data, checked before anything reads the data.

An ONNX tensor may keep its bytes in another file (``external_data``: ``location``, ``offset``,
``length``). A crafted graph can point that at ``../../etc/passwd``, ``/dev/zero`` (hashing it never
ends), a FIFO (reading it blocks), or a symbolic link out of the model's folder. Every reader of a
user's graph in fastgen (build's hashing, ``spec_from_onnx``, ``write_onnx``, ``ort_runner``,
engine loading) calls :func:`check_external_data` first: each location must name a regular file
inside the model's directory (symbolic links resolved), and ``offset``/``length`` must lie inside it.

onnx is imported inside the functions: ``fastgen.core`` stays cheap to import.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from fastgen.core.fs import open_regular, printable
from fastgen.errors import InvalidArgumentError

ARGUMENT = "onnx model"
_ALLOWED = "relative locations of regular files inside the model's directory"

# Bytes per element of the ONNX element types with a fixed size (TensorProto.DataType numbers): FLOAT,
# UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL, FLOAT16, DOUBLE, UINT32, UINT64, COMPLEX64, COMPLEX128,
# BFLOAT16, the float8 types, FLOAT8E8M0. Strings and packed 4-bit types are not size-checked.
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
             16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 24: 1}


def iter_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, sparse initializers, node attributes (Constant values
    included), in subgraphs and local functions too."""
    def graph_tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node: Any) -> Iterator[Any]:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from node_tensors(node)


def _load_graph(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError(ARGUMENT, str(path), reason=f"not a readable ONNX file ({reason})") from exc


def _int_field(value: str | None, key: str, refuse: Callable[[str], NoReturn]) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        refuse(f"has {key} {value!r}, not a non-negative integer")
    return int(value)


def _check_tensor(tensor: Any, path: Path, base: Path, real_base: str, data: bool) -> str | None:
    """The tensor's external location (checked), or None when its data is inline."""
    entries = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location != 1 and "location" not in entries:  # 1: TensorProto.EXTERNAL
        return None
    location = entries.get("location")

    def refuse(reason: str) -> NoReturn:
        shown = repr(location) if len(repr(location)) <= 300 else repr(location)[:300] + "..."  # one sane line
        where = f"location {shown}" if location is not None else "entry"
        raise InvalidArgumentError(ARGUMENT, str(path), _ALLOWED,
                                   reason=f"tensor {tensor.name[:200]!r}: external data {where} {reason}")

    if not location:
        refuse("names no file")
    if "\x00" in location:
        refuse("contains a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        refuse("is an absolute path")
    target = base / location
    resolved = os.path.realpath(target)
    if os.path.commonpath([resolved, real_base]) != real_base or resolved == real_base:
        refuse(f"is outside the model's directory {printable(base)} (it resolves to {printable(resolved)})")
    offset = _int_field(entries.get("offset"), "offset", refuse) or 0
    length = _int_field(entries.get("length"), "length", refuse)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if not data:
            return location  # the graph alone is being read: its weights need not be there
        refuse("does not exist")
    except OSError as exc:
        refuse(f"cannot be read ({exc.strerror or exc})")
    if stat.S_ISLNK(st.st_mode):
        refuse("is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        refuse("is not a regular file")
    if not data:
        return location
    size = st.st_size
    if offset > size or (length is not None and offset + length > size):
        refuse(f"has offset {offset} and length {length}, past the end of its {size}-byte file")
    itemsize = _ITEMSIZE.get(tensor.data_type)
    if itemsize is not None and all(d >= 0 for d in tensor.dims):
        needed = math.prod(tensor.dims) * itemsize
        # An explicit length must match exactly; without one the tensor reads on from the offset.
        available = length if length is not None else size - offset
        if available < needed or (length is not None and length != needed):
            refuse(f"holds {available} bytes, but the tensor's shape and type need {needed}")
    return location


def check_external_data(path: str | os.PathLike, model: Any = None, *, data: bool = True) -> list[Path]:
    """Check the external data of the ONNX file at ``path`` (``model``: its graph, already loaded without
    external data; else it is loaded here). Returns the data files, ``<model dir>/<location>``, in
    location order; raises :class:`InvalidArgumentError` naming the tensor and the location.

    ``data=False`` is for readers of the graph alone (its IO signature): the locations must still be
    safe, but the files may be absent and their sizes are not checked.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(ARGUMENT, str(path), reason="no such file") from exc
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.onnx would block the reader
        raise InvalidArgumentError(ARGUMENT, str(path), reason="not a regular file")
    if model is None:
        model = _load_graph(path)
    base = path.absolute().parent
    real_base = os.path.realpath(base)
    locations = {loc for t in iter_tensors(model) if (loc := _check_tensor(t, path, base, real_base, data))}
    return [path.parent / loc for loc in sorted(locations)]


def open_checked(path: str | os.PathLike) -> Any:
    """Open a data file for binary reading only if it is a regular file reached without a final link
    (:func:`fastgen.core.fs.open_regular`): one swapped for a FIFO or a link after
    :func:`check_external_data` fails instead of hanging."""
    try:
        return open_regular(path)
    except OSError as exc:
        raise InvalidArgumentError(ARGUMENT, str(path), reason=f"cannot be read ({exc.strerror or exc})") from exc


__all__ = ["ARGUMENT", "check_external_data", "iter_tensors", "open_checked"]
