"""Ordinal-regression building blocks for OrdinalCLIP (Li et al., NeurIPS 2022).

Everything here is pure (no I/O, no global state) and works on any device:

* :func:`interpolation_weights` and :class:`RankEmbeddings` -- rank embeddings interpolated from a
  few learnable *base* rank embeddings, so that neighbouring ranks get neighbouring embeddings.
* :func:`ordinal_loss` -- cross-entropy over ranks plus the text-to-image KL term of the reference.
* :func:`predict` and :func:`ordinal_metrics` -- argmax / expectation predictions, MAE and accuracy.
* :func:`similarity_matrix` and :func:`ordinality_score` -- how well learned prototypes keep the order.
* :func:`ranks_from_values`, :func:`rank_values_from_spec` -- map raw targets (ages, scores) to ranks.
* :func:`k_fold_indices` and :func:`summarise_folds` -- deterministic cross-validation folds.

Shapes use ``R`` ranks, ``B`` base ranks, ``T`` tokens per rank, ``D`` token-embedding width, ``N``
images in a batch and ``E`` prototype (joint-space) width.

Reference: github.com/xk-huang/OrdinalCLIP (``ordinalclip/models/prompt_leaners/rank_prompt_learner.py``,
``ordinalclip/runner/runner.py``, ``scripts/vis_ordinality.py``); the notes below say where this
module follows it and where (and why) it deliberately differs.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DataError

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
    "rank_values_from_spec",
    "ranks_from_values",
    "k_fold_indices",
    "summarise_folds",
]

INTERPOLATION_KINDS = ("linear", "inv_prop", "normal")

_INV_PROP_EPS = 1e-5


class RankValueError(DataError, ValueError):
    """A target value or a rank specification that cannot be turned into ranks.

    It is a :class:`ValueError` (for callers and tests) and a :class:`vlprompt.errors.DataError`
    (so the CLI reports it as one line naming the offending value).
    """


# --------------------------------------------------------------------------------------------------
# Interpolated rank embeddings
# --------------------------------------------------------------------------------------------------
def interpolation_weights(
    num_ranks: int,
    num_base: int,
    kind: str = "linear",
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """Weights that build each of ``R`` rank embeddings from ``B`` base rank embeddings.

    The bases sit at the anchors ``c_b = linspace(0, R-1, B)`` on the rank axis; rank ``r`` is at
    distance ``d[r, b] = |r - c_b|`` from base ``b``. Un-normalised weights:

    * ``"linear"``:   ``w = 1 - d / (R - 1)``   (1 on an anchor, 0 at the far end of the axis)
    * ``"inv_prop"``: ``w = 1 / (d + 1e-5)``    (inverse distance; an anchor rank is ~its base)
    * ``"normal"``:   ``w = exp(-d**2)``        (Gaussian; computed as a softmax, see below)

    and every row is then normalised over the bases (``w / w.sum(-1)``), so each rank embedding is a
    convex combination of *all* bases, not only of its two neighbours. With ``"linear"`` the base at
    the opposite end of the axis gets weight exactly 0 for the end ranks (``d = R - 1``).

    Matches the reference ``RankPromptLearner.create_interpolation_weights`` (same anchors, same three
    formulas, same row normalisation, including ``B == 1``: one anchor at ``(R-1)/2``, all weights 1).
    Differences, all numerical only:

    * computed in float64 and cast to ``dtype`` at the end (the reference uses the model dtype; in
      float16 ``1 / 1e-5`` overflows to inf and ``"inv_prop"`` rows become NaN);
    * ``"normal"`` is evaluated as ``softmax(-d**2)``, identical to ``exp(-d**2)`` normalised, but it
      does not underflow to ``0 / 0`` for ranks far from every anchor (e.g. R=101, B=2, r=50);
    * ``R == 1`` gives uniform weights ``1/B`` (the reference divides 0 by 0 for ``"linear"``).

    Args:
        num_ranks: ``R >= 1``.
        num_base: ``B >= 1``.
        kind: ``"linear"``, ``"inv_prop"`` or ``"normal"``.

    Returns:
        ``(R, B)`` tensor; every row is non-negative and sums to 1.
    """
    num_ranks, num_base = int(num_ranks), int(num_base)
    if num_ranks < 1 or num_base < 1:
        raise ValueError(f"num_ranks and num_base must be >= 1, got num_ranks={num_ranks}, num_base={num_base}")
    if kind not in INTERPOLATION_KINDS:
        raise ValueError(f"unknown interpolation kind {kind!r}; expected one of {INTERPOLATION_KINDS}")
    if num_ranks == 1:
        return torch.full((1, num_base), 1.0 / num_base, dtype=dtype, device=device)

    ranks = torch.arange(num_ranks, dtype=torch.float64)
    if num_base == 1:
        anchors = torch.tensor([(num_ranks - 1) / 2.0], dtype=torch.float64)
    else:
        anchors = torch.linspace(0, num_ranks - 1, num_base, dtype=torch.float64)
    dist = (ranks[:, None] - anchors[None, :]).abs()  # (R, B)

    if kind == "linear":
        w = 1.0 - dist / (num_ranks - 1)
        w = w / w.sum(dim=-1, keepdim=True)
    elif kind == "inv_prop":
        w = 1.0 / (dist + _INV_PROP_EPS)
        w = w / w.sum(dim=-1, keepdim=True)
    else:  # "normal"
        w = torch.softmax(-dist * dist, dim=-1)
    return w.to(dtype=dtype, device=device)


class RankEmbeddings(nn.Module):
    """Learnable rank embeddings: ``(R, T, D)`` token embeddings, one ``T``-token "word" per rank.

    * ``num_base=B`` (OrdinalCLIP): a parameter ``base`` of shape ``(B, T, D)`` and a non-persistent
      buffer ``weights`` of shape ``(R, B)`` from :func:`interpolation_weights` (it is derived from
      ``R``, ``B`` and ``kind``, so it is not saved in state dicts). ``forward()`` returns
      ``einsum('rb,btd->rtd', weights, base)``: rank embeddings interpolated from the bases, hence
      ordered along the bases (with ``B == 2`` rank ``r`` lies at ``r/(R-1)`` of the way from base 0
      to base 1 under ``"linear"``).
    * ``num_base=None`` (plain CoOp-style ranks): a free parameter ``embeds`` of shape ``(R, T, D)``.

    The output is built with one einsum and no in-place slice writes, so backward costs O(R·B·T·D)
    (the reference writes each rank into a cloned sentence tensor in a Python loop, whose backward
    copies the whole tensor once per rank: O(R^2)).

    Args:
        num_ranks: ``R``.
        num_tokens: ``T``, tokens per rank word.
        dim: ``D``, token-embedding width of the text encoder.
        num_base: ``B`` or ``None`` for free rank embeddings.
        kind: interpolation kind (see :func:`interpolation_weights`); ignored when ``num_base`` is None.
        init_std: standard deviation of the normal initialisation (reference: 0.02).
        init: optional initial values, ``(B, T, D)`` (or ``(R, T, D)`` when ``num_base`` is None), e.g.
            the token embeddings of the rank words ("young", "old"); copied, not shared.
        dtype: parameter dtype (default: torch's default dtype); ``init`` is cast to it.
    """

    def __init__(
        self,
        num_ranks: int,
        num_tokens: int,
        dim: int,
        num_base: Optional[int] = None,
        kind: str = "linear",
        init_std: float = 0.02,
        init: Optional[Tensor] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if min(num_ranks, num_tokens, dim) < 1:
            raise ValueError(f"num_ranks, num_tokens and dim must be >= 1, got {num_ranks}, {num_tokens}, {dim}")
        if num_base is not None and num_base < 1:
            raise ValueError(f"num_base must be >= 1 or None, got {num_base}")
        dtype = dtype or torch.get_default_dtype()
        self.num_ranks, self.num_tokens, self.dim = int(num_ranks), int(num_tokens), int(dim)
        self.num_base = None if num_base is None else int(num_base)
        self.kind = kind

        rows = self.num_ranks if self.num_base is None else self.num_base
        shape = (rows, self.num_tokens, self.dim)
        if init is not None:
            init = torch.as_tensor(init)
            if tuple(init.shape) != shape:
                what = "(R, T, D)" if self.num_base is None else "(B, T, D)"
                raise ValueError(f"init has shape {tuple(init.shape)}, expected {what} = {shape}")
            values = init.detach().to(dtype=dtype).clone()
        else:
            values = torch.empty(shape, dtype=dtype)
            nn.init.normal_(values, std=init_std)

        if self.num_base is None:
            self.embeds = nn.Parameter(values)
            self.base = None
            self.register_buffer("weights", None, persistent=False)
        else:
            self.base = nn.Parameter(values)
            self.embeds = None
            weights = interpolation_weights(self.num_ranks, self.num_base, kind, dtype=torch.float32)
            self.register_buffer("weights", weights, persistent=False)

    def forward(self) -> Tensor:
        """Return the rank embeddings, ``(R, T, D)``, in the parameter dtype."""
        if self.base is None:
            return self.embeds
        return torch.einsum("rb,btd->rtd", self.weights.to(self.base.dtype), self.base)

    def extra_repr(self) -> str:
        base = "free" if self.num_base is None else f"num_base={self.num_base}, kind={self.kind!r}"
        return f"num_ranks={self.num_ranks}, num_tokens={self.num_tokens}, dim={self.dim}, {base}"


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
def ordinal_loss(
    logits: Tensor,
    targets: Tensor,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    kl_temperature: float = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """OrdinalCLIP's training loss: image-to-text cross-entropy + text-to-image KL.

    * ``ce``: ``cross_entropy(logits, targets)``, mean over the ``N`` images.
    * ``kl``: each rank ``r`` present in the batch is a "text query" over the batch's images. Its
      target distribution over images is ``q_r = softmax(kl_temperature * onehot[:, r])`` (with
      ``onehot[i, r] = 1`` iff image ``i`` has rank ``r``: the images of rank ``r`` share almost all
      of the mass, the others get ``1/(n_r e^10 + N - n_r)`` each), and its prediction is
      ``log p_r = log_softmax(logits[:, r])`` over the images. ``kl = sum_{r present}
      KL(q_r || p_r) / #present``, with each KL summed over images; absent ranks add nothing.
    * ``loss = ce_weight * ce + kl_weight * kl``.

    This is the reference's ``Runner.compute_kl_loss`` exactly: ``one_hot(y, R).t()``, rows of absent
    ranks zeroed after ``(y_t * 10).softmax(-1)``, ``nn.KLDivLoss(reduction="sum")`` applied to
    ``log_softmax(logits.t(), -1)`` and divided by ``num_slots`` (the number of distinct ranks in the
    batch) -- so the KL is averaged over present ranks, not over images or over all ``R`` ranks. The
    reference's CE is ``nn.CrossEntropyLoss()`` (mean) and its total is ``1.0 * ce + 1.0 * kl``.
    Here everything is computed in float32 (``log q`` via ``log_softmax``, not ``log(softmax)``).

    Args:
        logits: ``(N, R)`` image-to-rank logits (already scaled by the logit scale).
        targets: ``(N,)`` long rank indices in ``[0, R)``.

    Returns:
        ``(loss, parts)``: ``loss`` a 0-dim tensor with grad; ``parts`` has detached 0-dim tensors
        ``"ce_loss"`` and ``"kl_loss"`` (unweighted).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, R), got shape {tuple(logits.shape)}")
    n, num_ranks = logits.shape
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.shape != (n,):
        raise ValueError(f"targets must be (N,) = ({n},), got shape {tuple(targets.shape)}")
    if n == 0:
        raise ValueError("ordinal_loss needs at least one image")
    targets = targets.long()
    if bool((targets < 0).any()) or bool((targets >= num_ranks).any()):
        bad = targets[(targets < 0) | (targets >= num_ranks)][0].item()
        raise ValueError(f"target rank {bad} is outside [0, {num_ranks})")

    logits = logits.float()
    ce = F.cross_entropy(logits, targets)

    onehot_t = F.one_hot(targets, num_ranks).t().float()  # (R, N)
    present = onehot_t.sum(dim=1) > 0  # (R,)
    log_q = F.log_softmax(kl_temperature * onehot_t, dim=1)  # (R, N), log of the soft target
    log_p = F.log_softmax(logits.t(), dim=1)  # (R, N), over images
    kl_per_rank = (log_q.exp() * (log_q - log_p)).sum(dim=1)  # (R,)
    kl = torch.where(present, kl_per_rank, torch.zeros_like(kl_per_rank)).sum() / present.sum()

    loss = ce_weight * ce + kl_weight * kl
    return loss, {"ce_loss": ce.detach(), "kl_loss": kl.detach()}


