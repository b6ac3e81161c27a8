# %% [markdown]
# ## 1 · Reformer: LSH attention
#
# **Angular LSH.** Draw a random matrix $R \in \mathbb{R}^{d\times b/2}$ and hash a vector by the largest of its $b$
# signed projections:
#
# $$h(x) = \arg\max\,[\,xR\,;\,-xR\,] \in \{0,\dots,b-1\}.$$
#
# The hash depends only on the direction of $x$ ($h(2x) = h(x)$), and nearby directions collide with high probability.
# In two dimensions each bucket is a **sector** of the circle. Bucket $l$ belongs to the signed direction $\pm r_l$
# (a column of $R$ or its opposite): it is the set of directions $x$ whose largest signed projection is the one on
# $\pm r_l$. A sector's edges lie where two signed projections tie, $x\cdot(r_a - r_b) = 0$: between the arrows
# below (the $b$ signed directions), not on them. The columns of $R$ are random, with random lengths, so the sectors
# are of unequal size and not centred on their arrows: $x = \hat r_l$ is where $x\cdot r_l$ is largest, but a
# longer neighbour $r_m$ can still win there, so a short column's arrow may point into another bucket's sector (the
# printed check below finds such cases), and its own sector can be small or even empty. The hash and the sorted layout live in
# `effattn/nn/lsh.py` (`lsh.hash_buckets`, `lsh.lsh_layout`); the attention in `effattn/attention/reformer.py`:

# %%
show_source(lsh.hash_buckets, "xr = x[", "parts.append")

# %%
from matplotlib.colors import BoundaryNorm, ListedColormap

rng = np.random.default_rng(0)
n_buckets = 6
bucket_cmap = ListedColormap(plt.get_cmap("tab10").colors[:n_buckets])     # exactly one colour per bucket
bucket_norm = BoundaryNorm(np.arange(n_buckets + 1) - 0.5, n_buckets)
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
angles = np.linspace(0, 2 * np.pi, 1441)[:-1]
circle = np.stack([np.cos(angles), np.sin(angles)], -1)               # (1440, 2) dense points on the circle
pts = rng.standard_normal((30, 2))
u = pts / np.linalg.norm(pts, axis=-1, keepdims=True)
for r, ax in enumerate(axes):
    rot = RF.draw_rotations(rng, 2, n_buckets, 1)                       # (1 round, d=2, b/2=3)
    hb = lsh.hash_buckets(circle, rot)[0]                               # bucket of every angle
    hp = lsh.hash_buckets(pts, rot)[0]
    ax.scatter(circle[:, 0], circle[:, 1], c=hb, cmap=bucket_cmap, norm=bucket_norm, s=6)
    for t in np.nonzero(hb != np.roll(hb, 1))[0]:                       # sector edges: where the bucket changes
        ax.plot([0, 1.08 * circle[t, 0]], [0, 1.08 * circle[t, 1]], color="#777", lw=0.7, ls=":")
    ax.scatter(0.6 * u[:, 0], 0.6 * u[:, 1], c=hp, cmap=bucket_cmap, norm=bucket_norm, s=25, edgecolor="k", lw=0.4)
    signed = np.concatenate([rot[0].T, -rot[0].T])                      # (b, 2): +r_l is bucket l, -r_l is l + b/2
    for l, a in enumerate(signed):
        a = 0.95 * a / np.linalg.norm(a)
        ax.annotate("", xy=a, xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=bucket_cmap(l), lw=1.8))
    ax.set_aspect("equal"); ax.axis("off"); ax.set_xlim(-1.15, 1.15); ax.set_ylim(-1.15, 1.15)
    ax.set_title(f"round {r}: {len(np.unique(hb))} non-empty of {n_buckets} buckets", fontsize=10)
fig.colorbar(plt.cm.ScalarMappable(norm=bucket_norm, cmap=bucket_cmap), ax=axes, ticks=range(n_buckets),
             fraction=0.02, label="bucket")
plt.suptitle("Angular LSH in 2-D: arrows = the signed directions ±r_l (coloured by their bucket l); dotted = sector "
             "edges; inner dots = tokens", fontsize=10)
plt.show()
assert np.array_equal(lsh.hash_buckets(pts, rot), lsh.hash_buckets(5 * pts, rot))   # h(5x) == h(x)
inside = lsh.hash_buckets(signed, rot)[0] == np.arange(n_buckets)
print("last round: does the signed direction +-r_l hash to its own bucket l?", inside.tolist())

