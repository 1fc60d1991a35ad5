"""Ranks of ordinal-regression data: raw targets (ages, scores, years) to rank indices, the value each rank
stands for, and deterministic k-fold indices.

Data-layer code: NumPy and plain tensors only (no ``torch.nn``, nothing of :mod:`vlprompt.methods`), used by the
readers of :mod:`vlprompt.data.ordinal` and, through :func:`rank_values_from_names`, by the ordinal methods.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

__all__ = ["RankValueError", "RankSpec", "rank_values_from_spec", "ranks_from_values", "k_fold_indices",
           "rank_values_from_names", "consecutive_integers"]


class RankValueError(DataError, ValueError):
    """A target value or a rank specification that cannot be turned into ranks.

    It is a :class:`ValueError` (for callers and tests) and a :class:`vlprompt.errors.DataError`
    (so the CLI reports it as one line naming the offending value).
    """


RankSpec = Union[str, Sequence[float]]


def _parse_spec(spec: RankSpec) -> tuple[str, np.ndarray]:
    """``("range", [lo, hi])`` for ``"lo:hi"``; ``("bins", edges)`` for edges (list or ``"a,b,c"``)."""
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            parts = text.split(":")
            try:
                lo, hi = (int(p) for p in parts)
            except ValueError as e:
                raise RankValueError(f"rank range {spec!r} must be 'lo:hi' with integers, e.g. '0:100'") from e
            if hi <= lo:
                raise RankValueError(f"rank range {spec!r} is empty or has one rank; need lo < hi")
            return "range", np.array([lo, hi], dtype=np.int64)
        try:
            edges = [float(p) for p in text.split(",")]
        except ValueError as e:
            raise RankValueError(f"rank spec {spec!r} is neither 'lo:hi' nor comma-separated bin edges") from e
    else:
        edges = [float(e) for e in spec]
    edges = np.asarray(edges, dtype=np.float64)
    if edges.size < 2:
        raise RankValueError(f"bin edges {edges.tolist()} need at least 2 values")
    if not np.all(np.isfinite(edges)) or not np.all(np.diff(edges) > 0):
        raise RankValueError(f"bin edges {edges.tolist()} must be finite and strictly increasing")
    return "bins", edges


def rank_values_from_spec(spec: RankSpec) -> Tensor:
    """The value each rank stands for, ``(R,)`` float32: ``lo..hi`` for ``"lo:hi"`` (both ends
    included, ``R = hi - lo + 1``: ``"0:100"`` is the reference's 101 age ranks), or the bin centres
    ``(e[k] + e[k+1]) / 2`` for bin edges ``e`` (``R = len(e) - 1``)."""
    kind, p = _parse_spec(spec)
    if kind == "range":
        return torch.arange(int(p[0]), int(p[1]) + 1, dtype=torch.float32)
    return torch.as_tensor((p[:-1] + p[1:]) / 2.0, dtype=torch.float32)


def ranks_from_values(values, spec: RankSpec) -> tuple[Tensor, Tensor]:
    """Map raw target values (ages, scores, years) to rank indices.

    * ``spec = "lo:hi"`` (integers, both included): rank = ``round(value) - lo`` with round half up
      (ages are integers; 23.4 -> rank of 23). A value that rounds outside ``[lo, hi]`` is an error,
      never silently clipped.
    * ``spec`` = bin edges ``e_0 < e_1 < ... < e_K`` (a sequence or ``"e0,e1,..."``): rank ``k`` for
      ``e_k <= value < e_{k+1}``; the last bin also takes ``value == e_K``. Values outside
      ``[e_0, e_K]`` are an error.

    Args:
        values: ``(N,)`` numbers (list, array or tensor).
        spec: see above.

    Returns:
        ``(ranks, rank_values)``: ``(N,)`` long rank indices and ``(R,)`` float32 values of the ranks
        (see :func:`rank_values_from_spec`).

    Raises:
        RankValueError (a ValueError): a value is NaN or outside the range (the message names the
        first such value and how many there are), or the spec is malformed.
    """
    kind, p = _parse_spec(spec)
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64).reshape(-1)
    if np.isnan(v).any():
        raise RankValueError(f"target value nan (at index {int(np.flatnonzero(np.isnan(v))[0])}) cannot be ranked")
    if kind == "range":
        lo, hi = int(p[0]), int(p[1])
        rounded = np.floor(v + 0.5)
        bad = (rounded < lo) | (rounded > hi)
        where = f"the rank range {lo}:{hi}"
    else:
        bad = (v < p[0]) | (v > p[-1])
        where = f"the bins [{p[0]:g}, {p[-1]:g}]"
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise RankValueError(
            f"target value {v[first]:g} (index {first}) is outside {where}; {int(bad.sum())} value(s) out of range"
        )
    if kind == "range":
        ranks = rounded.astype(np.int64) - lo
    else:
        ranks = np.searchsorted(p, v, side="right") - 1
        ranks = np.minimum(ranks, p.size - 2)  # value == last edge -> last bin
    return torch.as_tensor(ranks, dtype=torch.long), rank_values_from_spec(spec)


def k_fold_indices(n: int, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic ``k``-fold split of ``range(n)``.

    A single permutation from ``numpy.random.default_rng(seed)`` (PCG64: the same in every process,
    platform and NumPy >= 1.17) is cut into ``k`` contiguous folds with ``numpy.array_split`` (sizes
    differ by at most one, the larger first). Fold ``f``'s test set is its slice; its train set is the
    rest. Both are sorted int64 arrays; the test sets are disjoint and cover ``range(n)``.

    Returns:
        A list of ``k`` ``(train_idx, test_idx)`` pairs.
    """
    n, k = int(n), int(k)
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if n < k:
        raise ValueError(f"cannot split {n} items into {k} folds")
    perm = np.random.default_rng(seed).permutation(n)
    folds = [np.sort(f).astype(np.int64) for f in np.array_split(perm, k)]
    out = []
    for f, test in enumerate(folds):
        train = np.sort(np.concatenate([folds[g] for g in range(k) if g != f])).astype(np.int64)
        out.append((train, test))
    return out


def rank_values_from_names(classnames: Sequence[str], given: Optional[Sequence[float]] = None) -> Tensor:
    """The value each rank stands for, ``(R,)`` float32.

    ``given`` (the ``rank_values`` option, e.g. bin centres) wins; otherwise the class names when every one is a
    number (ages "0".."100": the readers of :mod:`vlprompt.data.ordinal` name ranks by their values), else
    ``0..R-1`` (Adience's age groups, decades, aesthetic levels: rank indices, as the reference's
    ``rank_output_value_array``).
    """
    r = len(classnames)
    if r < 2:
        raise DataError(f"ordinal regression needs at least 2 ranks, got {r}")
    if given is not None:
        values = torch.as_tensor([float(v) for v in given], dtype=torch.float32)
        if values.shape != (r,):
            raise ConfigError(f"rank_values has {values.numel()} values for {r} ranks")
        what = "rank_values"
    else:
        try:
            values = torch.tensor([float(c) for c in classnames], dtype=torch.float32)
        except ValueError:
            return torch.arange(r, dtype=torch.float32)  # named groups: rank indices
        what = "the numeric class names"
    if not bool(torch.isfinite(values).all()) or not bool((values[1:] > values[:-1]).all()):
        raise ConfigError(f"rank values ({what}) must be finite and strictly increasing, got "
                          f"{values.tolist()[:8]}...; pass rank_values=[...] explicitly")
    return values


def consecutive_integers(values: Tensor) -> bool:
    """Whether ``values`` ``(R,)`` are ``v0, v0 + 1, ...`` with an integer ``v0`` (then accuracy is the
    reference's ``round(prediction) == target``)."""
    return bool(torch.equal(values, values[0] + torch.arange(len(values), dtype=values.dtype))) and \
        float(values[0]) == round(float(values[0]))
