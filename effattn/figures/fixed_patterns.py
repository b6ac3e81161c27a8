"""Figures of the fixed-pattern mechanisms (notebook 01): blocks on a grid, image-shaped
memory pictures, compressed-slot visibility, the Sparse Transformer's heads and receptive
field, axial rows and columns.

Every ``<name>_figures(out_dir, rng)`` writes PNGs named ``<out_dir>/<name>_*.png``
and returns their paths; the drawing helpers (:func:`draw_image_block`,
:func:`plot_sparse_heads`, :func:`plot_sparse_receptive_field`, :func:`plot_axial_grid`,
:func:`plot_axial_masks`) are reused by the notebook.
"""
from __future__ import annotations

import math
import os

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from ..attention import (axial, image_local_1d, image_local_2d, local, memory_compressed, sparse_fixed,
                         sparse_strided)
from ..backend import to_numpy
from ..nn.factorized import receptive_field
from ..nn.image import default_image_shape, positions_2d
from .style import plot_pattern, plot_patterns, save

IMAGE_CMAP = ListedColormap(["#f4f4f4", "#9ecae1", "#1f5fa8"])


def draw_image_block(ax, image_shape, qpos, kpos, n, title=None):
    """Pixel grid of an (H, W) image in raster order: query positions ``qpos`` dark,
    memory positions ``kpos`` light; cells >= n (absent tail of a ragged last row) blank."""
    h, w = image_shape
    grid = np.zeros(h * w)
    kpos = [int(p) for p in np.ravel(to_numpy(kpos)) if 0 <= p < n]
    qpos = [int(p) for p in np.ravel(to_numpy(qpos)) if 0 <= p < n]
    grid[kpos] = 1
    grid[qpos] = 2
    grid[n:] = np.nan
    ax.imshow(grid.reshape(h, w), cmap=IMAGE_CMAP, vmin=0, vmax=2, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.6)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def local_figures(out_dir, rng=None):
    """local_blocks.png (look_back 0 / 1, causal, look_ahead) and local_ragged.png (N not a multiple of b)."""
    n, b = 32, 8
    mats = [local.build_pattern(n, block=b, look_back=0, xp=np), local.build_pattern(n, block=b, look_back=1, xp=np),
            local.build_pattern(n, block=b, look_back=1, causal=True, xp=np),
            local.build_pattern(n, block=b, look_back=1, look_ahead=1, xp=np)]
    titles = ["look_back=0 (own block only)", "look_back=1", "look_back=1, causal", "look_back=1, look_ahead=1"]
    fig = plot_patterns(mats, titles, suptitle=f"Blockwise local attention, N={n}, block b={b}", grid=b)
    paths = [save(fig, os.path.join(out_dir, "local_blocks.png"))]
    n2 = 29
    fig = plot_patterns([local.build_pattern(n2, block=b, look_back=1, causal=True, xp=np)],
                        [f"N={n2}, b={b}: last block has {n2 % b} rows"],
                        suptitle="Ragged last block (padded inside, masked)", grid=b)
    paths.append(save(fig, os.path.join(out_dir, "local_ragged.png")))
    return paths


def image_local_1d_figures(out_dir, rng=None):
    """image_local_1d_blocks.png (a query block and its memory on the pixel grid) and
    image_local_1d_matrix.png (the (N, N) pattern)."""
    h, w, lq, lm = 8, 12, 12, 18
    n = h * w
    g = 4                                                                      # the fifth query block
    qpos = np.arange(g * lq, (g + 1) * lq)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, causal in zip(axes, (False, True)):
        pat = image_local_1d.build_pattern(n, block_length=lq, memory_length=lm, causal=causal, xp=np)
        i = int(qpos[-1] if causal else qpos[0])
        who = f"masked: what query {divmod(i, w)} sees" if causal else "unmasked: block and its memory"
        draw_image_block(ax, (h, w), qpos if not causal else [i], np.flatnonzero(pat[i]), n,
                         f"{who}\nl_q={lq}, l_m={lm}")
    fig.suptitle("Image Transformer 1-D local attention on an 8 x 12 image (dark: query, light: memory)")
    fig.tight_layout()
    paths = [save(fig, os.path.join(out_dir, "image_local_1d_blocks.png"))]
    fig = plot_patterns([image_local_1d.build_pattern(48, block_length=8, memory_length=12, xp=np),
                         image_local_1d.build_pattern(48, block_length=8, memory_length=12, causal=True, xp=np)],
                        ["l_q=8, l_m=12", "l_q=8, l_m=12, masked"], suptitle="1-D local: the (N, N) pattern",
                        grid=8)
    paths.append(save(fig, os.path.join(out_dir, "image_local_1d_matrix.png")))
    return paths


