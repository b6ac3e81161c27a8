"""Figures of the efficiency techniques (notebook 10): the online softmax of ``flash``, tile by tile."""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np

from ..attention import flash
from .style import save


def flash_figures(out_dir, rng=None):
    """``flash_online_softmax.png``: the recurrence of :func:`effattn.attention.flash.forward` drawn
    tile by tile for a few query rows: the logits with the key-tile boundaries, the running max m, the
    running sum l (rescaled by e^(m - m') whenever the max grows), and how far the partial output
    acc / l still is from the final attention output after each tile (exactly 0 after the last)."""
    rng = np.random.default_rng(0) if rng is None else rng
    n, d, block = 64, 16, 8
    q = rng.standard_normal((4, d))
    k = rng.standard_normal((n, d))
    k[5 * block + 3] += 1.5 * q[0]                # one late key that raises row 0's max (and rescales l)
    v = rng.standard_normal((n, d))
    tr = flash.online_softmax_trace(q, k, v, block_k=block)
    s = (q @ k.T) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    final = (p / p.sum(-1, keepdims=True)) @ v
    tiles = np.arange(1, len(tr.bounds) + 1)

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), layout="constrained")
    ax = axes[0, 0]
    im = ax.imshow(s, aspect="auto", cmap="RdBu_r", interpolation="nearest", vmin=-abs(s).max(), vmax=abs(s).max())
    for j0, _ in tr.bounds[1:]:
        ax.axvline(j0 - 0.5, color="k", lw=0.8)
    ax.set(xlabel="key position j (vertical lines: key tiles of 8)", ylabel="query row i",
           title="logits S = q k^T / sqrt(d), visited one key tile at a time")
    fig.colorbar(im, ax=ax, label="S_ij")
    for row in range(q.shape[0]):
        axes[0, 1].step(tiles, tr.m[:, row], where="post", label=f"row {row}")
        axes[1, 0].plot(tiles, tr.l[:, row], "o-", ms=3)
        axes[1, 1].semilogy(tiles[:-1], np.abs(tr.out[:-1, row] - final[row]).max(-1), "o-", ms=3)
    axes[0, 1].set(xlabel="key tiles seen", ylabel="m = running max of S_i.",
                   title="running max: it only grows; each rise rescales l and acc")
    axes[0, 1].legend(fontsize=8)
    axes[1, 0].set(xlabel="key tiles seen", ylabel="l = sum_j exp(S_ij - m)",
                   title="running sum, kept relative to the current max")
    axes[1, 1].set(xlabel="key tiles seen", ylabel="max |acc / l - final output|",
                   title="partial output vs the exact one (0 after the last tile: not drawn)")
    fig.suptitle("flash: the online softmax (Milakov and Gimelshein 2018) tile by tile; "
                 f"after tile {len(tiles)} the output equals full attention "
                 f"(max error {np.abs(tr.out[-1] - final).max():.0e})")
    return [save(fig, os.path.join(out_dir, "flash_online_softmax.png"))]
