"""Statistics of per-item scores (mean and standard error, as the harness reports) and the progress bar."""

from __future__ import annotations

import math
import sys

import numpy as np


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation, as the harness reports)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se


def progress_bar(total: int, unit: str, enabled: bool, desc: str = ""):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