# --------------------------------------------------------------------------------------------------
# Predictions and metrics
# --------------------------------------------------------------------------------------------------
def predict(logits: Tensor, rank_values: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Turn ``(N, R)`` logits into rank-value predictions.

    Args:
        logits: ``(N, R)``.
        rank_values: ``(R,)`` the value each rank stands for (an age, a bin centre); default
            ``arange(R)`` (the reference's ``rank_output_value_array``: predictions are rank indices).

    Returns:
        ``dict(argmax=(N,) float, expectation=(N,) float, index=(N,) long)``: the value of the most
        likely rank, ``sum_r softmax(logits)[:, r] * rank_values[r]``, and the argmax rank index.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, R), got shape {tuple(logits.shape)}")
    num_ranks = logits.shape[1]
    if rank_values is None:
        values = torch.arange(num_ranks, dtype=torch.float32, device=logits.device)
    else:
        values = torch.as_tensor(rank_values, device=logits.device).float()
        if values.shape != (num_ranks,):
            raise ValueError(f"rank_values must be (R,) = ({num_ranks},), got shape {tuple(values.shape)}")
    probs = logits.float().softmax(dim=-1)
    index = probs.argmax(dim=-1)
    return {"argmax": values[index], "expectation": probs @ values, "index": index}


def _as_float_tensor(x) -> Tensor:
    return torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64))


