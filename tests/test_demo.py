"""`fnlm demo` end to end at a few steps: every stage runs and leaves its files in a new folder."""

from fnlm.cli import main
from fnlm.cli.demo import new_run_dir


def test_demo_writes_a_new_run_folder_with_every_artifact(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "--no-progress"]) == 0
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("demo-")
    for path in ["data/NOTICE.md", "data/train.npy", "data/valid.npy", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "model/log.jsonl", "model/loss_curve.png", "model/config.json"]:
        assert (run / path).is_file(), path
    assert list((run / "model" / "checkpoints").glob("step_0000004.pt"))
    out = capsys.readouterr().out
    assert "Once upon a time" in out and "validation loss" in out and "perplexity" in out


def test_a_new_run_never_reuses_an_earlier_folder(tmp_path):
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)  # the same second: a suffix tells them apart
    assert first != second and first.is_dir() and second.is_dir()
