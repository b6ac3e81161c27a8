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

import math
from typing import NamedTuple

from ..backend import get_namespace
from ..validate import broadcast_shapes
from .functional import NEG_INF, _ignore_divide

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


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


def take_rows(x, idx):
    """Rows of ``x`` at ``idx`` along axis -2: x (..., N, d), idx int (..., T) whose leading axes
    broadcast with x's -> (..., T, d); what ``take_along_axis(x, idx[..., None], axis=-2)`` gives.

    Written as one ``take`` over the flattened rows (each output row a contiguous copy of d
    numbers): NumPy's ``take_along_axis`` with a broadcast last axis of size 1 indexes element by
    element and is several times slower on (N, 64) rows."""
    xp = get_namespace(x, idx)
    lead = broadcast_shapes(tuple(x.shape[:-2]), tuple(idx.shape[:-1]))
    n, d = x.shape[-2:]
    rows = math.prod(lead)
    x2 = xp.broadcast_to(x, lead + (n, d)).reshape(rows * n, d)
    flat = xp.broadcast_to(idx, lead + idx.shape[-1:]).reshape(rows, -1) + (xp.arange(rows) * n)[:, None]
    return xp.take(x2, flat.reshape(-1), axis=0).reshape(lead + (idx.shape[-1], d))


def gather_rows(x, idx):
    """Rows of ``x`` at ``idx``: x (..., N, d), idx int (G, b) or (..., G, b) -> (..., G, b, d).

    Indices must lie in [0, N); callers clip padding positions to a valid
    index and mask them out with ``allowed``.
    """
    if idx.ndim == 2:  # one layout shared by every batch/head: plain fancy indexing
        return x[..., idx, :]
    g, b = idx.shape[-2:]
    out = take_rows(x, idx.reshape(idx.shape[:-2] + (g * b,)))
    return out.reshape(out.shape[:-2] + (g, b, x.shape[-1]))


def index_add(out, idx, values):
    """``out[idx] += values`` with repeated indices adding up (what ``xp.add.at`` does), in place;
    out (n, ...), idx (m,) ints (any shape, flattened), values (m, ...). NumPy's ``add.at`` is
    slow; on NumPy the rows are summed by a sparse (unique rows x m) one-hot matrix product
    (``scipy.sparse``; ``bincount`` for scalars): the same sums in another order (rounding
    only). Other backends (CuPy: atomic adds on the GPU) use ``add.at``."""
    xp = get_namespace(out)
    idx = idx.reshape(-1)
    if xp.__name__ != "numpy" or idx.size == 0:
        xp.add.at(out, idx, values)
        return out
    if out.ndim == 1:
        out += xp.bincount(idx, weights=values.reshape(-1), minlength=out.shape[0]).astype(out.dtype, copy=False)
        return out
    from scipy import sparse

    rows, inv = xp.unique(idx, return_inverse=True)
    onehot = sparse.csr_matrix((xp.ones(idx.size, dtype=out.dtype), (inv.reshape(-1), xp.arange(idx.size))),
                               shape=(rows.size, idx.size))
    out[rows] += (onehot @ values.reshape(idx.size, -1)).reshape((rows.size,) + out.shape[1:])
    return out


def index_add_weighted(out, idx, weights, g):
    """``out[idx[t, j]] += weights[t, j] * g[t]`` for every t, j (repeats add up), in place: the
    backward of an embedding bag. out (n, d), idx and weights (T, J), g (T, d). On NumPy one sparse
    (n x T) matrix with the weights as entries times g (no (T, J, d) temporary); else ``add.at``."""
    xp = get_namespace(out)
    T, J = idx.shape
    if xp.__name__ != "numpy":
        xp.add.at(out, idx.reshape(-1), (weights[..., None] * g[:, None, :]).reshape(T * J, -1))
        return out
    from scipy import sparse

    rows, inv = xp.unique(idx.reshape(-1), return_inverse=True)
    cols = xp.repeat(xp.arange(T), J)
    mat = sparse.csr_matrix((weights.reshape(-1).astype(out.dtype, copy=False), (inv.reshape(-1), cols)),
                            shape=(rows.size, T))
    out[rows] += mat @ g
    return out


