"""`fnlm train-bpe` and `fnlm tokenize`.

    fnlm train-bpe corpus.txt --vocab-size 10000 --special-token '<|endoftext|>' --out tok/
    fnlm tokenize --tokenizer tok/ corpus.txt corpus.npy

train-bpe writes vocab.json and merges.txt (GPT-2's format), special_tokens.json, manifest.json
(each file's size and sha256, which Tokenizer.load checks) and stats.json (wall time, peak RSS,
longest token); tokenize writes a .npy token array (uint16, or uint32 for vocabularies past
65,536 ids) that np.load(..., mmap_mode="r") maps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from ..files import write_files
from ..tokenizer.encode_file import encode_file
from ..tokenizer.tokenizer import SPECIAL_TOKENS_FILE, Tokenizer
from ..tokenizer.train_bpe import train_bpe

STATS_FILE = "stats.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train-bpe", help="train a byte-level BPE tokenizer on a UTF-8 text file",
                                  description=run_train_bpe.__doc__)
    train.add_argument("input", type=Path, help="UTF-8 text file")
    train.add_argument("--vocab-size", type=int, required=True, help="special tokens + 256 bytes + merges")
    train.add_argument("--special-token", action="append", default=[], dest="special_tokens", metavar="TOKEN",
                       help="a special token (repeatable), e.g. '<|endoftext|>'")
    train.add_argument("--out", type=Path, required=True, help="directory for the tokenizer files")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the tokenizer in --out if the folder is not empty (default: refuse)")
    train.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: all cores)")
    train.add_argument("--quiet", action="store_true", help="no progress line")
    train.set_defaults(run=run_train_bpe)

    tokenize = subparsers.add_parser("tokenize", help="encode a UTF-8 text file into a .npy token array",
                                     description=run_tokenize.__doc__)
    tokenize.add_argument("--tokenizer", type=Path, required=True, metavar="DIR",
                          help="directory with vocab.json and merges.txt")
    tokenize.add_argument("input", type=Path, help="UTF-8 text file")
    tokenize.add_argument("output", type=Path, help="the .npy file to write")
    tokenize.add_argument("--special-token", action="append", default=None, dest="special_tokens", metavar="TOKEN",
                          help=f"a special token (repeatable; default: DIR/{SPECIAL_TOKENS_FILE} if present)")
    tokenize.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    tokenize.add_argument("--quiet", action="store_true", help="no progress line")
    tokenize.set_defaults(run=run_tokenize)


def run_train_bpe(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer; write vocab.json, merges.txt, special_tokens.json,
    manifest.json and stats.json into --out. A non-empty --out is refused unless --overwrite;
    the files are replaced all or none (a full disk leaves the old tokenizer intact). A corpus
    too small for --vocab-size gives fewer tokens, with a warning."""
    check_output_folder(args.out, overwrite=args.overwrite)
    start = time.perf_counter()
    vocab, merges = train_bpe(args.input, args.vocab_size, args.special_tokens,
                              num_workers=args.workers, progress=not args.quiet)
    wall = time.perf_counter() - start
    specials = {token.encode("utf-8") for token in args.special_tokens}
    longest = max((token for token in vocab.values() if token not in specials), key=len)
    stats = {
        "input": str(args.input),
        "input_bytes": os.path.getsize(args.input),
        "vocab_size": len(vocab),
        "merges": len(merges),
        "wall_seconds": round(wall, 3),
        "peak_rss_mb": round(_peak_rss_mb(resource.RUSAGE_SELF), 1),
        "peak_rss_worker_mb": round(_peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
        "longest_token": longest.decode("utf-8", errors="replace"),
        "longest_token_bytes": len(longest),
    }
    Tokenizer(vocab, merges, args.special_tokens).save(args.out)
    write_files(args.out, {STATS_FILE: json.dumps(stats, indent=2, ensure_ascii=False) + "\n"})
    print(json.dumps(stats, ensure_ascii=False))
    return 0


def check_output_folder(folder: Path, *, overwrite: bool) -> None:
    """FileExistsError unless `folder` is absent, empty, or `overwrite` is set."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {folder} is a file, not a folder")
    if folder.is_dir() and not overwrite and (names := sorted(path.name for path in folder.iterdir())):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise FileExistsError(f"--out {folder} is not empty ({shown}); pass --overwrite to replace its tokenizer")


def run_tokenize(args: argparse.Namespace) -> int:
    """Encode a UTF-8 text file with a trained tokenizer, in parallel over chunks, into a .npy array."""
    tokenizer = Tokenizer.load(args.tokenizer, args.special_tokens)
    start = time.perf_counter()
    count = encode_file(tokenizer, args.input, args.output, num_workers=args.workers, progress=not args.quiet)
    wall = time.perf_counter() - start
    size = os.path.getsize(args.input)
    print(json.dumps({"tokens": count, "input_bytes": size, "wall_seconds": round(wall, 3),
                      "mb_per_second": round(size / 1e6 / wall, 2), "bytes_per_token": round(size / max(count, 1), 3)}))
    return 0


def _peak_rss_mb(who: int) -> float:
    """The peak resident set of this process (RUSAGE_SELF) or of its largest child."""
    return resource.getrusage(who).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
