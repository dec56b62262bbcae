"""The `fnlm` command's one error policy (fnlm.cli.main) and the ordinary mistakes outside
`fnlm train`: each prints one line naming what is wrong, exits 1, and loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fnlm import cli
from fnlm.tokenizer import Tokenizer, chunks
from fnlm.tokenizer import encode_file as encode_file_module
from tests.conftest import FIXTURES, subprocess_env
from tests.full_disk import disk_full_after, fill

EOT = "<|endoftext|>"
CORPUS = FIXTURES / "tinystories_sample.txt"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The message of the single line `fnlm COMMAND: error: MESSAGE` that err must be."""
    assert err.count("\n") == 1 and err.startswith(f"fnlm {command}: error: "), err
    return err.removeprefix(f"fnlm {command}: error: ").rstrip("\n")


@pytest.fixture
def tokenizer_dir(tmp_path):
    folder = tmp_path / "tok"
    Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT]).save(folder)
    return folder


# -- the policy ----------------------------------------------------------------------------------


def test_value_and_os_errors_are_one_line_and_exit_1(capsys, monkeypatch):
    def fails(args):
        raise ValueError("--thing 3 is not a thing")

    monkeypatch.setattr(cli.tokenizer, "run_tokenize", fails)
    code, out, err = run(capsys, "tokenize", "--tokenizer", "t", "in", "out")
    assert code == 1 and out == "" and one_error_line(err, "tokenize") == "--thing 3 is not a thing"

    def missing(args):
        open(args.input)

    monkeypatch.setattr(cli.tokenizer, "run_tokenize", missing)
    code, _, err = run(capsys, "tokenize", "--tokenizer", "t", "nowhere.txt", "out")
    assert code == 1 and one_error_line(err, "tokenize") == "No such file or directory: nowhere.txt"


def test_nested_commands_are_named_in_full(capsys, monkeypatch):
    def fails(args):
        raise OSError("cannot download http://x/y: HTTP 404 Not Found")

    monkeypatch.setattr(cli.data, "run_download", fails)
    code, _, err = run(capsys, "data", "download", "tinystories")
    assert code == 1 and one_error_line(err, "data download").startswith("cannot download")


def test_bugs_keep_their_traceback_and_debug_re_raises(capsys, monkeypatch):
    def buggy(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli.tokenizer, "run_tokenize", buggy)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["tokenize", "--tokenizer", "t", "in", "out"])

    def fails(args):
        raise ValueError("ordinary")

    monkeypatch.setattr(cli.tokenizer, "run_tokenize", fails)
    monkeypatch.setenv("FNLM_DEBUG", "1")
    with pytest.raises(ValueError, match="ordinary"):
        cli.main(["tokenize", "--tokenizer", "t", "in", "out"])
    assert "FNLM_DEBUG=1" in cli.build_parser().format_help()


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.tokenizer, "run_tokenize", interrupted)
    code, _, err = run(capsys, "tokenize", "--tokenizer", "t", "in", "out")
    assert code == 130 and err == "fnlm tokenize: interrupted\n"


def test_a_closed_output_pipe_is_quiet(capsys, monkeypatch):
    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli.tokenizer, "run_tokenize", reader_left)
    code, _, err = run(capsys, "tokenize", "--tokenizer", "t", "in", "out")
    assert code == 141 and err == ""


def test_library_warnings_are_one_line(capsys, monkeypatch):
    import warnings

    def warns(args):
        warnings.warn("careful: 3 is small")
        return 0

    monkeypatch.setattr(cli.tokenizer, "run_tokenize", warns)
    code, _, err = run(capsys, "tokenize", "--tokenizer", "t", "in", "out")
    assert code == 0 and err == "fnlm tokenize: warning: careful: 3 is small\n"


