# %% [markdown]
# ## Summary: how much of the true attention does each learned pattern keep, and at what cost?
#
# For the same clustered $q = k$ and $v$, the share of the **true** softmax attention mass
# $P = \operatorname{softmax}(qk^\top/\sqrt d)$ over the other tokens ($j \ne i$) that falls inside each mechanism's support, and the overlap
# $\sum_j \min(P_{ij}, W_{ij})$ of its effective matrix $W$ with $P$ (1 = identical rows), averaged over queries.
# `local` (a fixed window) is the baseline a learned pattern must beat; the last column is the mass a *random* support
# of the same size would keep on average, so a content-based pattern should beat it by a wide margin. Sinkhorn and the
# Synthesizers appear when they are registered (their parameters are random here, untrained: they show the
# mechanism's shape, not a trained model's quality).

# %%
rng = np.random.default_rng(7)
N, d = 256, 16
centres = rng.standard_normal((16, d)) * 2
xs = centres[rng.integers(0, 16, N)] + rng.standard_normal((N, d))
q = xs[None, None]; k = q.copy(); v = rng.standard_normal((1, 1, N, d))
# true attention to the *other* tokens (shared QK makes q_i . k_i the largest logit; Reformer excludes it by design)
P = effattn.get("full").weights(effattn.get("full").forward(q, k, v, mask=~np.eye(N, dtype=bool))[1])[0, 0]
names = [n for n in ("local", "reformer", "routing", "sinkhorn", "synthesizer_dense", "synthesizer_random")
         if n in effattn.names()]
rows = []
for name in names:
    spec = effattn.get(name)
    case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=N, d=d)
    inputs = {**case.inputs, "q": q, "k": k, "v": v}
    config = dict(case.config)
    if name == "routing":   # k-means centroids from the data, a few online steps (random ones leave dead clusters)
        qn_ = RT.normalise(q)
        mu_ = RT.draw_centroids_from_data(np.random.default_rng(1), qn_, config["centroids"].shape[-2])
        for _ in range(10):
            mu_ = RT.update_centroids(mu_, qn_, qn_, decay=0.5)
        config["centroids"] = mu_
    out, cache = spec.forward(**inputs, **config)
    W = np.asarray(spec.weights(cache))[0, 0]
    kept = (P * (W != 0)).sum(-1).mean()
    overlap = np.minimum(P, np.clip(W, 0, None)).sum(-1).mean()
    rows.append((name, kept, overlap, (W != 0).sum(-1).mean()))
print(f"{'mechanism':20s} {'true mass kept':>15s} {'overlap with P':>15s} {'keys per query':>15s} {'random support':>15s}")
for name, kept, overlap, nnz in rows:   # random support: the mass a random set of the same size would keep, nnz / N
    print(f"{name:20s} {kept:15.3f} {overlap:15.3f} {nnz:15.1f} {nnz / N:15.3f}")

# %% [markdown]
# **Cost against N** (forward + backward, one head, $d = 64$, float32; time and peak memory as `tracemalloc` sees
# them), with the exponent of a log-log fit. The machine is shared and small sizes are dominated by fixed costs: read
# the exponents and the ratio to `full`, not the absolute times. `python -m effattn bench` runs the full measurement.

# %%
from effattn.tools.bench import fit_exponent, measure

ns = [512, 1024, 2048, 4096]
cost = {}
for name in ["full", "reformer", "routing"] + [n for n in ("sinkhorn",) if n in effattn.names()]:
    cost[name] = [measure(effattn.get(name), n, d=64, repeats=2) for n in ns]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for name, rs in cost.items():
    te = fit_exponent(ns, [r["time_s"] for r in rs]); me = fit_exponent(ns, [r["peak_bytes"] for r in rs])
    axes[0].loglog(ns, [r["time_s"] for r in rs], "o-", label=f"{name}  N^{te:.2f}")
    axes[1].loglog(ns, [r["peak_bytes"] / 2**20 for r in rs], "o-", label=f"{name}  N^{me:.2f}")
    print(f"{name:10s} {effattn.get(name).complexity:14s} time ~ N^{te:.2f}  memory ~ N^{me:.2f}  "
          f"time / full at N={ns[-1]}: {rs[-1]['time_s'] / cost['full'][-1]['time_s']:.2f}")
axes[0].set_title("time (s)"); axes[1].set_title("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("N"); ax.grid(alpha=0.3, which="both"); ax.legend(fontsize=7)
plt.tight_layout(); plt.show()
assert fit_exponent(ns, [r["peak_bytes"] for r in cost["reformer"]]) < 1.3

# %% [markdown]
# ### What to remember
#
# * **Reformer** hashes directions with random rotations, sorts, and attends within chunks: O(N log N) for the sort,
#   O(N c) for the attention. Shared QK puts a token's query and key in the same bucket; a token attends to itself only
#   when nothing else is visible. Several rounds raise recall; with the duplicate correction the rounds combine to
#   exactly softmax over the union of the windows.
# * **Routing** clusters layer-normalised queries and keys with online k-means and attends within balanced clusters of
#   w = N/c members: O(N √N) with c = √N. The centroids are state updated by an exponential moving average, not by
#   gradients.
# * Both are exact given their discrete choices, which are held fixed in the backward pass. Both need care to be
#   *strictly* causal: a global sort or a global top-w lets later tokens decide what earlier ones see.
#
# ### Exercises
#
# 1. Reformer: plot the recall of the true top-8 keys against the number of buckets for a fixed chunk length. Why does
#    recall fall when buckets are much smaller than a chunk? (Hint: chunks then mix unrelated buckets.)
# 2. Compare `dedupe=True` with `dedupe=False` (HuggingFace's convention) for 4 rounds: how far apart are the outputs,
#    and which keys get more weight without the correction?
# 3. Routing: replace the balanced top-w rule by nearest-centroid assignment (`selection="recent"` with a large
#    window). What happens to the cost when one cluster attracts most tokens?
# 4. Show that Reformer's paper-style causal chunking (`chunking="sorted"`) leaks: find the smallest N for which a
#    change in token N−1 alters an earlier output.
# 5. Learned patterns versus `local`: generate data where similar tokens are far apart (a shuffled sequence). Which
#    mechanism keeps more of the true attention mass now?
