# %% [markdown]
# ## Summary: how much of the true attention does each learned pattern keep, and at what cost?
#
# For the same clustered $q = k$ and $v$, the share of the **true** softmax attention mass
# $P = \operatorname{softmax}(qk^\top/\sqrt d)$ over the other tokens ($j \ne i$) that falls inside each mechanism's support, and the overlap
# $\sum_j \min(P_{ij}, W_{ij})$ of its effective matrix $W$ with $P$ (1 = identical rows), averaged over queries.
# `local` (a fixed window) is the baseline a learned pattern must beat; the last column is the mass a *random* support
# of the same size would keep on average, so a content-based pattern should beat it by a wide margin.
#
# Sinkhorn (soft $P$) and the Synthesizers have a **dense** support — every key has some weight — so "true mass kept"
# is 1 for them by construction and says nothing: the table prints "dense" there, and only the overlap with $P$ is a
# measurement. Their parameters are random here, untrained: they show the mechanism's shape, not a trained model's
# quality (a trained Sinkhorn concentrates its $P$, a trained Synthesizer learns a pattern, sections above).

# %%
rng = np.random.default_rng(7)
N, d = 256, 16
centres = rng.standard_normal((16, d)) * 2
xs = centres[rng.integers(0, 16, N)] + rng.standard_normal((N, d))
q = xs[None, None]; k = q.copy(); v = rng.standard_normal((1, 1, N, d))
# true attention to the *other* tokens (shared QK makes q_i . k_i the largest logit; Reformer excludes it by design)
P = effattn.get("full").weights(effattn.get("full").forward(q, k, v, mask=~np.eye(N, dtype=bool))[1])[0, 0]
names = ["local", "reformer", "routing", "sinkhorn", "synthesizer_dense", "synthesizer_random"]
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
    dense_support = nnz == N
    print(f"{name:20s} {'dense' if dense_support else f'{kept:.3f}':>15s} {overlap:15.3f} {nnz:15.1f} "
          f"{'-' if dense_support else f'{nnz / N:.3f}':>15s}")
table = {name: (kept, overlap, nnz) for name, kept, overlap, nnz in rows}
for name in ("reformer", "routing"):        # content-based supports beat a random support of their size
    assert table[name][0] > 2 * table[name][2] / N, (name, table[name])

# %% [markdown]
# **Cost against N** (forward + backward, one head, $d = 64$, float32), with `effattn.tools.bench.cost_table`, the one
# measuring helper of every notebook: the process's CPU time on one BLAS thread, the median of three runs, and the
# peak memory that `tracemalloc` sees. The exponent is the slope of a least-squares line on log-log axes; each has an
# asserted sanity range, wide enough for a busy two-core machine and narrow enough to catch a wrong complexity
# (full attention measured as $N^{0.5}$, or Reformer as $N^2$, fails the cell). `python -m effattn bench --clock cpu
# --threads 1` runs the same measurement up to $N = 16384$.

# %%
from effattn.tools.bench import cost_table

ns = [512, 1024, 2048, 4096]
names_lp = ["full", "reformer", "routing", "sinkhorn", "synthesizer_dense", "synthesizer_random"]
expect = {"full": (1.4, 2.6), "reformer": (0.8, 1.5), "routing": (0.5, 1.8), "sinkhorn": (0.6, 1.8),
          "synthesizer_dense": (1.5, 2.4), "synthesizer_random": (1.5, 2.4)}
expect_memory = {"full": (1.6, 2.2), "reformer": (0.8, 1.25), "routing": (0.8, 1.6), "sinkhorn": (0.8, 1.6),
                 "synthesizer_dense": (1.5, 2.2), "synthesizer_random": (1.5, 2.2)}
cost, exps = cost_table(names_lp, ns, expect=expect, expect_memory=expect_memory)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for (name, rs), marker in zip(cost.items(), "osd^v<"):
    style = dict(color="k", lw=2.2) if name == "full" else dict(lw=1.2, ls="--" if name.startswith("synth") else "-")
    axes[0].loglog(ns, [r["time_s"] for r in rs], marker=marker, ms=4, label=f"{name} ~N^{exps[name]['time']:.2f}", **style)
    axes[1].loglog(ns, [r["peak_bytes"] / 2**20 for r in rs], marker=marker, ms=4,
                   label=f"{name} ~N^{exps[name]['memory']:.2f}", **style)
axes[0].set_title("forward + backward CPU time (s)"); axes[1].set_title("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("N"); ax.grid(alpha=0.3, which="both"); ax.legend(fontsize=7, loc="upper left")
plt.tight_layout(); plt.show()

# %% [markdown]
# Reformer and Routing grow about linearly at these sizes: Reformer's $\log N$ is the sort, cheap next to the chunked
# attention, and Routing's $N\sqrt N$ term (each of $\sqrt N$ clusters attends $w^2 = N$ pairs) is not yet larger than
# the $O(Nd)$ work of its layer norms and gathers while $w = \sqrt N \le d = 64$. Sinkhorn, with its default block
# $b = \sqrt{N/2}$, is the $N^{1.5}$ of its flop model asymptotically; here fixed per-call costs pull the fit lower. The
# Synthesizers are as quadratic as full attention (dashed lines): they change what the logits are, not how many.

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
