"""Figures of the learned-pattern mechanisms (notebook 03): Reformer's hash buckets and sorted chunks,
the Routing Transformer's k-means clusters, Sinkhorn's soft permutations and block reordering, and
the Synthesizers' maps (at random initialisation and learned on a toy shift task).

Every ``<name>_figures(out_dir, rng)`` writes PNGs named ``<out_dir>/<name>_*.png`` and returns
their paths. Inputs are made on the active backend (as the mechanisms' own examples are); the
arrays come back to the host (``to_numpy``) for drawing.
"""
from __future__ import annotations

import os

import numpy as np

from ..attention import full, reformer, routing, sinkhorn, synthesizer_dense, synthesizer_random
from ..backend import asarray, to_numpy
from ..nn.functional import sinusoidal_positions
from ..nn.optim import Adam
from matplotlib.colors import BoundaryNorm, ListedColormap

from .style import plot_shared
from .style import plot_pattern, plot_patterns, plt, save


# --------------------------------------------------------------------------- Reformer
def reformer_figures(out_dir, rng):
    """Every token's bucket in 3 hash rounds; one round's pattern in sorted and in original order."""
    n, d, c = 48, 8, 6
    centres = rng.standard_normal((4, d)) * 2                             # clustered tokens: buckets mean something
    x = centres[rng.integers(0, 4, n)] + 0.5 * rng.standard_normal((n, d))
    q = asarray(x[None])
    v = asarray(rng.standard_normal((1, n, d)))
    n_buckets, rounds = 8, 3
    rot = asarray(reformer.draw_rotations(rng, d, n_buckets, rounds))
    _, cache = reformer.forward(q, q, v, rotations=rot, chunk_size=c)
    buckets = to_numpy(cache.buckets)[0]                                  # (R, N)
    by_bucket = np.lexsort((np.arange(n), buckets[0]))                    # tokens sorted by (round-0 bucket, position)
    cmap = ListedColormap(plt.get_cmap("tab10").colors[:n_buckets])       # exactly one colour per bucket
    norm = BoundaryNorm(np.arange(n_buckets + 1) - 0.5, n_buckets)
    fig, axes = plt.subplots(1, 2, figsize=(12, 2.6), layout="constrained")
    for ax, order, xlabel, title in (
            (axes[0], np.arange(n), "token position", "in position order"),
            (axes[1], by_bucket, "tokens sorted by their round-0 bucket",
             "sorted by round-0 bucket: similar tokens tend to share later buckets too")):
        im = ax.imshow(buckets[:, order], aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("hash round")
        ax.set_yticks(range(rounds))
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=list(axes), ticks=range(n_buckets), fraction=0.03, label="bucket")
    fig.suptitle(f"Reformer: every token's bucket in each of {rounds} rounds ({n_buckets} buckets, "
                 f"{len(centres)} clusters of tokens)")
    paths = [save(fig, os.path.join(out_dir, "reformer_buckets.png"))]

    _, c1 = reformer.forward(q, q, v, rotations=rot[:1], chunk_size=c)
    W = to_numpy(reformer.weights(c1))[0]
    order = to_numpy(c1.slot_token)[0, 0]
    order = order[order < n]                                              # the tokens in slot order
    fig = plot_patterns([W[np.ix_(order, order)] > 0, W > 0],
                        ["sorted by bucket: chunk + previous chunk", "un-sorted (original positions)"],
                        suptitle="Reformer, one round: the same attention before and after un-sorting", grid=None)
    fig.axes[0].set_xlabel("sorted key slot")
    fig.axes[0].set_ylabel("sorted query slot")
    paths.append(save(fig, os.path.join(out_dir, "reformer_sorted.png")))
    return paths


