"""The handout's training experiments (section 7) as one table of `fnlm train` runs.

    python scripts/experiments.py run --data DATA --out runs/experiments --device cuda --parallel 6
    python scripts/experiments.py report --runs runs/experiments --docs docs/experiments

`run` trains in two waves: the learning-rate sweep first, then, at the sweep's best learning
rate, the batch-size sweep, the four ablations and the main experiment; finally it samples text
from the best TinyStories model and the main model. Runs go in parallel, `--parallel` at a
time, each in its own process (one GPU holds several of these small models at once).
`report` reads the runs' log.jsonl files and writes the learning-curve PNGs and summary.json.

DATA holds ts_train.npy / ts_valid.npy (TinyStories V1 head, 10K BPE, tokenizer in tok_ts10k/)
and en_train.npy / en_valid.npy (the English stand-in for OpenWebText, 32K BPE, tok_en32k/).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fnlm.run import read_log  # noqa: E402

TINYSTORIES_MODEL = dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
BASE_TRAIN = dict(batch_size=32, steps=400, warmup_steps=40, weight_decay=0.1, beta2=0.95, max_grad_norm=1.0,
                  log_every=10, eval_every=50, eval_batches=None, autocast="bfloat16", keep_checkpoints=1,
                  checkpoint_every=0)
LEARNING_RATES = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
BATCH_SIZES = [8, 16, 64, 128, 256]  # 32 is the learning-rate sweep's best run
ABLATIONS = {
    "no_rmsnorm": dict(remove_rmsnorm=True),
    "no_rmsnorm_low_lr": dict(remove_rmsnorm=True, lr_scale=0.1),
    "post_norm": dict(use_post_norm=True),
    "nope": dict(remove_rope=True),
    "silu_ffn": dict(ffn_type="silu", d_ff=4 * 512),  # 3 x 512 x 1344 = 2 x 512 x 2048 - a little
}
MAIN = dict(vocab_size=32_000, batch_size=64, steps=3000, warmup_steps=150, eval_every=250, eval_batches=16)
# --smoke: the same table at toy size, to check the pipeline on a CPU before spending GPU time.
SMOKE = dict(context_length=32, d_model=32, num_layers=1, num_heads=2, steps=6, warmup_steps=1, eval_every=3,
             eval_batches=2, log_every=1, autocast="none")


class Run(NamedTuple):
    name: str
    dataset: str  # "ts" or "en"
    flags: dict


def lr_runs() -> list[Run]:
    return [Run(f"lr_{lr:g}", "ts", {**TINYSTORIES_MODEL, **BASE_TRAIN, "lr": lr, "min_lr": lr / 10})
            for lr in LEARNING_RATES]


def second_wave(best_lr: float) -> list[Run]:
    base = {**TINYSTORIES_MODEL, **BASE_TRAIN, "lr": best_lr, "min_lr": best_lr / 10}
    tokens = BASE_TRAIN["batch_size"] * BASE_TRAIN["steps"]
    runs = []
    for batch in BATCH_SIZES:  # the same number of tokens at every batch size
        steps = tokens // batch
        runs.append(Run(f"batch_{batch}", "ts", {**base, "batch_size": batch, "steps": steps,
                                                 "warmup_steps": max(1, steps // 10),
                                                 "eval_every": max(1, steps // 8), "log_every": max(1, steps // 40)}))
    for name, change in ABLATIONS.items():
        change = dict(change)
        scale = change.pop("lr_scale", 1.0)
        runs.append(Run(f"ablation_{name}", "ts", {**base, **change, "lr": best_lr * scale, "min_lr": best_lr * scale / 10}))
    runs.append(Run("main_en", "en", {**base, **MAIN}))
    return runs


def command(run: Run, data: Path, out: Path, device: str, smoke: bool = False) -> list[str]:
    flags = {**run.flags, "train_data": data / f"{run.dataset}_train.npy",
             "val_data": data / f"{run.dataset}_valid.npy", "device": device}
    if smoke:
        flags |= SMOKE | {"d_ff": 64, "batch_size": min(flags["batch_size"], 8)}
    args = [sys.executable, "-m", "fnlm", "train", "--out", str(out / run.name), "--no-progress"]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is None:
            args += [flag, "none"]
        else:
            args += [flag, str(value)]
    return args


def run_all(runs: list[Run], args: argparse.Namespace) -> None:
    def one(run: Run) -> None:
        with open(args.out / f"{run.name}.out", "w") as log:
            code = subprocess.call(command(run, args.data, args.out, args.device, args.smoke),
                                   stdout=log, stderr=subprocess.STDOUT)
        print(f"{run.name}: exit {code}", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, runs))


def summarize(run_dir: Path) -> dict:
    """Final and best validation loss, the step of divergence (if any), tokens and wall time."""
    records = read_log(run_dir / "log.jsonl") if (run_dir / "log.jsonl").exists() else []
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    train = [r for r in records if r.get("train_loss") is not None]
    diverged = next((r["step"] for r in train if not math.isfinite(r["train_loss"]) or r["train_loss"] > 20), None)
    finite_val = [loss for _, loss in val if math.isfinite(loss)]
    return {
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": min(finite_val) if finite_val else None,
        "final_train_loss": train[-1]["train_loss"] if train else None,
        "diverged_at_step": diverged,
        "steps": records[-1]["step"] if records else 0,
        "tokens": records[-1].get("tokens") if records else 0,
        "wall_seconds": records[-1].get("wall_s") if records else None,
    }


def best_learning_rate(out: Path) -> float:
    scores = {run.flags["lr"]: summarize(out / run.name)["final_val_loss"] for run in lr_runs()}
    finite = {lr: loss for lr, loss in scores.items() if loss is not None and math.isfinite(loss)}
    if not finite:
        raise RuntimeError(f"every learning-rate run failed: {scores}")
    return min(finite, key=finite.get)


def sample(out: Path, data: Path, run_name: str, tokenizer: str, prompt: str, device: str) -> None:
    checkpoints = sorted((out / run_name / "checkpoints").glob("step_*.pt"))
    if not checkpoints:
        return
    args = [sys.executable, "-m", "fnlm", "generate", "--checkpoint", str(checkpoints[-1]),
            "--tokenizer", str(data / tokenizer), "--prompt", prompt, "--max-new-tokens", "256",
            "--temperature", "0.8", "--top-p", "0.95", "--seed", "0", "--num-samples", "2", "--device", device]
    with open(out / f"generate_{run_name}.txt", "w") as text:
        subprocess.call(args, stdout=text, stderr=subprocess.STDOUT)


def main_run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    run_all(lr_runs(), args)
    best = best_learning_rate(args.out)
    print(f"best learning rate: {best:g}", flush=True)
    run_all(second_wave(best), args)
    sample(args.out, args.data, f"lr_{best:g}", "tok_ts10k", "Once upon a time", args.device)
    sample(args.out, args.data, "main_en", "tok_en32k", "The history of", args.device)
    (args.out / "plan.json").write_text(json.dumps({"best_lr": best, "runs": [
        {"name": r.name, "dataset": r.dataset, "flags": {k: str(v) for k, v in r.flags.items()}}
        for r in lr_runs() + second_wave(best)]}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every run")
    run.add_argument("--data", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--device", default="cuda")
    run.add_argument("--parallel", type=int, default=6)
    run.add_argument("--smoke", action="store_true", help="toy sizes: check the pipeline on a CPU")
    report = sub.add_parser("report", help="learning-curve PNGs and summary.json from finished runs")
    report.add_argument("--runs", type=Path, required=True)
    report.add_argument("--docs", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "run":
        main_run(args)
    else:
        write_report(args.runs, args.docs)


GROUPS = {  # figure -> (run-name prefixes, x axis)
    "learning_rate": (("lr_",), "step"),
    "batch_size": (("batch_", "BEST"), "tokens"),
    "batch_size_wallclock": (("batch_", "BEST"), "wall_s"),
    "ablations": (("ablation_", "BEST"), "step"),
    "main_experiment": (("main_en",), "step"),
    "main_experiment_wallclock": (("main_en",), "wall_s"),
}


def write_report(runs: Path, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in runs.iterdir() if (p / "log.jsonl").exists())
    summary = {name: summarize(runs / name) for name in names}
    best = f"lr_{json.loads((runs / 'plan.json').read_text())['best_lr']:g}"
    (docs / "summary.json").write_text(json.dumps({"best_lr_run": best, "runs": summary}, indent=1) + "\n")
    for figure, (prefixes, x_key) in GROUPS.items():
        members = [n for n in names if any(n.startswith(p) for p in prefixes)] + ([best] if "BEST" in prefixes else [])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in members:
            records = read_log(runs / name / "log.jsonl")
            label = name if name != best or figure == "learning_rate" else f"{name} (base)"
            val = [(r[x_key], r["val_loss"]) for r in records if r.get("val_loss") is not None]
            train = [(r[x_key], r["train_loss"]) for r in records if r.get("train_loss") is not None]
            line, = ax.plot(*zip(*val), marker="o", markersize=3, label=f"{label} val") if val else (None,)
            if train:
                ax.plot(*zip(*train), alpha=0.35, color=line.get_color() if line else None, linewidth=1)
        ax.set_xlabel({"step": "step", "tokens": "tokens seen", "wall_s": "wall-clock seconds"}[x_key])
        ax.set_ylabel("loss (faint: train, markers: validation)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 10))
        ax.set_title(figure.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(docs / f"{figure}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
