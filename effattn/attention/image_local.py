"""Image Transformer local self-attention, 1-D and 2-D (two registrations).

Parmar, Vaswani, Uszkoreit, Kaiser, Shazeer, Ku, Tran, 2018, *Image
Transformer*, https://arxiv.org/abs/1802.05751 (Section 3.2, "Local
Self-Attention", and its Figure 2). Surveyed by Tay et al., 2020 as a fixed
pattern (FP) with complexity O(N·m), m the memory size.

Intuition: an image of H x W pixels is a sequence of N = H W positions in
raster order, far too long for full attention, but a pixel mostly depends on
its neighbourhood. The paper cuts the *queries* into non-overlapping blocks
and gives every query block one shared, larger *memory block* that contains
it; all queries of a block attend to the same memory, so a block is one small
dense attention problem and the cost is O(N m) instead of O(N^2).

1-D local attention (``image_local_1d``): query blocks of ``l_q`` consecutive
raster positions; the memory of block g is the block plus the ``l_m``
positions before it:

    block(i)  = floor(i / l_q)
    memory(g) = { j : g l_q - l_m <= j < (g + 1) l_q }
    S_ij = q_i . k_j / sqrt(d),  P_i = softmax_{j in memory(block(i))}(S_ij),  o_i = sum_j P_ij v_j

2-D local attention (``image_local_2d``): the image is tiled into query blocks
of ``h_q x w_q`` pixels; the memory block extends the query block by ``h_m``
rows above it and ``w_m`` columns to its left and right ("memory flange"):

    query block (R, C) = rows [R h_q, (R+1) h_q) x cols [C w_q, (C+1) w_q)
    memory(R, C)       = rows [R h_q - h_m, (R+1) h_q) x cols [C w_q - w_m, (C+1) w_q + w_m)

Masked (generation) versions, ``causal=True``: a query at raster position i
sees a memory position j only if j <= i (earlier in raster order), the
paper's masking of the memory block. Without ``causal`` the same memory is
used unmasked (the paper's super-resolution encoder setting).

Memory sizes (per query block): 1-D ``l_q + l_m`` keys for ``l_q`` queries;
2-D ``(h_q + h_m) (w_q + 2 w_m)`` keys for ``h_q w_q`` queries. Time and
memory O(N m d) with m the memory size.

Implementation: by reshapes only. 1-D is :func:`effattn.nn.blockwise.blockwise_forward`
with a window of ``before = l_m`` positions. 2-D applies the same window
copy (:func:`effattn.nn.blockwise.block_windows`) once along the rows (block
``h_q``, ``h_m`` rows before) and once along the columns (block ``w_q``,
``w_m`` columns on both sides): the memory rectangle is separable. Queries are
tiled by a reshape and a transpose. Positions outside the image, the padding
of a last partial block, and masked keys are excluded by the boolean mask of
:func:`effattn.nn.sparse.group_mask`, so the result equals dense attention
masked by :func:`image_local_1d_pattern` / :func:`image_local_2d_pattern`.

Backward: per block the flash-attention derivation of :mod:`effattn.nn.sparse`;
memory gradients are added back onto the positions they were copied from
(the adjoint of the window copy, again basic slices, no ``add.at``).

Conventions next to the well-known implementations:

- tensor2tensor ``masked_local_attention_1d(q, k, v, block_length)`` is the
  1-D masked case with ``l_q = l_m = block_length``;
  ``local_attention_1d(q, k, v, block_length, filter_width)`` (unmasked)
  uses ``filter_width`` positions on *both* sides of the block, where the
  paper's (and our) memory is only the ``l_m`` positions *before* it.
- tensor2tensor ``masked_local_attention_2d(q, k, v, query_shape=(h_q, w_q),
  memory_flange=(h_m, w_m))``: same names and meaning as here;
  ``local_attention_2d`` (unmasked) also extends the memory ``h_m`` rows
  *below* the block, where ours keeps the paper's memory (above, left, right)
  and only drops the raster-order mask.
- Channels: the paper models the H x W x 3 channel intensities as separate
  positions. This kernel is channel-agnostic: positions are raster positions
  of an ``image_shape = (H, W)`` grid. To fold channels in as the paper /
  tensor2tensor's 2-D image models do, pass ``image_shape = (H, W * 3)`` (the
  channel becomes the fastest column index) and widen ``w_q``/``w_m``
  accordingly.
- Ragged images: ``image_shape = (H, W)`` may hold a few more cells than N
  (``(H - 1) W < N <= H W``): the trailing cells of the last row are absent
  (never attended, no output). ``setup`` uses this to give any N a near-square
  shape W = ceil(sqrt(N)), H = ceil(N / W).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_bool, check_int, check_positive_float, check_qkv
from ..nn.blockwise import (band_pattern, block_windows, block_windows_backward, blockwise_backward,
                            blockwise_forward, blockwise_weights)
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, group_mask, pad_axis
from ..registry import Mechanism, register

_PAPER = dict(citation="Parmar et al., 2018", url="https://arxiv.org/abs/1802.05751", classes=("FP",),
              complexity="O(N·m)", causal=True, exact=True, kind="kernel", notebook="01_fixed_patterns")


# =========================================================================== 1-D
def _check_1d(block_length, memory_length, causal):
    block_length = check_int("block_length", block_length, minimum=1)
    memory_length = check_int("memory_length", memory_length, minimum=0)
    return block_length, memory_length, check_bool("causal", causal)


def forward_1d(q, k, v, *, causal=False, key_mask=None, block_length=128, memory_length=128, scale=None):
    """Image Transformer 1-D local attention on a raster-order sequence.

    q, k (..., N, d), v (..., N, dv); key_mask (..., N) bool; block_length = l_q >= 1
    queries per block; memory_length = l_m >= 0 positions before each block; causal =
    the masked (generation) version. Returns out (..., N, dv) and a BlockwiseCache.
    """
    n, _, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    block_length, memory_length, causal = _check_1d(block_length, memory_length, causal)
    scale = d ** -0.5 if scale is None else check_positive_float("scale", scale)
    return blockwise_forward(q, k, v, block=block_length, before=memory_length, after=0,
                             causal=causal, key_mask=key_mask, scale=scale)


def backward_1d(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}."""
    return blockwise_backward(dout, cache)


