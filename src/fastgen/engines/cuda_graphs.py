"""CUDA graphs per input-shape bucket, shared by the engines that capture them (torch, TensorRT)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# One CUDA graph per input signature: (name, shape, dtype) of every input.
ShapeKey = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def shape_key(names: Sequence[str], args: Sequence[torch.Tensor]) -> ShapeKey:
    """The signature a graph is captured for: every input's name, shape and dtype."""
    return tuple((n, tuple(a.shape), a.dtype) for n, a in zip(names, args, strict=True))


class GraphBucket:
    """A captured CUDA graph with its static input and output buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs: tuple[torch.Tensor, ...]):
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs

    def replay(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Copy ``args`` into the static inputs, replay, and return clones of the outputs (the static
        outputs are overwritten by the next replay)."""
        for static, arg in zip(self.inputs, args, strict=True):
            static.copy_(arg)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


def capture(call: Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]], args: Sequence[torch.Tensor],
            device: torch.device, *, warmup: int = 2) -> GraphBucket:
    """Capture ``call`` on static copies of ``args`` into a CUDA graph.

    Warm-up runs go on a side stream (lazy initialisation, cuDNN autotuning, compilation, TensorRT's
    first enqueue after a shape change) so none of it is recorded, as the CUDA graphs documentation
    prescribes.
    """
    static_inputs = [a.clone() for a in args]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call(static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = call(static_inputs)
    return GraphBucket(graph, static_inputs, static_outputs)


__all__ = ["GraphBucket", "ShapeKey", "capture", "shape_key"]
