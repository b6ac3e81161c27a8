"""Attention over a union of key sets, each with its own group layout, under ONE softmax.

Used by the Sparse Transformer patterns (``sparse_strided``, ``sparse_fixed``,
through :mod:`effattn.nn.factorized`) and axial attention: their patterns are unions of two (or more) simple parts
— "the previous l positions" and "every l-th position back", or "my row" and
"my column" — and each part is cheap in its own layout (blocks of
consecutive positions for one, columns of a grid for the other), but no
single block layout serves both. So each part runs in its own layout with
:func:`effattn.nn.sparse.attend_forward`, and the parts are merged exactly
with their log-sum-exps, the trick flash-attention uses to merge key chunks.

A *part* is a layout over the padded sequence of ``Np`` positions:

    q_idx (G, bq)   int, a permutation of range(Np) (every position is the
                    query of exactly one group)
    k_idx (G, bk) or (1, bk)   int key positions, -1 = none (masked);
                    (1, bk) = one key list shared by every group (broadcast,
                    never copied G times)
    allowed (G, bq, bk) bool, the part's rule (pattern, causality, padding);
                    the key_mask is ANDed in at run time.

The parts' key sets must be DISJOINT for every query (a key in two parts
would be counted twice); the callers remove the overlap from one part.

Merge (per query row; lse_k = log sum_{j in part k} exp(s_ij), o_k the
part's softmax output):

    L   = log sum_k exp(lse_k)                     the log-normaliser of the union
    a_k = exp(lse_k - L)                           the share of part k
    out = sum_k a_k o_k                            == softmax over the union, times V

Backward, with dO given (a_k depends on every lse through L):

    d o_k   = a_k dO
    d lse_k = a_k (rowsum(dO * o_k) - rowsum(dO * out))

and :func:`attend_backward` turns (d o_k, d lse_k) into dQ, dK, dV of the
group arrays (dS = P * (dP - rowsum(P dP)) + P * d lse). Query gradients go
back through the inverse permutation (a gather, no scatter); so do key and
value gradients when a part's keys are laid out like its queries
(``k_idx is q_idx``: rows of a grid attending within themselves); a shared key
list is summed over the groups first; otherwise key and value gradients are
scatter-added (``scatter_rows``) because a key is read by several groups.
Rows with no allowed key in any part give out = 0 and zero gradients
(L = -inf, every a_k = 0).

Cost: sum over parts of O(G bq bk d); memory one (G, bq, bk) score buffer per
part plus O(Np d) — nothing of size N x N.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from .sparse import attend_backward, attend_forward, dense_from_groups, gather_rows, pad_axis, scatter_rows


class Part(NamedTuple):
    """One group layout of a union pattern (see the module docstring)."""

    q_idx: object     # int (G, bq): permutation of range(Np)
    k_idx: object     # int (G, bk) or (1, bk): key positions, -1 = none
    allowed: object   # bool (G, bq, bk): the part's rule (broadcast over batch/heads)
    name: str = ""


class UnionCache(NamedTuple):
    n: int                 # real sequence length N (queries and keys)
    np_: int               # padded length Np
    parts: tuple           # the Part layouts
    attends: tuple         # AttendCache per part (group order)
    shares: tuple          # a_k (..., Np) per part, sequence order (None for a single part)
    outs: tuple            # o_k (..., Np, dv) per part, sequence order (None for a single part)
    out: object            # merged output (..., Np, dv)
    inv: tuple             # inverse permutation of each part's q_idx (Np,)


def _key_mask_groups(key_mask, k_idx, n):
    """key_mask (..., n) gathered at the key positions of a part -> (..., G, 1, bk) bool."""
    xp = get_namespace(k_idx)
    idx = xp.clip(k_idx, 0, n - 1)                   # (G, bk); -1 and padding are masked by the rule
    return key_mask[..., idx][..., :, None, :]       # (..., G, bk) -> (..., G, 1, bk)


def union_forward(q, k, v, parts, *, key_mask=None, scale=1.0):
    """Softmax attention of every query over the union of its parts' key sets.

    q (..., N, d), k (..., N, d), v (..., N, dv) (self-attention layout, N = M);
    parts: sequence of :class:`Part` over the padded length Np >= N;
    key_mask (..., N) bool or None. Returns out (..., N, dv) and a :class:`UnionCache`.
    """
    xp = get_namespace(q, k, v)
    n = q.shape[-2]
    np_ = int(parts[0].q_idx.size)
    qp, kp, vp = (pad_axis(x, np_) for x in (q, k, v))           # (..., Np, d)
    attends, outs, lses, invs = [], [], [], []
    for part in parts:
        kidx = xp.clip(part.k_idx, 0, np_ - 1)
        qb = gather_rows(qp, part.q_idx)                          # (..., G, bq, d)
        kb = gather_rows(kp, kidx)                                # (..., G or 1, bk, d)
        vb = gather_rows(vp, kidx)                                # (..., G or 1, bk, dv)
        allowed = part.allowed
        if key_mask is not None:
            allowed = allowed & _key_mask_groups(key_mask, part.k_idx, n)  # (..., G, bq, bk)
        ob, lse, cache = attend_forward(qb, kb, vb, allowed, scale)       # (..., G, bq, dv), (..., G, bq)
        inv = xp.argsort(part.q_idx.reshape(-1), kind="stable")          # group order -> sequence order
        lead = ob.shape[:-3]
        outs.append(ob.reshape(lead + (np_, ob.shape[-1]))[..., inv, :])  # (..., Np, dv)
        lses.append(lse.reshape(lead + (np_,))[..., inv])                 # (..., Np)
        attends.append(cache)
        invs.append(inv)
    if len(parts) == 1:
        out = outs[0]
        cache = UnionCache(n, np_, tuple(parts), tuple(attends), (None,), (None,), out, tuple(invs))
        return out[..., :n, :], cache
    # L = log sum_k exp(lse_k); a_k = exp(lse_k - L) (0 for rows with no key at all)
    big = lses[0]
    for lse in lses[1:]:
        big = xp.maximum(big, lse)
    safe = xp.where(xp.isfinite(big), big, 0.0).astype(big.dtype, copy=False)
    terms = [xp.exp(lse - safe) for lse in lses]                  # each in [0, 1], one is 1 per real row
    z = sum(terms[1:], terms[0])
    z = xp.where(z > 0, z, 1.0)
    shares = [t / z for t in terms]                               # a_k (..., Np)
    out = sum((a[..., None] * o for a, o in zip(shares[1:], outs[1:])), shares[0][..., None] * outs[0])
    cache = UnionCache(n, np_, tuple(parts), tuple(attends), tuple(shares), tuple(outs), out, tuple(invs))
    return out[..., :n, :], cache


def union_backward(dout, cache):
    """Gradients {"q", "k", "v"} (each (..., N, ·)) of :func:`union_forward`."""
    n, np_ = cache.n, cache.np_
    dout = pad_axis(dout, np_)                                    # (..., Np, dv)
    single = len(cache.parts) == 1
    if not single:
        row_out = (dout * cache.out).sum(axis=-1)                 # rowsum(dO * out)  (..., Np)
    dq = dk = dv = None
    for part, att, a, o, inv in zip(cache.parts, cache.attends, cache.shares, cache.outs, cache.inv):
        if single:
            dob, dlse = gather_rows(dout, part.q_idx), None       # (..., G, bq, dv)
        else:
            do_k = a[..., None] * dout                            # d o_k = a_k dO
            dlse_k = a * ((dout * o).sum(axis=-1) - row_out)      # d lse_k = a_k (rowsum(dO o_k) - rowsum(dO out))
            dob = gather_rows(do_k, part.q_idx)                   # (..., G, bq, dv)
            dlse = dlse_k[..., part.q_idx]                        # (..., G, bq)
        g = attend_backward(dob, att, dlse)
        lead = g["q"].shape[:-3]
        gq = g["q"].reshape(lead + (np_, g["q"].shape[-1]))[..., inv, :]   # group order -> sequence order
        gk, gv = _key_grads(g["k"], g["v"], part, inv, np_)
        dq = gq if dq is None else dq + gq
        dk = gk if dk is None else dk + gk
        dv = gv if dv is None else dv + gv
    return {"q": dq[..., :n, :], "k": dk[..., :n, :], "v": dv[..., :n, :]}


def _key_grads(gk, gv, part, inv, np_):
    """Key/value gradients of one part back in sequence order (..., Np, ·)."""
    xp = get_namespace(gk)
    lead = gk.shape[:-3]
    if part.k_idx is part.q_idx:
        # the keys are laid out like the queries (a permutation): undo it, nothing repeats
        return (gk.reshape(lead + (np_, gk.shape[-1]))[..., inv, :],
                gv.reshape(lead + (np_, gv.shape[-1]))[..., inv, :])
    kidx = xp.clip(part.k_idx, 0, np_ - 1)
    if kidx.shape[0] == 1 and gk.shape[-3] > 1:
        # one key list shared by every group: add the groups up first (cheap), then scatter once
        gk, gv = gk.sum(axis=-3, keepdims=True), gv.sum(axis=-3, keepdims=True)
    # keys read by several groups add up (scatter-add, repeats accumulate)
    return scatter_rows(gk, kidx, np_), scatter_rows(gv, kidx, np_)


def union_weights(cache):
    """The effective (..., N, N) attention matrix W (out == W @ v). Teaching sizes only."""
    xp = get_namespace(cache.out)
    n, np_ = cache.n, cache.np_
    w = None
    for part, att, a in zip(cache.parts, cache.attends, cache.shares):
        pb = att.p                                                # (..., G, bq, bk)
        if a is not None:
            pb = pb * a[..., part.q_idx][..., None]               # a_k P_k
        kidx = xp.clip(part.k_idx, 0, np_ - 1)
        wk = dense_from_groups(pb, part.q_idx, xp.broadcast_to(kidx, (part.q_idx.shape[0], kidx.shape[-1])), np_, np_)
        w = wk if w is None else w + wk
    return w[..., :n, :n]
