"""Encode a text file into a .npy token array, in parallel over chunks (`fnlm tokenize`)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..progress import Progress
from .chunks import chunk_boundaries, map_chunks, read_chunk
from .tokenizer import Tokenizer


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    """uint16 if every id fits, else uint32."""
    return np.dtype(np.uint16 if max(tokenizer.vocab) < 1 << 16 else np.uint32)


def encode_file(tokenizer: Tokenizer, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
                num_workers: int | None = None, progress: bool = True) -> int:
    """Write the ids of a UTF-8 file as a 1-D .npy array; returns how many there are.

    The file is cut into ~1 MB chunks at cuts (pretokenize.py), so chunks encode independently
    yet add up to tokenizer.encode(whole text); `num_workers` processes (default: all cores)
    encode them and this one writes them in order. The array appears under `output_path` only
    when complete: on any failure, Ctrl-C or a full disk included, no partial file is left
    (fnlm.files.atomic_write). An output that is the input is refused before anything is written.
    """
    output_path = Path(output_path)
    if _same_file(input_path, output_path):
        raise ValueError(f"the output {output_path} is the input {input_path}: writing it would destroy the text")
    dtype = token_dtype(tokenizer)
    bounds = chunk_boundaries(input_path, tokenizer.special_tokens)
    count = 0
    with atomic_write(output_path) as out, Progress("tokenize", total=bounds[-1], unit="B", enabled=progress) as bar:
        out.write(_npy_header(dtype, 0))  # rewritten below with the final length
        for size, ids in map_chunks(_encode_chunks, (tokenizer, input_path, dtype), bounds, num_workers, ordered=True):
            out.write(ids.tobytes())
            count += len(ids)
            bar.update(size, tokens=count)
        out.seek(0)
        out.write(_npy_header(dtype, count))
    return count


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether paths a and b name one existing file (through symlinks, '..' or hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _encode_chunks(tokenizer: Tokenizer, path: str | os.PathLike, dtype: np.dtype,
                   ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.array(tokenizer.encode(read_chunk(path, *r)), dtype=dtype) for r in ranges])


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header of a 1-D array; numpy pads it to 128 bytes whatever the length (up to
    20 digits), so the final header overwrites the placeholder exactly."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)}
    )
    assert len(header.getvalue()) == 128, "unexpected .npy header size"
    return header.getvalue()
