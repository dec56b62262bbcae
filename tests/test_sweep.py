"""fnlm.sweep and fnlm.run's sweeps: K runs as one vmapped program equal K separate runs; checkpoints, divergence, resume, CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fnlm.checkpoint import load_checkpoint
from fnlm.cli import main
from fnlm.config import ModelConfig, TrainConfig
from fnlm.model import init_params
from fnlm.run import grid, latest_checkpoint, parse_axis, read_log, run_name, train, train_sweep
from fnlm.sweep import make_sweep_step, stack, unstack
from fnlm.train import make_optimizer, make_train_step
from fnlm.tree import flatten, tree_leaves, unflatten
from tests.conftest import cli_error

TINY = ModelConfig(vocab_size=48, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)
CLOSE = dict(rtol=1e-5, atol=1e-6)  # vmap batches the matmuls differently: rounding, not drift


def tiny_config(token_files, **changes):
    values = dict(train_data=str(token_files[0]), val_data=str(token_files[1]), batch_size=4, steps=6, lr=3e-3,
                  min_lr=3e-4, warmup_steps=2, log_every=2, eval_every=3, eval_batches=2, checkpoint_every=3,
                  device="cpu")
    return TrainConfig(**values | changes)


def batch(seed, batch_size=4):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, TINY.vocab_size, (batch_size, TINY.context_length), generator=generator)
                 for _ in range(2))


def assert_trees_close(a, b, **tolerance):
    a, b = flatten(a), flatten(b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **(tolerance or CLOSE), msg=key)


def test_stack_and_unstack_are_inverse_and_unstack_copies():
    trees = [init_params(TINY, seed=seed) for seed in range(3)]
    stacked = stack(trees)
    assert all(leaf.shape[0] == 3 for leaf in tree_leaves(stacked))
    for tree, back in zip(trees, unstack(stacked)):
        assert_trees_close(tree, back, rtol=0, atol=0)
        assert all(leaf._base is None for leaf in tree_leaves(back))  # not views of the whole stack


@pytest.mark.parametrize("shared_batch", [True, False], ids=["same batches", "per-run batches"])
def test_vmapped_sweep_equals_separate_runs_step_by_step(shared_batch):
    base = TrainConfig(steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0)
    configs = [dataclasses.replace(base, **changes) for changes in (
        dict(seed=0),
        dict(seed=1, lr=1e-2, weight_decay=0.0, warmup_steps=1),
        dict(seed=2, lr=1e-3, max_grad_norm=0.05, cosine_steps=4),
    )]
    hparams = {name: torch.tensor([float(getattr(c, name)) for c in configs])
               for name in ("lr", "weight_decay", "warmup_steps", "max_grad_norm")}
    hparams["cosine_steps"] = torch.tensor([float(c.decay_steps) for c in configs])
    separate = []
    for config in configs:
        params, optimizer = init_params(TINY, seed=config.seed), make_optimizer(config)
        separate.append([params, optimizer.init(params), make_train_step(TINY, optimizer)])
    params, opt_state = stack([run[0] for run in separate]), stack([run[1] for run in separate])
    alive = torch.ones(3, dtype=torch.bool)
    step = make_sweep_step(TINY, base, shared_batch=shared_batch)
    for t in range(4):
        batches = [batch(10 * t + (0 if shared_batch else k)) for k in range(3)]
        x, y = batches[0] if shared_batch else (torch.stack(b) for b in zip(*batches))
        params, opt_state, metrics = step(params, opt_state, hparams, alive, x, y)
        assert metrics.alive.all()
        for k, run in enumerate(separate):
            run[0], run[1], single = run[2](run[0], run[1], *batches[k])
            torch.testing.assert_close(metrics.loss[k], single.loss, **CLOSE)
            torch.testing.assert_close(metrics.grad_norm[k], single.grad_norm, **CLOSE)
    for k, (run_params, run_state) in enumerate(zip(unstack(params), unstack(opt_state))):
        assert_trees_close(run_params, separate[k][0])
        assert_trees_close(run_state, separate[k][1])


def test_a_non_finite_run_is_frozen_and_the_others_go_on():
    base = TrainConfig(steps=4, lr=1e-3, warmup_steps=0, min_lr=0.0, max_grad_norm=None)
    params = stack([init_params(TINY, seed=0)] * 3)
    opt_state = stack([make_optimizer(base).init(init_params(TINY))] * 3)
    hparams = {"lr": torch.tensor([1e-3, 1e-3, 1e-3])}
    step = make_sweep_step(TINY, base, shared_batch=False)
    x, y = (torch.stack(b) for b in zip(*[batch(k) for k in range(3)]))
    x = x.clone()
    poisoned = dict(params)
    poisoned["lm_head"] = {"weight": params["lm_head"]["weight"].clone()}
    poisoned["lm_head"]["weight"][1, 0, 0] = float("nan")  # run 1's loss is NaN
    dead = torch.tensor([True, True, False])  # run 2 was frozen before
    new_params, new_state, metrics = step(poisoned, opt_state, hparams, dead, x, y)
    assert metrics.alive.tolist() == [True, False, False]
    assert torch.isnan(metrics.loss[1])
    for k in (1, 2):  # both kept their state exactly
        assert_trees_close(unstack(new_params)[k], unstack(poisoned)[k], rtol=0, atol=0, equal_nan=True)
        assert_trees_close(unstack(new_state)[k], unstack(opt_state)[k], rtol=0, atol=0)
    assert int(unstack(new_state)[0][2].count) == 1 and int(unstack(new_state)[1][2].count) == 0
    assert not torch.equal(new_params["lm_head"]["weight"][0], params["lm_head"]["weight"][0])


def test_sweep_runs_equal_single_runs_and_leave_ordinary_checkpoints(tmp_path, token_files):
    """Two runs differing in lr and seed (each drawing its own seed's batches) through the whole
    loop: logs and checkpoints equal `fnlm train`'s single runs, and a run directory resumes alone."""
    base = tiny_config(token_files)
    result = train_sweep(TINY, base, [parse_axis("lr:seed=3e-3:0,1e-2:1")], tmp_path / "sweep", show_progress=False)
    assert result.step == 6 and not result.interrupted and list(result.runs) == ["lr=0.003_seed=0", "lr=0.01_seed=1"]
    assert (tmp_path / "sweep" / "learning_curves.png").stat().st_size > 0

    def records(path):
        return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s", "sweep_tokens_per_s")}
                for r in read_log(path)]

    for name, summary in result.runs.items():
        run_dir = tmp_path / "sweep" / name
        config = dataclasses.replace(base, lr=float(name[3:name.index("_")]), seed=int(name[-1]))
        assert json.loads((run_dir / "config.json").read_text())["train"] == config.to_dict()
        single = train(TINY, config, tmp_path / "single" / name, show_progress=False)
        swept, alone = load_checkpoint(summary.checkpoint), load_checkpoint(single.checkpoint)
        assert swept.step == alone.step == 6 and swept.train_config == alone.train_config
        assert torch.equal(swept.rng, alone.rng)  # the same batches, so the same sampler state
        assert_trees_close(swept.params, alone.params)
        assert_trees_close(swept.opt_state, alone.opt_state)
        ours, theirs = records(run_dir / "log.jsonl"), records(tmp_path / "single" / name / "log.jsonl")
        assert [r["step"] for r in ours] == [r["step"] for r in theirs]
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000003.pt", "step_0000006.pt"]

    # An unstacked checkpoint is an ordinary one: its optimizer state fits the run's optimizer,
    # and the run directory continues as a single run.
    run_dir = tmp_path / "sweep" / "lr=0.01_seed=1"
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    unflatten(ckpt.opt_state, like=make_optimizer(TrainConfig.from_dict(ckpt.train_config)).init(ckpt.params))
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "8", "--cosine-steps", "6", "--no-progress"]) == 0
    assert load_checkpoint(latest_checkpoint(run_dir)).step == 8


