"""Ordinal regression (OrdinalCLIP and its baselines): the public names, re-exported from their layers.

* rank parsing, rank-value specs and k-fold indices: :mod:`vlprompt.data.ranks` (data layer);
* rank embeddings, the loss, predictions, metrics, ordinality and the regression decode:
  :mod:`vlprompt.methods.ordinal.parts` (methods layer).

The mean +- std over folds is :func:`vlprompt.stats.mean_std` (``vlprompt ordinal-folds``).
"""
from __future__ import annotations

from .data.ranks import RankValueError, k_fold_indices, rank_values_from_spec, ranks_from_values
from .methods.ordinal import parts as _parts
from .methods.ordinal.parts import *  # noqa: F401,F403  (its __all__: the methods layer's public names)

__all__ = [*_parts.__all__, "RankValueError", "rank_values_from_spec", "ranks_from_values", "k_fold_indices"]
