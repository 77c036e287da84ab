"""The compute dtypes a run may ask for, by name: the port, the reference, the harness and the
benchmarks all accept exactly these."""
from __future__ import annotations

from typing import Tuple

DTYPES: Tuple[str, ...] = ("float32", "float16", "bfloat16")
TRUTH_DTYPE = "float64"  # the harness's float64 reference, never a run's dtype