def scatter_rows(g, idx, n):
    """Backward of :func:`gather_rows` (and the way groups are put back): sum rows of
    ``g (..., G, b, d)`` into an (..., n, d) array at ``idx``; repeated indices add up."""
    xp = get_namespace(g)
    lead = g.shape[:-3]
    gg, b, d = g.shape[-3:]
    idx = xp.broadcast_to(idx, lead + (gg, b))
    lead_size = math.prod(lead)
    flat = idx.reshape(lead_size, gg * b) + (xp.arange(lead_size) * n)[:, None]
    out = xp.zeros((lead_size * n, d), dtype=g.dtype)
    index_add(out, flat, g.reshape(-1, d))
    return out.reshape(lead + (n, d))


class AttendCache(NamedTuple):
    """What :func:`attend_backward` needs. The weights are kept unnormalised,
    P = E * rz (E = exp(S - rowmax), rz = 1 / rowsum(E), 0 for an empty row), which
    saves the forward a full pass over the score matrix; ``cache.p`` gives P."""

    q: object      # (..., G, bq, d)
    k: object      # (..., G, bk, d)
    v: object      # (..., G, bk, dv)
    e: object      # (..., G, bq, bk) exp(S - rowmax), 0 where masked
    rz: object     # (..., G, bq, 1) 1 / rowsum(E), 0 for a row with no allowed key
    out: object    # (..., G, bq, dv)
    scale: float
    has_bias: bool

    @property
    def p(self):
        """The attention weights P = softmax(S) (..., G, bq, bk) (allocated on each access)."""
        return self.e * self.rz


def attend_forward(qb, kb, vb, allowed=None, scale=1.0, bias=None, diagonal=None):
    """Masked softmax attention inside each group (also plain dense attention: G absent).

    qb (..., G, bq, d), kb (..., G, bk, d), vb (..., G, bk, dv);
    allowed bool broadcastable to (..., G, bq, bk) (None = all allowed);
    bias optional additive logits broadcastable to (..., G, bq, bk);
    diagonal optional int t0 >= 0: a causal row block, query row r sits at key position t0 + r and
    sees keys j <= t0 + r (ANDed with ``allowed``); only the columns j >= t0 are touched, so a
    block of rows of causal attention pays no masking pass over the keys before it.
    Returns out (..., G, bq, dv), lse (..., G, bq) (-inf for an empty row), cache.

    One (bq x bk) buffer per group holds S, then E = exp(S - rowmax) in place (the
    masked softmax of :func:`effattn.nn.functional.softmax_forward`, unnormalised).
    The row sums come with the value product for free: E [V, 1] = [E V, rowsum(E)].
    """
    xp = get_namespace(qb, kb, vb)
    # Scores in base 2: exp(x) = 2^(x log2 e), and NumPy's float32 exp2 is about twice as fast as exp.
    s = (qb * (scale * LOG2E)) @ kb.swapaxes(-1, -2)  # log2(e) S: (..., bq, d) @ (..., d, bk) -> (..., bq, bk)
    if bias is not None:
        s += bias * LOG2E
    if allowed is not None:
        xp.copyto(s, NEG_INF, where=~allowed)       # masked: exactly zero weight after exp
    if diagonal is not None and diagonal < s.shape[-1]:
        r = xp.arange(s.shape[-2])[:, None]
        c = xp.arange(s.shape[-1] - diagonal)[None, :]
        xp.copyto(s[..., diagonal:], NEG_INF, where=c > r)   # key t0 + c is after query t0 + r
    m = s.max(axis=-1, keepdims=True)               # rowmax (..., bq, 1); -inf for an empty row
    m = xp.where(xp.isfinite(m), m, 0.0).astype(s.dtype, copy=False)
    s -= m
    e = xp.exp2(s, out=s)                           # E = exp(S - rowmax)
    ones = xp.ones(vb.shape[:-1] + (1,), dtype=vb.dtype)
    ez = e @ xp.concatenate([vb, ones], axis=-1)    # (..., bq, bk) @ (..., bk, dv + 1) -> [E V, rowsum(E)]
    z = ez[..., -1:]
    rz = xp.where(z > 0, 1.0 / xp.where(z > 0, z, 1.0), 0.0).astype(s.dtype, copy=False)
    out = ez[..., :-1] * rz                         # O = P V = (E V) / rowsum(E)
    with _ignore_divide(xp):
        lse = xp.log(z) + m * LN2                   # log-sum-exp of each row (m was in base 2)
    return out, lse[..., 0], AttendCache(qb, kb, vb, e, rz, out, scale, bias is not None)


