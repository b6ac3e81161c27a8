"""Figures of the low-rank mechanisms (notebook 05): the matrices Linformer and Nystromformer
imply, next to the softmax they approximate.

Every ``<name>_figures(out_dir, rng)`` writes PNGs named ``<out_dir>/<name>_*.png`` and returns
their paths. Both use a smooth sequence (a random walk plus noise for the queries and keys), whose
attention matrix is approximately low rank, as real ones are (notebook 05, section 1).
"""
from __future__ import annotations

import math
import os

import matplotlib.pyplot as plt
import numpy as np

from ..attention import full, linformer, nystromformer
from ..backend import asarray, to_numpy
from .style import WEIGHT_CMAP, plot_pattern, plot_shared, save


def _smooth_qkv(rng, n, d):
    """q, k (1, 1, n, d) drifting smoothly along the sequence, v (1, 1, n, d) standard normal (host)."""
    x = rng.standard_normal((n, d)).cumsum(axis=0) / math.sqrt(n / 8)   # smooth sequence: low-rank-ish attention
    q = (x + 0.3 * rng.standard_normal((n, d)))[None, None]
    k = (x + 0.3 * rng.standard_normal((n, d)))[None, None]
    v = rng.standard_normal((1, 1, n, d))
    return q, k, v


def linformer_figures(out_dir, rng):
    """``linformer_projection.png``: softmax P, its best rank-k approximation (SVD, Eckart-Young),
    Linformer's implied W = P_bar F with E, F as
    :func:`~effattn.attention.linformer.init_projection` draws them, and the singular values of
    P and W: Linformer is a rank-k map along the sequence, whatever E and F are."""
    n, d, kk = 64, 16, 8
    q, k, v = _smooth_qkv(rng, n, d)
    p = full.forward(q, k, v)[1].attend.p[0, 0]
    u, s, vt = np.linalg.svd(p)
    best = (u[:, :kk] * s[:kk]) @ vt[:kk]
    params = {"E": linformer.init_projection(rng, kk, n), "F": linformer.init_projection(rng, kk, n)}
    w = linformer.weights(linformer.forward(q, k, v, **params)[1])[0, 0]

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    mats = {"softmax P": p, f"best rank-{kk} approximation of P": best, f"Linformer W = P_bar F, k={kk}": w}
    for ax, (title, m) in zip(axes, mats.items()):
        plot_pattern(m, ax=ax, title=title, weights=True)
    for title, m, style in (("softmax P", p, "k-"), (f"Linformer W, k={kk}", w, "o-")):
        sv = np.linalg.svd(m, compute_uv=False)
        axes[3].semilogy(np.arange(1, n + 1), np.maximum(sv / sv[0], 1e-17), style, ms=2, lw=1, label=title)
    axes[3].axvline(kk, color="#d62728", lw=0.8)
    axes[3].set_title(f"singular values / largest (k = {kk})", fontsize=10)
    axes[3].set_xlabel("index")
    axes[3].legend(fontsize=8)
    fig.suptitle("Linformer: softmax(Q (E K)^T / sqrt(d)) F V, a rank-k map along the sequence (E, F at initialisation)")
    fig.tight_layout()
    return [save(fig, os.path.join(out_dir, "linformer_projection.png"))]


def nystromformer_figures(out_dir, rng):
    """Implied matrices F Z B next to softmax for a growing number of landmarks, on one colour scale, and
    below them the error |W - P| on a second shared scale: how far each approximation is, read off a bar."""
    n, d = 64, 16
    q, k, v = (asarray(a) for a in _smooth_qkv(rng, n, d))
    p = to_numpy(full.forward(q, k, v)[1].attend.p)[0, 0]
    top, bottom = [(p, "softmax P")], [None]
    for m, it in ((4, 6), (16, 6), (64, 30)):
        _, c = nystromformer.forward(q, k, v, landmarks=m, iterations=it)
        w = to_numpy(nystromformer.weights(c))[0, 0]
        top.append((w, f"Nystromformer m={m} ({it} iter.)"))
        bottom.append((np.abs(w - p), f"|W - P|, m={m}: mean row L1 {np.abs(w - p).sum(-1).mean():.2f}"))
    fig = plot_shared([top, bottom], suptitle="Nystromformer: implied F Z B vs softmax (top: one scale; "
                      "bottom: the error, one scale)", labels=["weight (square-root scale)", "|error|"],
                      cmaps=[WEIGHT_CMAP, "magma"], gammas=[0.5, None])
    return [save(fig, os.path.join(out_dir, "nystromformer_implied.png"))]


__all__ = ["linformer_figures", "nystromformer_figures"]
