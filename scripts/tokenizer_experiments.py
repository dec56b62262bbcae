"""The handout's tokenizer problems (section 2): train_bpe_tinystories, train_bpe_expts_owt and
tokenizer_experiments, on the data we have, with JSON results under docs/tokenizer/.

    uv run python scripts/tokenizer_experiments.py all          # the four steps below, in order
    uv run python scripts/tokenizer_experiments.py train-ts     # TinyStories head, vocab 10,000 (+ profile)
    uv run python scripts/tokenizer_experiments.py train-en     # English stand-in, vocab 32,000
    uv run python scripts/tokenizer_experiments.py compare      # the two vocabularies side by side
    uv run python scripts/tokenizer_experiments.py experiments  # (a)-(d) of tokenizer_experiments

Data (the full TinyStories and OpenWebText are not available here):
  - TinyStories: /work/shared/data/tinystories_v1_train_head.txt (2.1 MB, the first 2,316 stories of
    TinyStories V1 train, `<|endoftext|>`-separated) trains the 10K tokenizer and is sampled;
    tinystories_v1_valid_head.txt (0.8 MB, V1 valid head, stories separated by blank lines only)
    is encoded as the validation data.
  - OpenWebText stand-in: the three english_*.txt.gz files concatenated (prose, technical docs,
    dictionary; 92 MB), built as WORK/english_corpus.txt in that order if absent. It has no
    validation split: (d) holds out every 50th document (the 32K tokenizer saw all of them).

Measurements: every timed job runs in its own subprocess (a cold start), with wall seconds and
CPU seconds (the process and its pool workers; steadier than wall time when other jobs share the
cores) and the peak of the summed RSS of the process tree, sampled every 10 ms (scripts/bench_bpe.py's
run_side). TinyStories tokenizer files go to docs/tokenizer/ts10k/ (small, committed); the 32K
tokenizer and the token arrays go to WORK (default /tmp/tokexp), too large to commit.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import hashlib
import json
import os
import pstats
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_bpe import run_side  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = "<|endoftext|>"
DATA = Path("/work/shared/data")
ENGLISH_PARTS = ["english_prose_literature.txt.gz", "english_technical_docs.txt.gz", "english_dictionary_gcide.txt.gz"]
TS_VOCAB, EN_VOCAB = 10_000, 32_000
PILE_BYTES = 825e9  # the handout's 825 GB
VALID_EVERY = 50  # English stand-in: documents 49, 99, ... (0-based) are the validation split


# ---------------------------------------------------------------------------------------------
# small helpers


def cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of a block: `with Clock() as c: ...; c.result`."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.result = {"wall_s": round(time.perf_counter() - self.wall, 3), "cpu_s": round(cpu_seconds() - self.cpu, 3)}


def write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON, with the machine's 1-minute load average at that moment (2 cores
    shared with other jobs: a load above the core count means the timings above were contended)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data.setdefault("load_average_1min_at_write", round(os.getloadavg()[0], 2))  # kept when adding to a file
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def child(job: str, **kwargs) -> dict:
    """Run `job` of this script in a fresh subprocess; its JSON result plus the tree's peak RSS."""
    result = run_side([__file__, "_child", job, json.dumps(kwargs)])
    result["peak_rss_tree_mb"] = round(result.pop("peak_rss_mb"), 1)
    return result


def text_of(token: bytes) -> str:
    return token.decode("utf-8", errors="backslashreplace")


