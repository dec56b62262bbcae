"""Files written whole or not at all, and JSON read with errors that name the file.

    with atomic_write(path) as file:          # path appears only if the block completes
        file.write(data)
    write_files(folder, {"a.json": text_a, "b.txt": text_b})   # all of them, or none changed
    values = read_json(path)                  # ValueError "PATH: not valid JSON (line 3: ...)"
    write_json(path, values)                  # indented, atomically
    with new_folder(folder) as staging: ...   # a whole folder: appears only if the block completes

A write goes to a hidden temporary beside the target (same file system, so the rename is
atomic), is fsynced, and renamed over the target. On any error, a full disk or Ctrl-C
included, the temporary is removed and the target keeps its old contents; a write error is
re-raised as an OSError that names the target ("no space left writing PATH").
Imports no torch (the tokenizer uses it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file opened with `mode` ("wb" or "w") that replaces `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with naming_write_errors(path):
            with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as file:
                yield file
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # make the rename itself durable
    finally:
        tmp.unlink(missing_ok=True)


def write_files(directory: str | os.PathLike, contents: Mapping[str, str | bytes]) -> None:
    """Write each name -> contents into `directory` (str as UTF-8), all or none.

    Every file is written to a temporary and fsynced before the first rename, so a full disk or
    an interruption while writing leaves every old file as it was; the renames that follow
    need no space. The renames go in the order given (put a manifest last).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temporaries = {name: _temporary(directory / name) for name in contents}
    try:
        for name, data in contents.items():
            with naming_write_errors(directory / name), open(temporaries[name], "wb") as file:
                file.write(data.encode("utf-8") if isinstance(data, str) else data)
                file.flush()
                os.fsync(file.fileno())
        for name, tmp in temporaries.items():
            os.replace(tmp, directory / name)
        fsync_dir(directory)
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text in `path`; ValueError naming the file if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}); the file is damaged") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in `path`; FileNotFoundError "PATH does not exist" for a missing file,
    ValueError naming the file and line if it is not valid JSON."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}); "
                         "the file is damaged or was cut short") from None


def write_json(path: str | os.PathLike, value: Any, indent: int = 2) -> None:
    """Write `value` as indented JSON and a newline, atomically (atomic_write)."""
    with atomic_write(path, "w") as file:
        file.write(json.dumps(value, indent=indent) + "\n")


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # errors that only a write raises


def write_error(path: str | os.PathLike, error: OSError) -> OSError:
    """An OSError of the same kind whose message names `path`: "no space left writing PATH"."""
    if error.errno in _FULL:
        what = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}.get(error.errno, "file too large")
        return OSError(error.errno, f"{what} writing {path}")
    return OSError(error.errno or errno.EIO, f"cannot write {path}: {error.strerror or error}")


@contextlib.contextmanager
def naming_write_errors(path: Path) -> Iterator[None]:
    """Re-raise a full disk in the block, or an OSError that a library wrapped in a RuntimeError
    (torch.save reports a failed write as "unexpected pos N vs M"), as write_error(path). Other
    errors pass unchanged: an OSError of a file the block reads already names that file."""
    try:
        yield
    except OSError as error:
        if error.errno not in _FULL:
            raise  # e.g. an input file the block reads: its own message names it
        raise write_error(path, error) from error
    except RuntimeError as error:
        cause = _os_error_in(error)
        if cause is None:
            raise
        raise write_error(path, cause) from error


def _os_error_in(error: BaseException | None) -> OSError | None:
    """The first OSError in error's chain of causes and contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """fsync a directory (its renames); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """A folder written whole or not at all: yields a sibling temporary folder that becomes
    `directory` when the with-block completes and is removed if it fails. `directory` must be
    absent or empty (FileExistsError otherwise, checked before and after)."""
    directory = Path(directory)
    _check_free(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _check_free(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_free(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} already exists and is not an empty folder; choose another")
