"""One progress line for long jobs: a bar, a rate and an ETA, redrawn in place on stderr.

    with Progress("tokenize", total=n_bytes, unit="B") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk), loss=f"{loss:.3f}")

On a terminal the line is redrawn at most every `interval` seconds; elsewhere (CI logs, pipes)
a plain line is printed at most every 10 s, and `enabled=False` silences it entirely.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        label: str,
        total: float | None = None,
        unit: str = "",
        *,
        enabled: bool = True,
        interval: float = 0.2,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if self.tty else 10.0
        self.done = 0.0
        self.start = self._last = time.perf_counter()
        self.fields: dict[str, object] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, advance: float = 1, **fields: object) -> None:
        self.done += advance
        self.fields.update(fields)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(final=False)

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)
            self.enabled = False

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [self.label]
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 20)
            parts.append(f"[{bar:<20}] {frac:6.1%} {_human(self.done)}/{_human(self.total)}{self.unit}")
            if 0 < rate and self.done < self.total:
                parts.append(f"eta {_clock((self.total - self.done) / rate)}")
        else:
            parts.append(f"{_human(self.done)}{self.unit}")
        parts.append(f"{_human(rate)}{self.unit}/s")
        parts.append(_clock(elapsed))
        parts.extend(f"{key} {value}" for key, value in self.fields.items())
        return "  ".join(parts)

    def _draw(self, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


def _human(value: float) -> str:
    for suffix in ("", "k", "M", "G", "T"):
        if abs(value) < 999.5:
            return f"{value:.3g}{suffix}"
        value /= 1000
    return f"{value:.3g}P"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
