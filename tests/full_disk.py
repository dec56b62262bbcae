"""A full disk for tests: an injected ENOSPC in fnlm.files' writes (everywhere), and the ballast
that fills a real small tmpfs (conftest's small_tmpfs fixture: root on Linux; skipped elsewhere)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fnlm import download, files


class _FillingFile:
    """A file whose writes fail with ENOSPC once `budget[0]` bytes have been written in all."""

    def __init__(self, file, budget: list[int]) -> None:
        self._file, self._budget = file, budget

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._budget[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget[0] -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


@contextlib.contextmanager
def disk_full_after(monkeypatch: pytest.MonkeyPatch, limit: int) -> Iterator[None]:
    """Within the block, the files that fnlm.files and fnlm.download open for writing hold
    `limit` bytes in all; then a write fails with ENOSPC, as on a full disk."""
    budget = [limit]

    def filling_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return _FillingFile(file, budget) if any(flag in mode for flag in "wax+") else file

    with monkeypatch.context() as patch:
        for module in (files, download):
            patch.setattr(module, "open", filling_open, raising=False)
        yield


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` with a ballast file until about `leave` bytes are free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "ballast", "wb") as file:
        file.write(b"\0" * max(free - leave, 0))
