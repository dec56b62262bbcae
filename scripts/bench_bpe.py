"""BPE training: fnlm's train_bpe vs HF tokenizers' BpeTrainer, measured in the same run.

    uv run --extra bench python scripts/bench_bpe.py /tmp/english_corpus.txt --vocab-size 10000

Both sides train on the same file with the same vocabulary size and special token, each in its
own subprocess so they do not share a peak: HF with the GPT-2 regex as a Split pre-tokenizer
followed by ByteLevel (no regex of its own), fnlm with its defaults (all cores). Wall time is
taken around the training call inside the subprocess, and so is CPU time (all threads and
worker processes: a steadier measure when other jobs share the cores); peak RSS is the largest sum of RSS over
the subprocess and all its descendants (fnlm's workers, HF's threads live in one process),
sampled every 10 ms by psutil from this process, the same way for both. With --repeats > 1 the
sides alternate and the best time of each is kept (and the largest peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import psutil

SPECIAL = "<|endoftext|>"


def timed(function, *args, **kwargs) -> tuple[object, dict]:
    """function(*args, **kwargs) and its cost: wall seconds, and CPU seconds of this process's
    threads plus of the child processes it waited for (CPU time barely moves when other jobs
    share the cores)."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = function(*args, **kwargs)
    return result, {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_fnlm(corpus: str, vocab_size: int) -> dict:
    from fnlm.tokenizer import train_bpe

    (vocab, _), cost = timed(train_bpe, corpus, vocab_size, [SPECIAL])
    return {**cost, "vocab_size": len(vocab)}


def train_hf(corpus: str, vocab_size: int) -> dict:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from fnlm.tokenizer.pretokenize import GPT2_PATTERN

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    _, cost = timed(tokenizer.train, [corpus], trainer)
    return {**cost, "vocab_size": tokenizer.get_vocab_size()}


def run_side(argv: list[str]) -> dict:
    """Run `python THIS_SCRIPT --side ...` and return its JSON result plus "peak_rss_mb" of its tree."""
    process = psutil.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(_rss(p) for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.01)
    out = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {process.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": peak / 2**20}


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def best(results: list[dict]) -> dict:
    fastest = min(results, key=lambda r: r["seconds"])
    return {**fastest, "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--side", choices=["fnlm", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps((train_fnlm if args.side == "fnlm" else train_hf)(args.corpus, args.vocab_size)))
        return
    size_mb = os.path.getsize(args.corpus) / 1e6
    runs: dict[str, list[dict]] = {"fnlm": [], "hf": []}
    for _ in range(args.repeats):
        for side in runs:
            runs[side].append(run_side([__file__, args.corpus, "--vocab-size", str(args.vocab_size), "--side", side]))
    fnlm, hf = best(runs["fnlm"]), best(runs["hf"])
    print(f"corpus {args.corpus} ({size_mb:.1f} MB), vocab {args.vocab_size}, {os.cpu_count()} cores")
    for name, r in (("fnlm train_bpe", fnlm), ("HF tokenizers", hf)):
        print(f"  {name:15s} {r['seconds']:7.2f} s wall  {size_mb / r['seconds']:6.2f} MB/s  "
              f"{r['cpu_seconds']:7.2f} s CPU  peak RSS {r['peak_rss_mb']:6.0f} MB  vocab {r['vocab_size']}")
    print(f"  fnlm/HF: wall time {fnlm['seconds'] / hf['seconds']:.2f}  CPU time "
          f"{fnlm['cpu_seconds'] / hf['cpu_seconds']:.2f}  peak RSS {fnlm['peak_rss_mb'] / hf['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
