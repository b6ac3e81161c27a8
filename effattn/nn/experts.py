"""Shared parts of the sparse (conditional-computation) layers: Switch / mixture of experts and
the Product Key Memory (:mod:`effattn.layers.switch`, :mod:`effattn.layers.pkm`).

Both layers treat a batch ``x (..., N, D)`` as a flat list of T = prod(...) * N tokens, choose a
few of many parameter blocks per token with a top-k, and leave padding tokens (``key_mask``
False) out of everything: they get output 0 and gradient 0, and they take part in no shared
statistic (expert capacity, router averages).

- :func:`check_tokens`: validates ``x`` and ``key_mask``; :func:`flat_tokens` flattens them to
  ``(T, D)`` and a boolean ``real (T,)``.
- :func:`top_k`: the k largest entries along the last axis, in descending order (ties: lower
  index first), as (values, indices). The choice is a constant of the backward pass.
- :func:`expert_ffn_forward` / :func:`expert_ffn_backward`: E two-layer ReLU FFNs applied to
  rows grouped by expert (rows of expert e are the contiguous slice ``offsets[e]:offsets[e+1]``),
  ``h_e(x) = relu(x W1[e] + b1[e]) W2[e] + b2[e]``; a Python loop over the E experts, never over
  tokens.
"""
from __future__ import annotations

from ..backend import get_namespace
from ..validate import check_float_array, check_key_mask


def check_tokens(x, key_mask):
    """``x (..., N, D)`` float32/float64, non-empty; ``key_mask`` broadcastable to ``(..., N)``."""
    check_float_array("x", x, min_ndim=2)
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be a non-empty (..., N, D) array, got shape {tuple(x.shape)}")
    check_key_mask(key_mask, tuple(x.shape[:-2]), x.shape[-2])
    return x


def flat_tokens(x, key_mask):
    """``x (..., N, D)`` -> (xf (T, D), real (T,) bool), tokens in row-major order (batch, then position)."""
    xp = get_namespace(x)
    D = x.shape[-1]
    xf = x.reshape(-1, D)
    if key_mask is None:
        real = xp.ones(xf.shape[0], dtype=bool)
    else:
        real = xp.broadcast_to(key_mask, tuple(x.shape[:-1])).reshape(-1)
    return xf, real


def top_k(s, k):
    """The k largest entries of ``s`` along its last axis: (values (..., k), indices (..., k)),
    values in descending order; equal values come lower index first. O(L) per row
    (``argpartition``) plus a sort of the k chosen."""
    xp = get_namespace(s)
    L = s.shape[-1]
    if k < L:
        part = xp.argpartition(-s, k - 1, axis=-1)[..., :k]
        part = xp.sort(part, axis=-1)                                     # index order, for the tie rule
    else:
        part = xp.broadcast_to(xp.arange(L), s.shape).copy()
    vals = xp.take_along_axis(s, part, axis=-1)
    order = xp.argsort(-vals, axis=-1, kind="stable")
    return xp.take_along_axis(vals, order, axis=-1), xp.take_along_axis(part, order, axis=-1)


def expert_ffn_forward(xs, offsets, W1, b1, W2, b2):
    """E two-layer ReLU FFNs on rows grouped by expert.

    xs (A, D): the rows, sorted by expert; offsets: Python ints, len E + 1, rows of expert e are
    ``offsets[e]:offsets[e + 1]``; W1 (E, D, F), b1 (E, F), W2 (E, F, D_out), b2 (E, D_out).
    Returns (out (A, D_out), cache) with out_a = relu(x_a W1[e] + b1[e]) W2[e] + b2[e].
    """
    xp = get_namespace(xs)
    E = W1.shape[0]
    out = xp.empty((xs.shape[0], W2.shape[-1]), dtype=xs.dtype)
    hidden = xp.empty((xs.shape[0], W1.shape[-1]), dtype=xs.dtype)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        z = xs[lo:hi] @ W1[e]
        z += b1[e]
        xp.maximum(z, 0.0, out=z)                                          # relu
        hidden[lo:hi] = z
        out[lo:hi] = z @ W2[e] + b2[e]
    return out, (xs, offsets, hidden, W1, W2)


def expert_ffn_backward(dout, cache):
    """{"x": dxs (A, D), "W1", "b1", "W2", "b2"} of :func:`expert_ffn_forward`; an expert that
    received no row gets zero gradients."""
    xs, offsets, hidden, W1, W2 = cache
    xp = get_namespace(dout)
    dxs = xp.empty_like(xs)
    g = {"W1": xp.zeros_like(W1), "b1": xp.zeros(W1.shape[::2], dtype=W1.dtype),
         "W2": xp.zeros_like(W2), "b2": xp.zeros(W2.shape[::2], dtype=W2.dtype)}
    for e in range(W1.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        do, h = dout[lo:hi], hidden[lo:hi]
        g["W2"][e] = h.T @ do
        g["b2"][e] = do.sum(axis=0)
        dz = do @ W2[e].T
        dz *= h > 0                                                        # relu'
        g["W1"][e] = xs[lo:hi].T @ dz
        g["b1"][e] = dz.sum(axis=0)
        dxs[lo:hi] = dz @ W1[e].T
    return {"x": dxs, **g}
