"""Figures of the sparse models (notebook 09, to come): a mixture of experts' routing."""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np

from .. import registry
from .style import host2d, save


def switch_figures(out_dir, rng=None):
    """``switch_routing.png``: the combine weights of a top-1 and a top-2 router (tokens x experts),
    zero where a token was not sent to an expert or was dropped for lack of capacity."""
    spec = registry.get("switch")
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.6), layout="constrained")
    for ax, k in zip(axes, (1, 2)):
        case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=24, d=16, causal=False)
        config = dict(case.config, k=k)
        _, cache = spec.forward(**case.inputs, **config)
        w = host2d(spec.weights(cache))                      # (N, E)
        im = ax.imshow(w, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set(xlabel="expert", ylabel="token position", title=f"top-{k} router: gate of each chosen expert")
        ax.set_xticks(range(w.shape[1]))
    fig.colorbar(im, ax=list(axes), label="combine weight (0: not routed or dropped)")
    return [save(fig, os.path.join(out_dir, "switch_routing.png"))]
