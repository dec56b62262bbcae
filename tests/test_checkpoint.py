"""fnlm.checkpoint: round trips, weights_only files, atomic writes, clear errors, .npz export."""

import io
import json

import numpy as np
import pytest
import torch

from fnlm import checkpoint
from fnlm.checkpoint import CheckpointError, export_npz, load_checkpoint, save_checkpoint
from fnlm.config import ModelConfig
from fnlm.data import resolve_device
from fnlm.model import init_params
from fnlm.optim import adamw, apply_updates
from fnlm.tree import flatten, tree_map, unflatten
from tests import adapters
from tests.full_disk import disk_full_after

TINY = ModelConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24)


class _TestNet(torch.nn.Module):
    def __init__(self, d_input: int = 100, d_output: int = 10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(d_input, 200), torch.nn.Linear(200, 100), torch.nn.Linear(100, d_output)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("to_file_object", [False, True])
def test_module_checkpoint_cs336_contract(tmp_path, to_file_object):
    """CS336's tests/test_serialization.py::test_checkpointing, to a path and to a file object."""
    torch.manual_seed(42)
    adamw_cls = adapters.get_adamw_cls()

    def fresh():
        model = _TestNet()
        return model, adamw_cls(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)

    model, optimizer = fresh()
    inputs, labels = torch.rand((10, 100)), torch.randint(0, 10, (10,))
    for i in range(10):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs[i]), labels[i]).backward()
        optimizer.step()
    target = io.BytesIO() if to_file_object else tmp_path / "checkpoint.pt"
    adapters.run_save_checkpoint(model, optimizer, iteration=10, out=target)
    if to_file_object:
        target.seek(0)
    new_model, new_optimizer = fresh()
    assert adapters.run_load_checkpoint(target, new_model, new_optimizer) == 10
    for key, value in model.state_dict().items():
        assert torch.equal(value, new_model.state_dict()[key])
    old, new = optimizer.state_dict(), new_optimizer.state_dict()
    assert old["param_groups"] == new["param_groups"]
    for index, state in old["state"].items():
        assert all(torch.equal(value, new["state"][index][name]) for name, value in state.items())


def trained(steps=3):
    params = init_params(TINY, seed=1)
    optimizer = adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0)
    state = optimizer.init(params)
    for step in range(steps):
        grads = tree_map(lambda p: torch.full_like(p, 0.1 * (step + 1)), params)
        updates, state = optimizer.update(grads, state, params)
        params = apply_updates(params, updates)
    return params, state, optimizer


def test_round_trip_restores_every_part(tmp_path):
    params, opt_state, optimizer = trained()
    rng = torch.Generator().manual_seed(5)
    torch.randint(0, 10, (3,), generator=rng)
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(path, model_config=TINY, params=params, step=3, opt_state=opt_state, rng=rng.get_state(),
                    train_config={"lr": 0.01}, extra={"tokens_seen": 96})
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == TINY and ckpt.step == 3 and ckpt.train_config == {"lr": 0.01}
    assert ckpt.extra == {"tokens_seen": 96}
    assert flatten(ckpt.params).keys() == flatten(params).keys()
    assert all(torch.equal(a, flatten(params)[key]) for key, a in flatten(ckpt.params).items())
    restored = unflatten(ckpt.opt_state, like=optimizer.init(ckpt.params))
    assert type(restored) is type(opt_state)
    assert all(torch.equal(a, b) for a, b in zip(flatten(restored).values(), flatten(opt_state).values()))
    resumed = torch.Generator()
    resumed.set_state(ckpt.rng)
    assert torch.equal(torch.randint(0, 10**6, (4,), generator=resumed), torch.randint(0, 10**6, (4,), generator=rng))
    # The file is plain data: weights_only loading sees flat str -> tensor dicts and a config header.
    blob = torch.load(path, weights_only=True)
    assert blob["model_config"] == TINY.to_dict() and all(isinstance(k, str) for k in blob["params"])


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    params, _, _ = trained(1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model_config=TINY, params=params, step=1)
    before = path.read_bytes()

    def crashing_save(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model_config=TINY, params=params, step=2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path).step == 1


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    params, _, _ = trained(1)
    good = tmp_path / "good.pt"
    save_checkpoint(good, model_config=TINY, params=params, step=1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is a damaged or cut-short checkpoint"):
        load_checkpoint(truncated)
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4000))
    for name in ("text.pt", "random.pt"):  # never torch's advice to retry with weights_only=False
        with pytest.raises(CheckpointError, match=f"{name} is not an fnlm checkpoint: it is not a file that "
                                                  "torch.save wrote$"):
            load_checkpoint(tmp_path / name)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"not an fnlm.checkpoint/1 checkpoint \(format: None\)"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": checkpoint.FORMAT, "obj": _TestNet}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled.pt is not an fnlm checkpoint: it holds objects other than"):
        load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="not an fnlm.module-checkpoint/1 checkpoint"):
        adapters.run_load_checkpoint(good, _TestNet(), adapters.get_adamw_cls()(_TestNet().parameters()))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match="is not a file"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        save_checkpoint(good, model_config=TINY, params=params, step=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_an_unavailable_device_is_not_blamed_on_the_file(tmp_path):
    params, _, _ = trained(1)
    save_checkpoint(tmp_path / "ckpt.pt", model_config=TINY, params=params, step=1)
    with pytest.raises(ValueError, match=r"cannot load .*ckpt.pt: device 'cuda' is not available: no CUDA"):
        load_checkpoint(tmp_path / "ckpt.pt", map_location="cuda")


def test_auto_loads_onto_the_device_it_resolves_to(tmp_path):
    params, _, _ = trained(1)
    save_checkpoint(tmp_path / "ckpt.pt", model_config=TINY, params=params, step=1)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt", map_location="auto")
    assert {leaf.device.type for leaf in flatten(ckpt.params).values()} == {resolve_device("auto").type}


def test_a_full_disk_names_the_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a failed write as "RuntimeError: unexpected pos N vs M"; the OSError
    beneath it becomes one that names the checkpoint."""
    params, _, _ = trained(1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model_config=TINY, params=params, step=1)
    before = path.read_bytes()
    with disk_full_after(monkeypatch, 1000), pytest.raises(OSError, match=f"no space left writing {path}$"):
        save_checkpoint(path, model_config=TINY, params=params, step=2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with disk_full_after(monkeypatch, 100), pytest.raises(OSError, match="no space left writing .*params.npz$"):
        export_npz(path, tmp_path / "params.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_export_npz_reads_with_numpy_alone(tmp_path):
    params, _, _ = trained(1)
    save_checkpoint(tmp_path / "ckpt.pt", model_config=TINY, params=tree_map(lambda p: p.bfloat16(), params), step=1)
    export_npz(tmp_path / "ckpt.pt", tmp_path / "params.npz")
    with np.load(tmp_path / "params.npz", allow_pickle=False) as arrays:
        assert json.loads(str(arrays["config.json"])) == TINY.to_dict()
        for key, leaf in flatten(params).items():
            assert arrays[key].dtype == np.float32
            np.testing.assert_array_equal(arrays[key], leaf.bfloat16().float().numpy())
