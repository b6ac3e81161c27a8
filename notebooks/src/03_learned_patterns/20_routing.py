# %% [markdown]
# ## 2 · Routing Transformer: k-means attention
#
# The paper's Algorithm 1, with $c$ centroids $\mu \in \mathbb{R}^{c\times d}$ shared by queries and keys (one change
# in the centroid update, said below):
#
# $$Q \leftarrow \operatorname{LayerNorm}(Q),\quad K \leftarrow \operatorname{LayerNorm}(K)\quad\text{(no scale, no bias)}$$
# $$Q_{idx} = \operatorname{top}_w(\mu Q^\top),\quad K_{idx} = \operatorname{top}_w(\mu K^\top)\quad \text{(per cluster: its } w = N/c \text{ nearest)}$$
# $$O_{Q_{idx}} = \operatorname{softmax}\big(Q' K'^\top/\sqrt d\big)\,V' \ \text{ inside each cluster (causal: by original position)}$$
# $$\mu \leftarrow \lambda\mu + \tfrac{1-\lambda}{2}\,\overline{Q}_{\in\mu} + \tfrac{1-\lambda}{2}\,\overline{K}_{\in\mu}, \qquad \lambda = 0.999 .$$
#
# **Means, not sums.** The paper's update adds $Q_m Q$ and $K_m K$, with $Q_m, K_m$ the one-hot nearest-centroid
# matrices: the **sums** of each centroid's members. `routing.update_centroids` by default (`reduce="mean"`) adds their
# **means** $\overline{Q}_{\in\mu}$, $\overline{K}_{\in\mu}$, as lucidrains' implementation does, so a centroid's step does
# not grow with the size of its cluster or the batch; `reduce="sum"` is the paper's formula.
#
# Balanced top-$w$ clusters put a token in several clusters or in none: its output is the **mean** of its cluster
# outputs, zero if it is in none (as lucidrains' `scatter_mean`). With $c \approx \sqrt N$ the cost is
# $O(N\sqrt N)$. The centroids are *state*, moved by `routing.update_centroids` (no gradient); the layer norms are
# differentiated.

# %% [markdown]
# The lines of `routing.forward` that compute the equations above — the layer norms, the balanced top-$w$ memberships,
# attention inside each cluster, and the mean over a token's clusters — and the centroid update, as they are in the
# package:

# %%
show_source(RT.forward, "qn, lnq = layer_norm_forward", "out = scatter_rows(ob, q_idx, n)")
show_source(RT._topk_members)
show_source(RT.update_centroids, "new = decay * centroids")

# %%
rng = np.random.default_rng(3)
N, d, C = 96, 16, 6
centres = rng.standard_normal((C, d)) * 2.5
labels = rng.integers(0, C, N)
xq = centres[labels] + 0.8 * rng.standard_normal((N, d))
q = xq[None, None]
k = (xq + 0.4 * rng.standard_normal((N, d)))[None, None]                 # keys near their queries
v = rng.standard_normal((1, 1, N, d))
qn, kn = RT.normalise(q), RT.normalise(k)
histories = {}
for init in ("random unit vectors", "data points"):
    mu = RT.draw_centroids(rng, C, d) if init.startswith("random") else RT.draw_centroids_from_data(rng, qn, C)
    history = []
    for step in range(40):                                                # online k-means (fast decay for the demo)
        sizes = np.bincount(RT.assign(qn, mu)[0, 0], minlength=C)
        out, cache = RT.forward(q, k, v, centroids=mu)
        history.append((sizes.max(), sizes.min(), (cache.count[0, 0, :, 0] > 0).mean()))
        mu = RT.update_centroids(mu, qn, kn, decay=0.9)
    histories[init] = np.array(history, dtype=float)
out, cache = RT.forward(q, k, v, centroids=mu)
print("out", out.shape, " clusters x members", cache.q_idx.shape[-2:])
assert out.shape == (1, 1, N, d) and cache.q_idx.shape[-2:] == (C, N // C)
assert np.allclose(out, RT.reference(q, k, v, centroids=mu), atol=1e-10)
assert np.allclose(out, RT.weights(cache) @ v, atol=1e-10)
print("routing == mean over clusters of dense attention masked to the cluster (independent reference)")

# %%
pts = np.concatenate([qn[0, 0], kn[0, 0]])
pc = pts - pts.mean(0)
_, _, vt = np.linalg.svd(pc, full_matrices=False)
xy = pc @ vt[:2].T
cl = RT.assign(pts, mu)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
axes[0].scatter(xy[:N, 0], xy[:N, 1], c=cl[:N], cmap="tab10", vmin=0, vmax=9, s=16, label="queries")
axes[0].scatter(xy[N:, 0], xy[N:, 1], c=cl[N:], cmap="tab10", vmin=0, vmax=9, s=22, marker="x", label="keys")
muxy = (mu - pts.mean(0)) @ vt[:2].T
axes[0].scatter(muxy[:, 0], muxy[:, 1], c=np.arange(C), cmap="tab10", vmin=0, vmax=9, s=120, marker="*", edgecolor="k")
axes[0].set_title("k-means clusters (PCA of LayerNorm(q), LayerNorm(k))"); axes[0].legend(fontsize=7)
pat = RT.pattern(cache)[0, 0]
plot_pattern(pat, ax=axes[1], title="induced pattern (original order)")
by = np.argsort(RT.assign(qn, mu)[0, 0], kind="stable")
plot_pattern(pat[np.ix_(by, by)], ax=axes[2], title="rows/cols sorted by nearest cluster")
plt.tight_layout(); plt.show()

# %% [markdown]
# **Balance over the online updates.** The nearest-centroid assignment is unbalanced — some clusters attract many
# tokens, some none — which is why the attention uses the balanced top-$w$ rule. Centroids drawn at random can start
# far from every token and never win a member ("dead" clusters: the smallest size stays 0); initialised from data
# points (`routing.draw_centroids_from_data`, as lucidrains' implementation does) they settle on the data. The green line is the
# share of tokens in at least one top-$w$ cluster (the others get a zero output):

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.3), sharey=True)
for ax, (init, h) in zip(axes, histories.items()):
    ax.plot(h[:, 0], label="largest nearest-centroid cluster"); ax.plot(h[:, 1], label="smallest")
    ax.axhline(N / C, color="k", ls=":", label="w = N/c (balanced size)")
    ax2 = ax.twinx(); ax2.plot(h[:, 2], "g--"); ax2.set_ylim(0, 1.05); ax2.set_ylabel("coverage (green)", color="g")
    ax.set_xlabel("online k-means update"); ax.set_title(f"centroids initialised from {init}", fontsize=10)
axes[0].set_ylabel("tokens"); axes[0].legend(fontsize=7, loc="center right")
plt.tight_layout(); plt.show()
print({init: f"final sizes max {h[-1, 0]:.0f} / min {h[-1, 1]:.0f}, coverage {h[-1, 2]:.2f}" for init, h in histories.items()})
