"""Ordinal regression (OrdinalCLIP and its baselines): the public names, re-exported from their layers.

* rank parsing, rank-value specs and k-fold indices: :mod:`vlprompt.data.ranks` (data layer);
* rank embeddings, the loss, predictions, metrics, ordinality and the regression decode:
  :mod:`vlprompt.methods.ordinal_parts` (methods layer).

The mean +- std over folds is :func:`vlprompt.stats.mean_std` (``vlprompt ordinal-folds``).
"""
from __future__ import annotations

from .data.ranks import RankValueError, k_fold_indices, rank_values_from_spec, ranks_from_values
from .methods.ordinal_parts import (INTERPOLATION_KINDS, RankEmbeddings, interpolation_weights, ordinal_loss,
                                    ordinal_metrics, ordinality_score, predict, regression_decode, regression_logits,
                                    regression_units, similarity_matrix)

__all__ = [
    "INTERPOLATION_KINDS",
    "RankValueError",
    "interpolation_weights",
    "RankEmbeddings",
    "ordinal_loss",
    "predict",
    "ordinal_metrics",
    "similarity_matrix",
    "ordinality_score",
    "regression_units",
    "regression_logits",
    "regression_decode",
    "rank_values_from_spec",
    "ranks_from_values",
    "k_fold_indices",
]
