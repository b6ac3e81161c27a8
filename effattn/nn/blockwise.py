"""Blockwise attention with a window of neighbouring positions, by reshapes only.

Shared by the fixed-pattern mechanisms whose queries are cut into contiguous
blocks and whose keys are "the block plus some positions before / after it":
blockwise local attention (:mod:`effattn.attention.local`, window = whole
neighbouring blocks), the Image Transformer's 1-D local attention
(:mod:`effattn.attention.image_local_1d`, window = the block plus ``l_m``
preceding pixels) and, applied once per image axis (:mod:`effattn.nn.image`),
its 2-D local attention (:mod:`effattn.attention.image_local_2d`); and, as
whole neighbouring blocks (:func:`neighbour_blocks`), the windows of
Longformer, ETC and BigBird.

The trick (no gather with fancy indices, no scatter with ``add.at``): pad the
sequence with ``before`` zeros in front and enough zeros behind so that its
length is a multiple of the block ``b``; view it as ``(blocks, b, f)``; the
window of query block ``g`` is then the concatenation of the padded blocks
``g, g+1, ..., g+C-1`` (``C = ceil(L / b)``), cut to its length
``L = before + b + after``. Each of the ``C`` pieces is a *basic slice*
``xb[..., c:c+G, :, :]`` of the blocked view, so the forward copies each row
of the window once and the backward adds each piece back into the same slice
(a view), again without ``add.at``.

    block_windows(x (..., N, f), b, before, after)   -> (..., G, L, f)   G = ceil(N / b)
    window_positions(xp, G, b, before, after)        -> (G, L) ints (may be < 0 or >= N)
    blockwise_forward(q, k, v, block=b, before=, after=, ...) -> out (..., N, dv), cache

Cost: the windows hold ``G L f = N (1 + (before + after) / b) f`` numbers; the
scores ``G b L = N L`` — O(N L), never N x N.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from .sparse import attend_backward, attend_forward, dense_from_groups, group_mask, pad_axis


def _blocked_padded(x, block, before, n_chunks, fill=0):
    """x (..., N, f) padded with ``before`` zeros in front and zeros behind, viewed as
    (..., G + n_chunks - 1, b, f) so that window g, chunk c is block g + c."""
    n = x.shape[-2]
    g = -(-n // block)
    total = (g + n_chunks - 1) * block
    xp = get_namespace(x)
    pad = [(0, 0)] * x.ndim
    pad[-2] = (before, total - before - n)
    xpad = xp.pad(x, pad, constant_values=fill) if (before or total != n) else x  # (..., total, f)
    return xpad.reshape(x.shape[:-2] + (total // block, block, x.shape[-1]))


def block_windows(x, block, before, after, fill=0):
    """Windows of ``before + block + after`` rows around each block of ``block`` rows.

    x (..., N, f) -> (..., G, L, f) with G = ceil(N / block), L = before + block + after;
    row t of window g is x[g * block - before + t] (``fill`` outside [0, N)).
    """
    xp = get_namespace(x)
    n, f = x.shape[-2:]
    lead = x.shape[:-2]
    g = -(-n // block)
    length = before + block + after
    n_chunks = -(-length // block)
    xb = _blocked_padded(x, block, before, n_chunks, fill)                     # (..., G + C - 1, b, f)
    out = xp.empty(lead + (g, length, f), dtype=x.dtype)                       # (..., G, L, f)
    for c in range(n_chunks):
        width = min(block, length - c * block)
        # window rows c*b .. c*b + width - 1 are the first rows of padded block g + c
        out[..., c * block:c * block + width, :] = xb[..., c:c + g, :width, :]
    return out


def block_windows_backward(dw, n, block, before, after):
    """Adjoint of :func:`block_windows`: dw (..., G, L, f) -> dx (..., n, f), overlaps summed."""
    xp = get_namespace(dw)
    lead = dw.shape[:-3]
    g, length, f = dw.shape[-3:]
    n_chunks = -(-length // block)
    dxb = xp.zeros(lead + (g + n_chunks - 1, block, f), dtype=dw.dtype)       # (..., G + C - 1, b, f)
    for c in range(n_chunks):
        width = min(block, length - c * block)
        dxb[..., c:c + g, :width, :] += dw[..., c * block:c * block + width, :]  # basic slices: views, no add.at
    dx = dxb.reshape(lead + ((g + n_chunks - 1) * block, f))
    return dx[..., before:before + n, :]


def neighbour_blocks(xb, before, after, fill=0):
    """Whole neighbouring blocks (Longformer, ETC, BigBird): xb (..., G, b, f) already cut
    into blocks -> (..., G, (before + 1 + after) b, f), row block s of group c being block
    c - before + s (``fill`` outside 0..G-1). :func:`block_windows` with whole blocks."""
    g, b, f = xb.shape[-3:]
    return block_windows(xb.reshape(xb.shape[:-3] + (g * b, f)), b, before * b, after * b, fill=fill)


def neighbour_blocks_backward(gw, before, after):
    """Adjoint of :func:`neighbour_blocks`: gw (..., G, C b, f) -> (..., G, b, f)."""
    g, cb, f = gw.shape[-3:]
    b = cb // (before + 1 + after)
    dx = block_windows_backward(gw, g * b, b, before * b, after * b)
    return dx.reshape(gw.shape[:-3] + (g, b, f))


def window_positions(xp, g, block, before, after):
    """(G, L) original positions of the window rows: g * block - before + t."""
    length = before + block + after
    return xp.arange(g)[:, None] * block - before + xp.arange(length)[None, :]


class BlockwiseCache(NamedTuple):
    """What the backward and weights() need."""

    attend: object   # AttendCache of the groups: q (..., G, b, d), k/v windows (..., G, L, .), P (..., G, b, L)
    n: int           # sequence length N
    block: int       # query block b
    before: int      # window rows before the block
    after: int       # window rows after the block
    q_pos: object    # (G, b) query positions (>= N: padding)
    k_pos: object    # (G, L) key positions (< 0 or >= N: padding)
    causal: bool


def blockwise_forward(q, k, v, *, block, before, after, causal=False, key_mask=None, scale=1.0):
    """Softmax attention of each query block over its window (self-attention, M == N).

    q, k (..., N, d), v (..., N, dv); key_mask (..., N) bool. Query block g =
    positions [g b, (g+1) b); its keys = positions [g b - before, (g+1) b + after)
    that exist, are real (key_mask) and, when causal, are <= the query. Sizes beyond the
    sequence are clipped to N (a block or a reach longer than the sequence is the sequence), so
    no window is ever longer than 3 N. Returns out (..., N, dv) and a :class:`BlockwiseCache`.
    """
    xp = get_namespace(q, k, v)
    n, d = q.shape[-2:]
    block, before, after = min(block, n), min(before, n), min(after, n)
    lead = q.shape[:-2]
    g = -(-n // block)
    qb = pad_axis(q, g * block).reshape(lead + (g, block, d))                 # (..., G, b, d)
    kb = block_windows(k, block, before, after)                                # (..., G, L, d)
    vb = block_windows(v, block, before, after)                                # (..., G, L, dv)
    q_pos = xp.arange(g * block).reshape(g, block)                             # (G, b)
    k_pos = window_positions(xp, g, block, before, after)                      # (G, L)
    allowed = group_mask(q_pos, k_pos, n, n, causal=causal, key_mask=key_mask)  # (..., G, b, L)
    out, _, acache = attend_forward(qb, kb, vb, allowed, scale)                # (..., G, b, dv)
    out = out.reshape(lead + (g * block, v.shape[-1]))[..., :n, :]             # (..., N, dv)
    return out, BlockwiseCache(acache, n, block, before, after, q_pos, k_pos, causal)


def blockwise_backward(dout, cache):
    """Gradients {"q", "k", "v"}: the group gradients of :func:`attend_backward`, put back
    by the inverse reshape (queries) and :func:`block_windows_backward` (keys, values)."""
    acache, n, block, before, after = cache[:5]
    lead = dout.shape[:-2]
    g = acache.q.shape[-3]
    doutb = pad_axis(dout, g * block).reshape(lead + (g, block, dout.shape[-1]))  # (..., G, b, dv)
    gr = attend_backward(doutb, acache)
    dq = gr["q"].reshape(lead + (g * block, gr["q"].shape[-1]))[..., :n, :]
    dk = block_windows_backward(gr["k"], n, block, before, after)
    dv = block_windows_backward(gr["v"], n, block, before, after)
    return {"q": dq, "k": dk, "v": dv}


def blockwise_weights(cache):
    """The (..., N, N) matrix of the block softmaxes (teaching sizes only)."""
    xp = get_namespace(cache.attend.p)
    n = cache.n
    return dense_from_groups(cache.attend.p, xp.clip(cache.q_pos, 0, n - 1), xp.clip(cache.k_pos, 0, n - 1), n, n)


def band_pattern(n, block, before, after, causal=False, xp=None):
    """The rule of blockwise windows as a boolean (N, N) array, from block index
    arithmetic: i in block g = i // b sees j iff g b - before <= j < (g + 1) b + after
    (and j <= i when causal). ``xp``: array module (default: the active backend)."""
    xp = get_namespace() if xp is None else xp
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    start = (i // block) * block
    allowed = (j >= start - before) & (j < start + block + after)
    if causal:
        allowed = allowed & (j <= i)
    return allowed


__all__ = ["BlockwiseCache", "band_pattern", "block_windows", "block_windows_backward", "blockwise_backward",
           "blockwise_forward", "blockwise_weights", "neighbour_blocks", "neighbour_blocks_backward",
           "window_positions"]