def ordinal_metrics(
    pred_argmax,
    pred_expect,
    targets,
    rank_values=None,
) -> dict[str, float]:
    """MAE and accuracy of argmax and expectation predictions, as the reference computes them.

    ``mae = mean |pred - target|`` (rank-value units); ``acc = 100 * mean(round(pred) == target)``
    (percent; the reference logs the fraction). Rounding is ``torch.round`` (half to even), as in
    the reference. When ``rank_values`` ``(R,)`` is given, accuracy instead snaps the prediction and
    the target to their nearest rank value and compares the ranks -- use it when rank values are not
    consecutive integers (bin centres such as 5, 15, 25).

    Args:
        pred_argmax, pred_expect, targets: ``(N,)`` tensors / arrays / lists, in rank-value units.

    Returns:
        ``dict(mae_argmax, acc_argmax, mae_expectation, acc_expectation)`` of Python floats.
    """
    a, e, t = _as_float_tensor(pred_argmax), _as_float_tensor(pred_expect), _as_float_tensor(targets)
    if not (a.shape == e.shape == t.shape) or a.dim() != 1:
        raise ValueError(f"predictions and targets must be (N,), got {tuple(a.shape)}, {tuple(e.shape)}, {tuple(t.shape)}")
    if a.numel() == 0:
        raise ValueError("ordinal_metrics needs at least one prediction")

    if rank_values is None:
        def hit(p: Tensor) -> Tensor:
            return torch.round(p) == t
    else:
        rv = _as_float_tensor(rank_values)

        def nearest(x: Tensor) -> Tensor:
            return (x[:, None] - rv[None, :]).abs().argmin(dim=1)

        t_rank = nearest(t)

        def hit(p: Tensor) -> Tensor:
            return nearest(p) == t_rank

    out = {}
    for name, p in (("argmax", a), ("expectation", e)):
        out[f"mae_{name}"] = float((p - t).abs().mean())
        out[f"acc_{name}"] = float(hit(p).double().mean() * 100.0)
    return out


