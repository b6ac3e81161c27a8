"""Figures of the sparse models (notebook 09): a mixture of experts' routing."""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np

from .. import registry
from .style import host2d, save


def switch_figures(out_dir, rng=None):
    """``switch_routing.png``: for 24 tokens and 4 experts, the router probabilities p (tokens x
    experts), then the combine weights of a top-1 (Switch) and a top-2 (GShard) router: the gate of
    each chosen expert, 0 where a token was not sent to an expert or was dropped for lack of
    capacity (capacity factor 1.0: 6 tokens per expert)."""
    from ..layers import switch

    spec = registry.get("switch")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), layout="constrained")
    for ax, k in zip(axes, (None, 1, 2)):
        case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=24, d=16, causal=False)
        config = dict(case.config, k=k or 1)
        _, cache = spec.forward(**case.inputs, **config)
        if k is None:
            w = host2d(switch.probabilities(cache))
            title, cmap = "router probabilities p", "magma"
        else:
            w = host2d(spec.weights(cache))                      # (N, E)
            title, cmap = f"top-{k} ({'Switch' if k == 1 else 'GShard'}): chosen gates", "viridis"
        im = ax.imshow(w, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set(xlabel="expert", ylabel="token position", title=title)
        ax.set_xticks(range(w.shape[1]))
        if k is None:
            fig.colorbar(im, ax=ax, label="p")
    fig.colorbar(im, ax=list(axes[1:]), label="combine weight (0: not routed or dropped)")
    return [save(fig, os.path.join(out_dir, "switch_routing.png"))]


def pkm_figures(out_dir, rng=None):
    """``pkm_search.png``: the product-key search of one query (one head). The two sub-key score
    vectors s1 (sqrtK,) and s2 (sqrtK,) are the axes of the sqrtK x sqrtK grid of product scores
    s1[a] + s2[b] (all K keys, which the search never computes); the k x k candidate cells
    (the k best sub-keys of each half) are outlined, and the final top-k slots marked with their
    softmax weights."""
    from matplotlib.patches import Rectangle

    from ..layers import pkm

    rng = np.random.default_rng(0) if rng is None else rng
    sqrtK, topk, D = 16, 4, 16
    params = pkm.init_params(rng, D, sqrtK=sqrtK, dq=8, heads=1)
    x = rng.standard_normal((1, 1, D))
    _, cache = pkm.forward(x, topk=topk, **params)
    s = {key: np.asarray(host2d(v[0]))[0] for key, v in pkm.search(cache).items()}   # head 0, token 0
    grid = s["s1"][:, None] + s["s2"][None, :]                                       # (a, b)

    fig = plt.figure(figsize=(7.4, 7.0), layout="constrained")
    gs = fig.add_gridspec(2, 2, width_ratios=(1, 4.5), height_ratios=(1, 4.5))
    ax = fig.add_subplot(gs[1, 1])
    top = fig.add_subplot(gs[0, 1], sharex=ax)
    left = fig.add_subplot(gs[1, 0], sharey=ax)
    im = ax.imshow(grid, cmap="viridis", aspect="equal", interpolation="nearest")
    for a in s["top1"]:
        for b in s["top2"]:
            ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.6))
    for rank, (a, b, w) in enumerate(zip(s["a"], s["b"], s["w"])):
        ax.plot(b, a, marker="*", markersize=15, color="#d62728", markeredgecolor="black", linestyle="none",
                label="final top-k slot" if rank == 0 else None)
        ax.annotate(f"w={w:.2f}", (b, a), xytext=(9, 7), textcoords="offset points", ha="left", fontsize=7,
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85))
    ax.plot([], [], marker="s", markersize=9, markerfacecolor="none", markeredgecolor="white",
            linestyle="none", label=f"the {topk} x {topk} candidates")
    corner = fig.add_subplot(gs[0, 0])
    corner.axis("off")
    corner.legend(*ax.get_legend_handles_labels(), loc="center", fontsize=7, facecolor="#777777",
                  labelcolor="white", framealpha=1.0)
    ax.set(xlabel="second-half sub-key b", ylabel="first-half sub-key a")
    ax.set_title(f"product scores s1[a] + s2[b], slot a·{sqrtK} + b (K = {sqrtK * sqrtK})", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="score of product key (a, b)")

    chosen1 = np.isin(np.arange(sqrtK), s["top1"])
    chosen2 = np.isin(np.arange(sqrtK), s["top2"])
    top.bar(np.arange(sqrtK), s["s2"], color=np.where(chosen2, "#d62728", "#9a9a9a"))
    top.set(ylabel="s2 = keys2 q2", title=f"one query, top-{topk} of each half in red (cost 2·sqrtK + k²)")
    top.tick_params(labelbottom=False)
    left.barh(np.arange(sqrtK), s["s1"], color=np.where(chosen1, "#d62728", "#9a9a9a"))
    left.set(xlabel="s1 = keys1 q1")
    left.tick_params(labelleft=False)
    return [save(fig, os.path.join(out_dir, "pkm_search.png"))]
