"""Shared machinery of every exact sparse mechanism: gather, attend, scatter.

Local windows, strided patterns, Longformer bands, BigBird blocks, LSH chunks
and k-means clusters all reduce to one computation: split the queries into
*groups* (blocks, chunks, clusters); give each group a list of key positions
to look at; do softmax attention inside each group with a boolean mask; put
the rows back. Written once here, with its hand-derived backward, so each
mechanism only decides *which* positions go in which group.

Shapes: lead = batch/head axes ``...``; ``G`` groups; ``bq`` queries and
``bk`` keys per group.

    gather_rows(x (..., N, d), idx (..., G, b))        -> (..., G, b, d)
    attend_forward(qb (..., G, bq, d), kb (..., G, bk, d), vb (..., G, bk, dv),
                   allowed (..., G, bq, bk) bool, scale)  -> out (..., G, bq, dv)

Cost: O(G bq bk d) time and O(G bq bk) memory, i.e. O(N bk) when the groups
tile the queries; nothing of size N x M is ever allocated.

Backward of masked softmax attention (S = scale Q K^T + bias, P = softmax(S),
O = P V), per group, the flash-attention derivation:

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - rowsum(P * dP))        (+ P * dlse if the row's log-sum-exp is used)
    dQ = scale dS K,   dK = scale dS^T Q,  dbias = dS

Masked entries have P = 0 exactly, so they get no gradient; a row with no
allowed key has P = 0, output 0 and zero gradient.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from .functional import softmax_backward, softmax_forward


def pad_axis(x, length, axis=-2, value=0.0):
    """Pad ``x`` with ``value`` along ``axis`` up to ``length`` (no copy when already that long)."""
    n = x.shape[axis]
    if n == length:
        return x
    if n > length:
        raise ValueError(f"cannot pad length {n} down to {length}")
    xp = get_namespace(x)
    axis = axis % x.ndim
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - n)
    return xp.pad(x, pad, constant_values=value)


def round_up(n, b):
    """Smallest multiple of b that is >= n."""
    return -(-n // b) * b


def gather_rows(x, idx):
    """Rows of ``x`` at ``idx``: x (..., N, d), idx int (G, b) or (..., G, b) -> (..., G, b, d).

    Indices must lie in [0, N); callers clip padding positions to a valid
    index and mask them out with ``allowed``.
    """
    xp = get_namespace(x)
    if idx.ndim == 2:  # one layout shared by every batch/head: plain fancy indexing
        return x[..., idx, :]
    lead = x.shape[:-2]
    g, b = idx.shape[-2:]
    idx = xp.broadcast_to(idx, lead + (g, b))
    flat = idx.reshape(lead + (g * b, 1))
    out = xp.take_along_axis(x, flat, axis=-2)
    return out.reshape(lead + (g, b, x.shape[-1]))


def scatter_rows(g, idx, n):
    """Backward of :func:`gather_rows` (and the way groups are put back): sum rows of
    ``g (..., G, b, d)`` into an (..., n, d) array at ``idx``; repeated indices add up."""
    xp = get_namespace(g)
    lead = g.shape[:-3]
    gg, b, d = g.shape[-3:]
    idx = xp.broadcast_to(idx, lead + (gg, b))
    lead_size = 1
    for s in lead:
        lead_size *= s
    flat = idx.reshape(lead_size, gg * b) + (xp.arange(lead_size) * n)[:, None]
    out = xp.zeros((lead_size * n, d), dtype=g.dtype)
    xp.add.at(out, flat.reshape(-1), g.reshape(-1, d))
    return out.reshape(lead + (n, d))


class AttendCache(NamedTuple):
    """What :func:`attend_backward` needs: the group inputs, the weights P and the output."""

    q: object      # (..., G, bq, d)
    k: object      # (..., G, bk, d)
    v: object      # (..., G, bk, dv)
    p: object      # (..., G, bq, bk) softmax weights (0 where masked)
    out: object    # (..., G, bq, dv)
    scale: float
    has_bias: bool


def attend_forward(qb, kb, vb, allowed=None, scale=1.0, bias=None):
    """Masked softmax attention inside each group (also plain dense attention: G absent).

    qb (..., G, bq, d), kb (..., G, bk, d), vb (..., G, bk, dv);
    allowed bool broadcastable to (..., G, bq, bk) (None = all allowed);
    bias optional additive logits broadcastable to (..., G, bq, bk).
    Returns out (..., G, bq, dv), lse (..., G, bq) (-inf for an empty row), cache.
    Holds one (bq x bk) score buffer per group: the scores become P in place.
    """
    s = (qb * scale) @ kb.swapaxes(-1, -2)          # (..., bq, d) @ (..., d, bk) -> (..., bq, bk)
    if bias is not None:
        s += bias
    p, _, lse = softmax_forward(s, allowed, inplace=True)
    out = p @ vb                                    # (..., bq, bk) @ (..., bk, dv) -> (..., bq, dv)
    return out, lse[..., 0], AttendCache(qb, kb, vb, p, out, scale, bias is not None)


def attend_backward(dout, cache, dlse=None):
    """Gradients of the group arrays: dict q, k, v (and bias when one was given).

    Uses rowsum(P * dP) = rowsum(dO * O), so the backward holds two score-sized
    buffers (P and dP, overwritten by dS) and nothing more.
    """
    qb, kb, vb, p, out, scale, has_bias = cache
    dv = p.swapaxes(-1, -2) @ dout                  # dV = P^T dO
    dp = dout @ vb.swapaxes(-1, -2)                 # dP = dO V^T
    rowdot = (dout * out).sum(axis=-1, keepdims=True)
    ds = softmax_backward(dp, (p, -1), None if dlse is None else dlse[..., None], rowdot=rowdot, inplace=True)
    grads = {
        "q": (ds @ kb) * scale,                     # dQ = scale dS K
        "k": (ds.swapaxes(-1, -2) @ qb) * scale,    # dK = scale dS^T Q
        "v": dv,
    }
    if has_bias:
        grads["bias"] = ds
    return grads


def dense_from_groups(pb, q_idx, k_idx, n, m):
    """The (..., n, m) matrix W with W[i, j] = sum of group weights pb at (q_idx = i, k_idx = j).

    pb (..., G, bq, bk); q_idx (.., G, bq); k_idx (.., G, bk). Only for weights()
    at teaching sizes: it allocates n x m.
    """
    xp = get_namespace(pb)
    lead = pb.shape[:-3]
    g, bq, bk = pb.shape[-3:]
    qi = xp.broadcast_to(q_idx[..., :, :, None], lead + (g, bq, bk))
    ki = xp.broadcast_to(k_idx[..., :, None, :], lead + (g, bq, bk))
    lead_size = 1
    for s in lead:
        lead_size *= s
    flat = (qi.reshape(lead_size, -1) * m + ki.reshape(lead_size, -1)) + (xp.arange(lead_size) * (n * m))[:, None]
    w = xp.zeros(lead_size * n * m, dtype=pb.dtype)
    xp.add.at(w, flat.reshape(-1), pb.reshape(-1))
    return w.reshape(lead + (n, m))


def group_mask(q_pos, k_pos, n, m, *, causal=False, key_mask=None, k_idx=None):
    """The ``allowed`` mask of a group layout from positions.

    q_pos (.., G, bq) and k_pos (.., G, bk) are the original positions (may
    exceed n/m for padding). Allowed = query real & key real & (causal: k <= q)
    & key_mask[key]. key_mask (..., m) is gathered with k_idx (defaults to k_pos).
    Returns bool (..., G, bq, bk) (leading axes only where key_mask has them).
    """
    xp = get_namespace(q_pos)
    allowed = (q_pos[..., :, None] < n) & (k_pos[..., None, :] < m) & (k_pos[..., None, :] >= 0)
    if causal:
        allowed = allowed & (k_pos[..., None, :] <= q_pos[..., :, None])
    if key_mask is not None:
        idx = xp.clip(k_pos if k_idx is None else k_idx, 0, m - 1)
        km = key_mask[..., idx] if idx.ndim == 2 else _gather_mask(key_mask, idx)  # (..., G, bk)
        allowed = allowed & km[..., None, :]
    return allowed


def _gather_mask(key_mask, idx):
    xp = get_namespace(idx)
    lead = broadcast_shapes(key_mask.shape[:-1], idx.shape[:-2])
    km = xp.broadcast_to(key_mask, lead + key_mask.shape[-1:])
    ii = xp.broadcast_to(idx, lead + idx.shape[-2:])
    g, b = ii.shape[-2:]
    return xp.take_along_axis(km, ii.reshape(lead + (g * b,)), axis=-1).reshape(lead + (g, b))


def broadcast_shapes(*shapes):
    """NumPy's broadcasting rule on shape tuples (pure Python, for either backend)."""
    nd = max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0} - {1}
        if len(dims) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)
