"""Sinkhorn balancing in log space, and its backward: a square matrix of logits made (close to)
doubly stochastic.

Sinkhorn, 1964; Adams & Zemel, 2011, *Ranking via Sinkhorn Propagation*; used by Sparse Sinkhorn
attention (Tay et al., 2020, https://arxiv.org/abs/2002.11296, :mod:`effattn.attention.sinkhorn`)
to relax a permutation of blocks into a soft one.

Alternately normalise the rows and the columns of exp(S), in log space:

    S^0 = log_alpha                                  (..., N_B, N_B); -inf marks a forbidden entry
    S^k = F_c(F_r(S^{k-1})),  k = 1..n_iters
    F_r(X) = X - logsumexp_j X   (rows),   F_c(X) = X - logsumexp_i X   (columns)
    P = exp(S^{n_iters})                             rows and columns sum to ~1 as n_iters grows

The causal variant (the paper's *causal Sinkhorn balancing*) normalises entry (i, j) of a
column by the rows i' <= i only, so row i never depends on the rows below it, bit for bit:

    F_c^causal(X)[i, j] = X[i, j] - C[i, j],   C[i, j] = log sum_{i' <= i} exp X[i', j]

(cost O(N_B^3) per iteration instead of O(N_B^2): an (N_B, N_B, N_B) masked tensor).

Backward, through every half-step in reverse. Y = X - lse(X) along an axis has

    dX = dY - softmax(X) * sum(dY)        (sum and softmax along the normalised axis; softmax(X) = exp(Y))

and the causal column step has

    dX[i', j] = dY[i', j] - sum_{i >= i'} dY[i, j] exp(X[i', j] - C[i, j]).

Forbidden (-inf) entries stay -inf (weight 0) and get zero gradient; an all -inf row or column
stays -inf instead of becoming NaN.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_bool, check_float_array, check_int
from .functional import NEG_INF


class BalancingCache(NamedTuple):
    steps: list      # per half-step, in order: ("row", Y), ("col", Y) or ("ccol", X, C)
    causal: bool
    support: object  # bool (..., N_B, N_B): the finite entries of log_alpha


def _lse(x, axis):
    """Log-sum-exp along axis (kept), -inf for an all -inf slice, no warnings."""
    xp = get_namespace(x)
    m = x.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0).astype(x.dtype, copy=False)
    s = xp.exp(x - m).sum(axis=axis, keepdims=True)
    pos = s > 0
    return xp.where(pos, xp.log(xp.where(pos, s, 1.0)) + m, NEG_INF).astype(x.dtype, copy=False)


def _subtract(x, lse):
    """x - lse with empty slices (lse = -inf, x = -inf) staying -inf instead of NaN."""
    xp = get_namespace(x)
    return x - xp.where(xp.isfinite(lse), lse, 0.0).astype(x.dtype, copy=False)


def _lower_triangle(nb, xp):
    """(i, i') -> i' <= i."""
    return xp.arange(nb)[None, :] <= xp.arange(nb)[:, None]


def cumulative_col_lse(x):
    """C[i, j] = log sum_{i' <= i} exp x[i', j] via an (..., N_B, N_B, N_B) masked tensor.

    Exact prefix computation (the max is taken over i' <= i only), so row i never
    depends on rows below it, bit for bit."""
    xp = get_namespace(x)
    tri = _lower_triangle(x.shape[-2], xp)                            # (i, i'): i' <= i
    t = xp.where(tri[:, :, None], x[..., None, :, :], NEG_INF)         # (..., i, i', j)
    return _lse(t, axis=-2)[..., 0, :]                                 # (..., i, j)


def sinkhorn_forward(log_alpha, n_iters, causal=False):
    """Log-space Sinkhorn balancing: n_iters x (row normalisation, then column normalisation).

    log_alpha (..., N_B, N_B); -inf entries are forbidden (they stay -inf, weight 0).
    causal=True uses the cumulative column normalisation (module docstring).
    Returns log P (..., N_B, N_B) and a :class:`BalancingCache`. Rows (and, for a
    square full support, columns) of exp(log P) sum to 1 as n_iters grows.
    """
    check_float_array("log_alpha", log_alpha, min_ndim=2, finite=False)
    if log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"log_alpha must be square in its last two axes, got {tuple(log_alpha.shape)}")
    xp = get_namespace(log_alpha)
    if bool(xp.isnan(log_alpha).any()) or bool(xp.isposinf(log_alpha).any()):
        raise ValueError("log_alpha contains NaN or +inf (only -inf marks a forbidden entry)")
    n_iters = check_int("n_iters", n_iters)
    causal = check_bool("causal", causal)
    x = log_alpha
    steps = []
    for _ in range(n_iters):
        x = _subtract(x, _lse(x, axis=-1))                  # F_r: rows sum to one
        steps.append(("row", x))
        if causal:
            c = cumulative_col_lse(x)                       # (..., N_B, N_B)
            steps.append(("ccol", x, c))
            x = _subtract(x, c)                             # F_c, causal: over rows i' <= i
        else:
            x = _subtract(x, _lse(x, axis=-2))              # F_c: columns sum to one
            steps.append(("col", x))
    return x, BalancingCache(steps, causal, xp.isfinite(log_alpha))


def sinkhorn_backward(dlog_p, cache):
    """Gradient of log_alpha given dL/d(log P), through every iteration in reverse.

    Y = X - lse(X) along an axis:  dX = dY - exp(Y) * sum(dY)   (exp(Y) = softmax(X)).
    Causal column step Y = X - C:  dX[i',j] = dY[i',j] - sum_{i>=i'} dY[i,j] exp(X[i',j] - C[i,j]).
    Forbidden (-inf) entries get zero gradient.
    """
    xp = get_namespace(dlog_p)
    g = dlog_p
    for step in reversed(cache.steps):
        if step[0] == "row":
            w = xp.exp(step[1])                                              # softmax over j
            g = g - w * g.sum(axis=-1, keepdims=True)
        elif step[0] == "col":
            w = xp.exp(step[1])                                              # softmax over i
            g = g - w * g.sum(axis=-2, keepdims=True)
        else:
            x, c = step[1], step[2]
            tri = _lower_triangle(x.shape[-2], xp)[:, :, None]               # (i, i', 1)
            cc = xp.where(xp.isfinite(c), c, 0.0)
            e = x[..., None, :, :] - cc[..., :, None, :]                      # (..., i, i', j)
            w = xp.where(tri, xp.exp(xp.where(tri, e, NEG_INF)), 0.0)
            g = g - (g[..., :, None, :] * w).sum(axis=-3)                    # sum over i >= i'
    return xp.where(cache.support, g, 0.0).astype(dlog_p.dtype, copy=False)


__all__ = ["BalancingCache", "cumulative_col_lse", "sinkhorn_backward", "sinkhorn_forward"]