# --------------------------------------------------------------------------------------------------
# Ordinality of prototypes
# --------------------------------------------------------------------------------------------------
def similarity_matrix(prototypes: Tensor) -> Tensor:
    """Cosine similarities between prototypes: ``(R, E) -> (R, R)`` (float32, no grad needed)."""
    p = torch.as_tensor(prototypes)
    if p.dim() != 2:
        raise ValueError(f"prototypes must be (R, E), got shape {tuple(p.shape)}")
    p = F.normalize(p.float(), dim=-1)
    return p @ p.t()


def ordinality_score(prototypes: Tensor, span: Optional[int] = None, definition: str = "reference") -> float:
    """Share (percent) of similarity comparisons that respect the rank order, OrdinalCLIP's "ordinality".

    With ``S = similarity_matrix(prototypes)``:

    * ``definition="reference"`` (default; ``scripts/vis_ordinality.py`` of the reference): for every
      anchor ``i`` and every ``j`` with ``i <= j <= R-2`` and ``j - i < span``, one comparison
      ``S[i, j] > S[i, j+1]`` -- moving one rank further away *to the right* of the anchor must
      lower the similarity (strictly). The score is ``100 * (#true) / (#comparisons)``; with the
      default ``span = R - 1`` there are ``R(R-1)/2`` comparisons. Vectorised as the reference:
      ``triu(S[:-1, :-1] > S[:-1, 1:])`` masked to ``j - i < span``. Notes: only the right side of
      each anchor is compared (by symmetry of ``S`` the left sides are the right sides of other
      anchors' columns, not the same comparisons), only consecutive ranks are compared (not every
      triple), and the ``j == i`` comparisons (``S[i,i] = 1 > S[i,i+1]``) are true for any distinct
      prototypes, so even random prototypes score at least ``200/R`` percent. The reference reports
      a fraction in [0, 1] and divides ``S`` by its max first (does not change any comparison).
    * ``definition="triples"``: every anchor ``a`` and every pair ``j, k`` on the same side of ``a``
      with ``|a - j| < |a - k|`` (``j`` may equal ``a``), comparison ``S[a, j] > S[a, k]``: all
      rank triples, both sides. Stricter; ``O(R^3)`` booleans (chunked per anchor).

    Args:
        prototypes: ``(R, E)`` rank prototypes (e.g. text features), ``R >= 2``.
        span: reference definition only: the largest ``j + 1 - i`` compared (1 .. R-1; default R-1).

    Returns:
        The percentage in [0, 100], a Python float.
    """
    s = similarity_matrix(prototypes)
    num_ranks = s.shape[0]
    if num_ranks < 2:
        raise ValueError(f"ordinality needs at least 2 prototypes, got {num_ranks}")
    if definition == "reference":
        m = num_ranks - 1
        span = m if span is None else int(span)
        if not 1 <= span <= m:
            raise ValueError(f"span must be in [1, {m}], got {span}")
        ordered = s[:-1, :-1] > s[:-1, 1:]  # [i, j] = S[i, j] > S[i, j+1]
        i = torch.arange(m)[:, None]
        j = torch.arange(m)[None, :]
        mask = (j >= i) & (j - i < span)
        return float(ordered[mask].double().mean() * 100.0)
    if definition == "triples":
        if span is not None:
            raise ValueError("span applies only to definition='reference'")
        r = torch.arange(num_ranks)
        good = total = 0
        for a in range(num_ranks):
            dist = (r - a).abs()
            side = torch.sign(r - a)
            # pairs (j, k): j closer than k, on the same side (j == a counts on both sides)
            same_side = (side[:, None] == side[None, :]) | (side[:, None] == 0)
            pair = same_side & (dist[:, None] < dist[None, :])
            good += int((pair & (s[a][:, None] > s[a][None, :])).sum())
            total += int(pair.sum())
        return 100.0 * good / total
    raise ValueError(f"unknown ordinality definition {definition!r}; expected 'reference' or 'triples'")


