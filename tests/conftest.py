from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).parent / "fixtures"
SNAPSHOTS = Path(__file__).parent / "_snapshots"

# Properties run many examples on CPU; no deadline because the first call of a torch op is slow.
settings.register_profile(
    "fnlm", deadline=None, max_examples=int(os.environ.get("FNLM_HYPOTHESIS_EXAMPLES", 40)),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fnlm")
