"""`fnlm demo` end to end at a few steps, and its pure parts: the run length, the choice of the
checkpoint that writes the story, and the longest passage the story shares with the training text."""

import math
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fnlm.cli import main
from fnlm.cli.demo import (
    HASH_BASE,
    best_validation,
    default_size,
    longest_shared_span,
    new_run_dir,
    ngram_hashes,
    steps_for_epochs,
)


def test_demo_writes_a_new_run_folder_with_every_artifact(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "--device", "cpu", "--no-progress"]) == 0
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("demo-")
    for path in ["data/NOTICE.md", "data/train.npy", "data/valid.npy", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "model/log.jsonl", "model/loss_curve.png", "model/config.json", "demo.json"]:
        assert (run / path).is_file(), path
    assert [p.name for p in (run / "model" / "checkpoints").glob("*.pt")] == ["step_0000004.pt"]
    out = capsys.readouterr().out
    assert "Once upon a time" in out and "perplexity" in out
    assert "at step 4 of 4: the checkpoint that wrote the story" in out
    assert "longest passage of the story found in the training text:" in out


def test_a_new_run_never_reuses_an_earlier_folder(tmp_path):
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)  # the same second: a suffix tells them apart
    assert first != second and first.is_dir() and second.is_dir()


def test_the_gpu_size_on_cuda_and_the_cpu_size_elsewhere():
    assert default_size("cuda") == "small"
    assert default_size("cpu") == default_size("mps") == "tiny"


def test_steps_cover_the_asked_passes_over_the_training_tokens():
    assert steps_for_epochs(2.0, 1000, 100) == 20
    assert steps_for_epochs(1.0, 1001, 100) == 11  # rounds up: at least the asked passes
    assert steps_for_epochs(0.001, 10, 100) == 1


def test_the_story_comes_from_the_best_validated_checkpoint():
    checkpoints = {10: Path("a"), 20: Path("b"), 30: Path("c")}
    records = [{"step": 10, "train_loss": 1.0}, {"step": 10, "val_loss": 3.0}, {"step": 20, "val_loss": 2.5},
               {"step": 25, "val_loss": 2.0},  # validated but no checkpoint: cannot write the story
               {"step": 30, "val_loss": 2.5}, {"step": 35, "val_loss": math.nan}]
    assert best_validation(records, checkpoints) == (20, 2.5)  # the earliest of a tie
    assert best_validation(records[:1], checkpoints) is None


def brute_force_longest(words: list[str], corpus: list[str]) -> int:
    """Length of the longest run of words that occurs in corpus, by trying every pair of starts."""
    best = 0
    for i in range(len(words)):
        for j in range(len(corpus)):
            n = 0
            while i + n < len(words) and j + n < len(corpus) and words[i + n] == corpus[j + n]:
                n += 1
            best = max(best, n)
    return best


def occurs_in(span: list[str], corpus: list[str]) -> bool:
    return any(corpus[j:j + len(span)] == span for j in range(len(corpus) - len(span) + 1))


WORDS = st.lists(st.sampled_from(["a", "b", "c", "the", "cat,", "cat"]), max_size=30)


@settings(deadline=None, max_examples=200)
@given(WORDS, WORDS)
def test_longest_shared_span_matches_a_brute_force_search(words, corpus):
    span = longest_shared_span(" ".join(words), "\n".join(corpus)).split()
    assert len(span) == brute_force_longest(words, corpus)
    assert occurs_in(span, words) and occurs_in(span, corpus)


def test_longest_shared_span_finds_a_recalled_passage_and_ignores_punctuated_variants():
    corpus = "Once upon a time, there was a cat. The cat sat on the mat.\nThe dog ran."
    assert longest_shared_span("He said: the cat sat on the mat. Then", corpus) == "cat sat on the mat."
    assert longest_shared_span("a time there", corpus) == "a"  # "time," is not "time"
    assert longest_shared_span("nothing here", corpus) == ""
    assert longest_shared_span("", corpus) == ""


@settings(deadline=None, max_examples=50)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=12), st.integers(1, 13))
def test_ngram_hashes_are_the_polynomial_hash_of_each_window(ids, n):
    got = ngram_hashes(np.array(ids, dtype=np.uint64), n)
    want = [sum(ids[p + j] * HASH_BASE**j for j in range(n)) % 2**64 for p in range(len(ids) - n + 1)]
    assert got.dtype == np.uint64 and got.tolist() == want
