"""The training step, evaluation, the run loop (resume, interrupt, logs) and `fnlm train`."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fnlm.checkpoint import load_checkpoint
from fnlm.cli import main
from fnlm.config import ModelConfig, TrainConfig
from fnlm.model import init_params
from fnlm.optim import EmptyState, GradientTransformation, adamw, apply_updates, warmup_cosine_schedule
from fnlm.run import latest_checkpoint, read_log, train
from fnlm.train import eval_result, evaluate, make_loss_fn, make_train_step
from fnlm.tree import flatten, global_norm, tree_map
from tests.conftest import cli_error

TINY = ModelConfig(vocab_size=48, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)


def tiny_train_config(token_files, **changes):
    values = dict(train_data=str(token_files[0]), val_data=str(token_files[1]), batch_size=4, steps=8,
                  lr=3e-3, min_lr=3e-4, warmup_steps=2, cosine_steps=8, log_every=2, eval_every=4,
                  eval_batches=2, checkpoint_every=4, device="cpu")
    return TrainConfig(**values | changes)


def batch(seed=0, cfg=TINY, batch_size=4):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length), generator=generator) for _ in range(2))


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_step_is_grad_and_value_then_the_optimizer(max_grad_norm):
    params, (x, y) = init_params(TINY, seed=0, dtype=torch.float64), batch()
    optimizer = adamw(1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm)
    new_params, new_state, metrics = make_train_step(TINY, optimizer)(params, optimizer.init(params), x, y)
    loss_fn = make_loss_fn(TINY)
    grads = torch.func.grad(loss_fn)(params, x, y)
    updates, state = optimizer.update(grads, optimizer.init(params), params)
    expected = apply_updates(params, updates)
    assert all(torch.equal(a, expected_leaf) for a, expected_leaf in zip(flatten(new_params).values(), flatten(expected).values()))
    assert torch.equal(metrics.loss, loss_fn(params, x, y))
    torch.testing.assert_close(metrics.grad_norm, global_norm(grads).float())  # before clipping
    assert int(new_state[1 if max_grad_norm else 0].count) == 1


def test_an_optimizer_without_state_steps_and_reports_no_learning_rate():
    sgd = GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None: (tree_map(lambda g: -0.1 * g, u), s))
    params, (x, y) = init_params(TINY, seed=0), batch()
    new_params, _, metrics = make_train_step(TINY, sgd)(params, sgd.init(params), x, y)
    assert torch.isnan(metrics.lr) and float(metrics.grad_norm) > 0
    assert not torch.equal(new_params["lm_head"]["weight"], params["lm_head"]["weight"])


def test_overfitting_one_batch_drives_the_loss_near_zero():
    params, (x, y) = init_params(TINY, seed=0), batch(1)
    optimizer = adamw(1e-2, weight_decay=0.0)
    step, opt_state = make_train_step(TINY, optimizer), optimizer.init(params)
    for _ in range(150):
        params, opt_state, metrics = step(params, opt_state, x, y)
    assert float(metrics.loss) < 0.05


def test_evaluate_is_the_token_mean_over_batches():
    params, loss_fn = init_params(TINY, seed=0), make_loss_fn(TINY)
    batches = [batch(seed, batch_size=size) for seed, size in ((0, 4), (1, 4), (2, 1))]
    result = eval_result(evaluate(loss_fn, params, batches))
    expected = sum(float(loss_fn(params, x, y)) * y.numel() for x, y in batches) / (9 * TINY.context_length)
    assert result.loss == pytest.approx(expected, rel=1e-6) and result.tokens == 9 * TINY.context_length
    assert result.perplexity == pytest.approx(np.exp(expected), rel=1e-6)


def test_resume_continues_bit_for_bit(tmp_path, token_files):
    cfg = tiny_train_config(token_files)
    straight = train(TINY, cfg, tmp_path / "straight", show_progress=False)
    calls = []

    def stop_after_three_steps() -> bool:  # the loop asks before every step: a Ctrl-C at step 3
        calls.append(1)
        return len(calls) > 3

    halted = train(TINY, cfg, tmp_path / "resumed", show_progress=False, should_stop=stop_after_three_steps)
    assert halted.interrupted and halted.step == 3 and load_checkpoint(latest_checkpoint(tmp_path / "resumed")).step == 3
    resumed = train(TINY, cfg, tmp_path / "resumed", resume=True, show_progress=False)
    assert resumed.step == straight.step == 8 and not resumed.interrupted
    a, b = (load_checkpoint(run.checkpoint) for run in (straight, resumed))
    for name in ("params", "opt_state"):
        left, right = flatten(getattr(a, name)), flatten(getattr(b, name))
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name
    assert torch.equal(a.rng, b.rng)

    def losses(run_dir):
        return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in read_log(run_dir / "log.jsonl")]

    # The interrupted run logged its partial window (step 3) and the resumed one the rest (step 4).
    straight_log, resumed_log = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [r["step"] for r in straight_log] == [2, 4, 4, 6, 8, 8]
    assert [r["step"] for r in resumed_log] == [2, 3, 4, 4, 6, 8, 8]
    assert resumed_log[3:] == straight_log[2:] and resumed_log[0] == straight_log[0]
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["step_0000004.pt", "step_0000008.pt"]
    assert (tmp_path / "straight" / "loss_curve.png").stat().st_size > 0


def test_run_refuses_to_overwrite_or_resume_nothing(tmp_path, token_files):
    cfg = tiny_train_config(token_files, steps=2, eval_every=0)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TINY, cfg, tmp_path / "run", resume=True, show_progress=False)
    train(TINY, cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(TINY, cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(ValueError, match="token id 47 at position"):
        train(dataclasses.replace(TINY, vocab_size=47), cfg, tmp_path / "small_vocab", show_progress=False)
    with pytest.raises(ValueError, match="train_data is required"):
        train(TINY, dataclasses.replace(cfg, train_data=""), tmp_path / "no_data", show_progress=False)


def test_cli_reads_a_toml_config_with_flag_overrides_and_guards_resume(tmp_path, token_files, capsys):
    config = tmp_path / "config.toml"
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.to_dict().items() if v is not None)  # TOML has no null
    config.write_text(f"[model]\n{model}\n[train]\nbatch_size = 2\nsteps = 3\nwarmup_steps = 1\nlr = 0.5\n")
    run_dir = tmp_path / "run"
    common = ["train", "--out", str(run_dir), "--no-progress", "--device", "cpu"]
    assert main(common + ["--config", str(config), "--train-data", str(token_files[0]), "--lr", "1e-3",
                          "--max-grad-norm", "none", "--eval-every", "0", "--checkpoint-every", "0"]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"] == TINY.to_dict()
    assert (saved["train"]["batch_size"], saved["train"]["lr"], saved["train"]["max_grad_norm"]) == (2, 1e-3, None)
    assert saved["train"]["compile"] is None  # auto: eager here on the CPU, compiled on CUDA
    assert "change the learning-rate schedule (lr 0.001 -> 0.1): pass --reschedule" in cli_error(
        common + ["--resume", "--lr", "0.1"], capsys)
    assert "would change what the run computes (batch_size 2 -> 4)" in cli_error(
        common + ["--resume", "--batch-size", "4"], capsys)
    assert "would change it: ['--d-model']" in cli_error(common + ["--resume", "--d-model", "64"], capsys)
    # steps is a runtime setting, but with the default cosine length it would stretch the schedule
    assert "pass --cosine-steps 3 to keep the schedule, or --reschedule" in cli_error(
        common + ["--resume", "--steps", "5"], capsys)
    assert main(common + ["--resume", "--steps", "5", "--cosine-steps", "3"]) == 0
    assert load_checkpoint(latest_checkpoint(run_dir)).step == 5
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    assert (saved["steps"], saved["cosine_steps"]) == (5, 3)  # config.json says how the run went on
    main(["export", str(latest_checkpoint(run_dir)), str(tmp_path / "params.npz")])
    assert set(np.load(tmp_path / "params.npz")) == set(flatten(init_params(TINY))) | {"config.json"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_the_whole_step_traces_as_one_graph(device):
    """No graph breaks: traced whole, gradient, clipping, schedule and update are one graph (a
    break inside the gradient transform would run the compiled gradient eagerly)."""
    optimizer = adamw(warmup_cosine_schedule(1e-3, 1e-4, 2, 10), weight_decay=0.1, max_grad_norm=1.0)
    params, (x, y) = init_params(TINY, device=device), (ids.to(device) for ids in batch())
    step = make_train_step(TINY, optimizer, autocast_dtype=torch.bfloat16, device_type=device)
    explanation = torch._dynamo.explain(step)(params, optimizer.init(params), x, y)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.slow
def test_compiled_bf16_step_is_finite_and_tracks_eager():
    """The step compiled (grad_and_value and update) with bf16 autocast: finite, and close
    to the eager step; parameters and optimizer state stay float32."""
    cfg = dataclasses.replace(TINY, num_layers=1)
    optimizer = adamw(3e-3, weight_decay=0.1, max_grad_norm=1.0)
    runs = {}
    for compiled in (False, True):
        params = init_params(cfg, seed=0)
        opt_state = optimizer.init(params)
        step = make_train_step(cfg, optimizer, autocast_dtype=torch.bfloat16, compile=compiled)
        losses = []
        for seed in range(5):
            params, opt_state, metrics = step(params, opt_state, *batch(seed, cfg))
            losses.append(float(metrics.loss))
        runs[compiled] = losses, params, opt_state
    (eager_losses, _, _), (compiled_losses, compiled_params, compiled_state) = runs[False], runs[True]
    assert np.isfinite(compiled_losses).all()
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-2)
    assert {leaf.dtype for leaf in flatten((compiled_params, compiled_state)).values()} <= {torch.float32, torch.int32}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"warmup_steps": 10, "cosine_steps": 5}, r"cosine_steps \(5\) must be >= warmup_steps \(10\)"),
        ({"warmup_steps": 10, "steps": 5}, r"steps \(the default cosine_steps\) \(5\) must be >= warmup_steps"),
        ({"autocast": "fp8"}, "autocast must be one of"),
        ({"eval_batches": 0}, "eval_batches must be a positive int or None"),
        ({"lr": "fast"}, "lr must be a number"),
    ],
)
def test_bad_train_config_raises(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


def test_compile_is_auto_by_default_and_round_trips():
    """compile None (auto) compiles on CUDA only; an explicit bool wins; config.json keeps null."""
    auto = TrainConfig()
    assert auto.compile is None and auto.compiles("cuda") and not auto.compiles("cpu")
    assert not TrainConfig(compile=False).compiles("cuda") and TrainConfig(compile=True).compiles("cpu")
    for cfg in (auto, TrainConfig(compile=False)):
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"compile must be a bool or None \(auto\)"):
        TrainConfig(compile="yes")
