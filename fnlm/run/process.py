"""Process-wide settings, for entry points only (`fnlm train`, `fnlm demo`, benchmarks): the
library below never changes the process it runs in.

    keep_freed_memory()                  # glibc malloc keeps freed memory (CPU steps)
    with StopOnSignal() as stop:         # Ctrl-C / SIGTERM: stop after this step, then save
        train(..., should_stop=stop)
    sys.exit(stop.exit_code)             # 130 after SIGINT, 143 after SIGTERM
"""

from __future__ import annotations

import ctypes
import signal
import sys
from types import FrameType


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    An eager CPU step allocates and frees tens of megabytes of temporaries (logits, gradients,
    new parameters); by default glibc serves big blocks with fresh mmaps and trims the heap, so
    every step page-faults the same memory in again: a quarter of a small model's step, measured
    on both fnlm's step and the nn.Module reference. Returns False where it does not apply.
    """
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class StopOnSignal:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM asks the run to stop after its current
    step and save; a second one interrupts at once. Called, it says whether a stop was asked
    for; `exit_code` is the shell's code for the signal (128 + its number), 0 if none came."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + self.signum

    def __enter__(self) -> StopOnSignal:
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint after this step (again to abort)", file=sys.stderr)
