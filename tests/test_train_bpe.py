"""BPE training: the reference merges and vocab within the contract's time, a naive trainer as the
oracle on random corpora, file chunking at cuts, special tokens, the CLI and bad input."""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from fnlm.tokenizer import Tokenizer, chunks, pretokenize, train_bpe
from fnlm.tokenizer.gpt2 import text_to_token
from tests import adapters
from tests.conftest import FIXTURES

EOT = "<|endoftext|>"


def test_train_bpe_matches_the_reference_within_the_contract_time():
    start = time.perf_counter()
    vocab, merges = adapters.run_train_bpe(FIXTURES / "corpus.en", 500, [EOT])
    elapsed = time.perf_counter() - start
    reference_merges = [tuple(text_to_token(part) for part in line.split(" "))
                        for line in (FIXTURES / "train-bpe-reference-merges.txt").read_text(encoding="utf-8").splitlines()]
    reference_vocab = {i: text_to_token(token) for token, i in
                       json.loads((FIXTURES / "train-bpe-reference-vocab.json").read_text(encoding="utf-8")).items()}
    assert merges == reference_merges
    assert vocab.keys() == reference_vocab.keys() and set(vocab.values()) == set(reference_vocab.values())
    assert elapsed < 1.5


def test_ids_are_special_tokens_then_bytes_then_merges():
    vocab, merges = train_bpe(FIXTURES / "tinystories_sample.txt", 300, [EOT, "<pad>"])
    assert vocab[0] == EOT.encode() and vocab[1] == b"<pad>"
    assert [vocab[2 + b] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert [vocab[258 + i] for i in range(len(merges))] == [a + b for a, b in merges]


def test_special_tokens_take_no_part_in_merges(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text((FIXTURES / "tinystories_sample.txt").read_text(encoding="utf-8") * 20, encoding="utf-8")
    vocab, merges = train_bpe(path, 800, [EOT])  # the sample supports 839 tokens
    assert not any(b"<|" in token for token in vocab.values() if token != EOT.encode())
    assert not any(b"<|" in a + b for a, b in merges)


def naive_train_bpe(text: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[bytes, bytes]]:
    """The handout's algorithm, recounting every pair at every merge."""
    parts = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
    counts = Counter(piece.encode() for part in parts for piece in pretokenize.PRETOKEN.findall(part))
    words = Counter({tuple(bytes([b]) for b in word): n for word, n in counts.items()})
    merges: list[tuple[bytes, bytes]] = []
    while 256 + len(special_tokens) + len(merges) < vocab_size:
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


CORPUS_TEXT = st.lists(
    st.one_of(st.text(st.sampled_from(list("aab ab  ba\n'sé中0 1.")), min_size=1, max_size=30),
              st.just(EOT), st.just("<|x|>")),
    max_size=30,
).map("".join)


@pytest.mark.filterwarnings("ignore:.*supports only .* merges:UserWarning")  # small texts run out of pairs
@given(CORPUS_TEXT, st.integers(0, 74), st.sampled_from([[], [EOT, "<|x|>"]]))
def test_train_bpe_equals_the_naive_algorithm_over_many_chunks(text, num_merges, special_tokens):
    vocab_size = 256 + len(special_tokens) + num_merges
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(chunks, "CHUNK_BYTES", 16):
        path = Path(tmp) / "corpus.txt"
        path.write_text(text, encoding="utf-8")
        _, merges = train_bpe(path, vocab_size, special_tokens, num_workers=1)
    assert merges == naive_train_bpe(text, vocab_size, special_tokens)


def test_parallel_pre_tokenization_equals_serial(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text((FIXTURES / "corpus.en").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 8192)
    assert len(chunks.chunk_boundaries(path, [EOT])) > 10
    serial = train_bpe(path, 400, [EOT], num_workers=1)
    assert train_bpe(path, 400, [EOT], num_workers=2) == serial
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1 << 20)
    assert train_bpe(path, 400, [EOT], num_workers=1) == serial


@pytest.fixture(scope="module")
def overlapping() -> Tokenizer:
    return Tokenizer.from_files(FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt", [EOT, EOT + EOT, "<|x|>"])


TEXT_WITH_SPECIALS = st.lists(
    st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),  # lone surrogates are not text
              st.sampled_from([EOT, EOT + EOT, "<|x|>", "ab c", "\n\n  x"])),
    max_size=40,
).map("".join)


@given(TEXT_WITH_SPECIALS, st.integers(1, 64))
def test_chunk_boundaries_are_cuts(overlapping, text, chunk_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text(text, encoding="utf-8")
        bounds = chunks.chunk_boundaries(path, overlapping.special_tokens, chunk_bytes)
        texts = [chunks.read_chunk(path, a, b) for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == len(text.encode()) and bounds == sorted(set(bounds))
    assert "".join(texts) == text
    assert [i for piece in texts for i in overlapping.encode(piece)] == overlapping.encode(text)


def test_train_bpe_cli_writes_loadable_files_and_stats(tmp_path):
    from fnlm import cli

    out = tmp_path / "tok"
    assert cli.main(["train-bpe", str(FIXTURES / "corpus.en"), "--vocab-size", "500", "--special-token", EOT,
                     "--out", str(out), "--quiet"]) == 0
    vocab, merges = train_bpe(FIXTURES / "corpus.en", 500, [EOT])
    loaded = Tokenizer.from_files(out / "vocab.json", out / "merges.txt")
    assert loaded.vocab == vocab and loaded.merges == merges
    assert json.loads((out / "special_tokens.json").read_text(encoding="utf-8")) == [EOT]
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["vocab_size"] == 500 and stats["wall_seconds"] > 0 and stats["peak_rss_mb"] > 0
    assert stats["longest_token_bytes"] == max(len(t) for t in vocab.values() if t != EOT.encode())


def test_bad_arguments_are_named(tmp_path):
    corpus = FIXTURES / "corpus.en"
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 257"):
        train_bpe(corpus, 256, [EOT])
    with pytest.raises(TypeError, match=r"special_tokens must be non-empty strings"):
        train_bpe(corpus, 300, [b"<|endoftext|>"])
    with pytest.raises(ValueError, match=r"special_tokens has repeats"):
        train_bpe(corpus, 300, [EOT, EOT])
    with pytest.raises(ValueError, match=r"num_workers must be a positive integer or None, got 0"):
        train_bpe(corpus, 300, [EOT], num_workers=0)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte 6"):
        train_bpe(bad, 300, [EOT])
    with pytest.raises(FileNotFoundError):
        train_bpe(tmp_path / "missing.txt", 300, [EOT])