def weights_1d(cache):
    """(..., N, N) matrix of the block softmaxes: out == W @ v."""
    return blockwise_weights(cache)


def image_local_1d_pattern(n, block_length, memory_length, causal=False, xp=None):
    """The paper's 1-D rule as a boolean (N, N) array: query i (block g = i // l_q) sees key j
    iff g l_q - l_m <= j < (g + 1) l_q, and j <= i when causal."""
    n = check_int("n", n, minimum=1)
    block_length, memory_length, causal = _check_1d(block_length, memory_length, causal)
    return band_pattern(n, block_length, memory_length, 0, causal=causal, xp=xp)


def pattern_1d(cache):
    xp = get_namespace(cache.attend.p)
    return image_local_1d_pattern(cache.n, cache.block, cache.before, cache.causal, xp=xp)


def setup_1d(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters. l_q = l_m = 128 for long sequences (tensor2tensor's default
    block_length); for short ones l_q ~ n / 4 and l_m = 1.5 l_q, so that memories cross
    block borders at positions that are not block-aligned and padding is exercised."""
    if n >= 512:
        return {}, {"block_length": 128, "memory_length": 128}
    lq = max(2, n // 4)
    return {}, {"block_length": lq, "memory_length": (3 * lq) // 2}


# =========================================================================== 2-D
def _pair(name, value, minimum):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in value)):
        raise ValueError(f"{name} must be a pair of integers >= {minimum}, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be a pair of integers >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _check_2d(n, image_shape, query_shape, memory_flange, causal):
    image_shape = _pair("image_shape", image_shape, 1)
    query_shape = _pair("query_shape", query_shape, 1)
    memory_flange = _pair("memory_flange", memory_flange, 0)
    h, w = image_shape
    if not (h - 1) * w < n <= h * w:
        raise ValueError(f"image_shape {image_shape} does not fit N={n} positions: need (H - 1) W < N <= H W "
                         f"(only the last row may be incomplete)")
    return image_shape, query_shape, memory_flange, check_bool("causal", causal)


def image_shape_for(n):
    """A near-square (H, W) for N raster positions: W = ceil(sqrt(N)), H = ceil(N / W),
    so that (H - 1) W < N <= H W (the last row may be incomplete)."""
    n = check_int("n", n, minimum=1)
    w = 1
    while w * w < n:
        w += 1
    return -(-n // w), w


class Local2DCache(NamedTuple):
    """What backward_2d and weights_2d need."""

    attend: object         # AttendCache: q blocks (..., G, h_q w_q, d), memories (..., G, L, .), P (..., G, h_q w_q, L)
    n: int
    image_shape: tuple     # (H, W)
    query_shape: tuple     # (h_q, w_q)
    memory_flange: tuple   # (h_m, w_m)
    q_pos: object          # (G, h_q w_q) raster positions of the queries (>= N: absent)
    k_pos: object          # (G, L) raster positions of the memory (-1 outside the image)
    causal: bool


def _grid(x, image_shape):
    """(..., N, f) -> (..., H, W, f), absent trailing cells zero."""
    h, w = image_shape
    return pad_axis(x, h * w).reshape(x.shape[:-2] + (h, w, x.shape[-1]))


def query_blocks_2d(x, image_shape, query_shape):
    """Tile (..., N, f) into query blocks (..., G, h_q w_q, f), G = ceil(H/h_q) ceil(W/w_q),
    blocks in raster order of the block grid, pixels in raster order inside a block."""
    (h, w), (hq, wq) = image_shape, query_shape
    lead, f = x.shape[:-2], x.shape[-1]
    gr, gc = -(-h // hq), -(-w // wq)
    xg = pad_axis(pad_axis(_grid(x, image_shape), gr * hq, axis=-3), gc * wq, axis=-2)  # (..., GR hq, GC wq, f)
    xb = xg.reshape(lead + (gr, hq, gc, wq, f)).swapaxes(-4, -3)             # (..., GR, GC, hq, wq, f)
    return xb.reshape(lead + (gr * gc, hq * wq, f))


def query_blocks_2d_backward(xb, n, image_shape, query_shape):
    """Inverse of :func:`query_blocks_2d` (also how block outputs go back to raster order)."""
    (h, w), (hq, wq) = image_shape, query_shape
    lead, f = xb.shape[:-3], xb.shape[-1]
    gr, gc = -(-h // hq), -(-w // wq)
    x = xb.reshape(lead + (gr, gc, hq, wq, f)).swapaxes(-4, -3)              # (..., GR, hq, GC, wq, f)
    x = x.reshape(lead + (gr * hq, gc * wq, f))[..., :h, :w, :]               # (..., H, W, f)
    return x.reshape(lead + (h * w, f))[..., :n, :]


def memory_blocks_2d(x, image_shape, query_shape, memory_flange):
    """Memory rectangles (..., G, (h_q + h_m)(w_q + 2 w_m), f) of every query block:
    a window copy along the rows, then one along the columns (zeros outside the image)."""
    (h, w), (hq, wq), (hm, wm) = image_shape, query_shape, memory_flange
    lead, f = x.shape[:-2], x.shape[-1]
    rows = block_windows(_grid(x, image_shape).reshape(lead + (h, w * f)), hq, hm, 0)  # (..., GR, hq+hm, W f)
    gr, lr = rows.shape[-3:-1]
    win = block_windows(rows.reshape(lead + (gr, lr, w, f)), wq, wm, wm)      # (..., GR, LR, GC, LC, f)
    gc, lc = win.shape[-3:-1]
    return win.swapaxes(-4, -3).reshape(lead + (gr * gc, lr * lc, f))         # (..., G, LR LC, f)


def memory_blocks_2d_backward(dw, n, image_shape, query_shape, memory_flange):
    """Adjoint of :func:`memory_blocks_2d`: (..., G, L, f) -> (..., N, f), overlaps summed."""
    (h, w), (hq, wq), (hm, wm) = image_shape, query_shape, memory_flange
    lead, f = dw.shape[:-3], dw.shape[-1]
    gr, gc = -(-h // hq), -(-w // wq)
    lr, lc = hq + hm, wq + 2 * wm
    dwin = dw.reshape(lead + (gr, gc, lr, lc, f)).swapaxes(-4, -3)           # (..., GR, LR, GC, LC, f)
    drows = block_windows_backward(dwin, w, wq, wm, wm)                       # (..., GR, LR, W, f)
    dx = block_windows_backward(drows.reshape(lead + (gr, lr, w * f)), h, hq, hm, 0)  # (..., H, W f)
    return dx.reshape(lead + (h * w, f))[..., :n, :]


def positions_2d(xp, n, image_shape, query_shape, memory_flange):
    """Raster positions of the query blocks (G, h_q w_q) (n where absent) and of their
    memories (G, L) (-1 outside the image; >= n in the absent tail of the last row)."""
    (h, w), (hq, wq), (hm, wm) = image_shape, query_shape, memory_flange
    gr, gc = -(-h // hq), -(-w // wq)
    qr = xp.arange(gr)[:, None] * hq + xp.arange(hq)[None, :]                  # (GR, hq) rows
    qc = xp.arange(gc)[:, None] * wq + xp.arange(wq)[None, :]                  # (GC, wq) cols
    qpos = qr[:, None, :, None] * w + qc[None, :, None, :]                     # (GR, GC, hq, wq)
    inside = (qr[:, None, :, None] < h) & (qc[None, :, None, :] < w)
    qpos = xp.where(inside, qpos, n).reshape(gr * gc, hq * wq)
    kr = xp.arange(gr)[:, None] * hq - hm + xp.arange(hq + hm)[None, :]        # (GR, LR)
    kc = xp.arange(gc)[:, None] * wq - wm + xp.arange(wq + 2 * wm)[None, :]    # (GC, LC)
    kpos = kr[:, None, :, None] * w + kc[None, :, None, :]                     # (GR, GC, LR, LC)
    inside = ((kr >= 0) & (kr < h))[:, None, :, None] & ((kc >= 0) & (kc < w))[None, :, None, :]
    kpos = xp.where(inside, kpos, -1).reshape(gr * gc, (hq + hm) * (wq + 2 * wm))
    return qpos, kpos


def forward_2d(q, k, v, *, image_shape, causal=False, key_mask=None, query_shape=(8, 8), memory_flange=(4, 4),
               scale=None):
    """Image Transformer 2-D local attention.

    q, k (..., N, d), v (..., N, dv) in raster order of an image_shape = (H, W) grid
    ((H - 1) W < N <= H W); query_shape = (h_q, w_q) >= 1; memory_flange = (h_m, w_m) >= 0;
    causal = masked (generation) version. Returns out (..., N, dv) and a :class:`Local2DCache`.
    """
    n, _, d, dv = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    image_shape, query_shape, memory_flange, causal = _check_2d(n, image_shape, query_shape, memory_flange, causal)
    scale = d ** -0.5 if scale is None else check_positive_float("scale", scale)
    xp = get_namespace(q, k, v)
    qb = query_blocks_2d(q, image_shape, query_shape)                          # (..., G, hq wq, d)
    kb = memory_blocks_2d(k, image_shape, query_shape, memory_flange)          # (..., G, L, d)
    vb = memory_blocks_2d(v, image_shape, query_shape, memory_flange)          # (..., G, L, dv)
    q_pos, k_pos = positions_2d(xp, n, image_shape, query_shape, memory_flange)
    allowed = group_mask(q_pos, k_pos, n, n, causal=causal, key_mask=key_mask)  # (..., G, hq wq, L)
    out, _, acache = attend_forward(qb, kb, vb, allowed, scale)                # (..., G, hq wq, dv)
    out = query_blocks_2d_backward(out, n, image_shape, query_shape)           # (..., N, dv)
    return out, Local2DCache(acache, n, image_shape, query_shape, memory_flange, q_pos, k_pos, causal)


def backward_2d(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}."""
    acache, n, image_shape, query_shape, memory_flange = cache[:5]
    doutb = query_blocks_2d(dout, image_shape, query_shape)                    # (..., G, hq wq, dv)
    g = attend_backward(doutb, acache)
    return {"q": query_blocks_2d_backward(g["q"], n, image_shape, query_shape),
            "k": memory_blocks_2d_backward(g["k"], n, image_shape, query_shape, memory_flange),
            "v": memory_blocks_2d_backward(g["v"], n, image_shape, query_shape, memory_flange)}


def weights_2d(cache):
    """(..., N, N) matrix of the block softmaxes: out == W @ v."""
    xp = get_namespace(cache.attend.p)
    n = cache.n
    return dense_from_groups(cache.attend.p, xp.clip(cache.q_pos, 0, n - 1), xp.clip(cache.k_pos, 0, n - 1), n, n)


def image_local_2d_pattern(n, image_shape, query_shape, memory_flange, causal=False, xp=None):
    """The paper's 2-D rule as a boolean (N, N) array, from pixel coordinates: query i at
    (r, c) in block (R, C) = (r // h_q, c // w_q) sees key j at (r', c') iff
    R h_q - h_m <= r' < (R+1) h_q and C w_q - w_m <= c' < (C+1) w_q + w_m, and j <= i when causal."""
    if xp is None:
        from ..backend import xp as active_xp

        xp = active_xp()
    n = check_int("n", n, minimum=1)
    (h, w), (hq, wq), (hm, wm), causal = _check_2d(n, image_shape, query_shape, memory_flange, causal)
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    r0 = (i // w) // hq * hq                                                   # first row of i's query block
    c0 = (i % w) // wq * wq                                                    # first column of i's query block
    rj, cj = j // w, j % w
    allowed = (rj >= r0 - hm) & (rj < r0 + hq) & (cj >= c0 - wm) & (cj < c0 + wq + wm)
    if causal:
        allowed = allowed & (j <= i)
    return allowed


def pattern_2d(cache):
    xp = get_namespace(cache.attend.p)
    return image_local_2d_pattern(cache.n, cache.image_shape, cache.query_shape, cache.memory_flange,
                                  cache.causal, xp=xp)


def setup_2d(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters. A near-square image (:func:`image_shape_for`); query blocks 8 x 8 with
    a flange of 4 rows / columns for long sequences, 2 x 2 with a flange of 1 for short ones."""
    small = n < 256
    return {}, {"image_shape": image_shape_for(n), "query_shape": (2, 2) if small else (8, 8),
                "memory_flange": (1, 1) if small else (4, 4)}


# =========================================================================== readable reference
def image_local_loop(q, k, v, allowed_fn, *, key_mask=None, scale=None):
    """Per-query loop for one head: q, k (N, d), v (N, dv); ``allowed_fn(i, j) -> bool`` is
    the rule written for one pair. Teaching and tests only (O(N^2) Python)."""
    xp = get_namespace(q, k, v)
    n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out = xp.zeros((n, v.shape[-1]), dtype=q.dtype)
    for i in range(n):
        keys = [j for j in range(n) if allowed_fn(i, j) and (key_mask is None or bool(key_mask[j]))]
        if keys:
            s = (k[keys] @ q[i]) * scale
            p = xp.exp(s - s.max())
            out[i] = (p / p.sum()) @ v[keys]
    return out


# =========================================================================== figures
def _figures_1d(out_dir, rng):
    from ..viz_fixed import image_local_1d_figures

    return image_local_1d_figures(out_dir, rng)


def _figures_2d(out_dir, rng):
    from ..viz_fixed import image_local_2d_figures

    return image_local_2d_figures(out_dir, rng)


MECHANISM_1D = register(Mechanism(
    name="image_local_1d",
    title="Image Transformer, 1-D local attention",
    forward=forward_1d,
    backward=backward_1d,
    weights=weights_1d,
    setup=setup_1d,
    pattern=pattern_1d,
    sizes=("block_length",),
    figures=_figures_1d,
    summary="Raster-order query blocks of l_q attend to the block and the l_m positions before it.",
    **_PAPER,
))

MECHANISM_2D = register(Mechanism(
    name="image_local_2d",
    title="Image Transformer, 2-D local attention",
    forward=forward_2d,
    backward=backward_2d,
    weights=weights_2d,
    setup=setup_2d,
    pattern=pattern_2d,
    sizes=("query_shape", "image_shape"),
    figures=_figures_2d,
    summary="h_q x w_q query blocks attend to a memory extended h_m rows up and w_m columns left and right.",
    **_PAPER,
))