# --------------------------------------------------------------------------------------------------
# Raw values -> ranks
# --------------------------------------------------------------------------------------------------
RankSpec = Union[str, Sequence[float]]


def _parse_spec(spec: RankSpec) -> tuple[str, np.ndarray]:
    """``("range", [lo, hi])`` for ``"lo:hi"``; ``("bins", edges)`` for edges (list or ``"a,b,c"``)."""
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            parts = text.split(":")
            try:
                lo, hi = (int(p) for p in parts)
            except ValueError:
                raise RankValueError(f"rank range {spec!r} must be 'lo:hi' with integers, e.g. '0:100'") from None
            if hi <= lo:
                raise RankValueError(f"rank range {spec!r} is empty or has one rank; need lo < hi")
            return "range", np.array([lo, hi], dtype=np.int64)
        try:
            edges = [float(p) for p in text.split(",")]
        except ValueError:
            raise RankValueError(f"rank spec {spec!r} is neither 'lo:hi' nor comma-separated bin edges") from None
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


# --------------------------------------------------------------------------------------------------
# Cross-validation folds
# --------------------------------------------------------------------------------------------------
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


def summarise_folds(results: Sequence[Mapping[str, float]], ddof: int = 0) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over folds (or seeds).

    Args:
        results: one dict of numeric metrics per fold; every dict must have the same keys.
        ddof: delta degrees of freedom of the std (0: population std as ``numpy.std``; 1: sample).

    Returns:
        ``{metric: {"mean": float, "std": float, "n": int}}`` in the key order of the first dict.
    """
    results = list(results)
    if not results:
        raise ValueError("summarise_folds needs at least one result")
    keys = list(results[0].keys())
    for i, r in enumerate(results):
        if set(r.keys()) != set(keys):
            diff = sorted(set(keys) ^ set(r.keys()))
            raise ValueError(f"fold {i} has different metrics from fold 0: {diff}")
    out = {}
    for key in keys:
        vals = np.asarray([float(r[key]) for r in results], dtype=np.float64)
        std = float(vals.std(ddof=ddof)) if vals.size > ddof else math.nan
        out[key] = {"mean": float(vals.mean()), "std": std, "n": int(vals.size)}
    return out