def test_a_diverging_run_is_marked_and_frozen_and_resume_is_exact(tmp_path, token_files):
    """lr=1e30 blows up at step 3 (step 1 has lr 0, step 2 makes the weights ~1e30). It is
    logged as diverged and frozen at step 2, the other run trains on as if alone, and a sweep
    stopped at step 4 and resumed ends exactly like one run straight through."""
    base = tiny_config(token_files, max_grad_norm=None, checkpoint_every=0)
    axes = [parse_axis("lr=3e-3,1e30")]
    straight = train_sweep(TINY, base, axes, tmp_path / "straight", show_progress=False)
    assert straight.step == 6
    good, bad = straight.runs["lr=0.003"], straight.runs["lr=1e+30"]
    assert good.diverged_at is None and good.step == 6 and np.isfinite(good.train_loss)
    assert bad.diverged_at == 3 and bad.step == 2
    frozen = load_checkpoint(bad.checkpoint)
    assert frozen.step == 2 and frozen.extra["diverged_at"] == 3
    assert all(torch.isfinite(leaf).all() for leaf in tree_leaves(frozen.params))
    log = read_log(tmp_path / "straight" / "lr=1e+30" / "log.jsonl")
    assert [(r["step"], r.get("diverged", False)) for r in log] == [(2, False), (3, True)]
    single = train(TINY, dataclasses.replace(base, lr=3e-3), tmp_path / "single", show_progress=False)
    assert_trees_close(load_checkpoint(good.checkpoint).params, load_checkpoint(single.checkpoint).params)

    calls = []

    def stop_after_four_steps() -> bool:
        calls.append(1)
        return len(calls) > 4

    halted = train_sweep(TINY, base, axes, tmp_path / "resumed", show_progress=False,
                         should_stop=stop_after_four_steps)
    assert halted.interrupted and halted.step == 4 and halted.runs["lr=1e+30"].diverged_at == 3
    resumed = train_sweep(TINY, base, axes, tmp_path / "resumed", resume=True, show_progress=False)
    assert resumed.step == 6 and resumed.runs["lr=1e+30"].diverged_at == 3
    for name in straight.runs:
        a, b = (load_checkpoint(run.runs[name].checkpoint) for run in (straight, resumed))
        assert a.step == b.step and torch.equal(a.rng, b.rng)
        assert all(torch.equal(x, y) for x, y in zip(flatten(a.params).values(), flatten(b.params).values()))

        def losses(root):
            return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s", "sweep_tokens_per_s")}
                    for r in read_log(tmp_path / root / name / "log.jsonl")]

        # The interrupted sweep logged its partial window at step 4, then steps 5-6 as straight did.
        assert [r for r in losses("resumed") if r["step"] != 4] == [r for r in losses("straight") if r["step"] != 4]


