"""Which swept parameters mattered: pure functions over (parameter values, metric) pairs.

W&B's parameter-importance panel shows two numbers per parameter, and so does the report: the
correlation of the metric with the value (its sign says which way to move) and a random forest's
importance (it also sees effects that are not monotonic, and interactions).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from llmexp.plotting import is_number, log_scale


def swept(params: Sequence[Dict[str, Any]]) -> List[str]:
    """Parameters that took more than one value: a constant one explains nothing and would only
    add an empty panel."""
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]


def encode(values: Sequence[Any], log: bool) -> List[float]:
    """One number per value: log10 on a log-scaled parameter (a step from 1e-4 to 1e-3 is as big
    as from 1e-3 to 1e-2), sorted category codes for anything that is not a number."""
    if all(is_number(v) for v in values):
        return [math.log10(v) if log and v > 0 else float(v) for v in values]
    codes = {c: i for i, c in enumerate(sorted({repr(v) for v in values}))}
    return [float(codes[repr(v)]) for v in values]


def correlation(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson correlation; None when either side is constant (it is undefined there)."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def forest_importance(columns: Sequence[Sequence[float]], y: Sequence[float], seed: int = 0) -> List[float]:
    """Impurity importance of each column in a small random forest fit to ``y`` (sums to 1)."""
    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    X = np.asarray(columns, dtype=float).T
    forest = RandomForestRegressor(n_estimators=100, min_samples_leaf=1, random_state=seed).fit(X, np.asarray(y))
    return [float(v) for v in forest.feature_importances_]


def importance(params: Sequence[Dict[str, Any]], metric: Sequence[float],
               distributions: Optional[Dict[str, Optional[str]]] = None) -> List[Dict[str, Any]]:
    """One row per swept parameter (``param``, ``importance``, ``correlation``), most important
    first. Only trials with a metric count; below three of them the forest says nothing, and its
    importance is None."""
    distributions = distributions or {}
    keys = swept(params)
    if not keys or len(metric) < 2:
        return []
    columns = [encode([p.get(k) for p in params], log_scale([p.get(k) for p in params], distributions.get(k)))
               for k in keys]
    forest = forest_importance(columns, metric) if len(metric) >= 3 and len(set(metric)) > 1 else [None] * len(keys)
    # A correlation with category codes (stage=dpo, kto, ...) would rank them by their order: none.
    numeric = [all(isinstance(p.get(k), (int, float)) for p in params) for k in keys]
    rows = [{"param": k, "importance": f, "correlation": correlation(c, metric) if num else None}
            for k, c, f, num in zip(keys, columns, forest, numeric)]
    return sorted(rows, key=lambda r: -(r["importance"] if r["importance"] is not None else abs(r["correlation"] or 0)))
