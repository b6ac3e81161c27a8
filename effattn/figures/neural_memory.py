"""Figures of notebook 04 (neural memory): the Set Transformer's inducing points and seeds."""
from __future__ import annotations

import os

import numpy as np

from ..backend import asarray, to_numpy
from ..layers import isab, pma
from .style import WEIGHT_CMAP, plt, save


def _figure_set(rng, n=64, D=8):
    """A 2-D point cloud sorted along its first coordinate (so columns read left to right),
    lifted to D features: x (1, n, D) on the active backend."""
    pts = rng.standard_normal((n, 2)) * [2.0, 1.0]
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    return asarray(np.concatenate([pts, np.sin(pts @ rng.standard_normal((2, D - 2)))], axis=1)[None])


def _stacked(w, title, ylabel):
    """One wide panel per head of an (h, r, N) weight array."""
    h = w.shape[0]
    fig, axes = plt.subplots(h, 1, figsize=(9, 1.0 + 0.3 * w.shape[1] * h), squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        im = ax.imshow(w[j], cmap=WEIGHT_CMAP, interpolation="nearest", aspect="auto")   # (r, N): wide
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        ax.set_title(f"head {j}", fontsize=10)
        ax.set_ylabel(ylabel)
    axes[-1, 0].set_xlabel("set element j (sorted by its first coordinate)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def isab_figures(out_dir, rng):
    """The inducing points' attention over a set, per head (untrained parameters)."""
    heads, m = 2, 8
    x = _figure_set(rng)
    _, c = isab.forward(x, heads=heads, **isab.init_params(rng, x.shape[-1], x.shape[-1], m))
    w = to_numpy(isab.weights(c))[0]                   # (h, m, N)
    fig = _stacked(w, f"ISAB: how the m={m} inducing points read a set of N={x.shape[-2]} (MAB(I, X), untrained)",
                   "inducing point i")
    return [save(fig, os.path.join(out_dir, "isab_inducing_attention.png"))]


def pma_figures(out_dir, rng):
    """The seeds' attention over a set, per head (untrained parameters)."""
    heads, k = 2, 4
    x = _figure_set(rng)
    _, c = pma.forward(x, heads=heads, **pma.init_params(rng, x.shape[-1], x.shape[-1], k))
    w = to_numpy(pma.weights(c))[0]                    # (h, k, N)
    fig = _stacked(w, f"PMA: how the k={k} seeds pool a set of N={x.shape[-2]} (MAB(S, rFF(Z)), untrained)",
                   "seed i")
    return [save(fig, os.path.join(out_dir, "pma_seed_attention.png"))]
