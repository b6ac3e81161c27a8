"""Figures of notebook 06 (kernels): Performer's random features, the Linear Transformer's implied matrix."""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.colors import PowerNorm

from ..attention import full, linear, performer
from ..backend import asarray, to_numpy
from .style import WEIGHT_CMAP, plt, save


def _smooth_qk(rng, n, d):
    """Queries and keys that drift smoothly along the sequence (nearby positions are alike), with
    moderate norms, so that softmax attention has visible structure: (1, 1, n, d) each."""
    x = rng.standard_normal((n, d)).cumsum(axis=0) / math.sqrt(3 * n)   # smooth, moderate norms
    qs = asarray((x + 0.15 * rng.standard_normal((n, d)))[None, None])
    ks = asarray((x + 0.15 * rng.standard_normal((n, d)))[None, None])
    return qs, ks


def performer_figures(out_dir, rng):
    """``performer_implied.png``: Performer's implied matrices (m = 16, 256) and linear attention next to softmax, all
    on one colour scale with a colour bar, and below them the error |W - P| on a second shared scale.
    ``performer_error_vs_m.png``: the mean row L1 error of the implied matrix against the number of features m,
    orthogonal vs i.i.d., the mean over 32 draws with its standard error (read the gap against the bars)."""
    from .style import plot_shared

    paths = []
    n, d = 48, 16
    q = asarray(rng.standard_normal((1, 1, n, d)) * 0.5)          # moderate logits: the 1/sqrt(m) regime
    k = asarray(rng.standard_normal((1, 1, n, d)) * 0.5)
    v = asarray(rng.standard_normal((1, 1, n, d)))
    qs, ks = _smooth_qk(rng, n, d)
    p_s = to_numpy(full.weights(full.forward(qs, ks, v)[1]))[0, 0]
    top, bottom = [(p_s, "softmax P")], [None]
    approx = []
    for m in (16, 256):
        f = asarray(performer.draw_features(rng, m, d))
        approx.append((to_numpy(performer.weights(performer.forward(qs, ks, v, features=f)[1]))[0, 0],
                       f"Performer m={m}"))
    approx.append((to_numpy(linear.weights(linear.forward(qs, ks, v)[1]))[0, 0], "Linear (elu+1)"))
    for w, title in approx:
        top.append((w, title))
        err = np.abs(w - p_s)
        bottom.append((err, f"|W - P|, {title.lower()}: row L1 {err.sum(-1).mean():.2f}"))
    fig = plot_shared([top, bottom], suptitle="Kernel attention: implied matrices vs softmax (top: one scale; "
                      "bottom: the error, one scale)", labels=["weight (square-root scale)", "|error|"],
                      cmaps=[WEIGHT_CMAP, "magma"], gammas=[0.5, None])
    paths.append(save(fig, os.path.join(out_dir, "performer_implied.png")))
    # error against the number of features
    p = to_numpy(full.weights(full.forward(q, k, v)[1]))
    ms = [8, 16, 32, 64, 128, 256, 512]
    draws = 32
    errs, sems = {"orthogonal": [], "iid": []}, {"orthogonal": [], "iid": []}
    for m in ms:
        for kind in errs:
            e = []
            for _ in range(draws):
                f = asarray(performer.draw_features(rng, m, d, orthogonal=kind == "orthogonal"))
                _, c = performer.forward(q, k, v, features=f)
                e.append(float(np.abs(to_numpy(performer.weights(c)) - p).sum(-1).mean()))
            errs[kind].append(np.mean(e))
            sems[kind].append(np.std(e) / math.sqrt(draws))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, e in errs.items():
        ax.errorbar(ms, e, yerr=sems[kind], fmt="o-", ms=3, capsize=2, label=kind)
    ax.plot(ms, [errs["iid"][0] * (ms[0] / m) ** 0.5 for m in ms], "k--", lw=0.8, label="1/sqrt(m)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("features m")
    ax.set_ylabel("mean row L1 error vs softmax")
    ax.set_title(f"Performer, N={n}, d={d}: mean of {draws} draws ± standard error", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(save(fig, os.path.join(out_dir, "performer_error_vs_m.png")))
    return paths


def linear_figures(out_dir, rng):
    """The Linear Transformer's implied matrix W_ij = phi(q_i).phi(k_j) / sum_l phi(q_i).phi(k_l)
    (phi = elu + 1) next to softmax on the same q, k, bidirectional and causal, on one colour scale,
    with the weights of one query row: the same structure, much flatter weights (elu + 1 grows
    only linearly in q . k where exp grows exponentially)."""
    n, d = 32, 8
    qs, ks = _smooth_qk(rng, n, d)
    qs, ks = 3.0 * qs, 3.0 * ks                                   # peaked softmax, so the contrast shows
    v = asarray(rng.standard_normal((1, 1, n, d)))
    i = n // 2
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 6.4))
    for row, causal in enumerate((False, True)):
        mode = "causal" if causal else "bidirectional"
        ws = {"softmax": to_numpy(full.weights(full.forward(qs, ks, v, causal=causal)[1]))[0, 0],
              "linear (elu+1)": to_numpy(linear.weights(linear.forward(qs, ks, v, causal=causal)[1]))[0, 0]}
        norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(w.max()) for w in ws.values()))   # one scale per row
        for ax, (label, w) in zip(axes[row, :2], ws.items()):
            im = ax.imshow(w, cmap=WEIGHT_CMAP, norm=norm, interpolation="nearest")
            ax.axhline(i, color="w", lw=0.6, ls=":")
            ax.set_title(f"{label}, {mode}", fontsize=10)
            ax.set_xlabel("key position j")
            ax.set_ylabel("query position i")
        fig.colorbar(im, ax=axes[row, 1], fraction=0.046, pad=0.04)
        ax = axes[row, 2]
        for label, w in ws.items():
            ax.plot(w[i], "o-", ms=3, label=label)
        ax.set_title(f"row i={i} ({mode})", fontsize=10)
        ax.set_xlabel("key position j")
        ax.set_ylabel("weight W_ij")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Linear attention: the implied matrix vs softmax (same q, k; colour scale shared per row)")
    fig.tight_layout()
    return [save(fig, os.path.join(out_dir, "linear_implied.png"))]