def english_corpus(work: Path, data: Path) -> Path:
    """WORK/english_corpus.txt: the three english_* files concatenated in ENGLISH_PARTS order."""
    path = work / "english_corpus.txt"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        with open(partial, "wb") as out:
            for name in ENGLISH_PARTS:
                with gzip.open(data / name, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        os.replace(partial, path)
    return path


def english_part_bounds(data: Path) -> list[tuple[str, int]]:
    """(source name, end byte offset) of each part in the concatenated corpus."""
    bounds, end = [], 0
    for name in ENGLISH_PARTS:
        with gzip.open(data / name, "rb") as part:
            end += sum(len(block) for block in iter(lambda: part.read(1 << 22), b""))
        bounds.append((name.removeprefix("english_").removesuffix(".txt.gz"), end))
    return bounds


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def documents(text: str) -> list[str]:
    """The documents of a `<|endoftext|>`-separated text (surrounding newlines stripped, empty dropped)."""
    return [doc.strip("\n") for doc in text.split(SPECIAL) if doc.strip("\n")]


def load_tokenizer(directory: Path):
    from fnlm.tokenizer import Tokenizer

    return Tokenizer.load(directory)


# ---------------------------------------------------------------------------------------------
# jobs that run in a subprocess (`_child JOB KWARGS`)


def job_train(input: str, vocab_size: int, out: str) -> dict:
    """train_bpe as `fnlm train-bpe` runs it (all cores), timed as a whole and by phase.

    The phases come from wrapping two names inside fnlm.tokenizer.train_bpe during this run:
    count_pretokens (read + pre-tokenize + count, in the pool) and _State.__init__ (lay the
    distinct pre-tokens out, count byte pairs, build the heap); the rest is the merge loop.
    """
    import importlib

    from fnlm.tokenizer import Tokenizer

    tb = importlib.import_module("fnlm.tokenizer.train_bpe")  # the module (the package's name is the function)
    phases: dict[str, dict] = {}
    stats: dict[str, int] = {}
    count_pretokens, state_init = tb.count_pretokens, tb._State.__init__

    def timed_count(*args, **kwargs):
        with Clock() as clock:
            counts = count_pretokens(*args, **kwargs)
        phases["pretokenize"] = clock.result
        stats.update(distinct_pretokens=len(counts), pretokens=sum(counts.values()))
        return counts

    def timed_init(self, *args, **kwargs):
        with Clock() as clock:
            state_init(self, *args, **kwargs)
        phases["merge_setup"] = clock.result

    tb.count_pretokens, tb._State.__init__ = timed_count, timed_init
    with Clock() as total:
        vocab, merges = tb.train_bpe(input, vocab_size, [SPECIAL])
    phases["merge_loop"] = {key: round(total.result[key] - phases["pretokenize"][key] - phases["merge_setup"][key], 3)
                            for key in ("wall_s", "cpu_s")}
    out = Path(out)
    Tokenizer(vocab, merges, [SPECIAL]).save(out)
    rss = {who: resource.getrusage(w).ru_maxrss / 1024 for who, w in
           (("self", resource.RUSAGE_SELF), ("largest_worker", resource.RUSAGE_CHILDREN))}
    return {**total.result, "phases": phases, **stats, "vocab_size": len(vocab), "merges": len(merges),
            "peak_rss_self_mb": round(rss["self"], 1), "peak_rss_largest_worker_mb": round(rss["largest_worker"], 1)}


def job_profile(input: str, vocab_size: int, top: int = 15) -> dict:
    """cProfile of train_bpe with one worker, so that pre-tokenization runs (and is seen) here."""
    from fnlm.tokenizer import train_bpe

    profile = cProfile.Profile()
    with Clock() as clock:
        profile.runcall(train_bpe, input, vocab_size, [SPECIAL], num_workers=1)
    stats = pstats.Stats(profile)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        file = re.sub(r".*/(fnlm/|site-packages/|python3\.\d+/)", r"\1", file)
        rows.append({"function": f"{file}:{line}({name})" if line else name, "calls": calls,
                     "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3)})
    by_cum = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    return {**clock.result, "top_by_cumtime": by_cum, "top_by_tottime": by_tot}


def job_encode(tokenizer: str, input: str) -> dict:
    """Tokenizer.encode in this one process over the file's ~1 MB chunks (cold cache), as
    scripts/bench_encode.py does; times exclude loading the tokenizer and reading the file."""
    from fnlm.tokenizer.chunks import chunk_boundaries, read_chunk

    tok = load_tokenizer(Path(tokenizer))
    bounds = chunk_boundaries(input, [SPECIAL])
    texts = [read_chunk(input, start, end) for start, end in zip(bounds, bounds[1:])]
    with Clock() as clock:
        ids = [tok.encode(text) for text in texts]
    flat = np.fromiter((i for part in ids for i in part), dtype=np.uint32)
    return {**clock.result, "bytes": os.path.getsize(input), "tokens": len(flat),
            "digest": hashlib.sha256(flat.tobytes()).hexdigest()[:16]}


JOBS = {"train": job_train, "profile": job_profile, "encode": job_encode}


# ---------------------------------------------------------------------------------------------
# the vocabularies


def vocab_of(directory: Path) -> dict[int, bytes]:
    from fnlm.tokenizer import gpt2

    return gpt2.load_vocab(directory / "vocab.json")


def longest_tokens(vocab: dict[int, bytes], n: int = 10, words: bool = False) -> list[dict]:
    """The n longest tokens (ties by id); with `words`, only letters with an optional leading space."""
    tokens = [(i, t) for i, t in vocab.items()
              if t != SPECIAL.encode() and (not words or re.fullmatch(rb" ?[A-Za-z]+", t))]
    tokens.sort(key=lambda it: (-len(it[1]), it[0]))
    return [{"id": i, "token": text_of(t), "bytes": len(t)} for i, t in tokens[:n]]


KINDS = [  # (name, test on the token's bytes); the first that matches
    ("special", lambda t: t == SPECIAL.encode()),
    ("single byte", lambda t: len(t) == 1),
    ("non-ASCII (UTF-8 bytes)", lambda t: any(b >= 128 for b in t)),
    ("space + lowercase word", lambda t: re.fullmatch(rb" [a-z]+", t) is not None),
    ("space + capitalized word", lambda t: re.fullmatch(rb" [A-Z][a-z]*", t) is not None),
    ("space + all-caps word", lambda t: re.fullmatch(rb" [A-Z]{2,}", t) is not None),
    ("lowercase piece (no space)", lambda t: re.fullmatch(rb"[a-z]+", t) is not None),
    ("capitalized piece (no space)", lambda t: re.fullmatch(rb"[A-Z][a-z]*", t) is not None),
    ("other letters (all-caps piece, mixed case)", lambda t: re.fullmatch(rb" ?[A-Za-z]+", t) is not None),
    ("contraction ('s, 't, ...)", lambda t: re.fullmatch(rb"'(?:[sdmt]|ll|ve|re)", t) is not None),
    ("digits", lambda t: re.fullmatch(rb" ?[0-9]+", t) is not None),
    ("whitespace", lambda t: re.fullmatch(rb"\s+", t) is not None),
    ("punctuation / symbols", lambda t: re.fullmatch(rb" ?[^\sA-Za-z0-9]+", t) is not None),
]


def kind_of(token: bytes) -> str:
    return next((name for name, test in KINDS if test(token)), "other")


def vocab_profile(vocab: dict[int, bytes]) -> dict:
    kinds: dict[str, int] = {name: 0 for name, _ in KINDS}
    kinds["other"] = 0
    for token in vocab.values():
        kinds[kind_of(token)] += 1
    lengths = [len(t) for t in vocab.values() if len(t) > 1 and t != SPECIAL.encode()]
    return {"size": len(vocab), "kinds": {k: v for k, v in kinds.items() if v},
            "mean_bytes_of_merged_tokens": round(sum(lengths) / len(lengths), 2)}


# ---------------------------------------------------------------------------------------------
# steps


def train_repeated(repeats: int, **kwargs) -> dict:
    """The training job `repeats` times, each in a fresh process (training is deterministic, so
    each writes the same files): the run of median wall time, every run's times, the largest peak."""
    runs = [child("train", **kwargs) for _ in range(repeats)]
    median = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    return {"runs": len(runs), "median_run": median,
            "all_runs_wall_cpu_s": [[r["wall_s"], r["cpu_s"]] for r in runs],
            "peak_rss_tree_mb_max": max(r["peak_rss_tree_mb"] for r in runs)}


def train_ts(args: argparse.Namespace) -> None:
    source = args.data / "tinystories_v1_train_head.txt"
    out = args.docs / "ts10k"
    print(f"training the TinyStories tokenizer (vocab {TS_VOCAB:,}) on {source} ...", flush=True)
    train = train_repeated(args.repeats, input=str(source), vocab_size=TS_VOCAB, out=str(out))
    print("profiling it with cProfile (one worker) ...", flush=True)
    profile = child("profile", input=str(source), vocab_size=TS_VOCAB)
    vocab = vocab_of(out)
    result = {
        "command": "uv run python scripts/tokenizer_experiments.py train-ts",
        "data": f"{source} ({os.path.getsize(source):,} bytes; real TinyStories V1 train, first 2,316 stories; "
                "a stand-in for the full 2.1 GB TinyStories train)",
        "cpu_count": os.cpu_count(), "vocab_size": TS_VOCAB, "special_tokens": [SPECIAL],
        "tokenizer_files": str(out.relative_to(ROOT)),
        "training": train,
        "longest_tokens": longest_tokens(vocab),
        "profile_one_worker": profile,
    }
    write_json(args.docs / "train_bpe_tinystories.json", result)
    print(json.dumps(train), flush=True)


def train_en(args: argparse.Namespace) -> None:
    corpus = english_corpus(args.work, args.data)
    out = args.work / "en32k"
    print(f"training the stand-in tokenizer (vocab {EN_VOCAB:,}) on {corpus} ...", flush=True)
    train = train_repeated(args.repeats, input=str(corpus), vocab_size=EN_VOCAB, out=str(out))
    vocab = vocab_of(out)
    result = {
        "command": "uv run python scripts/tokenizer_experiments.py train-en",
        "data": f"{corpus} ({os.path.getsize(corpus):,} bytes, sha256 {sha256_file(corpus)[:16]}...): "
                f"{' + '.join(ENGLISH_PARTS)} concatenated, the English stand-in for OpenWebText",
        "cpu_count": os.cpu_count(), "vocab_size": EN_VOCAB, "special_tokens": [SPECIAL],
        "tokenizer_files": f"{out} (not committed: vocab.json + merges.txt are "
                           f"{(os.path.getsize(out / 'vocab.json') + os.path.getsize(out / 'merges.txt')) / 1e6:.2f} MB)",
        "training": train,
        "longest_tokens": longest_tokens(vocab, 20),
        "longest_word_tokens": longest_tokens(vocab, 10, words=True),
    }
    write_json(args.docs / "train_bpe_expts_owt.json", result)
    print(json.dumps(train), flush=True)


def compare(args: argparse.Namespace) -> None:
    ts, en = vocab_of(args.docs / "ts10k"), vocab_of(args.work / "en32k")
    ts_set, en_set = set(ts.values()), set(en.values())
    shared = ts_set & en_set

    def first_unique(vocab: dict[int, bytes], other: set[bytes], n: int = 30) -> list[str]:
        """Tokens the other vocabulary lacks, in merge order (the most frequent merges first)."""
        return [text_of(t) for i, t in sorted(vocab.items()) if len(t) > 1 and t not in other][:n]

    def share_of_first(vocab: dict[int, bytes], other: set[bytes], n: int) -> float:
        merged = [t for i, t in sorted(vocab.items()) if len(t) > 1 and t != SPECIAL.encode()][:n]
        return round(sum(t in other for t in merged) / len(merged), 4)

    result = {
        "command": "uv run python scripts/tokenizer_experiments.py compare",
        "tokenizers": {"ts10k": "docs/tokenizer/ts10k (TinyStories V1 train head, 2.1 MB)",
                       "en32k": f"{args.work / 'en32k'} (English stand-in for OWT, 92 MB)"},
        "shared_tokens": len(shared),
        "share_of_ts10k_in_en32k": round(len(shared) / len(ts_set), 4),
        "share_of_en32k_in_ts10k": round(len(shared) / len(en_set), 4),
        "share_of_first_n_merges_of_ts10k_in_en32k": {n: share_of_first(ts, en_set, n) for n in (100, 1000, 5000, 9743)},
        "profile": {"ts10k": vocab_profile(ts), "en32k": vocab_profile(en)},
        "ts10k_only_first_in_merge_order": first_unique(ts, en_set),
        "en32k_only_first_in_merge_order": first_unique(en, ts_set),
        "longest": {"ts10k": longest_tokens(ts, 5), "en32k": longest_tokens(en, 5)},
        "longest_words": {"ts10k": longest_tokens(ts, 5, words=True), "en32k": longest_tokens(en, 5, words=True)},
    }
    path = args.docs / "train_bpe_expts_owt.json"
    data = read_json(path) if path.exists() else {}
    data["comparison_with_ts10k"] = result
    write_json(path, data)


def sample_documents(text: str, n: int, seed: int) -> list[tuple[int, str]]:
    docs = documents(text)
    picks = sorted(random.Random(seed).sample(range(len(docs)), n))
    return [(i, docs[i]) for i in picks]


def compression(tokenizer, docs: list[str]) -> dict:
    sizes = [len(doc.encode("utf-8")) for doc in docs]
    counts = [len(tokenizer.encode(doc)) for doc in docs]
    return {"bytes": sum(sizes), "tokens": sum(counts), "bytes_per_token": round(sum(sizes) / sum(counts), 3),
            "per_document": [round(s / c, 3) for s, c in zip(sizes, counts)]}


def show_tokens(tokenizer, text: str) -> list[str]:
    return [text_of(tokenizer.vocab[i]) for i in tokenizer.encode(text)]


def experiments(args: argparse.Namespace) -> None:
    from fnlm.tokenizer.encode_file import token_dtype

    ts_dir, en_dir = args.docs / "ts10k", args.work / "en32k"
    ts_tok, en_tok = load_tokenizer(ts_dir), load_tokenizer(en_dir)
    ts_train, ts_valid = args.data / "tinystories_v1_train_head.txt", args.data / "tinystories_v1_valid_head.txt"
    corpus = english_corpus(args.work, args.data)
    en_text = corpus.read_text(encoding="utf-8")
    parts = english_part_bounds(args.data)

    # (a) and (b): 10 documents of each, with a fixed seed, under each tokenizer
    ts_docs = sample_documents(ts_train.read_text(encoding="utf-8"), 10, args.seed)
    en_all = documents(en_text)
    en_docs = sample_documents(en_text, 10, args.seed)
    starts, offset = [], 0  # byte offset of each English document, for its source file
    for piece in en_text.split(SPECIAL):
        if piece.strip("\n"):
            starts.append(offset + len(piece.encode()) - len(piece.lstrip("\n").encode()))
        offset += len(piece.encode()) + len(SPECIAL)

    def source(index: int) -> str:
        return next(name for name, end in parts if starts[index] < end)

    def describe(docs, where) -> list[dict]:
        return [{"index": i, **({"source": where(i)} if where else {}), "bytes": len(d.encode()),
                 "starts": d[:70]} for i, d in docs]

    ts_texts, en_texts = [d for _, d in ts_docs], [d for _, d in en_docs]
    en_example = next(line for line in en_texts[0].splitlines() if len(line) > 60)[:200]
    ts_example = ts_texts[0].splitlines()[0][:200]
    sampling = {
        "seed": args.seed, "how": "random.Random(seed).sample over the documents split at <|endoftext|>",
        "tinystories": {"file": str(ts_train), "documents": len(documents(ts_train.read_text(encoding="utf-8"))),
                        "note": "sampled from the train head (the tokenizer's training text): the valid head "
                                "has no <|endoftext|> markers, only blank lines, so its stories cannot be told apart",
                        "sample": describe(ts_docs, None)},
        "english_stand_in": {"file": str(corpus), "documents": len(en_all),
                             "note": "the 32K tokenizer's training text; the three files are joined without a "
                                     "separator, so the last document of one and the first of the next count as one",
                             "sample": describe(en_docs, source)},
    }
    part_a = {"ts10k_on_tinystories": compression(ts_tok, ts_texts),
              "en32k_on_english_stand_in": compression(en_tok, en_texts)}
    part_b = {"ts10k_on_english_stand_in": compression(ts_tok, en_texts),
              "en32k_on_tinystories": compression(en_tok, ts_texts),
              "example_english_line": {"text": en_example, "ts10k": show_tokens(ts_tok, en_example),
                                       "en32k": show_tokens(en_tok, en_example)},
              "example_tinystories_line": {"text": ts_example, "ts10k": show_tokens(ts_tok, ts_example),
                                           "en32k": show_tokens(en_tok, ts_example)}}
    by_source: dict[str, list[str]] = {}
    for i, doc in en_docs:
        by_source.setdefault(source(i), []).append(doc)
    part_b["by_source_bytes_per_token"] = {
        name: {"documents": len(docs), "en32k": compression(en_tok, docs)["bytes_per_token"],
               "ts10k": compression(ts_tok, docs)["bytes_per_token"]} for name, docs in by_source.items()}
    single = {}
    for name, tok in (("ts10k", ts_tok), ("en32k", en_tok)):
        ids = tok.encode(en_texts[0] + "\n" + ts_texts[0])
        single[name] = round(sum(len(tok.vocab[i]) == 1 for i in ids) / len(ids), 4)
    part_b["share_of_single_byte_tokens_on_sample_en0_plus_ts0"] = single
    del en_text, en_all

    # (c) and (d): encode the data; Tokenizer.encode in one process, `fnlm tokenize` on all cores
    out = args.work / "data"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("ts_train", ts_dir, ts_train), ("ts_valid", ts_dir, ts_valid), ("en_all", en_dir, corpus)]
    part_c: dict[str, dict] = {"note": "cold tokenizer in a fresh process each time, the fastest of --repeats runs "
                                       "(each run listed); bytes are UTF-8 input bytes"}
    part_d: dict[str, dict] = {}
    for name, tok_dir, path in jobs:
        print(f"encoding {path.name} with {tok_dir.name}: one process, then `fnlm tokenize` ...", flush=True)
        npy = out / f"{name}.npy"
        ones, clis = [], []
        for _ in range(args.repeats):  # alternating; the fastest of each is kept (others' jobs share the cores)
            ones.append(child("encode", tokenizer=str(tok_dir), input=str(path)))
            clis.append(cli_tokenize(tok_dir, path, npy))
        one = min(ones, key=lambda r: r["wall_s"])
        cli = {**min(clis, key=lambda r: r["encode_wall_s"]), "all_runs_encode_wall_s": [r["encode_wall_s"] for r in clis]}
        one["all_runs_wall_cpu_s"] = [[r["wall_s"], r["cpu_s"]] for r in ones]
        ids = np.load(npy, mmap_mode="r")
        same = hashlib.sha256(np.asarray(ids, dtype=np.uint32).tobytes()).hexdigest()[:16] == one["digest"]
        tok = ts_tok if tok_dir == ts_dir else en_tok
        round_trip = tok.decode(ids.tolist()) == path.read_text(encoding="utf-8")
        size = os.path.getsize(path)
        part_c[name] = {
            "file": str(path), "bytes": size, "tokenizer": tok_dir.name,
            "encode_one_process": {**{k: one[k] for k in ("wall_s", "cpu_s", "peak_rss_tree_mb", "all_runs_wall_cpu_s")},
                                   "bytes_per_s": round(size / one["wall_s"]), "bytes_per_cpu_s": round(size / one["cpu_s"])},
            "fnlm_tokenize_all_cores": {**cli, "bytes_per_s": round(size / cli["encode_wall_s"])},
            "same_ids": same,
        }
        part_d[name] = {"file": str(path), "tokenizer": tok_dir.name, "array": str(npy), "dtype": str(ids.dtype),
                        "tokens": int(len(ids)), "max_id": int(ids.max()), "array_bytes": int(ids.nbytes),
                        "bytes_per_token": round(size / len(ids), 3), "decode_round_trip": round_trip}
    # (b) on whole files as well: the cross pairs, and the English corpus source by source
    print("encoding english_corpus.txt with ts10k (`fnlm tokenize`) and the TinyStories heads with en32k ...", flush=True)
    cross = cli_tokenize(ts_dir, corpus, out / "en_all_ts10k.npy")
    part_c["en_all_with_ts10k"] = {"file": str(corpus), "tokenizer": "ts10k",
                                   "fnlm_tokenize_all_cores": {**cross, "bytes_per_s": round(os.path.getsize(corpus) / cross["encode_wall_s"])}}
    whole: dict[str, dict] = {}
    for name, path in (("ts_train_head", ts_train), ("ts_valid_head (held out from both tokenizers)", ts_valid)):
        whole[name] = {"ts10k": part_d[name[:8]]["bytes_per_token"],
                       "en32k": round(os.path.getsize(path) / len(en_tok.encode(path.read_text(encoding="utf-8"))), 3)}
    whole["english_stand_in"] = {
        "ts10k": bytes_per_token_by_part(np.load(out / "en_all_ts10k.npy"), ts_tok, parts),
        "en32k": bytes_per_token_by_part(np.load(out / "en_all.npy"), en_tok, parts)}
    part_b["whole_files_bytes_per_token"] = whole
    os.remove(out / "en_all_ts10k.npy")
    # the English stand-in: split at document boundaries into train and every 50th document as valid
    part_d.update(split_english(out / "en_all.npy", en_tok, out))
    part_d["dtype_chosen_by"] = "fnlm.tokenizer.encode_file.token_dtype: uint16 if every id < 65,536, else uint32"
    part_d["token_dtype"] = {"ts10k": str(token_dtype(ts_tok)), "en32k": str(token_dtype(en_tok))}

    en_c = part_c["en_all"]
    one_rate, cli_rate = en_c["encode_one_process"]["bytes_per_s"], en_c["fnlm_tokenize_all_cores"]["bytes_per_s"]
    cpu_rate = en_c["encode_one_process"]["bytes_per_cpu_s"]
    part_c["pile_estimate"] = {
        "pile_bytes": PILE_BYTES, "basis": "the English stand-in (92 MB) with the 32K tokenizer",
        "hours_one_process": round(PILE_BYTES / one_rate / 3600, 1),
        f"hours_fnlm_tokenize_{os.cpu_count()}_cores": round(PILE_BYTES / cli_rate / 3600, 1),
        "cpu_hours_one_process": round(PILE_BYTES / cpu_rate / 3600, 1),
        "cpu_hours_fnlm_tokenize": round(PILE_BYTES * en_c["fnlm_tokenize_all_cores"]["process_cpu_s"] / en_c["bytes"] / 3600, 1),
        "note": "linear extrapolation from this text; text with more distinct pre-tokens (code, other "
                "languages) encodes slower, text with fewer (the TinyStories heads) faster",
    }
    result = {
        "command": "uv run python scripts/tokenizer_experiments.py experiments",
        "data_note": "TinyStories = V1 train/valid heads (2.1 MB / 0.8 MB); OpenWebText = the 92 MB English "
                     "stand-in (prose + technical docs + dictionary)",
        "cpu_count": os.cpu_count(),
        "sampling": sampling, "a_compression": part_a, "b_cross": part_b, "c_throughput": part_c, "d_encode": part_d,
    }
    write_json(args.docs / "tokenizer_experiments.json", result)
    print(json.dumps({"a": {k: v["bytes_per_token"] for k, v in part_a.items()},
                      "b": {k: v["bytes_per_token"] for k, v in part_b.items() if "bytes_per_token" in v},
                      "pile": part_c["pile_estimate"]}), flush=True)


def bytes_per_token_by_part(ids: np.ndarray, tokenizer, parts: list[tuple[str, int]]) -> dict:
    """Bytes per token over the whole array and over each source file's stretch of it (a token
    belongs to the part where it ends)."""
    lengths = np.array([len(tokenizer.vocab.get(i, b"")) for i in range(max(tokenizer.vocab) + 1)])
    ends = np.cumsum(lengths[ids])
    result, start_byte, start_token = {"all": round(int(ends[-1]) / len(ids), 3)}, 0, 0
    for name, end in parts:
        end_token = int(np.searchsorted(ends, end, side="right"))
        result[name] = round((end - start_byte) / (end_token - start_token), 3)
        start_byte, start_token = end, end_token
    return result


def cli_tokenize(tok_dir: Path, path: Path, npy: Path) -> dict:
    """`fnlm tokenize --tokenizer DIR IN OUT` (python -m fnlm) as a subprocess: its own report of
    the encoding's wall time, and the process tree's wall, CPU (including start-up and loading
    the tokenizer) and peak RSS."""
    import psutil

    argv = [sys.executable, "-m", "fnlm", "tokenize", "--tokenizer", str(tok_dir), str(path), str(npy), "--quiet"]
    with Clock() as clock:
        process = psutil.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.01)
    if process.returncode:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {process.returncode}")
    report = json.loads(process.stdout.read().strip().splitlines()[-1])
    return {"command": f"uv run fnlm tokenize --tokenizer {tok_dir} {path} {npy}",
            "encode_wall_s": report["wall_seconds"], "process_wall_s": clock.result["wall_s"],
            "process_cpu_s": clock.result["cpu_s"], "peak_rss_tree_mb": round(peak / 2**20, 1)}


def split_english(path: Path, tokenizer, out: Path) -> dict:
    """en_train.npy / en_valid.npy from en_all.npy: documents (each with the <|endoftext|> after it)
    whose index is VALID_EVERY - 1 mod VALID_EVERY go to valid. Special tokens are cuts, so this
    equals encoding the two texts on their own."""
    ids = np.load(path)
    eot = tokenizer.encode(SPECIAL)[0]
    docs = np.split(ids, np.flatnonzero(ids == eot) + 1)
    docs = [d for d in docs if len(d)]
    valid = [d for i, d in enumerate(docs) if i % VALID_EVERY == VALID_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % VALID_EVERY != VALID_EVERY - 1]
    result = {}
    for name, parts in (("en_train", train), ("en_valid", valid)):
        array = np.concatenate(parts)
        np.save(out / f"{name}.npy", array)
        result[name] = {"array": str(out / f"{name}.npy"), "dtype": str(array.dtype), "documents": len(parts),
                        "tokens": int(len(array)), "array_bytes": int(array.nbytes),
                        "split": f"documents i with i % {VALID_EVERY} == {VALID_EVERY - 1} are valid"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["all", "train-ts", "train-en", "compare", "experiments", "_child"])
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the shared data files")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tokexp"),
                        help="large outputs: the English corpus, the 32K tokenizer, token arrays")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "tokenizer", help="JSON results, TS tokenizer")
    parser.add_argument("--seed", type=int, default=0, help="for sampling documents")
    parser.add_argument("--repeats", type=int, default=3, help="training runs to time (the median is reported)")
    args = parser.parse_args()
    if args.step == "_child":
        job, kwargs = args.rest
        print(json.dumps(JOBS[job](**json.loads(kwargs))))
        return
    args.docs, args.work = args.docs.resolve(), args.work.resolve()
    steps = {"train-ts": [train_ts], "train-en": [train_en], "compare": [compare], "experiments": [experiments],
             "all": [train_ts, train_en, compare, experiments]}[args.step]
    with Clock() as clock:
        for step in steps:
            step(args)
    print(f"{args.step}: {clock.result['wall_s']:.0f} s wall", flush=True)


if __name__ == "__main__":
    main()
