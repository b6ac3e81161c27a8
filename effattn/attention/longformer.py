"""Longformer: sliding-window attention, dilated per head, plus symmetric global attention.

Beltagy, Peters, Cohan, 2020, *Longformer: The Long-Document Transformer*,
https://arxiv.org/abs/2004.05150

Intuition: most of what a token needs is nearby, so each token attends to a
band of ``w`` neighbours on each side (a convolution-like receptive field
that grows with depth). Dilating the band on some heads (look at every
``delta``-th neighbour) widens the field at no extra cost. A few task-chosen
positions ([CLS], the question tokens) get *global* attention: they attend to
every token and every token attends to them, so information can cross the
whole sequence in two hops.

Rule (query i, key j; ``delta`` = the head's dilation, G = global positions):

    local  i not in G:  j = i + t delta with |t| <= w      (the dilated band)
                        or j in G                           (the global keys)
    global i in G:      every j                             (a dense row)
    causal=True:        additionally j <= i everywhere (band j in [i - w delta, i],
                        global keys only when j <= i, global rows causal too)

Separate global projections (the paper, Section 3.1; HuggingFace
``LongformerSelfAttention``): global attention has its own Q_g, K_g, V_g.
HuggingFace computes ``query_global``/``key_global``/``value_global`` for all
positions and uses them like this (``_compute_global_attn_output_from_hidden``
and ``_concat_with_global_key_attn_probs``), which is what this module does
when ``q_global, k_global, v_global`` (shapes of q, k, v) are given:

    rows i in G:      softmax_j( q_global_i . k_global_j / sqrt(d) ) over ALL j, weights v_global
    rows i not in G:  one softmax over [band keys k_j  +  global keys k_g (the *local* k)],
                      weights the local v (band values and global positions' values)

So the global projections feed only the global *rows*; the local rows see the
global positions through the ordinary k and v. Without them (the default,
``q_global=k_global=v_global=None``) the global rows use q, k, v, and then
``out == weights(cache) @ v`` holds (with separate projections the global
rows of ``weights`` are over ``v_global``).

A global key inside a query's band is counted once: HuggingFace removes
global positions from the windowed scores
(``remove_from_windowed_attention_mask``) and keeps them in the global-key
list; the ``allowed`` mask here does the same.

Conventions: ``w`` is the one-sided window, as in the paper's
``attention_window`` of the original code ("window size = number of attention
locations on each side"). HuggingFace's ``config.attention_window`` is the
two-sided size: ``w = attention_window // 2`` (``one_sided_attn_window_size``).
HuggingFace has no dilation (only the original TVM kernel does);
``dilation`` is an int or one int per head. The global set is one for the whole
call (``global_positions``) or one per batch element (``global_mask`` (B, N) bool,
HuggingFace's ``global_attention_mask > 0``: a question's tokens are global, and
questions differ in length); elements that share a set are computed together,
so the cost is one call per distinct set.

Peer mapping (HuggingFace transformers 5.24 ``LongformerSelfAttention``): ``w =
attention_window // 2``; its query/key/value -> q, k, v and query_global/key_global/
value_global -> q_global, k_global, v_global (only the global rows of q_global are used;
its gradient is 0 elsewhere in both); ``global_attention_mask`` -> ``global_mask`` (or
``global_positions``), ``attention_mask`` -> ``key_mask``; N padded as
``LongformerModel._pad_to_window_size`` does. Out and gradients agree to float32 rounding
(7e-8 and 1.2e-7: HF's softmax runs in float32; with that cast lifted, below 5e-16). One
difference: HF zeroes the output rows of masked queries (``is_index_masked``); here a masked
query attends like any other (fixtures ``longformer__hf_longformer__*`` compare real rows).

Implementation (never N x N): per head, positions are reordered by residue
modulo delta, so the dilated band becomes a plain band of width w inside each
residue class; the reordered sequence is cut into blocks of w queries whose
keys are the previous, own and next block (``neighbour_blocks``; causal: the
previous and own block) plus the g global keys appended to every block, and
:func:`effattn.nn.sparse.attend_forward` does the masked softmax per block.
The global rows are a dense (g x N) attention; the global keys and rows are
:mod:`effattn.nn.global_tokens` (shared with ETC and BigBird).

Shapes: q, k, q_global, k_global (..., N, d); v, v_global (..., N, dv);
key_mask (..., N) bool; out (..., N, dv). Blocks: G = Np / w with Np >= N
the padded, reordered length.

Decoding (:mod:`effattn.nn.decode`, the KV window; causal): token t sees the band
j = t - u delta (0 <= u <= w) of its head's dilation, the global keys j <= t, and, if t is itself
global, every j <= t. So while a global position lies ahead every key stays reachable (the window
holds all t keys, like ``full``); after the last global position only the band (the w delta_max
positions before t: the band of every residue, for the largest dilation) and the g global keys
are kept, w delta_max + g keys at most. The state is bounded, by max(G) + 1 up to the last global
position and by w delta_max + g after it: it does not grow with t (with globals only at the start,
[CLS] and a question, it is the band from the start). The global set is ``global_positions`` (any
non-negative positions; those beyond the tokens decoded never matter) or ``global_mask`` (B, N),
one set per batch element (positions >= N are not global). Separate global projections
(``q_global``, ``k_global``, ``v_global``) are refused: a global row attends with k_global and
v_global of every earlier token, which a step (one q, k, v per token) is not given.

Complexity: O(N (3w + g) d) time and O(N (3w + g)) memory for the band, plus
O(g N d) for the global rows: O(N (w + g)) — the survey's O(n(k + m)).

Backward: per block, the flash-attention derivation of
:func:`effattn.nn.sparse.attend_backward` (dV = P^T dO, dS = P (dP - rowsum(dO O)),
dQ = scale dS K, dK = scale dS^T Q); the block gradients go back to positions
by the inverse reordering (a gather: each query row appears once), the
adjoint of the neighbour-block slicing (slice additions) and a sum over
blocks for the global keys. The global rows' gradients go to q, k, v (or to
q_global, k_global, v_global).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

from ..backend import asarray, get_namespace, to_numpy
from ..validate import check_bool, check_float_array, check_int, check_qkv, check_scale
from ..nn.functional import softmax_forward
from ..nn.blockwise import neighbour_blocks, neighbour_blocks_backward
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.global_tokens import global_keys, global_keys_backward, global_rows_forward, index_set, membership
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, gather_rows, group_mask, pad_axis, round_up
from ..registry import Case, Mechanism, backward_of, forward_of, reads_cache, register


# --------------------------------------------------------------------------- configuration
def _dilations(dilation, q=None, *, lead=None):
    """dilation: int (all heads) or a sequence of one int per head (axis -3 of q, or the last
    axis of a decoder's ``lead``) -> tuple."""
    if isinstance(dilation, numbers.Integral) and not isinstance(dilation, bool):
        return (check_int("dilation", dilation),)
    try:
        dils = tuple(dilation)
    except TypeError:
        raise ValueError(f"dilation must be an integer >= 1 or one integer per head, got {dilation!r}") from None
    dils = tuple(check_int("dilation", x) for x in dils)
    if q is not None and (q.ndim < 3 or q.shape[-3] != len(dils)):
        raise ValueError(f"dilation has {len(dils)} entries but q has shape {tuple(q.shape)} "
                         f"(one dilation per head, heads on axis -3)")
    if lead is not None and (len(lead) < 1 or lead[-1] != len(dils)):
        raise ValueError(f"dilation has {len(dils)} entries but lead is {tuple(lead)} "
                         f"(one dilation per head, heads last in lead)")
    if len(set(dils)) == 1:
        return dils[:1]
    return dils


def _global_positions(global_positions, n):
    """Sorted unique global positions as a tuple of ints in [0, n)."""
    if global_positions is None:
        return ()
    return index_set("global_positions", global_positions, n, expected="a sequence of integer positions", bound="N")


class Layout(NamedTuple):
    """Where each position goes in the blocked, residue-ordered layout (per head or shared).

    perm (Hd, Np) or (Np,): original position of each layout slot (n = padding);
    inv (Hd, n) or (n,): layout slot of each position; qpos (.., G, w) query positions
    per block; kpos (.., G, C w) band key positions per block (n = none);
    identity: all dilations 1 (the layout is the sequence itself, padded)."""

    perm: object
    inv: object
    qpos: object
    kpos: object
    dil: object       # int array (Hd, 1, 1, 1) or (1, 1, 1) of dilations, for the band rule
    identity: bool
    np_: int
    blocks: int
    after: int


def make_layout(n, w, dils, causal, xp):
    """The blocked layout of a sequence of n positions for one-sided window w and dilations dils."""
    perms, invs = [], []
    lengths = []
    for delta in dils:
        lp = round_up(-(-n // delta), w)                  # residue class length, padded to blocks of w
        r = xp.arange(delta)[:, None]
        u = xp.arange(lp)[None, :]
        perm = (r + delta * u).reshape(-1)                # slot r * lp + u holds position r + delta u
        perms.append(xp.where(perm < n, perm, n))
        i = xp.arange(n)
        invs.append((i % delta) * lp + i // delta)        # inverse: position -> slot
        lengths.append(delta * lp)
    np_ = max(lengths)
    perm = xp.stack([pad_axis(p[:, None], np_, axis=0, value=n)[:, 0] for p in perms])   # (Hd, Np)
    inv = xp.stack(invs)                                                               # (Hd, n)
    g = np_ // w
    after = 0 if causal else 1
    qpos = perm.reshape(len(dils), g, w)                                               # (Hd, G, w)
    kpos = neighbour_blocks(qpos[..., None], 1, after, fill=n)[..., 0]                  # (Hd, G, C w)
    dil = xp.asarray(dils).reshape(len(dils), 1, 1, 1)
    if len(dils) == 1:                                   # shared layout: no head axis
        perm, inv, qpos, kpos, dil = perm[0], inv[0], qpos[0], kpos[0], dil[0]
    return Layout(perm, inv, qpos, kpos, dil, all(dd == 1 for dd in dils), np_, g, after)


def _to_layout(x, lay, n):
    """x (..., n, f) -> (..., Np, f) in layout order (padding slots: zeros or a clipped copy, masked)."""
    if lay.identity:
        return pad_axis(x, lay.np_)
    xp = get_namespace(x)
    idx = xp.minimum(lay.perm, n - 1)
    if idx.ndim == 1:
        return x[..., idx, :]
    return gather_rows(x, idx[:, None, :])[..., 0, :, :]             # (..., H, 1, Np, f) -> (..., H, Np, f)


def _from_layout(y, lay, n):
    """y (..., Np, f) in layout order -> (..., n, f) in sequence order (a new array)."""
    if lay.identity:
        return y[..., :n, :].copy()
    if lay.inv.ndim == 1:
        return y[..., lay.inv, :]
    return gather_rows(y, lay.inv[:, None, :])[..., 0, :, :]


# --------------------------------------------------------------------------- forward / backward
class LongformerCache(NamedTuple):
    band: object        # AttendCache of the blocks: (..., G, w, C w + g)
    glob: object        # AttendCache of the global rows (..., g, N), or None when g = 0
    layout: Layout
    gidx: object        # int (g,) global positions
    n: int
    w: int
    causal: bool
    separate: bool      # q_global, k_global, v_global were given
    lead: tuple
    dims: tuple         # (d, dv)


def _check_globals(q, k, v, q_global, k_global, v_global):
    given = [x is not None for x in (q_global, k_global, v_global)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("q_global, k_global and v_global must be given together (or none of them)")
    for name, x, like in (("q_global", q_global, q), ("k_global", k_global, k), ("v_global", v_global, v)):
        check_float_array(name, x, min_ndim=2)
        if tuple(x.shape) != tuple(like.shape) or x.dtype != like.dtype:
            raise ValueError(f"{name} must have the shape {tuple(like.shape)} and dtype {like.dtype} of "
                             f"{name[0]}, got {tuple(x.shape)} {x.dtype}")
    return True


@forward_of("longformer")
def forward(q, k, v, *, w, dilation=1, global_positions=(), global_mask=None, q_global=None, k_global=None,
            v_global=None, causal=False, key_mask=None, scale=None):
    """Longformer attention.

    q, k (..., N, d), v (..., N, dv); w one-sided window (int >= 1); dilation int or one per head;
    global_positions sequence of ints in [0, N), the same for every batch element, or instead
    global_mask bool (B, N) (B = q.shape[0]; HuggingFace's ``global_attention_mask``), one set per
    batch element; q_global, k_global (..., N, d), v_global (..., N, dv) optional separate global
    projections; key_mask (..., N) bool. Returns out (..., N, dv), cache.
    """
    if global_mask is None:
        return _forward(q, k, v, w=w, dilation=dilation, global_positions=global_positions, q_global=q_global,
                        k_global=k_global, v_global=v_global, causal=causal, key_mask=key_mask, scale=scale)
    check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    groups = _batch_groups(global_mask, global_positions, q)
    xp = get_namespace(q, k, v)
    parts = []
    out = xp.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for positions, idx in groups:                  # elements with the same global set run together
        sel = xp.asarray(idx)
        take = lambda x, sel=sel: x if x is None or x.ndim < q.ndim - 1 or x.shape[0] == 1 else x[sel]  # noqa: E731
        o, c = _forward(q[sel], k[sel], v[sel], w=w, dilation=dilation, global_positions=positions,
                        q_global=take(q_global), k_global=take(k_global), v_global=take(v_global), causal=causal,
                        key_mask=take(key_mask), scale=scale)
        out[sel] = o
        parts.append((sel, c))
    return out, PerBatchCache(tuple(parts), tuple(q.shape[:-2]), q.shape[-2])


class PerBatchCache(NamedTuple):
    """The cache of a call with ``global_mask``: one :class:`LongformerCache` per group of batch
    elements that share a global set, with the indices of the group on axis 0."""
    groups: tuple       # ((indices (g,), LongformerCache), ...)
    lead: tuple
    n: int


def _batch_groups(global_mask, global_positions, q):
    """Group the batch elements by their global set: [(positions tuple, [indices]), ...]."""
    if global_positions not in (None, ()):
        raise ValueError("give global_positions (one set for all) or global_mask (one per batch element), not both")
    n = q.shape[-2]
    if not hasattr(global_mask, "dtype") or global_mask.dtype.kind != "b":
        raise ValueError(f"global_mask must be a boolean array (B, N), got "
                         f"{getattr(global_mask, 'dtype', type(global_mask).__name__)}")
    if q.ndim < 3 or global_mask.ndim != 2 or tuple(global_mask.shape) != (q.shape[0], n):
        raise ValueError(f"global_mask must have shape (B, N) = ({q.shape[0] if q.ndim >= 3 else 'B'}, {n}) for q "
                         f"{tuple(q.shape)} (batch on axis 0), got {tuple(global_mask.shape)}")
    rows = to_numpy(global_mask)
    groups = {}
    for b in range(rows.shape[0]):
        groups.setdefault(tuple(int(i) for i in rows[b].nonzero()[0]), []).append(b)
    return list(groups.items())


def _forward(q, k, v, *, w, dilation, global_positions, q_global, k_global, v_global, causal, key_mask, scale):
    """Longformer attention with one global set for the whole batch (see :func:`forward`)."""
    n, _, d, dv = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    causal = check_bool("causal", causal)
    w = min(check_int("w", w), n)                                         # a window beyond N reaches every token
    dils = _dilations(dilation, q)
    gpos = _global_positions(global_positions, n)
    separate = _check_globals(q, k, v, q_global, k_global, v_global)
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    lead = tuple(q.shape[:-2])
    lay = make_layout(n, w, dils, causal, xp)
    g = len(gpos)
    gidx = xp.asarray(gpos, dtype=xp.int64)
    is_global = membership(gpos, n + 1, xp)                               # slot n = padding, never global

    # band: blocks of w queries in layout order, keys = neighbour blocks + the g global keys
    gb = lay.blocks
    qb = _to_layout(q, lay, n).reshape(lead + (gb, w, d))                 # (..., G, w, d)
    kw = neighbour_blocks(_to_layout(k, lay, n).reshape(lead + (gb, w, d)), 1, lay.after)    # (..., G, C w, d)
    vw = neighbour_blocks(_to_layout(v, lay, n).reshape(lead + (gb, w, dv)), 1, lay.after)   # (..., G, C w, dv)
    kpos = lay.kpos
    if g:
        kg = global_keys(k[..., gidx, :], gb)                                                 # (..., G, g, d)
        vg = global_keys(v[..., gidx, :], gb)                                                 # (..., G, g, dv)
        kw = xp.concatenate([kw, kg], axis=-2)                                               # (..., G, C w + g, d)
        vw = xp.concatenate([vw, vg], axis=-2)
        kpos = xp.concatenate([kpos, xp.broadcast_to(gidx, kpos.shape[:-1] + (g,))], axis=-1)
    allowed = group_mask(lay.qpos, kpos, n, n, causal=causal, key_mask=key_mask)             # validity, causal, key_mask
    diff = lay.kpos[..., None, :] - lay.qpos[..., :, None]                                   # (.., G, w, C w): j - i
    # band rule: j = i + t delta, |t| <= w; a global key is taken from the global list, not the band
    band = (abs(diff) <= w * lay.dil) & (diff % lay.dil == 0) & ~is_global[lay.kpos][..., None, :]
    if g:
        band = xp.concatenate([band, xp.ones(band.shape[:-1] + (g,), dtype=bool)], axis=-1)
    rule = band & ~is_global[lay.qpos][..., :, None]                      # global rows are computed densely below
    allowed = allowed & rule
    ob, _, band_cache = attend_forward(qb, kw, vw, allowed, scale)       # (..., G, w, dv)
    out = _from_layout(ob.reshape(lead + (lay.np_, dv)), lay, n)          # (..., N, dv)

    glob_cache = None
    if g:
        qsrc, ksrc, vsrc = (q_global, k_global, v_global) if separate else (q, k, v)
        allowed_g = xp.arange(n)[None, :] <= gidx[:, None] if causal else None    # (g, N): j <= i
        # global rows: softmax(q_g K_g^T / sqrt(d)) V_g over all positions
        og, _, glob_cache = global_rows_forward(qsrc[..., gidx, :], ksrc, vsrc, allowed_g, key_mask=key_mask,
                                                scale=scale)                          # (..., g, dv)
        out[..., gidx, :] = og
    return out, LongformerCache(band_cache, glob_cache, lay, gidx, n, w, causal, separate, lead, (d, dv))


@backward_of("longformer")
def backward(dout, cache):
    """Gradients {"q", "k", "v"} (+ "q_global", "k_global", "v_global" when given)."""
    if isinstance(cache, PerBatchCache):
        return _per_batch(cache, lambda c, sel: _backward(dout[sel], c), dout)
    return _backward(dout, cache)


def _per_batch(cache, fn, like):
    """Run ``fn(group cache, indices)`` per group and put the results back on axis 0."""
    xp = get_namespace(like)
    b = cache.lead[0]
    result = None
    for sel, c in cache.groups:
        part = fn(c, sel)
        if result is None:
            shape = lambda a: (b,) + tuple(a.shape[1:])  # noqa: E731
            result = ({k: xp.zeros(shape(a), dtype=a.dtype) for k, a in part.items()} if isinstance(part, dict)
                      else xp.zeros(shape(part), dtype=part.dtype))
        if isinstance(part, dict):
            for k, a in part.items():
                result[k][sel] = a
        else:
            result[sel] = xp.broadcast_to(part, (len(sel),) + tuple(result.shape[1:]))
    return result


def _backward(dout, cache):
    band, glob, lay, gidx, n, w, causal, separate, lead, (d, dv) = cache
    xp = get_namespace(dout)
    gb = lay.blocks
    cw = lay.kpos.shape[-1]
    dob = _to_layout(dout, lay, n).reshape(lead + (gb, w, dv))            # (..., G, w, dv); global rows have P = 0
    gr = attend_backward(dob, band)
    dq = _from_layout(gr["q"].reshape(lead + (lay.np_, d)), lay, n)      # each query row appears once
    dk = _from_layout(neighbour_blocks_backward(gr["k"][..., :cw, :], 1, lay.after).reshape(lead + (lay.np_, d)), lay, n)
    dv_ = _from_layout(neighbour_blocks_backward(gr["v"][..., :cw, :], 1, lay.after).reshape(lead + (lay.np_, dv)), lay, n)
    grads = {"q": dq, "k": dk, "v": dv_}
    if glob is not None:
        dk[..., gidx, :] += global_keys_backward(gr["k"][..., cw:, :])   # global keys: sum over blocks (unique positions)
        dv_[..., gidx, :] += global_keys_backward(gr["v"][..., cw:, :])
        gg = attend_backward(dout[..., gidx, :], glob)
        if separate:
            dqg = xp.zeros(lead + (n, d), dtype=dout.dtype)
            dqg[..., gidx, :] = gg["q"]
            grads.update(q_global=dqg, k_global=gg["k"], v_global=gg["v"])
        else:
            dq[..., gidx, :] += gg["q"]
            dk += gg["k"]
            dv_ += gg["v"]
    elif separate:
        grads.update(q_global=xp.zeros_like(dq), k_global=xp.zeros_like(dk), v_global=xp.zeros_like(dv_))
    return grads


@reads_cache("longformer")
def weights(cache):
    """The (..., N, N) matrix W with out == W @ v (rows of global positions are over
    v_global when separate global projections were given)."""
    if isinstance(cache, PerBatchCache):
        return _per_batch(cache, lambda c, sel: _weights(c), cache.groups[0][1].band.p)
    return _weights(cache)


def _weights(cache):
    band, glob, lay, gidx, n, *_ = cache
    kpos = lay.kpos
    if glob is not None:
        xp = get_namespace(band.p)
        kpos = xp.concatenate([kpos, xp.broadcast_to(gidx, kpos.shape[:-1] + (len(gidx),))], axis=-1)
    wm = dense_from_groups(band.p, lay.qpos, kpos, n + 1, n + 1)[..., :n, :n]
    if glob is not None:
        wm[..., gidx, :] = glob.p
    return wm


def build_pattern(n, *, w, dilation=1, global_positions=(), causal=False, xp=None):
    """The paper's rule as a boolean (.., N, N) matrix (one per head for per-head dilation)."""
    xp = get_namespace() if xp is None else xp
    dils = (dilation,) if isinstance(dilation, numbers.Integral) else tuple(dilation)
    dil = xp.asarray(dils).reshape(-1, 1, 1)
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    is_g = membership(_global_positions(global_positions, n), n, xp)
    allowed = ((abs(j - i) <= w * dil) & ((j - i) % dil == 0)) | is_g[:, None] | is_g[None, :]
    if causal:
        allowed = allowed & (j <= i)
    return allowed[0] if len(dils) == 1 else allowed


@reads_cache("longformer")
def pattern(cache):
    """Support of the attention (without key_mask): band | global rows | global columns;
    (B, [H,] N, N) with one global set per batch element (``global_mask``)."""
    if isinstance(cache, PerBatchCache):
        extra = len(cache.lead) - 1

        def one(c, sel):
            p = _pattern(c)
            return p.reshape((1,) * (extra + 2 - p.ndim) + tuple(p.shape))[None]   # (1, [H or 1,] N, N)
        return _per_batch(cache, one, cache.groups[0][1].band.p)
    return _pattern(cache)


def _pattern(cache):
    lay, gidx = cache.layout, cache.gidx
    xp = get_namespace(cache.band.p)
    dils = tuple(int(x) for x in lay.dil.reshape(-1).tolist())
    return build_pattern(cache.n, w=cache.w, dilation=dils if len(dils) > 1 else dils[0],
                         global_positions=gidx.tolist(), causal=cache.causal, xp=xp)


def reference(q, k, v, *, w, dilation=1, global_positions=(), global_mask=None, q_global=None, k_global=None,
              v_global=None, causal=False, key_mask=None, scale=None):
    """Dense O(N^2) oracle: builds the N x N scores of the local and of the global projections
    and takes, per row, the paper's / HuggingFace's rule (global_mask: per batch element)."""
    n, _, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    xp = get_namespace(q, k, v)
    scale = check_scale(scale, d)
    separate = q_global is not None
    dils = _dilations(dilation, q)
    if global_mask is None:
        is_g = membership(_global_positions(global_positions, n), n, xp)                 # (N,)
    else:
        _batch_groups(global_mask, global_positions, q)                                  # the same checks
        is_g = global_mask.reshape((q.shape[0],) + (1,) * (q.ndim - 3) + (n,))            # (B, 1.., N)
    dil = xp.asarray(dils).reshape(-1, 1, 1)
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    keep = xp.ones((n, n), dtype=bool) if not causal else (j <= i)
    if key_mask is not None:
        keep = keep & key_mask[..., None, :]
    local = (((abs(j - i) <= w * dil) & ((j - i) % dil == 0)) | is_g[..., None, :]) & keep   # band or a global key
    s = (q @ k.swapaxes(-1, -2)) * scale                                                  # (..., N, N)
    p, _, _ = softmax_forward(s, xp.broadcast_to(local, s.shape))
    out = p @ v
    qg, kg, vg = (q_global, k_global, v_global) if separate else (q, k, v)
    sg = (qg @ kg.swapaxes(-1, -2)) * scale                                               # (..., N, N)
    pg, _, _ = softmax_forward(sg, xp.broadcast_to(keep, sg.shape))
    return xp.where(is_g[..., :, None], pg @ vg, out)


# --------------------------------------------------------------------------- decoding
class DecodeRule(NamedTuple):
    """The causal Longformer rule as the KV window's ``reach`` and ``keep``: the dilated band,
    the global keys, and every earlier key for a global query."""

    w: int
    dil: object          # int array (H, 1) of per-head dilations, or (1,) shared
    back: int            # w delta_max: how far back the band of a later query reaches
    table: object        # bool (B', P): position p < P is global in batch element b (B' = 1: one set)
    last_global: int     # the largest global position (-1: none)
    lead: tuple

    def _lift(self, x):
        """(B', L) -> broadcastable to lead + (L,)."""
        if not self.lead:
            return x[0]
        return x.reshape((x.shape[0],) + (1,) * (len(self.lead) - 1) + (x.shape[-1],))

    def is_global(self, pos):
        """Whether key pos is global (per batch element): (B', 1.., L)."""
        xp = get_namespace(pos)
        p = self.table.shape[-1]
        return self._lift(self.table[:, xp.minimum(pos, p - 1)] & (pos < p))

    def reach(self, i, pos):
        d = i - pos
        band = (d <= self.w * self.dil) & (d % self.dil == 0)                          # (H, L) or (L,)
        row = self.table[:, min(i, self.table.shape[-1] - 1)] & (i < self.table.shape[-1])  # (B',): i global?
        row = self._lift(row[:, None])
        return (pos <= i) & (band | self.is_global(pos) | row)

    def keep(self, t, pos):
        if t <= self.last_global:                  # a global query is still ahead: it reads every key
            return pos >= 0
        return (pos >= t - self.back) | self.is_global(pos).reshape(-1, pos.shape[0]).any(axis=0)


def _decode_globals(global_positions, global_mask, lead, xp):
    """The global table (B', P) and the last global position of a decoder."""
    if global_mask is None:
        if global_positions is None:
            global_positions = ()
        try:
            gpos = sorted({int(x) for x in (global_positions.tolist() if hasattr(global_positions, "tolist")
                                           else global_positions)})
        except (TypeError, ValueError):
            raise ValueError(f"global_positions must be a sequence of integer positions, got "
                             f"{global_positions!r}") from None
        if gpos and gpos[0] < 0:
            raise ValueError(f"global_positions must be >= 0, got {[p for p in gpos if p < 0]}")
        table = membership(gpos, (gpos[-1] + 1) if gpos else 1, xp)[None, :]
        return table, (gpos[-1] if gpos else -1)
    if global_positions not in (None, ()):
        raise ValueError("give global_positions (one set for all) or global_mask (one per batch element), not both")
    if not hasattr(global_mask, "dtype") or global_mask.dtype.kind != "b":
        raise ValueError(f"global_mask must be a boolean array (B, N), got "
                         f"{getattr(global_mask, 'dtype', type(global_mask).__name__)}")
    if len(lead) < 1 or global_mask.ndim != 2 or global_mask.shape[0] != lead[0]:
        raise ValueError(f"global_mask must have shape (B, N) with B = lead[0] (lead {tuple(lead)}), got "
                         f"{tuple(global_mask.shape)}")
    hits = to_numpy(global_mask).any(axis=0).nonzero()[0]
    return xp.asarray(global_mask), (int(hits[-1]) if hits.size else -1)


def init_state(*, lead, d, dv, dtype="float64", w, dilation=1, global_positions=(), global_mask=None,
               q_global=None, k_global=None, v_global=None, scale=None):
    """The KV window (:class:`effattn.nn.decode.WindowState`) of causal Longformer attention
    (:class:`DecodeRule`): every key while a global position lies ahead (t keys at position t, up
    to max(G) + 1), then the band of the last w delta_max positions and the g global keys
    (at most w delta_max + g keys, with their values and mask bits, per batch element and
    head): bounded, whatever t is. ``global_mask`` (B, N) gives one global set per batch element;
    separate global projections (q_global, k_global, v_global) cannot be decoded."""
    if any(x is not None for x in (q_global, k_global, v_global)):
        raise ValueError("q_global, k_global, v_global: separate global projections cannot be decoded -- a "
                         "global row attends with k_global and v_global of every earlier token, and a step "
                         "receives one q, k, v per token; decode without them")
    lead = tuple(int(x) for x in lead)
    w = check_int("w", w)
    dils = _dilations(dilation, lead=lead)
    scale = check_scale(scale, d)
    xp = get_namespace()
    table, last_global = _decode_globals(global_positions, global_mask, lead, xp)
    dil = xp.asarray(dils).reshape(-1, 1) if len(dils) > 1 else xp.asarray(dils)
    rule = DecodeRule(w, dil, w * max(dils), table, last_global, lead)

    def prompt_forward(q, k, v, km):
        n = q.shape[-2]
        if global_mask is None:                     # the global positions inside the prompt
            globals_ = {"global_positions": [int(p) for p in xp.nonzero(table[0, :n])[0].tolist()]}
        else:
            globals_ = {"global_mask": pad_axis(table[:, :n], n, axis=-1, value=False)}
        return forward(q, k, v, w=w, dilation=dilation, causal=True, key_mask=km, scale=scale, **globals_)[0]

    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale, reach=rule.reach, keep=rule.keep,
                        forward=prompt_forward)


prefill = window_prefill
step = window_step


# --------------------------------------------------------------------------- setup and examples
def default_config(n, heads):
    """Defaults: w = 3 below N = 128 (so tests pad), 64 from N = 1024; the last head dilated by 2
    (the paper dilates a few heads); global positions 0 ([CLS]) and N // 2."""
    w = 3 if n < 128 else (16 if n < 1024 else 64)
    dilation = 1 if heads < 2 else tuple([1] * (heads - 1) + [2])
    gpos = (0,) if n < 4 else (0, n // 2)
    return {"w": w, "dilation": dilation, "global_positions": gpos}


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No learnable parameters (the global projections are inputs: see :func:`separate_global_case`)."""
    return {}, default_config(n, heads)


def separate_global_case(rng, batch=2, heads=2, n=16, d=4, causal=False, dtype="float64", **config):
    """A :class:`Case` with separate global projections q_global, k_global, v_global as inputs."""
    shape = (batch, heads, n, d)
    names = ("q", "k", "v", "q_global", "k_global", "v_global")
    inputs = {nm: asarray(rng.standard_normal(shape), dtype=dtype) for nm in names}
    cfg = {"causal": causal, **default_config(n, heads), **config}
    return Case(inputs=inputs, config=cfg, seq_inputs=names, key_inputs=("k", "v", "k_global", "v_global"), n=n, m=n)


MECHANISM = register(Mechanism(
    name="longformer",
    title="Longformer",
    citation="Beltagy et al., 2020",
    url="https://arxiv.org/abs/2004.05150",
    classes=("FP", "M"),
    complexity="O(n(k+m))",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="02_combination_of_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    reference=reference,
    init_state=init_state,
    prefill=prefill,
    step=step,
    bounded_state=True,
    sizes=("w", "dilation"),
    windows=("w",),
    summary="Dilated sliding window (per head) plus symmetric global attention on chosen positions, "
            "with optional separate global projections (HuggingFace convention).",
))
