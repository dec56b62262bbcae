from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SNAPSHOTS = Path(__file__).parent / "_snapshots"


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python, with the repository first on its path (keeping any
    PYTHONPATH it had: packages may live there)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_interpreted(module: str, check: str, printed: str) -> None:
    """Run tests.<module>.<check>() in a fresh Python under Triton's CPU interpreter (which must
    be set before fnlm defines its kernels) and assert that it passed and printed `printed`."""
    call = f"from tests.{module} import {check}; {check}()"
    result = subprocess.run([sys.executable, "-c", call], env=subprocess_env(TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert printed in result.stdout


def skip_before_interpreter_3_9(triton, loop_bound: str) -> pytest.MarkDecorator:
    """Skip a run_interpreted test under Triton before 3.9, whose interpreter cannot bound a loop
    by a runtime value (`loop_bound`, what the kernels' loops are bounded by). The compiled
    kernels run there: their CUDA tests check them."""
    old = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9)
    return pytest.mark.skipif(old, reason=f"Triton's interpreter before 3.9 cannot bound a loop by {loop_bound}")


def cli_error(argv: list[str], capsys) -> str:
    """The one-line error `fnlm` prints for argv (asserting exit code 1 and a single line)."""
    from fnlm.cli import main

    capsys.readouterr()
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


# Properties run many examples on CPU; no deadline because the first call of a torch op is slow.
settings.register_profile(
    "fnlm", deadline=None, max_examples=int(os.environ.get("FNLM_HYPOTHESIS_EXAMPLES", 40)),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fnlm")


@pytest.fixture
def token_files(tmp_path):
    """(train.npy, val.npy) over a 48-token vocabulary: a learnable stream, mostly counting mod 48
    with some noise, for training-loop tests."""
    rng = np.random.default_rng(0)
    stream = (np.arange(30_000) + (rng.random(30_000) < 0.1) * rng.integers(0, 48, 30_000)) % 48
    np.save(tmp_path / "train.npy", stream.astype(np.uint16))
    np.save(tmp_path / "val.npy", stream[:2_000].astype(np.uint16))
    return tmp_path / "train.npy", tmp_path / "val.npy"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs mounted at tmp_path/disk (skips unless this process may mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)
