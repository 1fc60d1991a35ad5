"""CoOp's linear probe as a method: logistic regression on the frozen, unnormalised image features.

Fitted in closed form in its :meth:`~LinearProbe.setup` by :func:`fit_linear_probe` (scikit-learn L-BFGS,
C searched on the few-shot val split as CoOp's ``lpclip/linear_probe.py`` does) on the test-transform features
of the very train / val images every other method of the same data, shots and seed uses, in the order the
sampler drew them: with ``--sampler lpclip`` the rows the script fits, in its order (grouped by label, each class
in ``np.random.choice``'s draw order), which matters since L-BFGS at tol 1e-4 is order-sensitive on
ill-conditioned features (pinned by ``tests/test_dassl_sampling.py``). The fitted classifier
is an ``affine`` head: logits (B, K) = features @ weight.T + bias, so a linear-probe run evaluates on other data
of the same classes, exports and predicts like any other run.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ...errors import ConfigError, VLPromptError
from ..base import Features, Method, MethodConfig, opt

#: CoOp's coarse sweep of C (its order: on a tie the first, i.e. the largest C, wins)
COARSE_C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass
class LinearProbeConfig(MethodConfig):
    C: Optional[float] = opt(None, "fixed inverse regularisation strength (default: searched on the val split)",
                             gt=0)
    c_grid: list[float] = opt(default_factory=lambda: list(COARSE_C_GRID),
                       help="coarse sweep of C before the bisection (CoOp's 1e6..1e-6)")
    search_steps: int = opt(8, "bisection steps in log10(C) after the coarse sweep", min=0)
    max_iter: int = opt(1000, "L-BFGS iterations", min=1)

    def check(self) -> None:
        if not self.c_grid or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c)
                                      and c > 0 for c in self.c_grid):
            raise ConfigError(f"linear-probe: c_grid must be a non-empty list of positive numbers, got {self.c_grid!r}")
        self.c_grid = [float(c) for c in self.c_grid]


class LinearProbe(Method):
    name = "linear-probe"
    family = "baselines"
    config_class = LinearProbeConfig
    summary = "CoOp's linear probe: logistic regression on the frozen image features (C searched on val)"
    setup_reads = frozenset({"train", "val"})
    head_kind = "affine"

    def __init__(self, config: LinearProbeConfig, backbone, classnames):
        super().__init__(config, backbone, classnames)
        k, e = len(self.classnames), backbone.embed_dim
        self.register_buffer("weight", torch.zeros(k, e, device=backbone.device))
        self.register_buffer("bias", torch.zeros(k, device=backbone.device))
        self._fit_info: dict = {}

    def set_classnames(self, classnames) -> None:
        self.require_trained_classes(classnames, "a linear probe")
        super().set_classnames(classnames)

    @classmethod
    def trains(cls, config) -> bool:
        return False

    def setup(self, train, val) -> dict:
        """The fit on the un-augmented features of the train split, C chosen on the val split's."""
        return self.fit(train.features(), train.labels, None if val is None or not len(val) else val.features(),
                        None if val is None or not len(val) else val.labels)

    def fit(self, train: Features, labels, val: Optional[Features], val_labels, *, progress: bool = False) -> dict:
        """Fit on features (N, E) with labels (N,); C searched on (``val``, ``val_labels``) unless fixed."""
        cfg = self.config
        res = fit_linear_probe(train.global_, labels, None if val is None else val.global_, val_labels,
                               cfg, progress=progress)
        clf = res.classifier
        coef = np.asarray(clf.coef_, dtype=np.float64)
        icpt = np.asarray(clf.intercept_, dtype=np.float64)
        classes = np.asarray(clf.classes_, dtype=np.int64)
        w = torch.zeros_like(self.weight, dtype=torch.float64).cpu()
        b = torch.full((len(self.classnames),), -float("inf"), dtype=torch.float64)  # labels absent from train
        if coef.shape[0] == 1:  # binary: sklearn's single row is the score of classes_[1]
            b[classes[0]] = 0.0
            w[classes[1]], b[classes[1]] = torch.from_numpy(coef[0]), float(icpt[0])
        else:
            w[classes] = torch.from_numpy(coef)
            b[classes] = torch.from_numpy(icpt)
        self.weight.copy_(w.float())
        self.bias.copy_(b.float())
        self._fit_info = {"C": res.C, "C_searched": cfg.C is None, "val_accuracy": res.val_accuracy,
                          "converged": res.converged, "search": res.history}
        return dict(self._fit_info)

    def forward(self, feats: Features) -> torch.Tensor:
        return feats.global_.float() @ self.weight.t() + self.bias

    def export_head(self):
        return {"weight": self.weight.detach().float().cpu(), "bias": self.bias.detach().float().cpu()}, \
            {"kind": "affine", "features": "unnormalised image features"}


