"""A sequence laid out as an image (or any grid) in raster order, and the Image Transformer's 2-D layouts.

Shared by the mechanisms that read positions as grid cells: the Image
Transformer's local attention (:mod:`effattn.attention.image_local_1d`,
:mod:`effattn.attention.image_local_2d`; Parmar et al., 2018,
https://arxiv.org/abs/1802.05751) and axial attention
(:mod:`effattn.attention.axial`; Ho et al., 2019).

Raster order: position i of a grid ``shape = (s_0, ..., s_{k-1})`` is the cell
whose coordinates are the digits of i in that mixed radix (C order, the last
axis fastest); for an image (H, W), i = r W + c. A sequence of N positions fits
a grid when only the last row is incomplete, (H - 1) W < N <= H W: the trailing
cells are absent (padding, masked).

    default_image_shape(n)           -> (H, W), W = ceil(sqrt N), H = ceil(N / W)
    raster_coords(pos, shape)        -> the grid coordinates of positions, one array per axis

The 2-D layouts of the Image Transformer (query blocks of h_q x w_q pixels,
memory rectangles extended h_m rows up and w_m columns left and right), by
reshapes and basic slices only (:func:`effattn.nn.blockwise.block_windows`
once along the rows, once along the columns: the memory rectangle is
separable), with their adjoints:

    query_blocks_2d(x (..., N, f), image_shape, query_shape)                  -> (..., G, h_q w_q, f)
    memory_blocks_2d(x (..., N, f), image_shape, query_shape, memory_flange)  -> (..., G, (h_q + h_m)(w_q + 2 w_m), f)
    positions_2d(xp, n, image_shape, query_shape, memory_flange)              -> (G, h_q w_q), (G, L) raster positions

G = ceil(H / h_q) ceil(W / w_q) blocks in raster order of the block grid,
pixels in raster order inside a block.
"""
from __future__ import annotations

import math

from ..validate import check_int
from .blockwise import block_windows, block_windows_backward
from .sparse import pad_axis


def default_image_shape(n):
    """A near-square (H, W) for N raster positions: W = ceil(sqrt(N)) columns, H = ceil(N / W)
    rows, so that (H - 1) W < N <= H W (the last row may be incomplete)."""
    n = check_int("n", n, minimum=1)
    cols = math.isqrt(n - 1) + 1 if n > 1 else 1                               # ceil(sqrt(n))
    return (-(-n // cols), cols)


def raster_coords(pos, shape):
    """Grid coordinates of raster positions ``pos`` (int array) on ``shape`` (C order):
    a list of arrays, one per axis, each shaped like ``pos``."""
    coords = []
    rest = pos
    for s in reversed(shape):
        coords.append(rest % s)
        rest = rest // s
    return coords[::-1]


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


__all__ = ["default_image_shape", "memory_blocks_2d", "memory_blocks_2d_backward", "positions_2d",
           "query_blocks_2d", "query_blocks_2d_backward", "raster_coords"]
