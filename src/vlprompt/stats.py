"""The one mean +- std convention of vlprompt's summaries (seeds, folds).

CoOp's ``parse_test_res.py`` (KaiyangZhou/CoOp, the script behind the CoOp / CoCoOp tables: "Compute mean and
std across different folders (seeds)") prints ``np.mean(values)`` and ``np.std(values)``: numpy's default,
the POPULATION standard deviation (ddof=0, divide by n). vlprompt uses the same, so that a "mean ± std over
seeds" here is comparable with the papers' tables. With 3 seeds the sample std (ddof=1) would be
sqrt(3/2) = 1.22x larger.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["STD_CONVENTION", "mean_std"]

STD_CONVENTION = "population std (ddof=0, numpy.std), as CoOp's parse_test_res.py"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """``(mean, std)`` of ``values`` with the population std (ddof=0; 0.0 for a single value).

    Raises ValueError on no values (a mean of nothing is not a number to print)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(v.mean()), float(v.std(ddof=0))
