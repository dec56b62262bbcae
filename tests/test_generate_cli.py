"""`fnlm generate` end to end on a tiny checkpoint and byte-level tokenizer; streaming UTF-8."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fnlm import cli
from fnlm.config import ModelConfig
from fnlm.decode import generate
from fnlm.cli.generate import generate_samples, stream_text
from fnlm.model import init_params

EOS = "<|endoftext|>"


class ByteTokenizer:
    """Token i is byte i: the hardest case for streaming, every multi-byte character is split."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@given(st.text(), st.data())
def test_streamed_pieces_are_whole_characters_that_join_to_the_text(text, data):
    data_bytes = list(text.encode("utf-8"))
    pieces = list(stream_text(ByteTokenizer(), iter(data_bytes)))
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in piece for piece in pieces)  # no half characters shown


def test_bytes_that_never_complete_a_character_end_as_replacement_characters():
    euro = list("€".encode())  # 3 bytes
    assert list(stream_text(ByteTokenizer(), [ord("a"), *euro[:2]])) == ["a", "\ufffd"]
    assert "".join(stream_text(ByteTokenizer(), [*euro[:2], ord("b"), *euro])) == "\ufffdb€"


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    tokenizer_module = pytest.importorskip("fnlm.tokenizer", reason="fnlm.tokenizer (the tokenizer work) is not in the tree")
    checkpoint_module = pytest.importorskip("fnlm.checkpoint", reason="fnlm.checkpoint (the training work) is not in the tree")
    root = tmp_path_factory.mktemp("generate")
    tokenizer = tokenizer_module.Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=[EOS])
    tokenizer.save(root / "tok")
    cfg = ModelConfig(vocab_size=257, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    params = init_params(cfg, seed=3)
    checkpoint_module.save_checkpoint(root / "ckpt.pt", model_config=cfg, params=params, step=7)
    return root, tokenizer, cfg, params


def run_cli(capsys, model_files, *flags):
    root = model_files[0]
    code = cli.main(["generate", "--checkpoint", str(root / "ckpt.pt"), "--tokenizer", str(root / "tok"), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_prints_the_prompt_and_the_library_completion(capsys, model_files):
    _, tokenizer, cfg, params = model_files
    code, out, err = run_cli(capsys, model_files, "--prompt", "Hi", "--max-new-tokens", "10", "--temperature", "0")
    assert code == 0 and err == ""
    completion = generate(params, cfg, tokenizer.encode("Hi"), max_new_tokens=10, temperature=0,
                          eos_id=tokenizer.encode(EOS)[0])
    ids = completion[:-1] if completion and completion[-1] == tokenizer.encode(EOS)[0] else completion
    assert out == "Hi" + tokenizer.decode(ids) + "\n"


def test_each_sample_reproduces_alone_from_its_seed(capsys, model_files):
    flags = ("--prompt", "Once", "--max-new-tokens", "8", "--temperature", "0.9", "--top-p", "0.95")
    code, out, _ = run_cli(capsys, model_files, *flags, "--seed", "4", "--num-samples", "2")
    assert code == 0
    assert "=== sample 1 of 2 (seed 4) ===" in out and "=== sample 2 of 2 (seed 5) ===" in out
    second = out.split("=== sample 2 of 2 (seed 5) ===\n")[1]
    assert run_cli(capsys, model_files, *flags, "--seed", "5")[1] == second
    assert run_cli(capsys, model_files, *flags, "--seed", "5")[1] == second  # and again: deterministic


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(capsys, model_files):
    code, out, err = run_cli(capsys, model_files, "--prompt", "x" * 20, "--max-new-tokens", "2", "--temperature", "0")
    assert code == 0 and out.startswith("x" * 20)
    assert "warning: the prompt has 20 tokens, more than the model's context of 16; keeping its last 16" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--prompt", ""), "the prompt is empty"),
        (("--prompt", "a", "--top-p", "0"), r"top_p must be in (0, 1]"),
        (("--prompt", "a", "--temperature", "-1"), "temperature must be a finite number >= 0"),
        (("--prompt", "a", "--num-samples", "0"), "--num-samples must be >= 1"),
        (("--prompt", "a", "--eos", "<|stop|>"), "--eos '<|stop|>' is not a token of the tokenizer in "),
        (("--prompt", "a", "--device", "nonsense"), "--device nonsense: "),
    ],
)
def test_bad_arguments_exit_1_with_one_line(capsys, model_files, flags, message):
    code, out, err = run_cli(capsys, model_files, *flags)
    assert code == 1 and out == ""
    assert err.startswith("fnlm generate: error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_says_so(capsys, model_files):
    code, _, err = run_cli(capsys, model_files, "--prompt", "a", "--device", "cuda")
    assert code == 1 and err.startswith("fnlm generate: error: --device cuda: ") and "no CUDA device" in err
    assert "checkpoint" not in err


def test_an_eos_in_the_vocabulary_but_not_special_ends_samples(capsys, model_files):
    code, out, _ = run_cli(capsys, model_files, "--prompt", "Hi", "--max-new-tokens", "5", "--eos", "x")
    assert code == 0 and out.startswith("Hi")


def test_generate_samples_takes_plain_arguments(model_files):
    root, tokenizer, cfg, params = model_files
    out, notes = io.StringIO(), io.StringIO()
    generate_samples(root / "ckpt.pt", root / "tok", "Hi", max_new_tokens=4, temperature=0, out=out, notes=notes)
    completion = generate(params, cfg, tokenizer.encode("Hi"), max_new_tokens=4, temperature=0,
                          eos_id=tokenizer.encode(EOS)[0])
    assert out.getvalue() == "Hi" + tokenizer.decode([i for i in completion if i != tokenizer.encode(EOS)[0]]) + "\n"


def test_a_tokenizer_larger_than_the_model_is_refused(capsys, model_files, tmp_path):
    tokenizer_module = pytest.importorskip("fnlm.tokenizer")
    tokenizer_module.Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=[EOS, "<pad>"]).save(tmp_path)
    code = cli.main(["generate", "--checkpoint", str(model_files[0] / "ckpt.pt"), "--tokenizer", str(tmp_path),
                     "--prompt", "a", "--eos", "<pad>"])
    assert code == 1 and "more than the model's vocab_size 257" in capsys.readouterr().err


def test_the_parser_documents_every_flag():
    text = cli.build_parser().parse_args(["generate", "--checkpoint", "c", "--tokenizer", "t", "--prompt", "p"])
    assert (text.max_new_tokens, text.temperature, text.top_p, text.seed, text.num_samples) == (256, 1.0, 1.0, 0, 1)
    assert torch.device(text.device).type == "cpu"
