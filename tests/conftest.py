from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

REPO = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SNAPSHOTS = Path(__file__).parent / "_snapshots"


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python, with the repository first on its path (keeping any
    PYTHONPATH it had: packages may live there)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}

# Properties run many examples on CPU; no deadline because the first call of a torch op is slow.
settings.register_profile(
    "fnlm", deadline=None, max_examples=int(os.environ.get("FNLM_HYPOTHESIS_EXAMPLES", 40)),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fnlm")
