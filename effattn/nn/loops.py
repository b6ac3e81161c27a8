"""The readable per-query form of a masked softmax attention, written once.

The fixed-pattern kernels (:mod:`effattn.attention.local`,
:mod:`effattn.attention.image_local_1d`, :mod:`effattn.attention.image_local_2d`)
each offer a ``loop(q, k, v, *, ...)``: the paper's rule for one (query, key)
pair, handed to :func:`masked_loop`, which does what the equations say, one
query at a time:

    keys(i) = { j : allowed(i, j) and key_mask[j] }          in increasing j
    s_j     = q_i . k_j * scale                               j in keys(i)
    o_i     = sum_j softmax(s)_j v_j                          (0 when keys(i) is empty)

No blocks, no padding, no masks as arrays: an oracle independent of the fast
paths, for teaching and tests only (O(N^2) Python).
"""
from __future__ import annotations

from ..backend import get_namespace
from ..validate import check_scale


def masked_loop(q, k, v, *, allowed, key_mask=None, scale=None):
    """Per-query softmax attention of one (N, d) head under a pair rule.

    q (N, d), k (M, d), v (M, dv); ``allowed(i, j) -> bool`` the rule for one pair;
    key_mask (M,) bool or None; scale defaults to d ** -0.5. Returns out (N, dv);
    a query with no allowed key gets a zero row.
    """
    xp = get_namespace(q, k, v)
    n, d = q.shape
    scale = check_scale(scale, d)
    out = xp.zeros((n, v.shape[-1]), dtype=q.dtype)
    for i in range(n):
        keys = [j for j in range(k.shape[0]) if allowed(i, j) and (key_mask is None or bool(key_mask[j]))]
        if not keys:
            continue
        s = (k[keys] @ q[i]) * scale                                             # (|keys|,)
        p = xp.exp(s - s.max())
        out[i] = (p / p.sum()) @ v[keys]
    return out


__all__ = ["masked_loop"]
