"""Encoding speed: fnlm (one process, and `fnlm tokenize` on all cores) vs tiktoken (one thread).

    uv run --extra bench python scripts/bench_encode.py /tmp/english_corpus.txt

All three use GPT-2's vocabulary and merges (tests/fixtures; tiktoken's Encoding is built from
them offline) with '<|endoftext|>' as a special token, so their ids must agree, and the script
checks that they do. Each side runs in its own subprocess with a cold tokenizer:
  - fnlm encode: Tokenizer.encode over the file's ~1 MB chunks (cut at cuts), one process;
  - tiktoken: Encoding.encode over the same chunks, one thread;
  - fnlm tokenize: encode_file (what `fnlm tokenize` runs) from the file to a .npy, all cores.
Times exclude loading the tokenizer and reading the file (tokenize includes its own reads and
writes). MB/s are of UTF-8 input. CPU seconds (all threads and worker processes) are printed
beside wall seconds: on a machine that other jobs share they show what each side costs.
With --repeats > 1 the sides alternate and the best time of each is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_bpe import best, run_side, timed

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SPECIAL = "<|endoftext|>"


def load_fnlm():
    from fnlm.tokenizer import Tokenizer

    return Tokenizer.from_files(FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt", [SPECIAL])


def load_tiktoken():
    import tiktoken

    from fnlm.tokenizer.gpt2 import text_to_token
    from fnlm.tokenizer.pretokenize import GPT2_PATTERN

    vocab = json.loads((FIXTURES / "gpt2_vocab.json").read_text(encoding="utf-8"))
    ranks = {text_to_token(token): i for token, i in vocab.items() if token != SPECIAL}
    return tiktoken.Encoding("gpt2-fixture", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={SPECIAL: vocab[SPECIAL]})


def chunks(corpus: str) -> list[str]:
    from fnlm.tokenizer.chunks import chunk_boundaries, read_chunk

    bounds = chunk_boundaries(corpus, [SPECIAL])
    return [read_chunk(corpus, start, end) for start, end in zip(bounds, bounds[1:])]


def digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.uint32).tobytes()).hexdigest()[:16]


def side(name: str, corpus: str) -> dict:
    if name == "tokenize":
        from fnlm.tokenizer.encode_file import encode_file

        tokenizer = load_fnlm()
        with tempfile.TemporaryDirectory() as tmp:
            _, cost = timed(encode_file, tokenizer, corpus, Path(tmp) / "ids.npy", progress=False)
            ids = np.load(Path(tmp) / "ids.npy")
        return {**cost, "tokens": len(ids), "digest": digest(ids)}
    texts = chunks(corpus)
    if name == "fnlm":
        encode = load_fnlm().encode
    else:
        encoding = load_tiktoken()

        def encode(text: str) -> list[int]:
            return encoding.encode(text, allowed_special={SPECIAL})
    ids, cost = timed(lambda: [encode(text) for text in texts])
    flat = np.fromiter((i for part in ids for i in part), dtype=np.uint32)
    return {**cost, "tokens": len(flat), "digest": digest(flat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--side", choices=["fnlm", "tiktoken", "tokenize"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.corpus)))
        return
    size_mb = os.path.getsize(args.corpus) / 1e6
    runs: dict[str, list[dict]] = {"tiktoken": [], "fnlm": [], "tokenize": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(run_side([__file__, args.corpus, "--side", name]))
    result = {name: best(r) for name, r in runs.items()}
    print(f"corpus {args.corpus} ({size_mb:.1f} MB), GPT-2 vocabulary, {os.cpu_count()} cores")
    labels = {"tiktoken": "tiktoken, 1 thread", "fnlm": "fnlm encode, 1 process",
              "tokenize": f"fnlm tokenize, {os.cpu_count()} procs"}
    tiktoken = result["tiktoken"]
    for name, r in result.items():
        print(f"  {labels[name]:24s} {size_mb / r['seconds']:6.2f} MB/s  ratio {tiktoken['seconds'] / r['seconds']:.2f}"
              f"  ({r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, peak RSS {r['peak_rss_mb']:.0f} MB)")
    print(f"  by CPU time: fnlm encode {tiktoken['cpu_seconds'] / result['fnlm']['cpu_seconds']:.2f} x tiktoken; "
          f"fnlm tokenize on {os.cpu_count()} idle cores (CPU time / {os.cpu_count()}) "
          f"{tiktoken['cpu_seconds'] * os.cpu_count() / result['tokenize']['cpu_seconds']:.2f} x tiktoken")
    same = len({r["digest"] for r in result.values()}) == 1
    print("  ids identical on all three sides" if same else "  IDS DIFFER between sides")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
