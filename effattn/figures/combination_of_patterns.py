"""Figures of the combination-of-patterns mechanisms (notebook 02): Longformer's band, dilation and
global positions; ETC's four pieces and relative labels; BigBird's window + global + random blocks.

Every ``<name>_figures(out_dir, rng)`` writes PNGs named ``<out_dir>/<name>_*.png`` and returns
their paths. The patterns come from each module's ``build_pattern`` (sizes alone, on the host).
"""
from __future__ import annotations

import os

import numpy as np

from ..attention import bigbird, etc, longformer
from .style import plot_pattern, plot_patterns, save


def longformer_figures(out_dir, rng=None):
    """The band, a dilated band, band + global positions, causal; then one dilation per head."""
    n, w = 48, 4
    mats = [longformer.build_pattern(n, w=w, xp=np),
            longformer.build_pattern(n, w=w, dilation=2, xp=np),
            longformer.build_pattern(n, w=w, global_positions=(0, 20), xp=np),
            longformer.build_pattern(n, w=w, global_positions=(0, 20), causal=True, xp=np)]
    titles = ["band w=4", "dilated band (delta=2)", "band + global {0, 20}", "causal band + global"]
    fig = plot_patterns(mats, titles, suptitle="Longformer: O(N(w + g))")
    paths = [save(fig, os.path.join(out_dir, "longformer_band_global.png"))]
    per_head = longformer.build_pattern(n, w=w, dilation=(1, 2, 3, 4), global_positions=(0,), xp=np)
    fig = plot_patterns(list(per_head), [f"head {h}: dilation {h + 1}" for h in range(4)],
                        suptitle="Longformer: a different dilation per head (global position 0)")
    paths.append(save(fig, os.path.join(out_dir, "longformer_dilation_per_head.png")))
    return paths


def etc_figures(out_dir, rng=None):
    """The four pieces g2g | g2l / l2g | l2l (plain and with hard g2l masking), and the
    relative position labels l(i, j) + k on the distance-labelled pieces."""
    n, ng, r = 40, 4, 3
    plain = etc.build_pattern(n, n_global=ng, radius=r, xp=np)
    seg = etc.contiguous_segments(n - ng, ng, xp=np)
    hard = etc.build_pattern(n, n_global=ng, radius=r, segment_ids=seg, xp=np)
    labels = etc.relative_labels(np.arange(n), np.arange(n), 3, np)
    lab = labels * plain + (~plain) * -1
    fig = plot_patterns([plain, hard], ["plain: g2l full", "hard g2l masking (4 segments)"],
                        suptitle=f"ETC: {ng} global + {n - ng} long tokens as one matrix, O(N_g^2 + N N_g)")
    fig.set_size_inches(11, 5.6)
    box = dict(boxstyle="round,pad=0.2", fc="white", ec="#d62728", lw=0.8)
    for ax in fig.axes[:2]:
        ax.axhline(ng - 0.5, color="#d62728", lw=1.2)
        ax.axvline(ng - 0.5, color="#d62728", lw=1.2)
        mid = (n + ng) / 2 - 0.5
        ax.annotate("g2g", xy=(ng / 2 - 0.5, ng / 2 - 0.5), xytext=(19, 9), color="#d62728", fontsize=10,
                    bbox=box, ha="center", va="center", arrowprops=dict(arrowstyle="->", color="#d62728"))
        ax.annotate(f"g2l (rows 0-{ng - 1})", xy=(mid + 8, ng / 2 - 0.5), xytext=(mid + 10, 8), color="#d62728",
                    fontsize=10, bbox=box, ha="center", va="center", arrowprops=dict(arrowstyle="->", color="#d62728"))
        ax.annotate("l2g", xy=(ng / 2 - 0.5, mid + 8), xytext=(12, mid + 10), color="#d62728", fontsize=10, bbox=box,
                    ha="center", va="center", arrowprops=dict(arrowstyle="->", color="#d62728"))
        ax.text(mid + 10, mid - 5, f"l2l\n(band, radius {r})", color="#d62728", fontsize=10, bbox=box, ha="center",
                va="center")
        ax.set_xlabel(f"key position j (0-{ng - 1}: global, {ng}-{n - 1}: long)")
        ax.set_ylabel(f"query position i (0-{ng - 1}: global)")
    fig.tight_layout()
    paths = [save(fig, os.path.join(out_dir, "etc_four_pieces.png"))]
    ax = plot_pattern(lab.astype(float), title="relative position label l(i,j)+k (k=3; -1 = none)", weights=True)
    paths.append(save(ax.figure, os.path.join(out_dir, "etc_relative_labels.png")))
    return paths


def bigbird_figures(out_dir, rng):
    """A new random layout per head; then the pattern built up: window, + global, + random."""
    n, b, g, r, heads = 64, 4, 1, 2, 3
    nb = n // b
    rand = bigbird.draw_random_blocks(rng, nb, r, g, heads=heads)
    pats = bigbird.build_pattern(n, block=b, random_blocks=rand, global_blocks=g, xp=np)
    fig = plot_patterns(list(pats), [f"head {h}: window + global + random" for h in range(heads)],
                        suptitle=f"BigBird (b={b}, g={g}, r={r}): a new random layout per head", grid=b)
    paths = [save(fig, os.path.join(out_dir, "bigbird_heads.png"))]
    none = np.full((nb, r), -1)
    parts = [bigbird.build_pattern(n, block=b, random_blocks=none, global_blocks=0, xp=np),
             bigbird.build_pattern(n, block=b, random_blocks=none, global_blocks=g, xp=np), pats[0]]
    fig = plot_patterns(parts, ["window (3 blocks)", "+ global block", "+ random blocks"],
                        suptitle="BigBird = window + global + random", grid=b)
    paths.append(save(fig, os.path.join(out_dir, "bigbird_parts.png")))
    return paths


__all__ = ["bigbird_figures", "etc_figures", "longformer_figures"]
