"""Factorized attention: two cheap patterns A(1), A(2) and the three ways to combine them.

Child, Gray, Radford, Sutskever, 2019, *Generating Long Sequences with Sparse
Transformers*, https://arxiv.org/abs/1904.10509 (Section 4). The machinery
shared by its two patterns, :mod:`effattn.attention.sparse_strided` and
:mod:`effattn.attention.sparse_fixed`; each module says only what its A(1) and
A(2) are (a rule as an N x N mask for ``pattern``, and a block-sparse
:class:`effattn.nn.union.Part` layout for the fast path).

Intuition. Full attention lets every position look at every earlier one. The
Sparse Transformer splits that job between two cheap patterns A(1), A(2) so
that any position reaches any earlier one in TWO hops: with l ~ sqrt(N), each
query looks at O(sqrt N) keys per pattern, so one layer costs O(N sqrt N), and
two stacked layers (or two heads, or one merged pattern) still connect
everything (see :func:`receptive_field`).

The paper's three ways of using the two patterns, config ``combine``:

- ``"merged"`` (default): one head attends to A(1) ∪ A(2) with one softmax;
  the two parts are merged exactly through their log-sum-exps
  (:func:`effattn.nn.union.union_forward`), the overlap A(1) ∩ A(2) removed
  from the second part so that no key counts twice;
- ``"heads"``: even heads (0, 2, ...) use A(1), odd heads use A(2) — the
  paper's "multi-head" variant; q must have a head axis (..., H, N, d);
  ``pattern`` then returns an (H, N, N) mask;
- ``"layers"``: this call uses only A(``part``) (1 or 2); a model
  alternates ``part`` 1, 2, 1, 2, ... across its layers — the paper's
  "interleaved" variant.

Layout: the sequence is padded to Np = G l and viewed as a G x l grid
(:func:`position_grid`: position i = g l + r, block g, residue r); each part
runs in the layout where it is dense, never an N x N array.

Backward: the union backward of :mod:`effattn.nn.union` (flash-attention
dS = P * (dP - rowsum(dO * O)), plus the log-sum-exp terms of the merge),
head slice by head slice for ``combine="heads"``.

    factorized_forward(q, k, v, make_part, sizes=, causal=, key_mask=, combine=, part=, scale=)
                                           -> out (..., N, dv), FactorizedCache
    factorized_backward(dout, cache)       -> {"q", "k", "v"}
    factorized_weights(cache)              -> (..., N, N)
    factorized_pattern(cache, rule)        -> (N, N) or (H, N, N) bool, from the rule
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_bool, check_choice, check_int, check_scale
from .union import union_backward, union_forward, union_weights

COMBINE = ("merged", "heads", "layers")


def default_stride(n):
    """l = the power of two nearest sqrt(n) in log scale (ties up): 2 ** floor(log2(n) / 2 + 1/2).
    1024 -> 32, 2048 -> 64, 16384 -> 128, 47 -> 8, 5 -> 2. The default stride of
    ``sparse_strided`` and block of ``sparse_fixed``."""
    n = check_int("n", n)
    return 2 ** math.floor(math.log2(n) / 2 + 0.5)


# --------------------------------------------------------------------------- the block-sparse layouts
def position_grid(n, l, xp):
    """(G, l) int: the padded positions 0 .. G l - 1 as a grid, position i = g l + r."""
    g = -(-n // l)
    return xp.arange(g * l).reshape(g, l)


def rule_mask(qpos, kpos, n, causal):
    """valid query & valid key & (causal: j <= i), as (G, bq, bk) plus the broadcast i, j."""
    i = qpos[:, :, None]                            # (G, bq, 1)
    j = kpos[:, None, :]                            # (G or 1, 1, bk)
    ok = (i < n) & (j >= 0) & (j < n)
    if causal:
        ok = ok & (j <= i)
    return ok, i, j


# --------------------------------------------------------------------------- the shared driver
class FactorizedCache(NamedTuple):
    combine: str
    part: int
    causal: bool
    sizes: tuple           # (l,) or (l, c)
    n: int
    lead: tuple            # q.shape[:-2]
    dv: int
    slices: tuple          # ((head slice or None, UnionCache), ...)


def _head_slice(x, sl, axis):
    if x is None:
        return None
    idx = [slice(None)] * x.ndim
    idx[axis] = sl
    return x[tuple(idx)]


def _slice_key_mask(key_mask, sl):
    """The key mask of a head slice: axis -2 of key_mask lines up with the head axis of q."""
    if key_mask is None or key_mask.ndim < 2 or key_mask.shape[-2] == 1:
        return key_mask
    return _head_slice(key_mask, sl, key_mask.ndim - 2)


def factorized_forward(q, k, v, make_part, *, sizes, causal, key_mask, combine, part, scale):
    """Attention under A(1), A(2) combined as ``combine`` says (see the module docstring).

    q, k, v (..., N, d) / (..., N, dv), already validated as self-attention;
    ``make_part(which, causal, exclude_overlap, xp) -> Part`` the layout of A(which)
    (``exclude_overlap``: leave out the keys A(1) already has); sizes: the pattern's
    sizes, kept in the cache for ``pattern``. Returns out (..., N, dv), :class:`FactorizedCache`.
    """
    n, d, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    causal = check_bool("causal", causal)
    combine = check_choice("combine", combine, COMBINE)
    part = check_choice("part", part, (1, 2))
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    if combine == "merged":
        jobs = [(None, (make_part(1, causal, False, xp), make_part(2, causal, True, xp)))]
    elif combine == "layers":
        jobs = [(None, (make_part(part, causal, False, xp),))]
    else:
        if q.ndim < 3:
            raise ValueError(f"combine='heads' needs a head axis: q of shape (..., H, N, d), got {tuple(q.shape)}")
        jobs = [(slice(0, None, 2), (make_part(1, causal, False, xp),)),   # even heads: A(1)
                (slice(1, None, 2), (make_part(2, causal, False, xp),))]   # odd heads: A(2)
    slices, outs = [], []
    for sl, parts in jobs:
        if sl is None:
            o, c = union_forward(q, k, v, parts, key_mask=key_mask, scale=scale)
        else:
            ax = q.ndim - 3
            qs, ks, vs = (_head_slice(x, sl, ax) for x in (q, k, v))
            if qs.shape[ax] == 0:
                continue
            o, c = union_forward(qs, ks, vs, parts, key_mask=_slice_key_mask(key_mask, sl), scale=scale)
        slices.append((sl, c))
        outs.append(o)
    if jobs[0][0] is None:
        out = outs[0]
    else:
        out = xp.empty(q.shape[:-1] + (dv,), dtype=q.dtype)                # (..., H, N, dv)
        for (sl, _), o in zip(slices, outs):
            out[(Ellipsis, sl, slice(None), slice(None))] = o
    cache = FactorizedCache(combine, part, causal, tuple(sizes), n, tuple(q.shape[:-2]), dv, tuple(slices))
    return out, cache


def factorized_backward(dout, cache):
    """Gradients {"q": dq, "k": dk, "v": dv} (the union backward of each head slice)."""
    xp = get_namespace(dout)
    if cache.slices[0][0] is None:
        return union_backward(dout, cache.slices[0][1])
    grads = {}
    for sl, c in cache.slices:
        g = union_backward(dout[(Ellipsis, sl, slice(None), slice(None))], c)
        for name, val in g.items():
            if name not in grads:
                shape = cache.lead + (cache.n, val.shape[-1])
                grads[name] = xp.empty(shape, dtype=val.dtype)
            grads[name][(Ellipsis, sl, slice(None), slice(None))] = val
    return grads


def factorized_weights(cache):
    """The effective attention matrix (..., N, N): out == W @ v. Teaching sizes only."""
    if cache.slices[0][0] is None:
        return union_weights(cache.slices[0][1])
    first = union_weights(cache.slices[0][1])
    xp = get_namespace(first)
    w = xp.zeros(cache.lead + (cache.n, cache.n), dtype=first.dtype)
    for sl, c in cache.slices:
        w[(Ellipsis, sl, slice(None), slice(None))] = union_weights(c)
    return w


def factorized_pattern(cache, rule):
    """The pattern of a call from the paper's rule (not from the fast path): bool (N, N), or
    (H, N, N) for ``combine="heads"`` (even heads A(1), odd heads A(2)).
    ``rule(part, xp)``: the (N, N) mask of A(part) (part None: A(1) ∪ A(2))."""
    xp = get_namespace(cache.slices[0][1].out)
    if cache.combine == "merged":
        return rule(None, xp)
    if cache.combine == "layers":
        return rule(cache.part, xp)
    heads = cache.lead[-1]
    a1, a2 = rule(1, xp), rule(2, xp)
    return xp.stack([a1 if h % 2 == 0 else a2 for h in range(heads)])     # (H, N, N)


def receptive_field(*patterns):
    """Which keys each query reaches after stacking layers with these patterns (first layer first).

    R_1 = A_1, R_t = A_t R_{t-1} (boolean matrix product): query i reaches j in
    t layers if some path i -> k -> ... -> j follows allowed edges. Dense
    (N x N), for figures and teaching. bool (N, N).
    """
    reach = None
    for a in patterns:
        xp = get_namespace(a)
        a = a.astype(xp.int64)
        reach = a if reach is None else ((a @ reach) > 0).astype(xp.int64)
    return reach > 0


__all__ = ["COMBINE", "FactorizedCache", "default_stride", "factorized_backward", "factorized_forward",
           "factorized_pattern", "factorized_weights", "position_grid", "receptive_field", "rule_mask"]


def combine_decode_rule(a1, a2, keep1, keep2, combine="merged", part=1, heads=1):
    """The KV-window rules (:mod:`effattn.nn.decode`) of a factorized pattern from its two parts:
    ``a1(i, pos)``, ``a2(i, pos)`` (may query i attend key pos, causality aside) and ``keep1``,
    ``keep2`` (may a query from t on still attend it through that part). Combined as ``combine``
    says: "merged" the union, "layers" part 1 or 2, "heads" even heads A(1) and odd heads A(2)
    (reach is then (heads, L)). Returns (reach, keep)."""
    both = lambda t, pos: keep1(t, pos) | keep2(t, pos)  # noqa: E731
    if combine == "merged":
        return (lambda i, pos: (pos <= i) & (a1(i, pos) | a2(i, pos))), both
    if combine == "layers":
        return (lambda i, pos: (pos <= i) & (a1 if part == 1 else a2)(i, pos)), (keep1 if part == 1 else keep2)

    def reach(i, pos):
        even = get_namespace(pos).arange(heads)[:, None] % 2 == 0                       # (H, 1)
        return (pos <= i) & ((even & a1(i, pos)) | (~even & a2(i, pos)))                # (H, L)
    return reach, (both if heads > 1 else keep1)

