"""Entropic optimal transport for PLOT: many small Sinkhorn problems solved in one batched call.

PLOT (Chen et al., ICLR 2023) matches the M local features of an image with the N prompts of a class:
one M x N problem per (image, class) pair, cost ``C = 1 - sim``. The reference iterates, without gradient,

    K = exp(-C / eps);  r, c = 1, 1
    repeat <= max_iter:  r0 = r;  r = a / (K c);  c = b / (K^T r);  stop when mean|r - r0| < thresh
    T = diag(r) K diag(c)

with the stopping error pooled over the whole batch, so every problem runs as long as the batch needs and
an image's plan depends on its batch-mates. :func:`sinkhorn_plan` runs the same iteration with the same
stopping rule applied to each problem on its own: a problem that meets it keeps the plan of that iteration
and leaves the working set, so its result is exactly what it would be alone.

The iteration is carried in the log domain (``f = log r``, ``g = log c``, ``L = -C / eps``):

    f = log a - LSE_j(L_ij + g_j),     g = log b - LSE_i(L_ij + f_i),

mathematically the reference's iteration, but nothing overflows or underflows for small eps. The
log-sum-exps are evaluated one of two ways, chosen per problem:

* factorised (the common case). With ``K = exp(L - max L)`` computed once and ``g = log c_hat + gamma``
  (``c_hat`` normalised to sum 1, ``gamma`` a per-problem scalar), ``LSE_j(L_ij + g_j) = max L + gamma +
  log (K c_hat)_i``, so ``f = log(a / K c_hat) + scalar``: one batched mat-vec, the exp/log only on
  per-problem scalars (kept in float64). ``(K c_hat)_i`` lies in ``[exp(-range) / N, 1]`` (range = max - min
  of the problem's L), so nothing under- or overflows as long as range <= ``_FAST_RANGE`` = 60: always at
  eps=0.1 with cosine costs (range <= 2 / eps = 20). Same for g. No full-tensor exp per iteration.
* ``torch.logsumexp`` over the full tensor for problems with a larger range (small eps): exact for any eps.

The stopping rule needs the non-log r = exp(f); in float32 it carries the same rounding as the reference's
r (measured), so a problem stops at the reference's iteration except when its error comes within float32
noise (~3e-7 * mean r) of thresh, where either implementation may stop one iteration earlier or later.
Should r itself overflow float32 (tiny eps only; the reference gives NaN there), the rule cannot be met
and that problem runs max_iter iterations; its plan stays finite.

Backend decision: POT 0.9.7's batched solver ``ot.batch.solve_batch(method="log_sinkhorn")`` was examined
(source) and measured (``benchmarks/sinkhorn.py``); it is NOT used:

* it cannot reproduce the reference: it stops on ``max over the batch of ||T_b 1 - a_b||_2 < tol``, checked
  every 10 iterations: another quantity, pooled over the batch, no per-problem stopping. Even with a fixed
  count (tol=0, max_iter = the slowest problem's count) every problem runs as long as the slowest one:
  logits off the per-problem reference by 1e-4 with spread cosines (ours: 3e-6, float32 rounding);
* it is measurably slower: two full-tensor logsumexps (two exps per entry) per iteration, every problem
  to the end. Measured on this project's 2-core CPU (shared, 1 torch thread, CPU time, best of 3;
  49 x 4 problems, eps=0.1, thresh=1e-2; "spread" cosines over [-1, 1] / "CLIP-like" cosines within +-0.2):

                                spread P=3200  P=32000   CLIP-like P=3200  P=32000
      reference loop (pooled)       33 ms       396 ms            12 ms     87 ms
      sinkhorn_plan                 28 ms       333 ms            13 ms     84 ms
      solve_batch, tol=0, fixed    347 ms      4990 ms            51 ms    630 ms
      ot.sinkhorn, one per problem  3.4 s      35 s              0.75 s     6.7 s   (numpy, its own rule)

(With 2 threads the shared machine gave erratic wall times; this loop launches ~2x more small kernels
per iteration than the reference and suffered more from a busy second core in some runs.)

So this module runs its own batched torch loop (the project rule: the field's library unless measurably
worse, and say so); POT serves as a cross-check in the tests (``ot.sinkhorn`` per problem) and the benchmark.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ...errors import NonFiniteError

__all__ = ["sinkhorn_plan", "reference_sinkhorn", "transport_logits"]

# Largest range (max - min) of a problem's -C/eps for the factorised log-sum-exp: its smallest relevant
# term is >= exp(-60) / max(M, N), far above float32's smallest normal number (~1e-38) for any PLOT size.
_FAST_RANGE = 60.0
# Drop converged problems from the working tensors once fewer than this fraction of their rows still run.
_COMPACT_BELOW = 0.75


def sinkhorn_plan(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.1,
    max_iter: int = 100,
    thresh: float = 1e-2,
    differentiable: bool = False,
    context: str = "",
) -> Tensor:
    """Entropic OT plans of a batch of problems, each stopping on its own.

    Args:
        cost: (P, M, N) cost matrices (PLOT: ``1 - local_features @ prompt_features^T``); any float dtype
            and device.
        a: (P, M) source marginals (rows of the plan); None -> uniform 1/M.
        b: (P, N) target marginals (columns); None -> uniform 1/N.
        eps: entropic regularisation (``K = exp(-cost / eps)``).
        max_iter: at most this many Sinkhorn iterations (one row and one column update each).
        thresh: a problem stops after the first iteration where ``mean_i |r_i - r_prev_i| < thresh``,
            r = exp(f) being the non-log row scaling, as in the reference (thresh=0: exactly max_iter).
        differentiable: False (default, as in PLOT): the iterations run under ``torch.no_grad`` and the
            plan is a constant. True: gradients flow through the unrolled iterations to ``cost`` (and a, b).
        context: put into the error message (e.g. ``"step 123"``).

    Returns:
        (P, M, N) plan ``T_ij = exp(f_i - cost_ij / eps + g_j)`` in ``cost``'s dtype. The iterations run in
        float32 (float64 for float64 input) with autocast disabled, whatever the input dtype.

    Raises:
        NonFiniteError: the plan has a NaN or an infinite entry (e.g. NaN in the cost).
    """
    if cost.ndim != 3:
        raise ValueError(f"cost must be (P, M, N), got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    P, M, N = cost.shape
    if P == 0:
        return cost.new_zeros(cost.shape)
    work = torch.float64 if cost.dtype == torch.float64 else torch.float32
    grad_mode = contextlib.nullcontext() if differentiable else torch.no_grad()
    with torch.autocast(device_type=cost.device.type, enabled=False), grad_mode:
        # everything is kept transposed, (P, N, M): both batched mat-vecs are fastest that way
        LT = cost.transpose(1, 2).contiguous().to(work) / -eps
        log_a = _log_marginal(a, (P, M), LT)
        log_b = _log_marginal(b, (P, N), LT)
        fast, L_max = _fast_ok(LT)
        if bool(fast.all()):
            plan = _solve(LT, L_max, log_a, log_b, max_iter, thresh, fast=True)
        elif not bool(fast.any()):
            plan = _solve(LT, L_max, log_a, log_b, max_iter, thresh, fast=False)
        else:  # problems are independent: solve the two groups apart and put them back in order
            groups = (fast.nonzero().squeeze(1), (~fast).nonzero().squeeze(1))
            plan = torch.cat([_solve(LT[i], L_max[i], log_a[i], log_b[i], max_iter, thresh, fast=ok)
                              for i, ok in zip(groups, (True, False))])
            plan = plan[torch.argsort(torch.cat(groups))]
    _check_finite(plan, cost, eps, context)
    return plan.to(cost.dtype)


def transport_logits(sim: Tensor, plan: Tensor) -> Tensor:
    """(P,) transport similarity ``sum_ij plan_ij * sim_ij`` of (P, M, N) ``sim`` and ``plan``.

    PLOT's logits are ``logit_scale.exp() * transport_logits(sim, plan)`` reshaped to (images, classes).
    """
    return (plan.to(sim.dtype) * sim).sum(dim=(-2, -1))


def reference_sinkhorn(cost: Tensor, eps: float = 0.1, max_iter: int = 100, thresh: float = 1e-2) -> Tensor:
    """PLOT's reference Sinkhorn (non-log domain, stopping error pooled over the batch); tests/benchmarks only.

    ``cost`` (P, M, N) -> plan (P, M, N), uniform marginals, computed in ``cost``'s dtype without gradient.
    """
    with torch.no_grad():
        P, M, N = cost.shape
        K = torch.exp(-cost / eps)
        u = torch.full((P, M), 1.0 / M, dtype=cost.dtype, device=cost.device)
        v = torch.full((P, N), 1.0 / N, dtype=cost.dtype, device=cost.device)
        r, c = torch.ones_like(u), torch.ones_like(v)
        for _ in range(max_iter):
            r0 = r
            r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
            c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
            err = (r - r0).abs().mean()
            if err.item() < thresh:
                break
        return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K


# --------------------------------------------------------------------------------------------- internals


def _log_marginal(w: Tensor | None, shape: tuple[int, int], like: Tensor) -> Tensor:
    if w is None:
        return torch.full(shape, -math.log(shape[1]), dtype=like.dtype, device=like.device)
    if tuple(w.shape) != shape:
        raise ValueError(f"marginal must have shape {shape}, got {tuple(w.shape)}")
    return torch.log(w.to(like.dtype))


def _fast_ok(L: Tensor) -> tuple[Tensor, Tensor]:
    """(P,) bool: the problem's range max(L) - min(L) is <= _FAST_RANGE (False where L has NaN / inf);
    and (P,) max(L)."""
    flat = L.detach().flatten(1)
    L_max = flat.amax(1)
    return (L_max - flat.amin(1)) <= _FAST_RANGE, L_max


def _solve(LT: Tensor, L_max: Tensor, log_a: Tensor, log_b: Tensor, max_iter: int, thresh: float,
           fast: bool) -> Tensor:
    """Sinkhorn on (P, N, M) ``LT = (-C/eps)^T`` ((P,) ``L_max`` its max) with per-problem stopping;
    returns the (P, M, N) plan.

    A problem that meets the stopping rule has its plan factors taken at that iteration and is never looked
    at again; the working tensors are compacted (converged problems dropped) once fewer than
    ``_COMPACT_BELOW`` of their rows are still running. No in-place update of a tensor autograd needs, so
    the same code serves the differentiable mode.
    """
    P, N, M = LT.shape
    if fast:
        L_max = L_max.unsqueeze(1)
        KT = (LT - L_max.unsqueeze(2)).exp_()                  # entries in [exp(-range), 1]
        const = [KT, log_a.exp(), log_b.exp()]
        # c = 1: c_hat = 1/N (sum 1), r = rho * exp(off) with off = -(L_max + log N)
        scalar = torch.float32 if LT.device.type == "mps" else torch.float64  # MPS has no float64
        state = [LT.new_full((P, N), 1.0 / N), -(L_max.to(scalar) + math.log(N))]
        step = _step_factorised
    else:
        const = [LT, log_a, log_b]
        state = [LT.new_zeros(P, N)]                           # g = 0
        step = _step_lse
    idx = torch.arange(P, device=LT.device)                   # problem of each working row
    running = torch.ones(P, dtype=torch.bool, device=LT.device)
    r_prev = LT.new_ones(P, M)                                 # r = 1, c = 1 to start, as the reference
    out_idx: list[Tensor] = []
    out_x: list[Tensor] = []
    out_y: list[Tensor] = []
    for it in range(max_iter):
        state, r, x, y = step(const, state)
        if it == max_iter - 1:
            break
        with torch.no_grad():
            r = r.detach()
            stop = running & ((r - r_prev).abs().mean(1) < thresh)
            r_prev = r
        if bool(stop.any()):
            rows = stop.nonzero().squeeze(1)
            out_idx.append(idx[rows])
            out_x.append(x[rows])
            out_y.append(y[rows])
            running = running & ~stop
            n_run = int(running.sum())
            if n_run == 0:
                break
            if n_run < _COMPACT_BELOW * running.numel():
                rows = running.nonzero().squeeze(1)
                const = [t.index_select(0, rows) for t in const]
                state = [t.index_select(0, rows) for t in state]
                idx, r_prev, running = idx[rows], r_prev.index_select(0, rows), running[rows]
    if bool(running.any()):
        rows = running.nonzero().squeeze(1)
        out_idx.append(idx[rows])
        out_x.append(x[rows])
        out_y.append(y[rows])
    x, y = torch.cat(out_x), torch.cat(out_y)
    if len(out_idx) > 1:
        order = torch.argsort(torch.cat(out_idx))
        x, y = x[order], y[order]
    if fast:  # T^T = K^T * (column factor x row factor), computed in the contiguous (P, N, M) layout
        planT = KT * (y.unsqueeze(2) * x.unsqueeze(1))
    else:
        planT = torch.exp(LT + y.unsqueeze(2) + x.unsqueeze(1))
    return planT.transpose(1, 2).contiguous()


def _step_lse(const: list[Tensor], state: list[Tensor]):
    """One iteration with ``torch.logsumexp`` (exact for any range of L). State: [g (P, N)].

    Returns the new state, the non-log row scaling ``r = exp f`` (P, M), and the plan's row and column
    factors ``f`` (P, M), ``g`` (P, N): ``T_ij = exp(L_ij + f_i + g_j)``.
    """
    LT, log_a, log_b = const
    (g,) = state
    f = log_a - torch.logsumexp(LT + g.unsqueeze(2), dim=1)
    g = log_b - torch.logsumexp(LT + f.unsqueeze(1), dim=2)
    return [g], f.exp(), f, g


def _step_factorised(const: list[Tensor], state: list[Tensor]):
    """One iteration with the log-sum-exps factorised through ``K = exp(L - L_max)`` (see the module doc).

    State: ``c_hat`` (P, N), the column scaling normalised to sum 1, and ``off`` (P, 1) float64, the log
    factor that turns the next ``rho`` into the reference's r. With ``g = log c_hat + gamma``:

        f = log a - LSE_j(L_ij + g_j) = log(a / (K c_hat))_i - L_max - gamma = log rho_i + off,

    likewise g from ``r_hat = rho / sum rho``; all the vectors stay in [exp(-range) / N, 1]-ish ranges, only
    the per-problem scalar ``off`` carries the magnitude (in float64, so that r has no more rounding than
    the reference's). Returns the new state, the non-log row scaling ``r = exp f`` (P, M), and the plan's
    factors ``r_hat`` (P, M), ``tau`` (P, N) with ``T_ij = K_ij r_hat_i tau_j`` (the scalars cancel).
    """
    KT, a, b = const                                          # KT: (P, N, M)
    c_hat, off = state
    rho = a / (KT * c_hat.unsqueeze(2)).sum(1)               # (K c_hat)_i as a sum over j: fastest
    r = rho * off.exp().to(rho.dtype)
    rho_sum = rho.sum(1, keepdim=True)
    r_hat = rho / rho_sum
    tau = b / torch.bmm(KT, r_hat.unsqueeze(2)).squeeze(2)
    tau_sum = tau.sum(1, keepdim=True)
    # gamma' = gamma + log(tau_sum / rho_sum), so off' = off - log(tau_sum / rho_sum)
    off = off - (tau_sum.to(off.dtype) / rho_sum.to(off.dtype)).log()
    return [tau / tau_sum, off], r, r_hat, tau


def _check_finite(plan: Tensor, cost: Tensor, eps: float, context: str) -> None:
    with torch.no_grad():
        # entries are >= 0 and <= 1 when finite, so a problem's sum is finite iff all its entries are
        finite = torch.isfinite(plan.flatten(1).sum(1))
        if bool(finite.all()):
            return
        n_bad = int((~finite).sum())
        n_cost = int((~torch.isfinite(cost).flatten(1).all(1)).sum())
    where = f" at {context}" if context else ""
    raise NonFiniteError(
        f"Sinkhorn transport plan is not finite{where}: {n_bad} of {plan.shape[0]} problems have NaN/inf "
        f"entries (eps={eps}; {n_cost} problems have NaN/inf in the cost itself). Check the features for "
        f"NaN/inf (e.g. an fp16 overflow upstream, a diverged learning rate), or try a larger eps."
    )