# %% [markdown]
# **Shared QK, sort, chunk.** The paper ties keys to queries, $k_j = q_j/\lVert q_j\rVert$, so a token's query and key
# fall in the same bucket. Sort the tokens by (bucket, position), cut the sorted sequence into chunks of length $c$ and
# let each chunk attend to itself and the previous chunk:
#
# $$\tilde P_i = \{\, j : \lfloor s_i/c\rfloor - 1 \le \lfloor s_j/c\rfloor \le \lfloor s_i/c\rfloor \,\},\qquad
#   o_i = \sum_{j\in\tilde P_i} \operatorname{softmax}_j\big(q_i\cdot k_j - m_{ij}\big)\, v_j .$$
#
# $m_{ij} = \infty$ outside the window (or for $j>i$ when causal) and $10^5$ for $j = i$: since $q_i\cdot k_i$ is almost
# always the largest dot product, a token attends to itself only when nothing else is visible.
#
# In `effattn`, `reformer.forward(q, k, v, rotations=..., chunk_size=c)` hashes `k` (the shared-QK source) and uses
# $\hat k = k/\lVert k\rVert$ as keys; pass `k = q` for the paper's layer. Every token's bucket, per round:

# %%
N, d, c = 64, 16, 8
centres = rng.standard_normal((6, d)) * 2
x = centres[rng.integers(0, 6, N)] + 0.6 * rng.standard_normal((N, d))   # tokens with some cluster structure
q = x[None, None]; v = rng.standard_normal((1, 1, N, d))
rot = RF.draw_rotations(rng, d, 8, 4)                                   # 4 rounds, 8 buckets
out, cache = RF.forward(q, q, v, rotations=rot, chunk_size=c)
print("out", out.shape, " buckets", cache.buckets.shape, " slots per round", cache.slot_token.shape[-1])
assert out.shape == (1, 1, N, d) and cache.buckets.shape == (1, 1, 4, N)
n_b = 2 * rot.shape[-1]                                                # 8 buckets
cmap8 = ListedColormap(plt.get_cmap("tab10").colors[:n_b]); norm8 = BoundaryNorm(np.arange(n_b + 1) - 0.5, n_b)
by_bucket = np.lexsort((np.arange(N), cache.buckets[0, 0, 0]))         # tokens sorted by (round-0 bucket, position)
fig, axes = plt.subplots(1, 2, figsize=(12, 2.6))
for ax, order_, xlabel in ((axes[0], np.arange(N), "token position"),
                           (axes[1], by_bucket, "tokens sorted by their round-0 bucket")):
    im = ax.imshow(cache.buckets[0, 0][:, order_], aspect="auto", cmap=cmap8, norm=norm8, interpolation="nearest")
    ax.set_xlabel(xlabel); ax.set_ylabel("hash round"); ax.set_yticks(range(rot.shape[0]))
fig.colorbar(im, ax=axes, ticks=range(n_b), fraction=0.03, label="bucket")
axes[0].set_title("bucket of every token in each of 4 rounds", fontsize=10)
axes[1].set_title("sorted by round-0 bucket: the same tokens tend to share later buckets too", fontsize=10)
plt.show()
same = cache.buckets[0, 0, 0][:, None] == cache.buckets[0, 0, 0][None, :]            # pairs sharing round 0
agree = [(cache.buckets[0, 0, r][:, None] == cache.buckets[0, 0, r][None, :])[same & ~np.eye(N, dtype=bool)].mean()
         for r in range(1, rot.shape[0])]
print("pairs that share a round-0 bucket share the bucket of round 1, 2, 3 in", [f"{a:.0%}" for a in agree],
      f"of cases (a random pair: {1 / n_b:.0%})")

# %% [markdown]
# **Before and after un-sorting.** In sorted order the pattern is a simple band of chunk blocks (each chunk sees itself
# and its predecessor, minus the diagonal); mapped back to the original positions it is scattered, content-based.
# With one round and fixed hashes the kernel equals dense attention masked by this pattern — checked here against
# `full` with the pattern as a mask, and against the registry's independent loop-built reference:

# %%
out1, c1 = RF.forward(q, q, v, rotations=rot[:1], chunk_size=c)
W1 = RF.weights(c1)[0, 0]
order = c1.slot_token[0, 0, 0]
order = order[order < N]
fig = plot_patterns([W1[np.ix_(order, order)] > 0, W1 > 0], ["sorted by (bucket, position)", "un-sorted"],
                    suptitle="one round: the chunked pattern before and after un-sorting", grid=None)
plt.show()
khat = q / np.sqrt((q * q).mean(-1, keepdims=True) + 1e-6) / np.sqrt(d)   # unit keys (HF's _len_and_dim_norm, eps 1e-6)
ref, _ = effattn.get("full").forward(q, khat, v, mask=RF.pattern(c1), scale=1.0)
assert np.allclose(out1, ref, atol=1e-10)
assert np.allclose(out1, RF.reference(q, q, v, rotations=rot[:1], chunk_size=c), atol=1e-10)
print("1 round == full attention masked by the induced pattern")

