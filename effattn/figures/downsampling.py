"""Figures of the downsampling layers (notebook 08): the Funnel's pooled groups, Perceiver's latents."""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np

from .style import host2d, save


def funnel_stage_membership(n=32, stride=2, stages=3, separate_cls=True):
    """[(N_s, n) bool]: for each stage s >= 1, which input positions each pooled row summarises
    (the groups of every pooling step composed back to the input)."""
    from ..nn.pooling import pool_groups

    cover = np.eye(n, dtype=bool)                     # stage 0: row i is position i
    out = [cover]
    for _ in range(stages - 1):
        g = np.asarray(host2d(pool_groups(cover.shape[0], stride, separate_cls)))
        cover = np.stack([cover[row[row >= 0]].any(axis=0) for row in g])
        out.append(cover)
    return out


def funnel_figures(out_dir, rng=None):
    """``funnel_pooling.png``: top, stage by stage (N = 32, stride 2, [CLS] kept apart), the input
    positions each pooled position summarises (N -> 17 -> 9); bottom, the pooled-query attention of a
    random ``funnel`` layer (17 pooled queries over the 32 positions), with its pooled groups outlined."""
    from ..layers import funnel

    rng = np.random.default_rng(0) if rng is None else rng
    n = 32
    cover = funnel_stage_membership(n, 2, 3)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.2), layout="constrained",
                             gridspec_kw={"height_ratios": (cover[1].shape[0], cover[1].shape[0])})
    for ax, s in zip(axes[0], (1, 2)):
        ax.imshow(cover[s], cmap="Blues", aspect="auto", interpolation="nearest", vmin=0, vmax=1.3)
        ax.set(title=f"stage {s}: {cover[s].shape[0]} pooled positions over N = {n}", xlabel="input position",
               ylabel="pooled position")
    D = 16
    p = funnel.init_params(rng, D)
    x = rng.standard_normal((1, n, D))
    _, c = funnel.forward(x, heads=2, **p)
    w = np.asarray(host2d(funnel.weights(c)[0, 0]))
    ax = axes[1, 0]
    im = ax.imshow(w, cmap="magma", aspect="auto", interpolation="nearest")
    g = np.asarray(host2d(funnel.groups(c)))
    for r, row in enumerate(g):
        members = row[row >= 0]
        ax.add_patch(plt.Rectangle((members.min() - 0.5, r - 0.5), len(members), 1, fill=False, ec="cyan", lw=1))
    ax.set(title="pooled-query attention (head 0); cyan: the query's own group", xlabel="key position j",
           ylabel="pooled query")
    fig.colorbar(im, ax=ax, label="weight")
    ax = axes[1, 1]
    sizes = [c.shape[0] for c in cover]
    cost = [sizes[0] ** 2] + [sizes[i] * sizes[i - 1] for i in range(1, len(sizes))]
    ax.bar(range(len(sizes)), np.array(cost) / cost[0], color="tab:blue")
    for i, (s, v) in enumerate(zip(sizes, cost)):
        ax.text(i, v / cost[0] + 0.02, f"N={s}", ha="center")
    ax.set(xticks=range(len(sizes)), xticklabels=[f"stage {i}" for i in range(len(sizes))],
           ylabel="attention cost of a stage's first layer / full", title="queries x keys, stage by stage")
    return [save(fig, os.path.join(out_dir, "funnel_pooling.png"))]


def perceiver_maps(weights, side=None, titles=None, suptitle=None, latents=(0, 1, 2, 3)):
    """A figure of cross-attention maps: each of ``weights`` is (m, N) (latents x inputs); one row of
    panels per map, one panel per chosen latent, drawn as a side x side image when the inputs are
    pixels (side given) or as the (m, N) matrix otherwise."""
    weights = [np.asarray(host2d(w)) for w in weights]
    titles = titles or [""] * len(weights)
    if side is None:
        fig, axes = plt.subplots(1, len(weights), figsize=(5.5 * len(weights), 3.6), layout="constrained",
                                 squeeze=False)
        for ax, w, t in zip(axes[0], weights, titles):
            im = ax.imshow(w, cmap="magma", aspect="auto", interpolation="nearest")
            ax.set(title=t, xlabel="input position j", ylabel="latent")
            fig.colorbar(im, ax=ax)
    else:
        fig, axes = plt.subplots(len(weights), len(latents), figsize=(2.3 * len(latents), 2.4 * len(weights)),
                                 layout="constrained", squeeze=False)
        for row, w, t in zip(axes, weights, titles):
            for ax, r in zip(row, latents):
                ax.imshow(w[r].reshape(side, side), cmap="magma", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{t}latent {r}", fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def perceiver_figures(out_dir, rng=None):
    """``perceiver_attention.png``: the cross-attention (latents x inputs) of a random Perceiver
    (8 learned latents over N = 48: every latent reads every input) and of Perceiver AR (the last
    8 positions are the latents: latent r reads the positions up to N - 8 + r, a causal band)."""
    from ..layers import perceiver

    rng = np.random.default_rng(0) if rng is None else rng
    n, D, m = 48, 16, 8
    x = rng.standard_normal((1, n, D))
    maps = []
    for causal in (False, True):
        p = perceiver.init_params(rng, D, n_latents=m, latent_layers=1, causal=causal)
        _, c = perceiver.forward(x, heads=2, causal=causal, n_latents=m if causal else None, **p)
        maps.append(perceiver.weights(c)[0, 0])
    fig = perceiver_maps(maps, titles=[f"Perceiver: {m} learned latents read all N = {n}",
                                       f"Perceiver AR: the last {m} positions, causal"])
    return [save(fig, os.path.join(out_dir, "perceiver_attention.png"))]
