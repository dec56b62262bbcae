"""The Tokenizer against tiktoken's GPT-2 encoding (built offline from the fixtures), round trips,
streaming under a memory limit, the cut points it relies on, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from itertools import accumulate

import numpy as np
import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from fnlm.tokenizer import Tokenizer, train_bpe
from fnlm.tokenizer.bpe import Merger
from fnlm.tokenizer.gpt2 import text_to_token
from fnlm.tokenizer.pretokenize import GPT2_PATTERN, PRETOKEN, last_cut, pretokenize
from fnlm.tokenizer.tokenizer import CACHE_SIZE
from tests import adapters
from tests.conftest import FIXTURES

EOT = "<|endoftext|>"
VOCAB, MERGES = FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt"
TEXTS = ["address.txt", "german.txt", "tinystories_sample.txt", "corpus.en"]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_files(VOCAB, MERGES, [EOT])


@pytest.fixture(scope="module")
def gpt2_plain() -> Tokenizer:
    return Tokenizer.from_files(VOCAB, MERGES)


@pytest.fixture(scope="module")
def overlapping() -> Tokenizer:
    return Tokenizer.from_files(VOCAB, MERGES, [EOT, EOT + EOT, "<|x|>"])


@pytest.fixture(scope="module")
def oracle() -> tiktoken.Encoding:
    vocab = json.loads(VOCAB.read_text(encoding="utf-8"))
    ranks = {text_to_token(token): i for token, i in vocab.items() if token != EOT}
    return tiktoken.Encoding("gpt2-fixture", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: vocab[EOT]})


# Text that exercises the regex: contractions, digits, runs of spaces and newlines, non-ASCII
# letters, marks and digits, punctuation, special-token fragments.
UNICODE_TEXT = st.text(
    st.one_of(st.sampled_from(list("ab Z09'sltvre  \n\t\r\x0b\x0c\x1c.,!-<|>") + ["é", "中", "\u00a0", "\u2003", "²",
                                                                               "\u0301", "’", "🙂", "\x85", "ß"]),
              st.characters(blacklist_categories=("Cs",))),  # lone surrogates are not text
    max_size=60,
)


# -- tiktoken is the oracle -----------------------------------------------------------------------

@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_tiktoken_on_fixture_texts(gpt2, gpt2_plain, oracle, name):
    text = (FIXTURES / name).read_text(encoding="utf-8")
    assert gpt2.encode(text) == oracle.encode(text, allowed_special={EOT})
    assert gpt2_plain.encode(text) == oracle.encode(text, disallowed_special=())


def test_encode_matches_tiktoken_around_special_tokens(gpt2, oracle):
    text = f"Hello{EOT} world!{EOT}{EOT}\n\n{EOT}  x {EOT}"
    assert gpt2.encode(text) == oracle.encode(text, allowed_special={EOT})


@given(UNICODE_TEXT)
def test_encode_matches_tiktoken_on_any_text(gpt2_plain, oracle, text):
    assert gpt2_plain.encode(text) == oracle.encode(text, disallowed_special=())


def test_adapter_builds_the_tokenizer(oracle):
    vocab = {i: text_to_token(t) for t, i in json.loads(VOCAB.read_text(encoding="utf-8")).items()}
    merges = [tuple(text_to_token(p) for p in line.split(" ")) for line in MERGES.read_text(encoding="utf-8").splitlines()]
    tokenizer = adapters.get_tokenizer(vocab, merges, [EOT])
    text = (FIXTURES / "tinystories_sample.txt").read_text(encoding="utf-8")
    assert tokenizer.encode(text) == oracle.encode(text, allowed_special={EOT})


# -- round trips and special tokens ---------------------------------------------------------------

@given(st.lists(st.one_of(UNICODE_TEXT, st.sampled_from([EOT, EOT + EOT, "<|x|>"])), max_size=6))
def test_decode_inverts_encode_with_special_tokens_anywhere(overlapping, parts):
    text = "".join(parts)
    assert overlapping.decode(overlapping.encode(text)) == text


def test_overlapping_special_tokens_longest_match_wins(overlapping):
    tokenizer = overlapping
    eot, double = tokenizer.encode(EOT), tokenizer.encode(EOT + EOT)
    assert len(eot) == 1 and len(double) == 1 and eot != double
    ids = tokenizer.encode(f"a{EOT}{EOT}{EOT}b")
    assert ids[1:3] == double + eot
    assert tokenizer.decode(ids) == f"a{EOT}{EOT}{EOT}b"


def test_new_special_tokens_get_new_ids(gpt2):
    tokenizer = Tokenizer(gpt2.vocab, gpt2.merges, ["<|pad|>", EOT])
    assert tokenizer.encode("<|pad|>") == [max(gpt2.vocab) + 1]
    assert tokenizer.encode(EOT) == [50256]
    assert gpt2.encode("<|pad|>") != [max(gpt2.vocab) + 1]


def test_decode_replaces_invalid_utf8(gpt2):
    ids = {token: i for i, token in gpt2.vocab.items()}
    assert gpt2.decode([ids[b"a"], ids[b"\xe2"], ids[b"\x82"], ids[b"b"]]) == "a\ufffdb"  # 2 of the 3 bytes of €
    assert gpt2.decode([]) == ""


def test_batched_and_single_piece_merging_agree(gpt2):
    merger = gpt2._cache.merger
    rng = random.Random(0)
    pieces = [*{p for name in TEXTS for p in pretokenize((FIXTURES / name).read_text(encoding="utf-8"))}]
    pieces += ["".join(rng.choice("aab  \n'é中") for _ in range(rng.randint(1, 40))) for _ in range(300)]
    assert merger._batch(pieces) == [merger.one(piece) for piece in pieces]


def test_merger_handles_runs_of_one_pair():
    # merges: (a, a) -> 256, (256, 256) -> 257: "aaaaa" is [257, a] left to right
    a = ord("a")
    merger = Merger(range(256), [(a, a, 256), (256, 256, 257)])
    pieces = ["a" * n for n in range(1, 9)] * 40  # enough pieces for the numpy path
    assert merger._batch(pieces) == [merger.one(p) for p in pieces]
    assert merger.one("aaaaa") == (257, a)


# -- pre-tokenization and cuts ----------------------------------------------------------------------

@given(UNICODE_TEXT)
def test_pretokenize_equals_the_gpt2_regex(text):
    assert pretokenize(text) == PRETOKEN.findall(text)


@given(UNICODE_TEXT, UNICODE_TEXT)
def test_last_cut_is_a_cut_that_more_text_keeps(overlapping, text, more):
    cut = last_cut(text, overlapping.special_tokens)
    assert 0 <= cut < max(len(text), 1)
    whole = text + more
    assert overlapping.encode(whole) == overlapping.encode(whole[:cut]) + overlapping.encode(whole[cut:])


# -- streaming --------------------------------------------------------------------------------------

@given(st.lists(st.one_of(UNICODE_TEXT, st.sampled_from([EOT, EOT + EOT, "<|x|>"])), max_size=8),
       st.lists(st.integers(0, 400), max_size=12))
def test_encode_iterable_equals_encode_for_any_chunking(overlapping, parts, cuts):
    text = "".join(parts) * 40  # long enough to cross the streaming block
    bounds = sorted({0, len(text), *(min(c * 7, len(text)) for c in cuts)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(overlapping.encode_iterable(chunks)) == overlapping.encode(text)


def test_encode_iterable_over_a_file_equals_encode(gpt2):
    path = FIXTURES / "tinystories_sample.txt"
    with open(path, encoding="utf-8") as file:
        assert list(gpt2.encode_iterable(file)) == gpt2.encode(path.read_text(encoding="utf-8"))


_STREAM_UNDER_LIMIT = r"""
import resource, sys
import psutil
from fnlm.tokenizer import Tokenizer

