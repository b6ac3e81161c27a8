"""Sparse Transformer: strided and fixed factorized attention patterns.

Child, Gray, Radford, Sutskever, 2019, *Generating Long Sequences with Sparse
Transformers*, https://arxiv.org/abs/1904.10509

Intuition. Full attention lets every position look at every earlier one. The
Sparse Transformer splits that job between two cheap patterns A(1), A(2) so
that any position reaches any earlier one in TWO hops: with l ~ sqrt(N), each
query looks at O(sqrt N) keys per pattern, so one layer costs O(N sqrt N), and
two stacked layers (or two heads, or one merged pattern) still connect
everything (see :func:`receptive_field`).

Patterns (query i, key j; l = ``stride`` or ``block``, c = ``summary``):

*strided* (``sparse_strided``), for data with a period (images row by row, audio):

    A(1)_i = {j : i - l < j <= i}          "the previous l positions" (causal)
    A(2)_i = {j : (i - j) mod l = 0, j <= i}  "every l-th position back"

    non-causal (both directions): A(1)_i = {j : |i - j| < l},
                                  A(2)_i = {j : (i - j) mod l = 0}

*fixed* (``sparse_fixed``), for data without a period (text):

    A(1)_i = {j : floor(j / l) = floor(i / l)}     "my own block of l"
    A(2)_i = {j : j mod l in {l - c, ..., l - 1}}  "the last c cells of every block":
                                                     summary columns every later cell reads
    causal: both intersected with j <= i. Non-causal: exactly the sets above
    (the whole own block and the summary cells of every block, earlier and
    later) — the paper's bidirectional use, and DeepSpeed's
    ``FixedSparsityConfig(attention="bidirectional")`` without its optional
    ``horizontal_global_attention``.

Conventions, next to the well-known implementations:

* The paper writes A(1)_i = {t, t+1, ..., i} with t = max(0, i - l): l + 1
  positions. We use l positions, i - l < j <= i, which is OpenAI's
  ``sparse_attention`` ``get_attn_mask(..., "local", local_attn_ctx=l)``
  (``matrix_band_part(ctx=l - 1, 0)``). The only difference is j = i - l,
  which A(2) contains anyway, so the MERGED pattern is identical either way.
  A(2) is OpenAI's ``"strided"`` mask, ``(q - k) mod stride == 0 and q >= k``.
* OpenAI's ``blocksparse_attention_impl(attn_mode="strided")`` computes
  A(2) on the transposed sequence (``strided_transpose``: reshape to
  (N / l, l) and swap the axes) — the column layout used here.
* ``sparse_fixed``: ``block`` = l positions, ``summary`` = c positions (the
  paper's c; it writes {t, ..., l} with t = l - c, i.e. the last c residues).
  OpenAI's ``attn_mode="fixed"`` counts in blocks of ``blocksize`` tokens:
  ``local_attn_ctx`` = l (tokens), ``vertsize`` = c / blocksize, the summary
  blocks taken from the END of each window, and token-level causality; with
  ``num_verts=1`` it is this pattern. DeepSpeed's ``FixedSparsityConfig``:
  ``num_local_blocks`` = l / block, ``num_global_blocks`` = c / block, global
  columns at the end of each local window as here; its "unidirectional"
  layout is causal only at block granularity (the diagonal block is dense;
  a causal mask is applied separately), ours token by token (exactly
  j <= i); for a short last window it moves the global block inside it,
  whereas here the residue rule is kept (a short last block may have no
  summary cell). Not implemented: the paper's per-head choice of WHICH c
  residues summarise a block (OpenAI ``num_verts`` > 1, DeepSpeed
  ``num_different_global_patterns`` > 1).
* The paper's three ways of using the two patterns, config ``combine``:

  - ``"merged"`` (default): one head attends to A(1) ∪ A(2) with one softmax;
  - ``"heads"``: even heads (0, 2, ...) use A(1), odd heads use A(2) — the
    paper's "multi-head" variant; q must have a head axis (..., H, N, d);
    ``pattern`` then returns an (H, N, N) mask;
  - ``"layers"``: this call uses only A(``part``) (1 or 2); a model
    alternates ``part`` 1, 2, 1, 2, ... across its layers — the paper's
    "interleaved" variant.

Implementation, block-sparse, never an N x N array. The sequence is padded
to Np = G l and viewed as a G x l grid (position i = g l + r: block g, residue
r). Each part runs in the layout where it is dense, with
:func:`effattn.nn.sparse.attend_forward`, and the merged pattern combines the
parts under one softmax through their log-sum-exps (:mod:`effattn.nn.union`):

    strided A(1): groups = rows (blocks) g, keys = rows g-1, g (and g+1 if
                  non-causal): (G, l) queries x (G, 2l or 3l) keys, masked by the rule
    strided A(2): groups = COLUMNS r (positions with i mod l = r): G queries x G keys
                  — every key of a column is a multiple of l away
    fixed   A(1): groups = rows, keys = the same row: (G, l) x (G, l)
    fixed   A(2): groups = rows, keys = the G c summary positions, one shared list

In the merged pattern the overlap A(1) ∩ A(2) is removed from the second part
(strided: j = i; fixed: the summary cells of the own block), so no key counts
twice. Cost with l ~ sqrt(N): strided O(N (3l + N/l) d), fixed
O(N (l + c N/l) d): O(N sqrt N) for a constant c. ``setup`` picks l = the
power of two nearest sqrt(N) and c = max(1, min(4, l // 4)) (the paper used
l = 128, c in {8, 16, 32}; a c growing with l would make the summary part
quadratic).

Backward: the union backward of :mod:`effattn.nn.union` (flash-attention
dS = P * (dP - rowsum(dO * O)), plus the log-sum-exp terms of the merge).

Cache: :class:`SparseTransformerCache` (the union caches of the one or two
head slices, and the sizes that ``pattern`` needs).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_namespace
from ..backend import xp as active_xp
from ..validate import check_bool, check_choice, check_int, check_positive_float, check_qkv
from ..nn.union import Part, union_backward, union_forward, union_weights
from ..registry import Mechanism, register

COMBINE = ("merged", "heads", "layers")


# --------------------------------------------------------------------------- sizes
def default_stride(n):
    """l = the power of two nearest sqrt(n) in log scale (ties up): 2 ** floor(log2(n) / 2 + 1/2).
    1024 -> 32, 2048 -> 64, 16384 -> 128, 47 -> 8, 5 -> 2."""
    n = check_int("n", n)
    return 2 ** math.floor(math.log2(n) / 2 + 0.5)


def default_summary(block):
    """c = max(1, min(4, l // 4)): a constant number of summary cells per block once l >= 16,
    so the summary keys number c N / l = O(sqrt N) and the cost stays O(N sqrt N)."""
    return max(1, min(4, block // 4))


# --------------------------------------------------------------------------- the rules, as N x N masks
def strided_pattern(n, stride, *, causal=False, part=None, xp=None):
    """The strided pattern from the paper's rule: bool (n, n), True = query i may attend key j.

    part = 1 (A(1), the previous l), 2 (A(2), every l-th back) or None (A(1) ∪ A(2)).
    Non-causal: |i - j| < l and (i - j) mod l = 0 in both directions.
    """
    xp = active_xp() if xp is None else xp
    i = xp.arange(n)[:, None]                      # (N, 1)
    j = xp.arange(n)[None, :]                      # (1, N)
    a1 = xp.abs(i - j) < stride                    # |i - j| < l
    a2 = (i - j) % stride == 0                     # (i - j) mod l = 0
    allowed = {1: a1, 2: a2, None: a1 | a2}[part]
    if causal:
        allowed = allowed & (j <= i)
    return allowed


def fixed_pattern(n, block, summary, *, causal=False, part=None, xp=None):
    """The fixed pattern from the paper's rule: bool (n, n).

    A(1): floor(j / l) = floor(i / l); A(2): j mod l >= l - c; causal: and j <= i.
    """
    xp = active_xp() if xp is None else xp
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    a1 = (j // block) == (i // block)              # same block of l
    a2 = xp.broadcast_to((j % block) >= block - summary, (n, n))  # summary columns
    allowed = {1: a1, 2: a2, None: a1 | a2}[part]
    if causal:
        allowed = allowed & (j <= i)
    return allowed


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


# --------------------------------------------------------------------------- the block-sparse layouts
def _grid(n, l, xp):
    g = -(-n // l)
    return xp.arange(g * l).reshape(g, l)           # (G, l): position i = g l + r


def _rule_mask(qpos, kpos, n, causal):
    """valid query & valid key & (causal: j <= i), as (G, bq, bk) plus the broadcast i, j."""
    i = qpos[:, :, None]                            # (G, bq, 1)
    j = kpos[:, None, :]                            # (G or 1, 1, bk)
    ok = (i < n) & (j >= 0) & (j < n)
    if causal:
        ok = ok & (j <= i)
    return ok, i, j


def _shift_rows(pos, s):
    """Rows of the position grid shifted by s blocks (row g gets row g + s); -1 outside."""
    xp = get_namespace(pos)
    g = pos.shape[0]
    rows = xp.arange(g) + s
    out = pos[xp.clip(rows, 0, g - 1)]
    return xp.where(((rows >= 0) & (rows < g))[:, None], out, -1)


def strided_part(n, stride, which, *, causal, exclude_overlap=False, xp=None):
    """The :class:`Part` layout of A(which) of the strided pattern (see the module docstring)."""
    xp = active_xp() if xp is None else xp
    pos = _grid(n, stride, xp)                                          # (G, l)
    if which == 1:
        shifts = (-1, 0) if causal else (-1, 0, 1)
        kpos = xp.concatenate([_shift_rows(pos, s) for s in shifts], axis=1)  # (G, 2l or 3l)
        ok, i, j = _rule_mask(pos, kpos, n, causal)
        ok = ok & (xp.abs(i - j) < stride)                              # i - l < j <= i  /  |i - j| < l
        return Part(pos, kpos, ok, "strided A1 (local)")
    cols = pos.T                                                        # (l, G): column r = {r, r + l, ...}
    ok, i, j = _rule_mask(cols, cols, n, causal)                        # (i - j) mod l = 0 by construction
    if exclude_overlap:
        ok = ok & (j != i)                                              # i itself is in A(1)
    return Part(cols, cols, ok, "strided A2 (every l-th)")


def fixed_part(n, block, summary, which, *, causal, exclude_overlap=False, xp=None):
    """The :class:`Part` layout of A(which) of the fixed pattern."""
    xp = active_xp() if xp is None else xp
    pos = _grid(n, block, xp)                                           # (G, l)
    if which == 1:
        ok, _, _ = _rule_mask(pos, pos, n, causal)                      # own block
        return Part(pos, pos, ok, "fixed A1 (own block)")
    kpos = pos[:, block - summary:].reshape(1, -1)                      # (1, G c): the summary cells
    ok, i, j = _rule_mask(pos, kpos, n, causal)                         # (G, l, G c)
    if exclude_overlap:
        ok = ok & ((j // block) != (i // block))                        # own block's cells are in A(1)
    return Part(pos, kpos, ok, "fixed A2 (summary columns)")


# --------------------------------------------------------------------------- the shared driver
class SparseTransformerCache(NamedTuple):
    kind: str              # "strided" or "fixed"
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


def _forward(kind, sizes, make_part, q, k, v, causal, key_mask, combine, part, scale):
    n, _, d, dv = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    causal = check_bool("causal", causal)
    combine = check_choice("combine", combine, COMBINE)
    part = check_choice("part", part, (1, 2))
    scale = d ** -0.5 if scale is None else check_positive_float("scale", scale)
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
    cache = SparseTransformerCache(kind, combine, part, causal, sizes, n, tuple(q.shape[:-2]), dv, tuple(slices))
    return out, cache


def backward(dout, cache):
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


def weights(cache):
    """The effective attention matrix (..., N, N): out == W @ v. Teaching sizes only."""
    if cache.slices[0][0] is None:
        return union_weights(cache.slices[0][1])
    first = union_weights(cache.slices[0][1])
    xp = get_namespace(first)
    w = xp.zeros(cache.lead + (cache.n, cache.n), dtype=first.dtype)
    for sl, c in cache.slices:
        w[(Ellipsis, sl, slice(None), slice(None))] = union_weights(c)
    return w


def pattern(cache):
    """The pattern from the paper's rule (not from the fast path): bool (N, N), or (H, N, N)
    for ``combine="heads"`` (even heads A(1), odd heads A(2))."""
    xp = get_namespace(cache.slices[0][1].out)
    if cache.kind == "strided":
        rule = lambda part: strided_pattern(cache.n, *cache.sizes, causal=cache.causal, part=part, xp=xp)  # noqa: E731
    else:
        rule = lambda part: fixed_pattern(cache.n, *cache.sizes, causal=cache.causal, part=part, xp=xp)  # noqa: E731
    if cache.combine == "merged":
        return rule(None)
    if cache.combine == "layers":
        return rule(cache.part)
    heads = cache.lead[-1]
    a1, a2 = rule(1), rule(2)
    return xp.stack([a1 if h % 2 == 0 else a2 for h in range(heads)])     # (H, N, N)


# --------------------------------------------------------------------------- public kernels
def strided_forward(q, k, v, *, causal=False, key_mask=None, stride=None, combine="merged", part=1, scale=None):
    """Sparse Transformer strided attention.

    q, k, v (..., N, d) / (..., N, dv) (self-attention: same length);
    stride: l (default :func:`default_stride`, ~sqrt N); combine: "merged" |
    "heads" | "layers"; part: 1 or 2 (which pattern, for combine="layers");
    key_mask (..., N) bool. Returns out (..., N, dv) and a :class:`SparseTransformerCache`.
    """
    n = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)[0]
    stride = default_stride(n) if stride is None else check_int("stride", stride)

    def make(which, causal_, exclude, xp):
        return strided_part(n, stride, which, causal=causal_, exclude_overlap=exclude, xp=xp)

    return _forward("strided", (stride,), make, q, k, v, causal, key_mask, combine, part, scale)


def fixed_forward(q, k, v, *, causal=False, key_mask=None, block=None, summary=None, combine="merged",
                  part=1, scale=None):
    """Sparse Transformer fixed attention.

    block: l (default ~sqrt N); summary: c, the summary cells at the end of each
    block (1 <= c <= l; default :func:`default_summary`); the rest as
    :func:`strided_forward`.
    """
    n = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)[0]
    block = default_stride(n) if block is None else check_int("block", block)
    summary = default_summary(block) if summary is None else check_int("summary", summary)
    if summary > block:
        raise ValueError(f"summary must be <= block ({block}), got {summary}")

    def make(which, causal_, exclude, xp):
        return fixed_part(n, block, summary, which, causal=causal_, exclude_overlap=exclude, xp=xp)

    return _forward("fixed", (block, summary), make, q, k, v, causal, key_mask, combine, part, scale)


def strided_setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters; stride l ~ sqrt(N) (a power of two)."""
    return {}, {"stride": default_stride(n)}


def fixed_setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters; block l ~ sqrt(N), summary c = max(1, min(4, l // 4))."""
    block = default_stride(n)
    return {}, {"block": block, "summary": default_summary(block)}


# --------------------------------------------------------------------------- figures
def plot_heads(kind, n=64, l=8, c=2, causal=True):
    """Figure: the masks of head 0 (A(1)), head 1 (A(2)) and the merged pattern (combine="heads")."""
    from .. import viz

    if kind == "strided":
        mats = [strided_pattern(n, l, causal=causal, part=p) for p in (1, 2, None)]
        sizes = f"l={l}"
    else:
        mats = [fixed_pattern(n, l, c, causal=causal, part=p) for p in (1, 2, None)]
        sizes = f"l={l}, c={c}"
    titles = ["head 0 (even heads): A(1)", "head 1 (odd heads): A(2)", "merged: A(1) ∪ A(2)"]
    mode = "causal" if causal else "bidirectional"
    return viz.plot_patterns(mats, titles, suptitle=f"Sparse Transformer, {kind} ({sizes}, {mode}, N={n})", grid=l)


def plot_receptive_field(n=64, stride=8):
    """Figure: layer 1 = A(1) (local), layer 2 = A(2) (strided), and what a query reaches after
    both: every earlier key."""
    from .. import viz

    a1 = strided_pattern(n, stride, causal=True, part=1)
    a2 = strided_pattern(n, stride, causal=True, part=2)
    two = receptive_field(a1, a2)
    return viz.plot_patterns([a1, a2, two], ["layer 1: A(1) local", "layer 2 alone: A(2) strided",
                                             "receptive field after A(1) then A(2)"],
                             suptitle=f"Sparse Transformer (strided, l={stride}, N={n}): two layers reach everything",
                             grid=stride)


def heads_figure(out_dir, kind):
    """Writes sparse_<kind>_heads.png."""
    import os

    from .. import viz

    return viz.save(plot_heads(kind), os.path.join(out_dir, f"sparse_{kind}_heads.png"))


def receptive_field_figure(out_dir):
    """Writes sparse_strided_receptive_field.png."""
    import os

    from .. import viz

    return viz.save(plot_receptive_field(), os.path.join(out_dir, "sparse_strided_receptive_field.png"))


def _figures(out_dir, rng):
    return [heads_figure(out_dir, "strided"), receptive_field_figure(out_dir)]


def _fixed_figures(out_dir, rng):
    return [heads_figure(out_dir, "fixed")]


STRIDED = register(Mechanism(
    name="sparse_strided",
    title="Sparse Transformer (strided)",
    citation="Child et al., 2019",
    url="https://arxiv.org/abs/1904.10509",
    classes=("FP",),
    complexity="O(N√N)",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="01_fixed_patterns",
    forward=strided_forward,
    backward=backward,
    weights=weights,
    setup=strided_setup,
    pattern=pattern,
    sizes=("stride",),
    figures=_figures,
    summary="The previous l positions plus every l-th position back (l ~ sqrt N): two hops reach everything.",
))

FIXED = register(Mechanism(
    name="sparse_fixed",
    title="Sparse Transformer (fixed)",
    citation="Child et al., 2019",
    url="https://arxiv.org/abs/1904.10509",
    classes=("FP",),
    complexity="O(N√N)",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="01_fixed_patterns",
    forward=fixed_forward,
    backward=backward,
    weights=weights,
    setup=fixed_setup,
    pattern=pattern,
    sizes=("block", "summary"),
    figures=_fixed_figures,
    summary="Own block of l plus the last c 'summary' cells of every block.",
))