# --------------------------------------------------------------------------- Routing
def routing_figures(out_dir, rng):
    """The k-means clusters of LayerNorm(q) and LayerNorm(k) (PCA) with their centroids, and the pattern they
    induce, in position order and sorted by cluster. The centroids start from data points
    (``routing.draw_centroids_from_data``; random unit vectors can leave clusters dead) and take a few
    online k-means steps."""
    n, d, c = 64, 8, 4
    centres = rng.standard_normal((c, d)) * 3
    x = centres[rng.integers(0, c, n)] + rng.standard_normal((n, d))
    q = asarray(x[None])
    k = asarray((x + 0.3 * rng.standard_normal((n, d)))[None])
    v = asarray(rng.standard_normal((1, n, d)))
    qn, kn = routing.normalise(q), routing.normalise(k)
    mu = routing.draw_centroids_from_data(rng, qn, c)
    for _ in range(30):   # a few online k-means steps with a fast decay, for the picture
        mu = routing.update_centroids(mu, qn, kn, decay=0.5)
    _, cache = routing.forward(q, k, v, centroids=mu)
    pts = np.concatenate([to_numpy(qn)[0], to_numpy(kn)[0]])             # (2N, d): queries, then keys
    mean = pts.mean(axis=0)
    _, _, vt = np.linalg.svd(pts - mean, full_matrices=False)
    proj = (pts - mean) @ vt[:2].T                                        # the first two principal components
    mu_xy = (to_numpy(mu) - mean) @ vt[:2].T
    cl = to_numpy(routing.assign(asarray(pts), mu))
    cmap = ListedColormap(plt.get_cmap("tab10").colors[:c])
    norm = BoundaryNorm(np.arange(c + 1) - 0.5, c)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    axes[0].scatter(proj[:n, 0], proj[:n, 1], c=cl[:n], cmap=cmap, norm=norm, marker="o", s=18, label="queries")
    axes[0].scatter(proj[n:, 0], proj[n:, 1], c=cl[n:], cmap=cmap, norm=norm, marker="x", s=22, label="keys")
    axes[0].scatter(mu_xy[:, 0], mu_xy[:, 1], c=np.arange(c), cmap=cmap, norm=norm, marker="*", s=260,
                    edgecolor="k", lw=1.0, label="centroids")
    sizes = np.bincount(cl[:n], minlength=c)
    axes[0].set_title(f"k-means clusters of LayerNorm(q), LayerNorm(k) (PCA)\nqueries per cluster {sizes.tolist()}",
                      fontsize=10)
    axes[0].legend(fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[0], ticks=range(c), label="cluster",
                 fraction=0.05)
    pat = to_numpy(routing.pattern(cache))[0]
    plot_pattern(pat, ax=axes[1], title="induced pattern (original order)")
    by = np.argsort(cl[:n], kind="stable")
    plot_pattern(pat[np.ix_(by, by)], ax=axes[2], title="rows and columns sorted by nearest cluster",
                 xlabel="key (sorted by cluster)", ylabel="query (sorted by cluster)")
    return [save(fig, os.path.join(out_dir, "routing_clusters.png"))]