def attend_backward(dout, cache, dlse=None):
    """Gradients of the group arrays: dict q, k, v (and bias when one was given).

    With P = E rz:  dV = P^T dO = E^T (rz dO);  dP = dO V^T;
    dS = P * (dP - rowsum(P * dP) + dlse) = E * (rz dO V^T - rz (rowsum(dO * O) - dlse)),
    using rowsum(P * dP) = rowsum(dO * O). Two score-sized buffers (E, and dP overwritten by dS).
    """
    qb, kb, vb, e, rz, out, scale, has_bias = cache
    xp = get_namespace(dout, e)
    dos = dout * rz                                 # rz dO (..., bq, dv)
    dv = e.swapaxes(-1, -2) @ dos                   # dV = E^T (rz dO) = P^T dO
    rowdot = (dout * out).sum(axis=-1, keepdims=True)
    if dlse is not None:
        rowdot = rowdot - dlse[..., None]
    # rz (dP - rowdot) in one product: [rz dO, -rz rowdot] [V, 1]^T  (..., bq, dv+1) @ (..., dv+1, bk)
    ones = xp.ones(vb.shape[:-1] + (1,), dtype=vb.dtype)
    ds = xp.concatenate([dos, -rz * rowdot], axis=-1) @ xp.concatenate([vb, ones], axis=-1).swapaxes(-1, -2)
    ds *= e                                         # dS = P * (dP - rowsum(dO * O) + dlse)
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
    lead_size = math.prod(lead)
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


def combine_masks(n, m, xp, *, causal=False, key_mask=None, mask=None, lead=()):
    """AND of the causal, key and general masks as one boolean array broadcastable
    to lead + (n, m); None when nothing is masked."""
    allowed = None
    if causal:
        allowed = xp.arange(m)[None, :] <= xp.arange(n)[:, None]            # (N, M): j <= i
    if key_mask is not None:
        km = key_mask[..., None, :]                                          # (..., 1, M)
        allowed = km if allowed is None else allowed & km
    if mask is not None:
        if getattr(mask, "dtype", None) is None or mask.dtype.kind != "b":
            raise ValueError(f"mask must be a boolean array (True = may attend), got {getattr(mask, 'dtype', type(mask).__name__)}")
        try:
            shape = broadcast_shapes(tuple(mask.shape), tuple(lead) + (n, m))
        except ValueError:
            shape = None
        if shape != tuple(lead) + (n, m):
            raise ValueError(f"mask must broadcast to {tuple(lead) + (n, m)}, got shape {tuple(mask.shape)}")
        allowed = mask if allowed is None else allowed & mask
    return allowed



def _gather_mask(key_mask, idx):
    xp = get_namespace(idx)
    lead = broadcast_shapes(key_mask.shape[:-1], idx.shape[:-2])
    km = xp.broadcast_to(key_mask, lead + key_mask.shape[-1:])
    ii = xp.broadcast_to(idx, lead + idx.shape[-2:])
    g, b = ii.shape[-2:]
    return xp.take_along_axis(km, ii.reshape(lead + (g * b,)), axis=-1).reshape(lead + (g, b))