vocab, merges, path, cache_size = sys.argv[1:]
tokenizer = Tokenizer.from_files(vocab, merges, ["<|endoftext|>"], cache_size=int(cache_size))
count = digest = 0
stream = tokenizer.encode_iterable(open(path, encoding="utf-8"))
rss = psutil.Process().memory_info().rss
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (rss + 1_000_000, hard))
try:
    for token in stream:  # the whole stream runs under the limit
        count, digest = count + 1, (digest * 1_000_003 + token) % (1 << 61)
finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
print(count, digest)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS semantics")
@pytest.mark.parametrize("novel, cache_size", [(0.0, CACHE_SIZE), (0.1, 1 << 13)], ids=["default-cache", "churning-cache"])
def test_encode_iterable_streams_5mb_under_rss_plus_1mb(tmp_path, gpt2, novel, cache_size):
    """A fresh process (no torch: its address space is far above its RSS) builds a tokenizer,
    sets RLIMIT_AS to RSS + 1 MB, and only then pulls every id of a 5 MB file through
    encode_iterable, keeping a count and a rolling hash. As the address space already exceeds
    that limit, nothing may map new memory: the stream must live in what the process holds.

    The first file has fixture-like vocabulary (the default cache takes all its pre-tokens);
    in the second every tenth word is one of 20,000 random ones, so an 8,192-entry cache keeps
    evicting under the limit.
    """
    path = tmp_path / "stream.txt"
    path.write_text(_mixed_text(5_000_000, novel, seed=0), encoding="utf-8")
    ids = gpt2.encode(path.read_text(encoding="utf-8"))
    expected = f"{len(ids)} {_rolling_hash(ids)}"
    run = subprocess.run([sys.executable, "-c", _STREAM_UNDER_LIMIT, str(VOCAB), str(MERGES), str(path), str(cache_size)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == expected


def _mixed_text(size: int, novel: float, seed: int) -> str:
    """~size characters of fixture words in random order, a fraction `novel` of them drawn from
    20,000 random lowercase words, in documents of 500 words separated by end-of-text tokens."""
    rng = random.Random(seed)
    words = " ".join((FIXTURES / name).read_text(encoding="utf-8") for name in TEXTS).split(" ")
    made_up = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 10))) for _ in range(20_000)]
    picks = rng.choices(words, k=size // 5)
    for i in rng.sample(range(len(picks)), int(novel * len(picks))):
        picks[i] = rng.choice(made_up)
    text = f"\n{EOT}\n".join(" ".join(picks[i : i + 500]) for i in range(0, len(picks), 500))
    return (text * (size // len(text) + 1))[:size]


def _rolling_hash(ids: list[int]) -> int:
    return list(accumulate(ids, lambda h, token: (h * 1_000_003 + token) % (1 << 61), initial=0))[-1]


# -- files and bad input ----------------------------------------------------------------------------

def test_save_and_from_files_round_trip(tmp_path, gpt2):
    gpt2.save(tmp_path)
    loaded = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", [EOT])
    assert loaded.vocab == gpt2.vocab and loaded.merges == gpt2.merges
    text = (FIXTURES / "german.txt").read_text(encoding="utf-8")
    assert loaded.encode(text) == gpt2.encode(text)


@pytest.mark.parametrize("vocab_text, merges_text, message", [
    ('{"a": 0,\n "b": 1', "", r"vocab.json:2: not valid JSON"),
    ("[1, 2]", "", r"vocab.json:1: expected a JSON object"),
    ('{"a": 0,\n "b": 0}', "", r"vocab.json:2: id 0 is given to both 'a' and 'b'"),
    ('{"a": 0,\n "a": 1}', "", r"vocab.json:2: token 'a' appears twice"),
    ('{"a": 0,\n "b": "1"}', "", r"vocab.json:2: the id of 'b' must be a non-negative integer"),
    ('{"a": 0,\n "a b": 1}', "", r"vocab.json:2: token 'a b' has ' ' \(U\+0020\)"),
    (None, "#version: 0.2\nĠ t\nĠ\n", r"merges.txt:3: expected two tokens separated by one space"),
    (None, "Ġ t\nq \u2603\n", r"merges.txt:2: token '\u2603' has"),
    (None, "Ġ t\nĠ t\n", r"merges.txt:2: merge 'Ġ t' repeats .*merges.txt:1"),
    (None, "Ġ t\nĠt Ġt\n", r"merges.txt:2: merge 'Ġt Ġt' uses 'ĠtĠt', which is not in the vocabulary"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, vocab_text, merges_text, message):
    vocab_path, merges_path = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_path.write_text(vocab_text if vocab_text is not None else VOCAB.read_text(encoding="utf-8"), encoding="utf-8")
    merges_path.write_text(merges_text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_files(vocab_path, merges_path)


def test_bad_constructor_arguments_are_named(gpt2):
    bytes_only = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match=r"vocab lacks 1 of the 256 single bytes"):
        Tokenizer({i: bytes([i]) for i in range(255)}, [])
    with pytest.raises(ValueError, match=r"token b'a' has two ids, 97 and 256"):
        Tokenizer({**bytes_only, 256: b"a"}, [])
    with pytest.raises(TypeError, match=r"vocab must map non-negative int ids to bytes"):
        Tokenizer({**bytes_only, 256: "ab"}, [])
    with pytest.raises(ValueError, match=r"merges\[0\]: merge 'a b' uses 'ab', which is not in the vocabulary"):
        Tokenizer(bytes_only, [(b"a", b"b")])
    with pytest.raises(TypeError, match=r"merges\[0\]: a merge must be a tuple of two bytes"):
        Tokenizer(bytes_only, [("a", "b")])
    with pytest.raises(TypeError, match=r"special_tokens must be a list of non-empty str"):
        Tokenizer(bytes_only, [], EOT)
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800'"):
        gpt2.encode("a\ud800")
    with pytest.raises(TypeError, match=r"encode takes a str, got bytes"):
        gpt2.encode(b"abc")
    with pytest.raises(TypeError, match=r"encode_iterable takes an iterable of str, got a bytes"):
        list(gpt2.encode_iterable([b"abc"]))
    with pytest.raises(ValueError, match=r"token id 50258 is not in the vocabulary \(ids 0..50256\)"):
        gpt2.decode([1, 50258])


# -- fnlm tokenize ----------------------------------------------------------------------------------

def test_tokenize_cli_writes_a_memory_mappable_array_equal_to_encode(tmp_path, monkeypatch, gpt2):
    from fnlm import cli
    from fnlm.tokenizer import chunks

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4096)  # many chunks, two processes
    gpt2.save(tmp_path / "tok")
    (tmp_path / "tok" / "special_tokens.json").write_text(json.dumps([EOT]), encoding="utf-8")
    text = _mixed_text(60_000, 0.1, seed=1)
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "in.txt"), str(tmp_path / "out.npy"),
            "--workers", "2", "--quiet"]
    assert cli.main(args) == 0
    ids = np.load(tmp_path / "out.npy", mmap_mode="r")
    assert ids.dtype == np.uint16 and ids.tolist() == gpt2.encode(text)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.txt", "out.npy", "tok"]  # no temporaries


def test_token_dtype_widens_past_65536_ids():
    from fnlm.tokenizer.encode_file import token_dtype

    small = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    large = Tokenizer({**{i: bytes([i]) for i in range(256)}, 70_000: b"ab"}, [])
    assert token_dtype(small) == np.uint16 and token_dtype(large) == np.uint32


def test_importing_the_tokenizer_does_not_import_torch():
    code = "import sys, fnlm.tokenizer, fnlm.cli.tokenizer; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert run.stdout.strip() == "False", run.stderr


def test_save_and_load_keep_the_special_tokens(tmp_path, gpt2):
    tokenizer = Tokenizer(gpt2.vocab, gpt2.merges, [EOT, EOT + EOT])
    tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.special_tokens == tokenizer.special_tokens
    text = f"Hello{EOT}{EOT} world{EOT}"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert Tokenizer.load(tmp_path / "tok", []).special_tokens == []


# -- the tokenizer folder's manifest ----------------------------------------------------------------

@pytest.fixture(scope="module")
def small() -> Tokenizer:
    vocab, merges = train_bpe(FIXTURES / "tinystories_sample.txt", 300, [EOT], num_workers=1)
    return Tokenizer(vocab, merges, [EOT])


def test_save_writes_a_manifest_of_the_files(tmp_path, small):
    small.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["vocab_size"] == 300 and manifest["merges"] == 43
    data = (tmp_path / "merges.txt").read_bytes()
    assert manifest["files"]["merges.txt"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "manifest.json", "merges.txt", "special_tokens.json", "vocab.json"]


def test_a_merges_file_cut_at_a_line_boundary_is_detected(tmp_path, small):
    small.save(tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "merges.txt").write_text("".join(lines[:-5]), encoding="utf-8")  # still a valid merges.txt
    assert len(Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt").merges) == 38
    with pytest.raises(ValueError, match=r"merges.txt does not match .*manifest.json \(\d+ bytes, expected \d+;"):
        Tokenizer.load(tmp_path)


def test_files_from_another_tokenizer_are_detected(tmp_path, small):
    small.save(tmp_path / "a")
    Tokenizer(small.vocab, small.merges[:-1], [EOT, "<pad>"]).save(tmp_path / "b")
    a_merges = (tmp_path / "a" / "merges.txt").read_bytes()
    (tmp_path / "a" / "merges.txt").write_bytes((tmp_path / "b" / "merges.txt").read_bytes())
    (tmp_path / "b" / "merges.txt").write_bytes(a_merges)
    (tmp_path / "b" / "vocab.json").write_bytes((tmp_path / "a" / "vocab.json").read_bytes())
    for folder, name in (("a", "merges.txt"), ("b", "vocab.json")):
        with pytest.raises(ValueError, match=f"{folder}/{name} does not match"):
            Tokenizer.load(tmp_path / folder)


def test_a_folder_without_a_manifest_still_loads(tmp_path, small):
    small.save(tmp_path)
    (tmp_path / "manifest.json").unlink()
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab == small.vocab and loaded.merges == small.merges and loaded.special_tokens == [EOT]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("special_tokens.json", '["<|endoftext|>"', r"special_tokens.json: not valid JSON \(line 1"),
    ("special_tokens.json", '{"a": 1}', r"special_tokens.json: expected a JSON list of non-empty strings"),
    ("manifest.json", '{"format": "fnlm.tok', r"manifest.json: not valid JSON"),
    ("manifest.json", '{"files": []}', r"manifest.json: not an fnlm.tokenizer/1 manifest"),
    ("vocab.json", "\udcff", r"vocab.json: not UTF-8 text"),  # in a folder without a manifest
])
def test_damaged_folder_files_are_named(tmp_path, small, name, text, message):
    small.save(tmp_path)
    if name == "vocab.json":
        (tmp_path / "manifest.json").unlink()
    (tmp_path / name).write_bytes(text.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(tmp_path)


def test_a_missing_folder_or_file_is_named(tmp_path, small):
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*nowhere does not exist"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is not a tokenizer folder: it has no vocab.json"):
        Tokenizer.load(tmp_path)
    small.save(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt is missing"):
        Tokenizer.load(tmp_path)


def test_save_is_all_or_none_on_a_full_disk(tmp_path, small, monkeypatch):
    from tests.full_disk import disk_full_after

    old = Tokenizer(small.vocab, small.merges[:10], [EOT])
    old.save(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with disk_full_after(monkeypatch, 4000), pytest.raises(OSError, match=f"no space left writing {tmp_path}/"):
        small.save(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert Tokenizer.load(tmp_path).merges == old.merges


def test_a_missing_merges_file_is_named_without_a_manifest(tmp_path, small):
    small.save(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="is not a tokenizer folder: it has no merges.txt"):
        Tokenizer.load(tmp_path)
