"""Figures of the fixed-pattern mechanisms (notebook 01): blocks on a grid, image-shaped
memory pictures, compressed-slot visibility.

Every ``<name>_figures(out_dir, rng)`` writes PNGs named ``<out_dir>/<name>_*.png``
and returns their paths; the drawing helpers (:func:`draw_image_block`) are reused
by the notebook.
"""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from ..backend import to_numpy
from . import style as viz

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
    from ..attention.local import local_pattern

    n, b = 32, 8
    mats = [local_pattern(n, b, 0, False, xp=np), local_pattern(n, b, 1, False, xp=np),
            local_pattern(n, b, 1, True, xp=np), local_pattern(n, b, 1, False, look_ahead=1, xp=np)]
    titles = ["look_back=0 (own block only)", "look_back=1", "look_back=1, causal", "look_back=1, look_ahead=1"]
    fig = viz.plot_patterns(mats, titles, suptitle=f"Blockwise local attention, N={n}, block b={b}", grid=b)
    paths = [viz.save(fig, os.path.join(out_dir, "local_blocks.png"))]
    n2 = 29
    fig = viz.plot_patterns([local_pattern(n2, b, 1, True, xp=np)], [f"N={n2}, b={b}: last block has {n2 % b} rows"],
                            suptitle="Ragged last block (padded inside, masked)", grid=b)
    paths.append(viz.save(fig, os.path.join(out_dir, "local_ragged.png")))
    return paths


def image_local_1d_figures(out_dir, rng=None):
    from ..attention.image_local import image_local_1d_pattern

    h, w, lq, lm = 8, 12, 12, 18
    n = h * w
    g = 4                                                                      # the fifth query block
    qpos = np.arange(g * lq, (g + 1) * lq)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, causal in zip(axes, (False, True)):
        pat = image_local_1d_pattern(n, lq, lm, causal, xp=np)
        i = int(qpos[-1] if causal else qpos[0])
        who = f"masked: what query {divmod(i, w)} sees" if causal else "unmasked: block and its memory"
        draw_image_block(ax, (h, w), qpos if not causal else [i], np.flatnonzero(pat[i]), n,
                         f"{who}\nl_q={lq}, l_m={lm}")
    fig.suptitle("Image Transformer 1-D local attention on an 8 x 12 image (dark: query, light: memory)")
    fig.tight_layout()
    paths = [viz.save(fig, os.path.join(out_dir, "image_local_1d_blocks.png"))]
    fig = viz.plot_patterns([image_local_1d_pattern(48, 8, 12, False, xp=np),
                             image_local_1d_pattern(48, 8, 12, True, xp=np)],
                            ["l_q=8, l_m=12", "l_q=8, l_m=12, masked"], suptitle="1-D local: the (N, N) pattern",
                            grid=8)
    paths.append(viz.save(fig, os.path.join(out_dir, "image_local_1d_matrix.png")))
    return paths


def image_local_2d_figures(out_dir, rng=None):
    from ..attention.image_local import image_local_2d_pattern, image_shape_for, positions_2d

    shape, qs, fl = (12, 16), (4, 4), (3, 2)
    n = shape[0] * shape[1]
    qpos, kpos = positions_2d(np, n, shape, qs, fl)
    blk = 1 * (-(-shape[1] // qs[1])) + 2                                      # block row 1, block column 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    draw_image_block(axes[0], shape, qpos[blk], kpos[blk], n, f"unmasked: query block {qs}, flange {fl}")
    pat = image_local_2d_pattern(n, shape, qs, fl, True, xp=np)
    for ax, which in zip(axes[1:], (0, -1)):
        i = int(qpos[blk][which])
        draw_image_block(ax, shape, [i], np.flatnonzero(pat[i]), n, f"masked: what query {divmod(i, shape[1])} sees")
    fig.suptitle("Image Transformer 2-D local attention on a 12 x 16 image (dark: query, light: memory)")
    fig.tight_layout()
    paths = [viz.save(fig, os.path.join(out_dir, "image_local_2d_blocks.png"))]
    n2 = 45
    shape2 = image_shape_for(n2)
    fig = viz.plot_patterns([image_local_2d_pattern(n2, shape2, (2, 3), (1, 1), False, xp=np),
                             image_local_2d_pattern(n2, shape2, (2, 3), (1, 1), True, xp=np)],
                            [f"N={n2}, image {shape2}, query (2, 3), flange (1, 1)", "masked"],
                            suptitle="2-D local: the (N, N) pattern in raster order (ragged last row)")
    paths.append(viz.save(fig, os.path.join(out_dir, "image_local_2d_matrix.png")))
    return paths


def memory_compressed_figures(out_dir, rng=None):
    from ..attention.memory_compressed import draw_compression, forward, slot_visibility, weights

    rng = np.random.default_rng(0) if rng is None else rng
    n, k = 24, 4
    vis = slot_visibility(n, n, k, True, np)
    km = np.ones(n, bool)
    km[8:12] = False                                                           # slot 2 entirely masked
    km[13] = False
    real = km.reshape(-1, k).any(axis=1)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, mat, title in zip(axes, [np.ones_like(vis), vis, vis & real[None, :]],
                              [f"bidirectional (N={n}, k={k})", "causal: visible once\nlast position of slot <= i",
                               "causal + key_mask\n(slot 2 all masked)"]):
        viz.plot_pattern(mat, ax=ax, title=title, xlabel="compressed slot s", colorbar=False)
        ax.set_aspect("auto")
    fig.suptitle("Memory-compressed attention: which slots each query sees")
    fig.tight_layout()
    paths = [viz.save(fig, os.path.join(out_dir, "memory_compressed_slots.png"))]
    d = 8
    q, kk, v = (rng.standard_normal((1, 1, n, d)) for _ in range(3))
    params = draw_compression(rng, k, d)
    mats = []
    for causal in (False, True):
        _, cache = forward(q, kk, v, causal=causal, **params)
        mats.append(weights(cache)[0, 0])
    fig = viz.plot_patterns(mats, ["bidirectional", "causal"], weights=True,
                            suptitle=f"Implied N x N weights W = P C (k={k}): each slot's weight spread over its positions")
    paths.append(viz.save(fig, os.path.join(out_dir, "memory_compressed_weights.png")))
    return paths