# --------------------------------------------------------------------------- Sinkhorn
def sinkhorn_figures(out_dir, rng):
    """The soft permutation across iterations and temperatures; the block mixing and the effective
    attention it implies (soft, hard, causal); the sorted key blocks themselves."""
    from ..nn.sinkhorn import sinkhorn_forward

    paths = []
    # 1. the soft permutation across iterations and temperatures
    nb = 8
    logits = rng.standard_normal((nb, nb)) * 2.0
    temps = (2.0, 0.75, 0.25)
    iters = (0, 1, 3, 20)
    mats, titles = [], []
    for tau in temps:
        for it in iters:
            la = logits * (1.0 / tau)
            if it == 0:                                   # before balancing: softmax over all entries
                top = la.max()
                mats.append(np.exp(la - top) / np.exp(la - top).sum())
            else:
                mats.append(np.exp(to_numpy(sinkhorn_forward(asarray(la), it)[0])))
            titles.append(f"tau={tau}, " + ("before balancing (sums to 1 overall)" if it == 0
                                             else f"{it} iteration" + ("s" if it != 1 else "")))
    rows = [list(zip(mats[r * len(iters):(r + 1) * len(iters)], titles[r * len(iters):(r + 1) * len(iters)]))
            for r in range(len(temps))]
    fig = plot_shared(rows, suptitle="Sinkhorn balancing: P vs iterations and temperature (one scale, 0 to 1: after "
                      "balancing every row and column of P sums to 1)", xlabel="source block j",
                      ylabel="target block i", vranges=[(0.0, 1.0)] * len(temps), labels=["P_ij"] * len(temps))
    paths.append(save(fig, os.path.join(out_dir, "sinkhorn_permutation.png")))

    # 2. block reordering: the soft permutation and the effective attention it implies
    n, d = 32, 8
    q, k, v = (asarray(rng.standard_normal((1, 1, n, d))) for _ in range(3))
    params, config = sinkhorn.setup(rng, n=n, d=d, heads=1)
    b = config["block"]
    _, c_s = sinkhorn.forward(q, k, v, **params, **config)
    _, c_h = sinkhorn.forward(q, k, v, **params, **config, hard=True)
    _, c_c = sinkhorn.forward(q, k, v, **params, **config, causal=True)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.9), layout="constrained")
    pb = to_numpy(c_s.p[0, 0])
    im = axes[0].imshow(pb, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[0].set_title(f"soft permutation P ({pb.shape[0]} x {pb.shape[1]} blocks)", fontsize=10)
    axes[0].set_xlabel("source block j")
    axes[0].set_ylabel("query block i")
    axes[0].set_xticks(range(pb.shape[1]))
    axes[0].set_yticks(range(pb.shape[0]))
    fig.colorbar(im, ax=axes[0], fraction=0.046, label="P_ij")
    ws = [to_numpy(sinkhorn.weights(c))[0, 0] for c in (c_s, c_h, c_c)]
    top = max(float(w.max()) for w in ws)
    for ax, w, title in zip(axes[1:], ws, ["W, soft P (bidirectional)", "W, hard P (argmax)", "W, soft P (causal)"]):
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
        for t in range(b, n, b):
            ax.axhline(t - 0.5, color="w", lw=0.4)
            ax.axvline(t - 0.5, color="w", lw=0.4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
    fig.colorbar(im, ax=list(axes[1:]), fraction=0.02, label="W_ij (one scale)")
    fig.suptitle(f"Sinkhorn attention, N={n}, b={b}: block-level P (left) and the token-level W it implies")
    paths.append(save(fig, os.path.join(out_dir, "sinkhorn_blocks.png")))

    # 3. the reordering itself: keys in their original order, hard-sorted and soft-sorted
    ramp = np.broadcast_to(np.arange(n)[:, None] / n, (n, d))            # key j "is" its position
    kk = asarray(np.array(ramp)[None, None])
    _, c_p = sinkhorn.forward(q, kk, v, **params, **config)
    _, c_hp = sinkhorn.forward(q, kk, v, **params, **config, hard=True)
    fig = plot_patterns(
        [ramp, to_numpy(sinkhorn.sorted_keys(c_hp)[0, 0]), to_numpy(sinkhorn.sorted_keys(c_p)[0, 0])],
        ["keys (value = position / N)", "hard-sorted blocks P_hard K", "soft-sorted blocks P K"],
        suptitle="Block reordering: row block i is what query block i sees besides its own block",
        ncols=3, weights=True, grid=config["block"], xlabel="feature", ylabel="slot (block i, offset s)")
    paths.append(save(fig, os.path.join(out_dir, "sinkhorn_reorder.png")))
    return paths


# --------------------------------------------------------------------------- Synthesizers
def _shift_task(module, params, x, rng, steps=150, lr=0.1, **config):
    """Train ``params`` in place with Adam on a toy task: with q = k = x, output i must copy value
    i - 1 (a shift pattern; fresh random values each step). Returns the final mean squared error."""
    opt = Adam(params, lr=lr)
    n, d = x.shape[-2:]
    for _ in range(steps):
        vals = rng.standard_normal((1, 1, n, d))
        target = np.concatenate([np.zeros_like(vals[..., :1, :]), vals[..., :-1, :]], axis=-2)
        out, cache = module.forward(x, x, asarray(vals), **params, **config)
        err = out - asarray(target)
        opt.step(module.backward(2.0 * err / err.size, cache))
    return float(to_numpy((err * err).mean()))


def _maps(module, x, params, **config):
    """softmax maps (N, N) of a synthesizer with q = k = v = x, on the host."""
    return to_numpy(module.weights(module.forward(x, x, x, **params, **config)[1]))


def synthesizer_dense_figures(out_dir, rng):
    """Random-init maps of both synthesizers next to the maps learned in 150 Adam steps on a toy
    task (output i must copy value i-1: a shift pattern), and vanilla attention."""
    n, d, steps = 16, 16, 150
    x = asarray(sinusoidal_positions(n, d, np)[None, None])                # (1, 1, N, d): positions as X
    params_d = synthesizer_dense.init_params(rng, n_max=n, d=d)
    params_r = synthesizer_random.init_params(rng, n_max=n, heads=1)
    init = [_maps(synthesizer_dense, x, params_d), _maps(synthesizer_random, x, params_r)]
    _shift_task(synthesizer_dense, params_d, x, rng, steps)
    _shift_task(synthesizer_random, params_r, x, rng, steps)
    learned = [_maps(synthesizer_dense, x, params_d), _maps(synthesizer_random, x, params_r)]
    q, k = (asarray(rng.standard_normal((1, 1, n, d))) for _ in range(2))
    vanilla = to_numpy(full.weights(full.forward(q, k, q)[1]))
    titles = ["dense synth., random init", "random synth., random init", "vanilla softmax(QK^T), random q, k",
              f"dense synth., after {steps} steps (shift task)", f"random synth., after {steps} steps (shift task)"]
    fig = plot_patterns(init + [vanilla] + learned, titles, suptitle="Synthesizer attention maps", ncols=3,
                        weights=True)
    return [save(fig, os.path.join(out_dir, "synthesizer_dense_maps.png"))]


def synthesizer_random_figures(out_dir, rng):
    """The random synthesizer's table softmax(R) learned on the shift task, the full (N, N) table
    next to the factorized R = R1 R2^T of rank k = 1, 2, 4: how much rank a shift pattern needs."""
    n, d, steps = 16, 16, 150
    x = asarray(sinusoidal_positions(n, d, np)[None, None])                # q = k = x is never read
    mats, titles = [], []
    for rank in (None, 1, 2, 4):
        params = synthesizer_random.init_params(rng, n_max=n, heads=1, factorized=rank)
        mse = _shift_task(synthesizer_random, params, x, rng, steps, factorized=rank)
        mats.append(_maps(synthesizer_random, x, params, factorized=rank))
        titles.append(("full table R" if rank is None else f"factorized, k={rank}") + f"  (MSE {mse:.2g})")
    fig = plot_patterns(mats, titles, suptitle=f"Random synthesizer: softmax(R) after {steps} Adam steps on the "
                        "shift task (output i copies value i-1)", ncols=4, weights=True)
    return [save(fig, os.path.join(out_dir, "synthesizer_random_factorized.png"))]