# %% [markdown]
# **Several rounds.** Each round $r$ gives an output $o_i^{(r)}$ and the log-sum-exp $z(i, P_i^{(r)})$ of its logits;
# the rounds are combined as $o_i = \sum_r \exp\big(z(i,P_i^{(r)}) - z(i,P_i)\big)\,o_i^{(r)}$. A key seen in
# $N_{ij}$ rounds would be counted $N_{ij}$ times, so the paper subtracts $\log N_{ij}$ from its logit. With that
# correction the result is exactly softmax attention over the **union** of the rounds' windows (HuggingFace and trax
# omit the correction: `dedupe=False`). The kernel's backward holds buckets fixed; the gradient check:

# %%
qs, ks, vs = (rng.standard_normal((1, 2, 13, 3)) for _ in range(3))
rot_s = RF.draw_rotations(rng, 3, 4, 3, heads=2)
for causal in (False, True):
    errs = check_gradients(RF.forward, RF.backward, {"q": qs, "k": ks, "v": vs},
                           {"rotations": rot_s, "chunk_size": 3, "causal": causal})
    print("causal" if causal else "bidirectional", {k_: f"{e:.1e}" for k_, e in errs.items()})
    assert max(errs.values()) < 1e-6
out4, c4 = RF.forward(q, q, v, rotations=rot, chunk_size=c)
assert np.allclose(out4, RF.reference(q, q, v, rotations=rot, chunk_size=c), atol=1e-10)
print("4 rounds with the duplicate correction == dense attention over the union of windows")

# %% [markdown]
# **How often does a query find its true nearest keys?** For each query, take its top-8 keys under the true (dense)
# attention and count how many of them are inside the union of its windows, for 1 to 8 rounds. More rounds raise the
# recall, at proportional cost.

# %%
Nr, dr, cr, topk = 512, 32, 16, 8
centres = rng.standard_normal((24, dr)) * 1.5
xr = centres[rng.integers(0, 24, Nr)] + rng.standard_normal((Nr, dr))
qr = xr[None, None]; vr = rng.standard_normal((1, 1, Nr, dr))
kr = qr / np.linalg.norm(qr, axis=-1, keepdims=True)
S = (qr @ kr.swapaxes(-1, -2))[0, 0]
np.fill_diagonal(S, -np.inf)
true_top = np.argsort(-S, axis=-1)[:, :topk]                           # (N, 8) true nearest keys
rounds_list = [1, 2, 4, 8]
recall = []
rot8 = RF.draw_rotations(rng, dr, 2 * (Nr // (2 * cr)), 8)
for nr in rounds_list:
    _, cc = RF.forward(qr, qr, vr, rotations=rot8[:nr], chunk_size=cr)
    pat = RF.pattern(cc)[0, 0]
    recall.append(np.take_along_axis(pat, true_top, axis=-1).mean())
plt.figure(figsize=(4.5, 3.2))
plt.plot(rounds_list, recall, "o-"); plt.xscale("log", base=2); plt.ylim(0, 1)
plt.xlabel("hash rounds"); plt.ylabel(f"share of true top-{topk} keys seen"); plt.grid(alpha=0.3)
plt.title(f"N={Nr}, c={cr}, {rot8.shape[-1] * 2} buckets"); plt.show()
print({r: round(float(x_), 3) for r, x_ in zip(rounds_list, recall)})
assert recall[-1] > recall[0]

# %% [markdown]
# **Causality, strictly.** With a causal mask the paper's chunks still depend on *later* tokens: how many later tokens
# hash to lower buckets decides where an early token's chunk boundary falls, so outputs before position $t$ can change
# when tokens after $t$ change — training then differs from incremental decoding. `effattn` therefore defaults to
# `chunking="bucket"` when `causal=True`: every bucket is chunked on its own and a token's window depends only on earlier
# tokens. `chunking="sorted"` is the paper's layout: chunks of the one global sort, as HuggingFace and trax chunk it
# too. It is not HuggingFace's computation to the bit: HuggingFace also lets the first chunk look back at the *last*
# chunk (a wrap-around of the sorted sequence), which `effattn` leaves out; the two agree only where the wrap-around
# cannot matter (see the peer mapping in the module docstring of `effattn/attention/reformer.py`).

# %%
qc, kc, vc = (rng.standard_normal((1, 4, 24, 4)) for _ in range(3))
rc = RF.draw_rotations(rng, 4, 4, 1, heads=4)
kc2 = kc.copy(); kc2[..., 12:, :] = rng.standard_normal(kc2[..., 12:, :].shape)
for chunking in ("sorted", "bucket"):
    a_, _ = RF.forward(qc, kc, vc, rotations=rc, chunk_size=3, causal=True, chunking=chunking)
    b_, _ = RF.forward(qc, kc2, vc, rotations=rc, chunk_size=3, causal=True, chunking=chunking)
    print(f"{chunking:7s}: outputs before t=12 unchanged when tokens >= 12 change: {np.array_equal(a_[..., :12, :], b_[..., :12, :])}")
