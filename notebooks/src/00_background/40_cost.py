# %% [markdown]
# ## 4 · The quadratic cost, measured
#
# Forward + backward of one head in float32 with $d = 64$: the time and the peak memory (what `tracemalloc` sees NumPy
# allocate) against $N$, with the exponent of a least-squares fit on log-log axes. The survey's complexity is
# $O(N^2)$; the fitted exponents should approach 2 as the N x N work dominates (at small N the O(N d) parts still show).
# `python -m effattn bench` makes the same measurement for every mechanism.

# %%
from effattn.tools.bench import fit_exponent, measure

ns = [256, 512, 1024, 2048]
rows = [measure(full, n, d=64, repeats=2) for n in ns]
t_exp = fit_exponent(ns, [r["time_s"] for r in rows])
m_exp = fit_exponent(ns, [r["peak_bytes"] for r in rows])
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].loglog(ns, [r["time_s"] for r in rows], "o-"); axes[0].set_title(f"time ~ N^{t_exp:.2f}")
axes[1].loglog(ns, [r["peak_bytes"] / 2**20 for r in rows], "o-"); axes[1].set_title(f"peak memory (MiB) ~ N^{m_exp:.2f}")
for ax in axes:
    ax.set_xlabel("N"); ax.grid(alpha=0.3)
plt.tight_layout(); plt.show()
print(f"fitted exponents: time {t_exp:.2f}, memory {m_exp:.2f}")
assert m_exp > 1.6  # the N x N matrices dominate memory

# %% [markdown]
# **Where the FLOPs go in a Transformer layer.** Per token, the projections $W_q, W_k, W_v, W_o$ cost $8D^2$ flops
# (multiply-add = 2), the feed-forward layer with inner size $4D$ costs $16D^2$, and attention's $QK^\top$ and $PV$ cost
# $4ND$. Attention overtakes the rest only once $4ND > 24D^2$, i.e. $N > 6D$: for BERT-base ($D=768$) that is beyond
# 4,600 tokens — which is why efficient attention matters for long sequences, and why the survey (Section 2.3) notes that
# for short inputs the feed-forward layers dominate.

# %%
D = 768
for n_ in (512, 4608, 16384):
    proj, ffn, attn = 8 * D * D, 16 * D * D, 4 * n_ * D
    total = proj + ffn + attn
    print(f"N={n_:6d}: projections {proj / total:5.1%}  feed-forward {ffn / total:5.1%}  attention {attn / total:5.1%}")