def test_fnlm_train_sweep_cli_with_a_joint_axis_then_generate(tmp_path, token_files, capsys):
    tokenizer_module = pytest.importorskip("fnlm.tokenizer")
    tokenizer_module.Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"]).save(
        tmp_path / "tok")
    model = dataclasses.replace(TINY, vocab_size=257, num_layers=1)
    out = tmp_path / "sweep"
    common = ["train", "--out", str(out), "--no-progress", "--device", "cpu"]
    model_flags = [f"--{k.replace('_', '-')}={v}" for k, v in model.to_dict().items() if not isinstance(v, bool)]
    assert main(common + model_flags + [
        "--train-data", str(token_files[0]), "--steps", "3", "--batch-size", "2", "--warmup-steps", "1",
        "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "0",
        "--sweep", "lr:min_lr=1e-3:1e-4,3e-3:3e-4", "--sweep-stream", "same", "--sweep", "seed=0,1"]) == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["stream"] == "same" and list(saved["runs"]) == [
        "lr=0.001_min_lr=0.0001_seed=0", "lr=0.001_min_lr=0.0001_seed=1",
        "lr=0.003_min_lr=0.0003_seed=0", "lr=0.003_min_lr=0.0003_seed=1"]
    assert "would change what the run computes (weight_decay 0.1 -> 0.5)" in cli_error(
        common + ["--resume", "--weight-decay", "0.5"], capsys)
    assert "continues the saved sweep" in cli_error(common + ["--resume", "--sweep", "lr=1e-3"], capsys)
    assert "--reschedule" in cli_error(common + ["--resume", "--steps", "4"], capsys)
    assert main(common + ["--resume", "--steps", "4", "--reschedule"]) == 0  # accepted, and recorded:
    assert json.loads((out / "sweep.json").read_text())["train"]["steps"] == 4
    run_log = read_log(out / "lr=0.003_min_lr=0.0003_seed=1" / "log.jsonl")
    assert {"step": 3, "reschedule": {"decay_steps": [3, 4]}} in run_log
    checkpoint = latest_checkpoint(out / "lr=0.003_min_lr=0.0003_seed=1")
    assert load_checkpoint(checkpoint).step == 4
    assert main(["generate", "--checkpoint", str(checkpoint), "--tokenizer", str(tmp_path / "tok"),
                 "--prompt", "ab", "--max-new-tokens", "3", "--temperature", "0"]) == 0


@pytest.mark.parametrize("text, message", [
    ("lr", "expected NAME=V1,V2"),
    ("lr=", "expected NAME=V1,V2"),
    ("beta1=0.9,0.95", "cannot sweep 'beta1'"),
    ("lr=1e-3,fast", "'fast' is not a number"),
    ("seed=0,1.5", "'1.5' is not an int"),
    ("lr=1e-3,1e-3", "a value appears twice"),
    ("lr:min_lr=1e-3", "has 1 values for 2 names"),
    ("lr=inf", "is not finite"),
])
def test_bad_sweep_axes_raise(text, message):
    with pytest.raises(ValueError, match=message):
        parse_axis(text)


def test_grid_is_the_product_of_the_axes_first_slowest(token_files):
    axes = [parse_axis("lr:min_lr=1e-3:1e-4,3e-3:3e-4"), parse_axis("weight-decay=0,0.1")]
    runs = grid(axes)
    assert runs == [{"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.0}, {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1},
                    {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.0}, {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.1}]
    assert run_name(runs[1]) == "lr=0.001_min_lr=0.0001_weight_decay=0.1"
    with pytest.raises(ValueError, match=r"\['lr'\] given in more than one axis"):
        grid([parse_axis("lr=1e-3"), parse_axis("lr:seed=1e-3:0")])
    with pytest.raises(ValueError, match="sweep run lr=5e-05: min_lr must be in"):  # lr < the base min_lr
        train_sweep(TINY, tiny_config(token_files), [parse_axis("lr=5e-5")], token_files[0].parent / "x")


@pytest.mark.slow
def test_the_compiled_sweep_step_traces_as_one_graph():
    """torch.compile(vmap(step)): gradient, clipping, schedule, update and the freeze in one graph."""
    base = TrainConfig(steps=10, warmup_steps=2)
    params = stack([init_params(TINY, seed=s) for s in range(2)])
    opt_state = stack([make_optimizer(base).init(init_params(TINY))] * 2)
    hparams = {"lr": torch.tensor([1e-3, 3e-3]), "weight_decay": torch.tensor([0.1, 0.0])}
    step = make_sweep_step(TINY, base, autocast_dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(step)(params, opt_state, hparams, torch.ones(2, dtype=torch.bool), *batch(0))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
