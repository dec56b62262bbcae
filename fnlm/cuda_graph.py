"""CUDA graphs: record a program's kernels once, then launch them all with one call.

A replay runs the same kernels on the same memory, so what the program reads and writes lives
at fixed addresses: buffers that its caller owns and that the program updates in place (what a
JAX program would donate). Two programs here are replayed so: the static-cache decode step
(fnlm.static_cache) and the donated training step (fnlm.train.cuda_graphed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_and_capture(body: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Run body once, then return what runs it again: on a GPU the replay of a CUDA graph captured
    after that run (made on a side stream, so that compiling and allocating happen outside the
    capture); elsewhere body itself."""
    if device.type != "cuda":
        body()
        return body
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay
