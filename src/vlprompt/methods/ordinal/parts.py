"""Ordinal-regression building blocks of OrdinalCLIP (Li et al., NeurIPS 2022) and its baselines.

Pure functions and modules (no I/O, no global state), on any device:

* :func:`interpolation_weights` and :class:`RankEmbeddings` -- rank embeddings interpolated from a
  few learnable *base* rank embeddings, so that neighbouring ranks get neighbouring embeddings.
* :func:`ordinal_loss` -- cross-entropy over ranks plus the text-to-image KL term of the reference.
* :func:`predict` and :func:`ordinal_metrics` -- argmax / expectation predictions, MAE and accuracy.
* :func:`similarity_matrix` and :func:`ordinality_score` -- how well learned prototypes keep the order.
* :func:`regression_units`, :func:`regression_logits` and :func:`regression_decode` -- the regression
  baseline's value as ``(N, R)`` logits and the one way back from them to the value.

Rank parsing (raw targets to ranks, rank-value specs, k-fold indices) is data-layer code:
:mod:`vlprompt.data.ranks`.

Shapes use ``R`` ranks, ``B`` base ranks, ``T`` tokens per rank, ``D`` token-embedding width, ``N``
images in a batch and ``E`` prototype (joint-space) width.

Reference: github.com/xk-huang/OrdinalCLIP (``ordinalclip/models/prompt_leaners/rank_prompt_learner.py``,
``ordinalclip/runner/runner.py``, ``scripts/vis_ordinality.py``); the notes below say where this
module follows it and where (and why) it deliberately differs.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INTERPOLATION_KINDS",
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
]

INTERPOLATION_KINDS = ("linear", "inv_prop", "normal")

_INV_PROP_EPS = 1e-5


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
        raise ValueError(f"predictions and targets must be (N,), got {tuple(a.shape)}, {tuple(e.shape)}, "
                         f"{tuple(t.shape)}")
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
        out[f"acc_{name}"] = 100 * int(hit(p).sum()) / p.numel()  # from the count: no float noise
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
# The regression baseline's value as logits, and back
# --------------------------------------------------------------------------------------------------
def regression_units(rank_values: Tensor) -> tuple[Tensor, float, float, float]:
    """Standardisation of a regression over ranks: ``(units (R,), mean, scale, tau)``.

    ``units = (rank_values - mean) / scale`` with the mean and the sample std of the rank values (scale 1 when
    they do not vary); ``tau`` is one rank spacing in units, the width of the discretised Gaussian that
    :func:`regression_logits` puts around the value. The regression is trained and exported in these units.
    """
    rv = torch.as_tensor(rank_values).double()
    if rv.dim() != 1 or rv.numel() < 2:
        raise ValueError(f"rank_values must be (R,) with R >= 2, got shape {tuple(rv.shape)}")
    mean = float(rv.mean())
    scale = float(rv.std()) or 1.0
    units = (rv - mean) / scale
    tau = float((units[-1] - units[0]) / (len(units) - 1))
    return units.float(), mean, scale, tau


def regression_logits(z: Tensor, units: Tensor, tau: float) -> Tensor:
    """``(N, R)`` logits ``-(z - u_r)^2 / (2 tau^2)`` of standardised values ``z`` ``(N,)``: their argmax is the
    nearest rank, and :func:`regression_decode` recovers ``z`` from them exactly."""
    u = units.to(device=z.device, dtype=z.dtype)
    return -(z[:, None] - u[None, :]).square() / (2.0 * tau ** 2)


def regression_decode(logits: Tensor, units: Tensor, tau: float, mean: float = 0.0, scale: float = 1.0) -> Tensor:
    """The values ``(N,)`` behind :func:`regression_logits`: ``mean + scale * z`` (``mean=0, scale=1``: the
    standardised ``z`` the loss compares).

    Two columns determine ``z``: ``l_last - l_first = (u_last - u_first) (2 z - u_last - u_first) / (2 tau^2)``,
    so ``z = tau^2 (l_last - l_first) / (u_last - u_first) + (u_last + u_first) / 2``. Computed in float64 (the
    difference of two large logits), differentiable, returned in the logits' dtype. The one decoder of the
    regression: the method's loss and predictions and the exported head's values all go through it.
    """
    lg = logits.double()
    u = units.to(device=lg.device, dtype=torch.float64)
    z = tau ** 2 * (lg[:, -1] - lg[:, 0]) / (u[-1] - u[0]) + (u[-1] + u[0]) / 2
    return (mean + scale * z).to(logits.dtype)
