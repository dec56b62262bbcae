"""What the benchmarks share: waiting for a device, its allocated memory, naming it in a report, and
writing the report: the command line and the JSON file."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_allocated(device: torch.device) -> int:
    """Bytes the device's tensors hold now (0 off CUDA: not measured there)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """The most bytes allocated since the last reset_peak_memory (0 off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    """The script's name and its arguments, as a report records how it was made."""
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