# -- CoOp's fitting procedure (lpclip/linear_probe.py) -------------------------------------------------
def search_c(score: Callable[[float], float], grid: Sequence[float] = COARSE_C_GRID, steps: int = 8
             ) -> tuple[float, list[dict]]:
    """CoOp's search of C maximising ``score(C)`` (validation accuracy).

    Coarse: ``score`` at every value of ``grid``; the first best is the peak. Then ``steps`` bisection steps in
    log10(C) starting from [peak / 10, peak * 10]: score both ends, keep the better (the left on a tie) as the
    current choice and halve the interval towards it. Returns the choice after the last step (the coarse peak
    when ``steps == 0``) and the history: one ``{"stage", "C", "score"}`` per evaluation, in order.
    ``score`` is called once per distinct C."""
    memo: dict[float, float] = {}
    history: list[dict] = []

    def evaluate(c: float, stage: str) -> float:
        if c not in memo:
            memo[c] = float(score(c))
        history.append({"stage": stage, "C": c, "score": memo[c]})
        return memo[c]

    scores = [evaluate(float(c), "coarse") for c in grid]
    peak = float(grid[int(np.argmax(scores))])
    chosen = peak
    lo, hi = math.log10(peak) - 1.0, math.log10(peak) + 1.0
    for step in range(steps):
        c_lo, c_hi = float(10.0 ** lo), float(10.0 ** hi)
        s_lo, s_hi = evaluate(c_lo, f"step {step + 1}"), evaluate(c_hi, f"step {step + 1}")
        mid = 0.5 * (lo + hi)
        if s_lo < s_hi:
            chosen, lo = c_hi, mid
        else:
            chosen, hi = c_lo, mid
    return chosen, history


#: Fits with fewer than this many (samples x features x classes) run BLAS on one thread.
SMALL_FIT = 10_000_000


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000):
    """``LogisticRegression(solver="lbfgs", l2, C, max_iter)`` fitted on features (N, E) and labels (N,);
    returns (classifier, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=C)
    # small problems: BLAS threads only add synchronisation (measured 10-30x slower fits with 2 threads on a
    # busy 2-core machine); large ones keep the default thread pool
    small = x.shape[0] * x.shape[1] * max(len(np.unique(y)), 2) < SMALL_FIT
    with warnings.catch_warnings(record=True) as caught, \
            (threadpool_limits(limits=1, user_api="blas") if small else contextlib.nullcontext()):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf, converged


def probe_logits(clf, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """Decision values (N, K) of a fitted classifier, one column per label 0..K-1 (-inf for labels absent from
    its training data), so that ``argmax`` is its prediction."""
    d = np.asarray(clf.decision_function(x), dtype=np.float64)
    if d.ndim == 1:  # binary: sklearn's single column is the score of classes_[1]
        d = np.stack([np.zeros_like(d), d], axis=1)
    out = np.full((d.shape[0], num_classes), -np.inf)
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = d
    return torch.from_numpy(out)


@dataclass
class LinearProbeResult:
    """The fitted ``classifier``, the chosen ``C``, its ``val_accuracy`` (percent, None without search), the
    search ``history`` (``{"stage", "C", "val_accuracy", "converged"}`` per evaluation) and whether the final fit
    ``converged``."""

    classifier: object
    C: float
    val_accuracy: Optional[float]
    history: list
    converged: bool


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def fit_linear_probe(train_x, train_y, val_x=None, val_y=None, config: Optional[LinearProbeConfig] = None, *,
                     progress: bool = False) -> LinearProbeResult:
    """CoOp's linear probe on features (N, E) with integer labels (N,): C fixed by ``config.C`` or searched on
    (``val_x``, ``val_y``) with :func:`search_c`; the classifier is fitted on the train features alone."""
    cfg = (config or LinearProbeConfig()).validate()
    xt, yt = _as_numpy(train_x), _as_numpy(train_y).astype(np.int64)
    if xt.ndim != 2 or len(xt) != len(yt) or len(xt) == 0:
        raise VLPromptError(f"linear probe: train features {xt.shape} and labels {yt.shape} do not match")
    if len(np.unique(yt)) < 2:
        raise VLPromptError("linear probe: the training data holds a single class; it needs at least two")
    fits: dict[float, tuple] = {}

    def fit(c: float):
        if c not in fits:
            fits[c] = fit_logistic(xt, yt, c, cfg.max_iter)
        return fits[c]

    if cfg.C is not None:
        clf, converged = fit(float(cfg.C))
        return LinearProbeResult(clf, float(cfg.C), None, [], converged)
    if val_x is None or val_y is None or len(val_y) == 0:
        raise VLPromptError("linear probe: no validation images to choose C on; give a fixed C "
                            "(`--C` on the command line) or use a dataset with a val split")
    xv, yv = _as_numpy(val_x), _as_numpy(val_y).astype(np.int64)
    if xv.ndim != 2 or xv.shape[1] != xt.shape[1] or len(xv) != len(yv):
        raise VLPromptError(f"linear probe: val features {xv.shape} and labels {yv.shape} do not match the train "
                            f"features {xt.shape}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.c_grid) + 2 * cfg.search_steps, desc="linear probe: C search", unit="fit",
               leave=False, dynamic_ncols=True, disable=None if progress else True)

    def val_accuracy(c: float) -> float:
        clf, _ = fit(c)
        bar.update(1)
        return 100.0 * float(np.mean(clf.predict(xv) == yv))

    try:
        chosen, history = search_c(val_accuracy, cfg.c_grid, cfg.search_steps)
    finally:
        bar.close()
    history = [{"stage": h["stage"], "C": h["C"], "val_accuracy": h["score"], "converged": fits[h["C"]][1]}
               for h in history]
    clf, converged = fit(chosen)
    val_acc = next(h["val_accuracy"] for h in history if h["C"] == chosen)
    return LinearProbeResult(clf, chosen, val_acc, history, converged)
