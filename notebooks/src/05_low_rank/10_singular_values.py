# %% [markdown]
# ## 1 · Attention matrices are approximately low rank
#
# Linformer's Figure 1 shows the normalised cumulative singular values of RoBERTa's attention matrices: the first
# 128 of 512 hold about 90 % of the spectrum. This repository ships no pretrained weights, so we look at attention
# matrices with the same kinds of structure: **content** attention of smoothly varying token vectors, **positional**
# attention computed from sinusoidal position encodings (what the first layer of a Transformer sees before content
# matters), and, for contrast, random i.i.d. vectors at two temperatures (no structure at all: high rank at either
# temperature).
#
# $$P = U \Sigma V^\top,\qquad \text{energy}(k) = \frac{\sum_{i\le k}\sigma_i}{\sum_i \sigma_i}$$
#
# By Eckart–Young, the best rank-k approximation is $U_k \Sigma_k V_k^\top$ with spectral error $\sigma_{k+1}$: a
# fast-decaying spectrum is what makes the low-rank family work.

# %%
from effattn.nn.functional import sinusoidal_positions

rng = np.random.default_rng(0)
n, d = 256, 64
cases = {}
q, k = smooth_qk(rng, n, d)
cases["content (smooth tokens)"] = softmax_matrix(q, k)[0, 0]
pos = to_numpy(sinusoidal_positions(n, d, np))[None, None] * 0.5
cases["positional (sinusoidal)"] = softmax_matrix(pos, pos)[0, 0]
cases["positional, encodings x2"] = softmax_matrix(4 * pos, 4 * pos)[0, 0]     # the same, 16x sharper logits
for temp in (1.0, 3.0):
    qr, kr = (rng.standard_normal((1, 1, n, d)) * temp ** 0.5 for _ in range(2))
    cases[f"random, logits x{temp:g}"] = softmax_matrix(qr, kr)[0, 0]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for name, p in cases.items():
    s = np.linalg.svd(p, compute_uv=False)
    energy = np.cumsum(s) / s.sum()
    axes[0].semilogy(s / s[0], label=name)
    axes[1].plot(energy, label=name)
    print(f"{name:28s} k for 90% energy: {int(np.searchsorted(energy, 0.9)) + 1:4d} of {n}   sigma_1 = {s[0]:.2f}")
    assert s[0] >= 1 - 1e-9 and s[0] <= math.sqrt(n)      # P 1 = 1 gives sigma_1 >= 1; ||P||_2 <= sqrt(||P||_1 ||P||_inf)
axes[0].set_title("singular values / largest"); axes[0].set_xlabel("index")
axes[1].set_title("normalised cumulative sum"); axes[1].set_xlabel("k"); axes[1].axhline(0.9, color="k", lw=0.5)
axes[1].legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# Structured attention (content that varies smoothly, smooth positional patterns) concentrates in a few dozen
# directions; random attention does not. (With the positional encodings scaled by 2 instead of 0.5 the positional
# attention sharpens into a near-diagonal band that needs about seven times as many directions: sharp, local attention
# is *not* low rank — the fixed-pattern family of notebook 01 handles that case.) Low-rank methods bet on the first kind. The two random
# cases need about the same number of directions at both temperatures (the printed counts): without structure,
# sharper logits neither help nor hurt much.
#
# **The first singular value is at least 1, not about 1.** A row-stochastic matrix maps the all-ones vector to itself
# ($P\mathbf 1 = \mathbf 1$), so $\sigma_1 = \lVert P\rVert_2 \ge \lVert P\mathbf 1\rVert / \lVert\mathbf 1\rVert = 1$;
# and $\lVert P\rVert_2 \le \sqrt{\lVert P\rVert_1 \lVert P\rVert_\infty} = \sqrt{\max_j \sum_i P_{ij}} \le \sqrt N$. It equals 1
# exactly when the columns sum to one too (a doubly stochastic $P$); when many queries pile their weight on the same
# few keys, $\sigma_1$ grows: the content case prints about 3, while the symmetric positional cases (nearly doubly
# stochastic) stay at 1.00.
#
# The best rank-k error in practice, for the content case:

# %%
p = cases["content (smooth tokens)"]
u, s, vt = np.linalg.svd(p)
for kk in (4, 16, 64):
    pk = (u[:, :kk] * s[:kk]) @ vt[:kk]
    print(f"rank {kk:3d}: mean row L1 error {np.abs(pk - p).sum(-1).mean():.3f}")