def test_a_real_process_prints_one_line_and_exits_1(tmp_path):
    """The one subprocess test: what a user sees, end to end."""
    missing = tmp_path / "missing.txt"
    result = subprocess.run(
        [sys.executable, "-m", "fnlm", "train-bpe", str(missing), "--vocab-size", "300", "--out", str(tmp_path / "tok")],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"fnlm train-bpe: error: input file {missing} does not exist\n"


# -- train-bpe -----------------------------------------------------------------------------------


def test_train_bpe_missing_input(capsys, tmp_path):
    code, _, err = run(capsys, "train-bpe", tmp_path / "nope.txt", "--vocab-size", 300, "--out", tmp_path / "tok")
    assert code == 1 and one_error_line(err, "train-bpe") == f"input file {tmp_path / 'nope.txt'} does not exist"
    assert not (tmp_path / "tok").exists()


def test_train_bpe_refuses_a_non_empty_folder_unless_overwrite(capsys, tmp_path, tokenizer_dir):
    before = {path.name: path.read_bytes() for path in tokenizer_dir.iterdir()}
    argv = ("train-bpe", CORPUS, "--vocab-size", 300, "--special-token", EOT, "--out", tokenizer_dir, "--quiet",
            "--workers", 1)
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert one_error_line(err, "train-bpe") == (f"--out {tokenizer_dir} is not empty (manifest.json, merges.txt, "
                                                 "special_tokens.json, vocab.json); pass --overwrite to replace its tokenizer")
    assert {path.name: path.read_bytes() for path in tokenizer_dir.iterdir()} == before
    assert run(capsys, *argv, "--overwrite")[0] == 0
    assert len(Tokenizer.load(tokenizer_dir).vocab) == 300
    assert json.loads((tokenizer_dir / "stats.json").read_text())["vocab_size"] == 300


def test_train_bpe_on_a_too_small_corpus_warns_and_keeps_what_it_has(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, out, err = run(capsys, "train-bpe", empty, "--vocab-size", 300, "--special-token", EOT,
                         "--out", tmp_path / "tok", "--quiet")
    assert code == 0 and json.loads(out)["vocab_size"] == 257
    assert err == (f"fnlm train-bpe: warning: {empty} supports only 0 merges (no pair of tokens is left to merge): "
                   "the vocabulary has 257 tokens, not the 300 asked for\n")
    assert len(Tokenizer.load(tmp_path / "tok").vocab) == 257


def test_train_bpe_on_a_full_disk_keeps_the_old_tokenizer(capsys, tmp_path, tokenizer_dir, monkeypatch):
    before = {path.name: path.read_bytes() for path in tokenizer_dir.iterdir()}
    with disk_full_after(monkeypatch, 2000):
        code, _, err = run(capsys, "train-bpe", CORPUS, "--vocab-size", 400, "--out", tokenizer_dir, "--overwrite",
                           "--quiet", "--workers", 1)
    assert code == 1 and one_error_line(err, "train-bpe").startswith(f"no space left writing {tokenizer_dir}/")
    assert {path.name: path.read_bytes() for path in tokenizer_dir.iterdir()} == before  # no temporaries either


def test_train_bpe_on_a_real_full_disk_keeps_the_old_tokenizer(capsys, small_tmpfs):
    """The same on a real 256 kB tmpfs, filled so that the new files cannot fit (needs root)."""
    folder = small_tmpfs / "tok"
    Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT]).save(folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    fill(small_tmpfs, leave=8192)
    code, _, err = run(capsys, "train-bpe", FIXTURES / "corpus.en", "--vocab-size", 1000, "--out", folder,
                       "--overwrite", "--quiet", "--workers", 1)
    assert code == 1 and one_error_line(err, "train-bpe").startswith(f"no space left writing {folder}/")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert len(Tokenizer.load(folder).vocab) == 257


# -- tokenize ------------------------------------------------------------------------------------


def test_tokenize_missing_input_and_tokenizer(capsys, tmp_path, tokenizer_dir):
    code, _, err = run(capsys, "tokenize", "--tokenizer", tokenizer_dir, tmp_path / "nope.txt", tmp_path / "o.npy")
    assert code == 1 and one_error_line(err, "tokenize") == f"input file {tmp_path / 'nope.txt'} does not exist"
    code, _, err = run(capsys, "tokenize", "--tokenizer", tmp_path / "none", CORPUS, tmp_path / "o.npy")
    assert code == 1 and one_error_line(err, "tokenize") == f"tokenizer folder {tmp_path / 'none'} does not exist"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tok"]


def test_tokenize_refuses_to_write_over_its_input(capsys, tmp_path, tokenizer_dir):
    text = tmp_path / "in.txt"
    text.write_text("Once upon a time")
    (tmp_path / "link.npy").symlink_to(text)
    for output in (text, tmp_path / "." / "in.txt", tmp_path / "link.npy"):
        code, _, err = run(capsys, "tokenize", "--tokenizer", tokenizer_dir, text, output, "--quiet")
        assert code == 1 and one_error_line(err, "tokenize") == (
            f"the output {output} is the input {text}: writing it would destroy the text")
    assert text.read_text() == "Once upon a time"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.txt", "link.npy", "tok"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, ValueError])
def test_a_failed_tokenize_leaves_no_partial_file(capsys, tmp_path, tokenizer_dir, monkeypatch, failure):
    chunks_done = []

    def encode_then_fail(tokenizer, path, dtype, ranges):
        if chunks_done:
            raise failure("stop")
        chunks_done.append(ranges)
        return np.zeros(3, dtype=dtype)

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 64)
    monkeypatch.setattr(encode_file_module, "_encode_chunks", encode_then_fail)
    code, _, _ = run(capsys, "tokenize", "--tokenizer", tokenizer_dir, CORPUS, tmp_path / "out.npy", "--workers", 1,
                     "--quiet")
    assert code == (130 if failure is KeyboardInterrupt else 1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tok"]


def test_tokenize_on_a_full_disk_names_the_file(capsys, tmp_path, tokenizer_dir, monkeypatch):
    with disk_full_after(monkeypatch, 1000):
        code, _, err = run(capsys, "tokenize", "--tokenizer", tokenizer_dir, CORPUS, tmp_path / "out.npy", "--quiet")
    assert code == 1 and one_error_line(err, "tokenize") == f"no space left writing {tmp_path / 'out.npy'}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tok"]


def test_a_damaged_tokenizer_file_is_named(capsys, tmp_path, tokenizer_dir):
    (tokenizer_dir / "special_tokens.json").write_text('["<|endof')
    code, _, err = run(capsys, "tokenize", "--tokenizer", tokenizer_dir, CORPUS, tmp_path / "out.npy", "--quiet")
    assert code == 1 and one_error_line(err, "tokenize").startswith(
        f"{tokenizer_dir / 'special_tokens.json'}: not valid JSON (line 1")


# -- checkpoints ---------------------------------------------------------------------------------


def test_export_of_a_file_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = run(capsys, "export", tmp_path / "random.pt", tmp_path / "out.npz")
    assert code == 1 and one_error_line(err, "export") == (
        f"{tmp_path / 'random.pt'} is not an fnlm checkpoint: it is not a file that torch.save wrote")
    assert "weights_only" not in err and not (tmp_path / "out.npz").exists()