def image_local_2d_figures(out_dir, rng=None):
    """image_local_2d_blocks.png (a query block, its memory rectangle, what two masked queries see)
    and image_local_2d_matrix.png (the (N, N) pattern of a ragged image)."""
    shape, qs, fl = (12, 16), (4, 4), (3, 2)
    n = shape[0] * shape[1]
    qpos, kpos = positions_2d(np, n, shape, qs, fl)
    blk = 1 * (-(-shape[1] // qs[1])) + 2                                      # block row 1, block column 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    draw_image_block(axes[0], shape, qpos[blk], kpos[blk], n, f"unmasked: query block {qs}, flange {fl}")
    pat = image_local_2d.build_pattern(n, image_shape=shape, query_shape=qs, memory_flange=fl, causal=True, xp=np)
    for ax, which in zip(axes[1:], (0, -1)):
        i = int(qpos[blk][which])
        draw_image_block(ax, shape, [i], np.flatnonzero(pat[i]), n, f"masked: what query {divmod(i, shape[1])} sees")
    fig.suptitle("Image Transformer 2-D local attention on a 12 x 16 image (dark: query, light: memory)")
    fig.tight_layout()
    paths = [save(fig, os.path.join(out_dir, "image_local_2d_blocks.png"))]
    n2 = 45
    shape2 = default_image_shape(n2)
    cfg2 = {"image_shape": shape2, "query_shape": (2, 3), "memory_flange": (1, 1), "xp": np}
    fig = plot_patterns([image_local_2d.build_pattern(n2, **cfg2),
                         image_local_2d.build_pattern(n2, causal=True, **cfg2)],
                        [f"N={n2}, image {shape2}, query (2, 3), flange (1, 1)", "masked"],
                        suptitle="2-D local: the (N, N) pattern in raster order (ragged last row)")
    paths.append(save(fig, os.path.join(out_dir, "image_local_2d_matrix.png")))
    return paths


def memory_compressed_figures(out_dir, rng=None):
    """memory_compressed_slots.png (which slots each query sees) and memory_compressed_weights.png
    (the implied N x N weights W = P C)."""
    rng = np.random.default_rng(0) if rng is None else rng
    n, k = 24, 4
    vis = memory_compressed.slot_visibility(n, n, k, True, np)
    km = np.ones(n, bool)
    km[8:12] = False                                                           # slot 2 entirely masked
    km[13] = False
    real = km.reshape(-1, k).any(axis=1)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, mat, title in zip(axes, [np.ones_like(vis), vis, vis & real[None, :]],
                              [f"bidirectional (N={n}, k={k})", "causal: visible once\nlast position of slot <= i",
                               "causal + key_mask\n(slot 2 all masked)"]):
        plot_pattern(mat, ax=ax, title=title, xlabel="compressed slot s", colorbar=False)
        ax.set_aspect("auto")
    fig.suptitle("Memory-compressed attention: which slots each query sees")
    fig.tight_layout()
    paths = [save(fig, os.path.join(out_dir, "memory_compressed_slots.png"))]
    d = 8
    q, kk, v = (rng.standard_normal((1, 1, n, d)) for _ in range(3))
    params = memory_compressed.init_compression(rng, k, d)
    mats = []
    for causal in (False, True):
        _, cache = memory_compressed.forward(q, kk, v, causal=causal, **params)
        mats.append(memory_compressed.weights(cache)[0, 0])
    fig = plot_patterns(mats, ["bidirectional", "causal"], weights=True,
                        suptitle=f"Implied N x N weights W = P C (k={k}): each slot's weight spread over its positions")
    paths.append(save(fig, os.path.join(out_dir, "memory_compressed_weights.png")))
    return paths


# --------------------------------------------------------------------------- Sparse Transformer
def plot_sparse_heads(kind, n=64, l=8, c=2, causal=True):
    """Figure: the masks of head 0 (A(1)), head 1 (A(2)) and the merged pattern (combine="heads");
    ``kind`` "strided" (stride l) or "fixed" (block l, summary c)."""
    if kind == "strided":
        mats = [sparse_strided.build_pattern(n, stride=l, causal=causal, part=p, xp=np) for p in (1, 2, None)]
        sizes = f"l={l}"
    else:
        mats = [sparse_fixed.build_pattern(n, block=l, summary=c, causal=causal, part=p, xp=np) for p in (1, 2, None)]
        sizes = f"l={l}, c={c}"
    titles = ["head 0 (even heads): A(1)", "head 1 (odd heads): A(2)", "merged: A(1) ∪ A(2)"]
    mode = "causal" if causal else "bidirectional"
    return plot_patterns(mats, titles, suptitle=f"Sparse Transformer, {kind} ({sizes}, {mode}, N={n})", grid=l)


def plot_sparse_receptive_field(n=64, stride=8):
    """Figure: layer 1 = A(1) (local), layer 2 = A(2) (strided), and what a query reaches after
    both: every earlier key."""
    a1 = sparse_strided.build_pattern(n, stride=stride, causal=True, part=1, xp=np)
    a2 = sparse_strided.build_pattern(n, stride=stride, causal=True, part=2, xp=np)
    two = receptive_field(a1, a2)
    return plot_patterns([a1, a2, two], ["layer 1: A(1) local", "layer 2 alone: A(2) strided",
                                         "receptive field after A(1) then A(2)"],
                         suptitle=f"Sparse Transformer (strided, l={stride}, N={n}): two layers reach everything",
                         grid=stride)


def sparse_strided_figures(out_dir, rng=None):
    """sparse_strided_heads.png (the per-head masks) and sparse_strided_receptive_field.png."""
    return [save(plot_sparse_heads("strided"), os.path.join(out_dir, "sparse_strided_heads.png")),
            save(plot_sparse_receptive_field(), os.path.join(out_dir, "sparse_strided_receptive_field.png"))]


def sparse_fixed_figures(out_dir, rng=None):
    """sparse_fixed_heads.png (the per-head masks)."""
    return [save(plot_sparse_heads("fixed"), os.path.join(out_dir, "sparse_fixed_heads.png"))]


# --------------------------------------------------------------------------- axial
def plot_axial_grid(shape=(6, 8), query=(3, 5)):
    """Figure: the keys of one query q drawn on the grid, for row, column and both,
    bidirectional (top) and causal in raster order (bottom)."""
    r, c = shape
    n = r * c
    qi = query[0] * c + query[1]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5))
    for col, (ax_name, title) in enumerate((("row", "row attention"), ("column", "column attention"),
                                            ("both", "both: row ∪ column"))):
        for rowi, causal in enumerate((False, True)):
            ax = axes[rowi, col]
            allowed = axial.build_pattern(n, shape=shape, axis=ax_name, causal=causal, xp=np)[qi]
            allowed = allowed.reshape(shape).astype(float)
            allowed[query] = 0.5
            ax.imshow(allowed, cmap="Blues", vmin=0, vmax=1.2)
            ax.set_xticks(range(c))
            ax.set_yticks(range(r))
            ax.set_xlabel("column")
            ax.set_ylabel("row")
            ax.set_title(f"{title} ({'causal' if causal else 'bidirectional'})", fontsize=9)
            ax.text(query[1], query[0], "q", ha="center", va="center", color="k")
    fig.suptitle(f"Axial attention on a {r} x {c} grid: the keys (blue) of the query q")
    fig.tight_layout()
    return fig


def plot_axial_masks(shape=(6, 8), causal=True):
    """Figure: row, column and both as N x N masks (block lines every row of the grid)."""
    n = math.prod(shape)
    mats = [axial.build_pattern(n, shape=shape, axis=a, causal=causal, xp=np) for a in ("row", "column", "both")]
    mode = "causal" if causal else "bidirectional"
    return plot_patterns(mats, [f"row ({mode})", f"column ({mode})", f"both ({mode})"],
                         suptitle=f"Axial attention as N x N masks (grid {shape[0]} x {shape[1]}, N={n})",
                         grid=shape[-1])


def axial_figures(out_dir, rng=None):
    """axial_grid.png (rows/columns on the grid) and axial_masks.png (as N x N masks)."""
    return [save(plot_axial_grid(), os.path.join(out_dir, "axial_grid.png")),
            save(plot_axial_masks(), os.path.join(out_dir, "axial_masks.png"))]
